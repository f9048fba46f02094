"""Shoes relative captions (XiaoxiaoGuo/fashion-retrieval dataset/), split as MLCL and the CIR papers do."""

from __future__ import annotations

import os
from pathlib import Path

from cirlab.data.records import CIRQuery, EvalSet, Protocol
from cirlab.data.sources.base import CIRSource
from cirlab.data.sources.common import read_records
from cirlab.errors import CirlabError

LAYOUT = """  <root>/                                  (e.g. shoes/)
    relative_captions_shoes.json
    train_im_names.txt, eval_im_names.txt
    the images anywhere below <root>, at any depth, found by file name; either as the
    Attribute Discovery zip unpacks:
      womens_<category>/.../img_womens_<category>_<n>.jpg
    or gathered in one folder:
      images/womens_<category>/.../img_womens_<category>_<n>.jpg"""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

LISTS = {"train": "train_im_names.txt", "val": "eval_im_names.txt", "test": "eval_im_names.txt"}


class ShoesSource(CIRSource):
    name = "shoes"
    layout = LAYOUT
    readme_section = "Shoes"
    protocol = Protocol(recall_ks=(1, 10, 50), exclude_reference=True, main_metric="mean_recall")

    def __init__(self, root: str | Path):
        self._index: dict[str, Path] | None = None  # set first: `detected` reads it in the root's error
        self._clashes: dict[str, list[Path]] = {}
        self.root = self.require_dir(Path(root), "dataset root")

    def image_path(self, name: str) -> Path:
        """The annotations name images by file name only and the zip nests them by category at varying
        depth, so every image under the root is indexed by file name once. A name found in two places
        is an error: picking one could pair a caption with the wrong picture."""
        if self._index is None:
            self._index_images()
        if name in self._clashes:
            paths = "\n".join(f"  {p}" for p in self._clashes[name])
            raise CirlabError(
                f"shoes: image file name {name} occurs more than once under {self.root}:\n{paths}\n"
                "Images are found by file name: keep one copy (or point dataset.root at one tree)."
            )
        if name not in self._index:
            none = "" if self._index else " (no .jpg/.jpeg/.png file at all there)"
            raise self.missing_image(f"image {name} not found under {self.root}{none}")
        return self._index[name]

    def _index_images(self) -> None:
        index: dict[str, Path] = {}
        seen: set[str] = set()  # real folders walked, so a symlink loop ends
        for folder, dirs, files in os.walk(self.root, followlinks=True):
            dirs.sort()
            real = os.path.realpath(folder)
            if real in seen:
                dirs.clear()
                continue
            seen.add(real)
            for file in sorted(f for f in files if f.lower().endswith(IMAGE_SUFFIXES)):
                path = Path(folder) / file
                if file in index and os.path.realpath(path) != os.path.realpath(index[file]):
                    self._clashes.setdefault(file, [index[file]]).append(path)
                elif file not in index:
                    index[file] = path
        self._index = index

    @property
    def detected(self) -> str:
        """Where the images were found (known once indexed, i.e. after the first image lookup)."""
        if self._index is None:
            return ""
        if not self._index:
            return f"no images under {self.root}"
        tops = sorted(
            {
                p.relative_to(self.root).parts[0] if p.parent != self.root else "."
                for p in self._index.values()
            }
        )
        kind = "gathered in images/" if tops == ["images"] else "as unpacked"
        shown = ", ".join(f"{t}/" for t in tops[:4]) + (
            f" and {len(tops) - 4} more folders" if len(tops) > 4 else ""
        )
        return f"images {kind}: {len(self._index)} under {self.root}, in {shown}"

    def image_names(self, split: str) -> list[str]:
        if split not in LISTS:
            raise CirlabError(
                f"shoes: unknown split {split!r}; use train, val or test (val and test are both eval)"
            )
        path = self.require_file(self.root / LISTS[split], f"{split} image list")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]

    def queries(self, split: str) -> list[CIRQuery]:
        """Triplets whose two images are both in the split's list (no triplet is mixed in the real data)."""
        names = set(self.image_names(split))
        path = self.require_file(self.root / "relative_captions_shoes.json", "relative captions")
        rows = read_records(path, ("ImageName", "ReferenceImageName", "RelativeCaption"))
        rows = [r for r in rows if r["ImageName"] in names and r["ReferenceImageName"] in names]
        return [
            CIRQuery(
                qid=str(i),
                reference=r["ReferenceImageName"],
                captions=(r["RelativeCaption"],),
                targets=(r["ImageName"],),
            )
            for i, r in enumerate(rows)
        ]

    def train_queries(self) -> list[CIRQuery]:
        return self.queries("train")

    def eval_sets(self, split: str) -> list[EvalSet]:
        # Targets are in the gallery by construction: queries keep only triplets inside the list.
        return [EvalSet(queries=self.queries(split), gallery=self.image_names(split))]
