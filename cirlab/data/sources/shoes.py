"""Shoes relative captions (XiaoxiaoGuo/fashion-retrieval dataset/), split as MLCL and the CIR papers do."""
from __future__ import annotations

from pathlib import Path

from cirlab.data.records import CIRQuery, EvalSet, Protocol
from cirlab.data.sources.base import CIRSource
from cirlab.data.sources.common import read_records
from cirlab.errors import CirlabError

LAYOUT = """  <root>/
    relative_captions_shoes.json
    train_im_names.txt, eval_im_names.txt
    images/womens_<category>/.../img_womens_<category>_<n>.jpg   (any depth; found by file name)"""

LISTS = {"train": "train_im_names.txt", "val": "eval_im_names.txt", "test": "eval_im_names.txt"}


class ShoesSource(CIRSource):
    name = "shoes"
    layout = LAYOUT
    readme_section = "Shoes"
    protocol = Protocol(recall_ks=(1, 10, 50), exclude_reference=True, main_metric="mean_recall")

    def __init__(self, root: str | Path):
        self.root = self.require_dir(Path(root), "dataset root")
        self._index: dict[str, Path] | None = None

    def image_path(self, name: str) -> Path:
        """The zip nests images by category at varying depth, so index images/ by file name once.
        Duplicate file names resolve to the first path in sorted order (stable across machines)."""
        if self._index is None:
            images = self.require_dir(self.root / "images", "images")
            index: dict[str, Path] = {}
            for path in sorted(p for p in images.rglob("*") if p.is_file()):
                index.setdefault(path.name, path)
            self._index = index
        return self._index.get(name, self.root / "images" / name)

    def image_names(self, split: str) -> list[str]:
        if split not in LISTS:
            raise CirlabError(f"shoes: unknown split {split!r}; use train, val or test (val and test are both eval)")
        path = self.require_file(self.root / LISTS[split], f"{split} image list")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]

    def queries(self, split: str) -> list[CIRQuery]:
        """Triplets whose two images are both in the split's list (no triplet is mixed in the real data)."""
        names = set(self.image_names(split))
        path = self.require_file(self.root / "relative_captions_shoes.json", "relative captions")
        rows = read_records(path, ("ImageName", "ReferenceImageName", "RelativeCaption"))
        rows = [r for r in rows if r["ImageName"] in names and r["ReferenceImageName"] in names]
        return [CIRQuery(qid=str(i), reference=r["ReferenceImageName"], captions=(r["RelativeCaption"],),
                         targets=(r["ImageName"],)) for i, r in enumerate(rows)]

    def train_queries(self) -> list[CIRQuery]:
        return self.queries("train")

    def eval_sets(self, split: str) -> list[EvalSet]:
        # Targets are in the gallery by construction: queries keep only triplets inside the list.
        return [EvalSet(queries=self.queries(split), gallery=self.image_names(split))]
