"""`dataset=imagenet`: a folder of unlabeled images in ImageNet's layout, SEARLE's phi training images.

The reference distils phi on the 100k unlabeled ImageNet1K test images, globbing `{root}/test/**/*.JPEG`
and naming each image by its file name; this source does the same (names are paths relative to the
split folder, so sub-folders cannot collide). It has no CIR queries: use it as phi's image source,
`cirlab +method=searle dataset=cirr +dataset@method.unlabeled=imagenet`.
"""

from __future__ import annotations

from pathlib import Path

from cirlab.data.sources.base import CIRSource
from cirlab.errors import CirlabError

LAYOUT = """  <root>/                         (e.g. ImageNet1K/)
    <split>/ILSVRC2012_test_00000001.JPEG ...   (split: test; sub-folders allowed, searched recursively)"""

USE = (
    "use it as SEARLE's phi images: +method=searle dataset=<a CIR dataset> +dataset@method.unlabeled=imagenet"
)


class ImageFolderSource(CIRSource):
    layout = LAYOUT

    def __init__(self, root: str | Path, split: str = "test", extensions=(".JPEG",), name: str = "imagenet"):
        # nothing is read here: an experiment naming this source builds without the data
        self.root, self.split, self.name = Path(root), split, name
        self.extensions = tuple(extensions)
        self._names: list[str] | None = None

    def image_path(self, name: str) -> Path:
        return self.root / self.split / name

    def unlabeled_images(self) -> list[str]:
        if self._names is None:
            folder = self.require_dir(self.root / self.split, f"{self.split} images")
            self._names = sorted(
                p.relative_to(folder).as_posix()
                for p in folder.rglob("*")
                if p.suffix in self.extensions and p.is_file()
            )
            if not self._names:
                raise CirlabError(
                    f"{self.name}: no {'/'.join(self.extensions)} images under {folder}\n"
                    f"Expected layout under dataset.root:\n{self.layout}"
                )
        return self._names

    def _no_queries(self, *_):
        raise CirlabError(f"{self.name} is a folder of unlabeled images without CIR queries: {USE}")

    train_queries = eval_sets = _no_queries
