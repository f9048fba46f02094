"""CIRR rc2 in its official layout (Cuberick-Orion/CIRR, branch cirr_dataset) or the one CLIP4Cir and SEARLE
use (images beside cirr/), read as CLIP4Cir reads it."""

from __future__ import annotations

from pathlib import Path

from cirlab.data.records import CIRQuery, EvalSet, Protocol
from cirlab.data.sources.base import CIRSource
from cirlab.data.sources.common import check_targets, read_records
from cirlab.data.sources.submission import RankedNames, write_cirr_submission
from cirlab.errors import CirlabError
from cirlab.io import read_json

SPLITS = {"train": "train", "val": "val", "test": "test1", "test1": "test1"}
IMAGE_DIRS = ("train", "dev", "test1")  # the split files' paths start with one of these
SEED = "CLIP4Cir/SEARLE layout"
OFFICIAL = "official cirr_dataset layout"

LAYOUT = """  either the CLIP4Cir/SEARLE layout, dataset.root=CIRR (or cirr_dataset):
    CIRR/
      cirr/captions/cap.rc2.<split>.json           split: train, val, test1
      cirr/image_splits/split.rc2.<split>.json     {"<name>": "./train/<k>/<name>.png", ...}
      train/<0..99>/<name>.png, dev/<name>.png, test1/<name>.png
  or the official layout (Cuberick-Orion/CIRR, cirr_dataset branch), dataset.root=cirr:
    cirr/
      captions/cap.rc2.<split>.json
      image_splits/split.rc2.<split>.json
      img_raw/train/<0..99>/<name>.png, img_raw/dev/<name>.png, img_raw/test1/<name>.png
  The split files' paths are relative to the image folder (CIRR/, or cirr/img_raw/);
  dataset.image_root=DIR names it when the images are elsewhere."""


def _has_annotations(folder: Path) -> bool:
    return (folder / "captions").is_dir() or (folder / "image_splits").is_dir()


class CIRRSource(CIRSource):
    name = "cirr"
    layout = LAYOUT
    readme_section = "CIRR"
    protocol = Protocol(
        recall_ks=(1, 5, 10, 50),
        subset_ks=(1, 2, 3),
        exclude_reference=True,
        main_metric="avg_recall_at_5_subset_at_1",
    )

    def __init__(self, root: str | Path, image_root: str | Path | None = None):
        """Either layout from `root` alone: the READMEs of CLIP4Cir/SEARLE and of CIRR name different
        folders, and users type the one they unpacked. `image_root` (optional) overrides the image folder."""
        root = self.require_dir(Path(root), "dataset root")
        # `root` may also be the cirr/ folder of the CLIP4Cir/SEARLE layout: its images are then beside it
        ann = root / "cirr" if _has_annotations(root / "cirr") else root if _has_annotations(root) else None
        if ann is None:
            raise CirlabError(
                f"cirr: no captions/ or image_splits/ folder in {root} or in {root / 'cirr'}: "
                f"set dataset.root to the CIRR folder.\n{self.layout_help()}"
            )
        if (ann / "img_raw").is_dir():
            layout, images = OFFICIAL, ann / "img_raw"
        elif ann != root or any((root.parent / d).is_dir() for d in IMAGE_DIRS):
            layout, images = SEED, ann.parent
        else:  # no images yet: errors name the official folder
            layout, images = OFFICIAL, ann / "img_raw"
        self.root = ann
        self.image_root = Path(image_root) if image_root is not None else images
        self.detected = f"{layout}: annotations in {ann}, images in {self.image_root}" + (
            " (dataset.image_root)" if image_root is not None else ""
        )
        self._splits: dict[str, dict[str, str]] = {}

    def split_file(self, split: str) -> dict[str, str]:
        """name -> path relative to image_root, in file order (the gallery order)."""
        split = self._official(split)
        if split not in self._splits:
            path = self.require_file(
                self.root / "image_splits" / f"split.rc2.{split}.json", f"{split} image split"
            )
            mapping = read_json(path)
            if not isinstance(mapping, dict):
                raise CirlabError(f"{path}: expected a JSON object mapping image name to path")
            self._splits[split] = mapping
        return self._splits[split]

    def image_path(self, name: str) -> Path:
        """Train images sit in numbered sub-folders that only the split file knows, so look it up."""
        for split in ("train", "val", "test1"):
            if split in self._splits or (self.root / "image_splits" / f"split.rc2.{split}.json").is_file():
                rel = self.split_file(split).get(name)
                if rel is not None:
                    path = self.image_root / rel
                    if not path.is_file():
                        absent = (
                            "" if self.image_root.is_dir() else f" (there is no folder {self.image_root})"
                        )
                        raise self.missing_image(f"image {name} not found: {path}{absent}")
                    return path
        raise CirlabError(
            f"cirr: image {name!r} is in none of the split files under {self.root / 'image_splits'}"
        )

    def queries(self, split: str) -> list[CIRQuery]:
        split = self._official(split)
        path = self.require_file(self.root / "captions" / f"cap.rc2.{split}.json", f"{split} captions")
        keys = ("pairid", "reference", "caption", "img_set") + (() if split == "test1" else ("target_hard",))
        return [
            CIRQuery(
                qid=str(r["pairid"]),
                reference=r["reference"],
                captions=(r["caption"],),
                targets=() if split == "test1" else (r["target_hard"],),
                subset=tuple(r["img_set"]["members"]),
            )
            for r in read_records(path, keys)
        ]

    def train_queries(self) -> list[CIRQuery]:
        return self.queries("train")

    def eval_sets(self, split: str) -> list[EvalSet]:
        if split not in ("val", "test", "test1"):
            raise CirlabError(f"cirr: unknown eval split {split!r}; use val or test")
        queries = self.queries(split)
        gallery = list(self.split_file(split))
        path = self.root / "image_splits" / f"split.rc2.{self._official(split)}.json"
        check_targets(self.name, split, queries, gallery, path)
        return [EvalSet(queries=queries, gallery=gallery)]

    def has_answers(self, split: str) -> bool:
        return self._official(split) != "test1"

    def write_submission(
        self, folder: Path, split: str, predictions: RankedNames, subset_predictions: RankedNames
    ) -> list[Path]:
        return write_cirr_submission(folder, split, predictions, subset_predictions)

    @staticmethod
    def _official(split: str) -> str:
        if split not in SPLITS:
            raise CirlabError(f"cirr: unknown split {split!r}; use one of {list(SPLITS)}")
        return SPLITS[split]
