"""CIRCO in its official layout (miccunifi/CIRCO), read as SEARLE reads it: val/test only, many targets."""

from __future__ import annotations

from pathlib import Path

from cirlab.data.records import CIRQuery, EvalSet, Protocol
from cirlab.data.sources.base import CIRSource
from cirlab.data.sources.common import check_targets, read_records
from cirlab.data.sources.submission import RankedNames, write_circo_submission
from cirlab.errors import CirlabError
from cirlab.io import read_json

LAYOUT = """  <root>/                         (e.g. CIRCO/)
    annotations/val.json, annotations/test.json
    COCO2017_unlabeled/
      annotations/image_info_unlabeled2017.json
      unlabeled2017/000000271520.jpg ...     (COCO id zero-padded to 12 digits)"""


def image_name(coco_id: int) -> str:
    """Records name CIRCO images by their zero-padded COCO id, as the file names do."""
    return f"{int(coco_id):012d}"


class CIRCOSource(CIRSource):
    name = "circo"
    layout = LAYOUT
    readme_section = "CIRCO"
    protocol = Protocol(
        recall_ks=(5, 10, 25, 50), map_ks=(5, 10, 25, 50), exclude_reference=False, main_metric="map_at_10"
    )

    def __init__(self, root: str | Path):
        self.root = self.require_dir(Path(root), "dataset root")
        self.info_file = self.root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
        self._files: dict[str, str] | None = None
        self._concepts: dict[str, dict[str, str]] = {}

    def gallery_files(self) -> dict[str, str]:
        """name -> file name for all COCO unlabeled2017 images (the gallery of val and test; read once)."""
        if self._files is None:
            info = read_json(self.require_file(self.info_file, "COCO unlabeled2017 image info"))
            if not isinstance(info, dict) or not isinstance(info.get("images"), list):
                raise CirlabError(
                    f"{self.info_file}: expected a COCO image-info object with an 'images' list"
                )
            self._files = {image_name(im["id"]): im["file_name"] for im in info["images"]}
        return self._files

    def image_path(self, name: str) -> Path:
        file_name = self.gallery_files().get(name, f"{name}.jpg")
        return self.root / "COCO2017_unlabeled" / "unlabeled2017" / file_name

    def queries(self, split: str) -> list[CIRQuery]:
        if split not in ("val", "test"):
            raise CirlabError(f"circo: unknown split {split!r}; use val or test")
        path = self.require_file(self.root / "annotations" / f"{split}.json", f"{split} annotations")
        keys = ("id", "reference_img_id", "relative_caption", "shared_concept")
        rows = read_records(path, keys + (() if split == "test" else ("gt_img_ids",)))
        self._concepts[split] = {str(r["id"]): r["shared_concept"] for r in rows}
        return [
            CIRQuery(
                qid=str(r["id"]),
                reference=image_name(r["reference_img_id"]),
                captions=(r["relative_caption"],),
                targets=tuple(image_name(i) for i in r.get("gt_img_ids", ())),
            )
            for r in rows
        ]

    def shared_concepts(self, split: str) -> dict[str, str]:
        """qid -> shared_concept (used by some zero-shot prompts; not by SEARLE)."""
        if split not in self._concepts:
            self.queries(split)
        return self._concepts[split]

    def train_queries(self) -> list[CIRQuery]:
        raise CirlabError(
            "CIRCO has no training split (only val and test); train on another dataset "
            "or use a zero-shot method"
        )

    def eval_sets(self, split: str) -> list[EvalSet]:
        queries = self.queries(split)
        gallery = list(self.gallery_files())
        check_targets(self.name, split, queries, gallery, self.info_file)
        return [EvalSet(queries=queries, gallery=gallery)]

    def has_answers(self, split: str) -> bool:
        return split != "test"

    def write_submission(
        self, folder: Path, split: str, predictions: RankedNames, subset_predictions: RankedNames
    ) -> list[Path]:
        return write_circo_submission(folder, split, predictions)
