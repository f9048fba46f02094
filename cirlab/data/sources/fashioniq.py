"""FashionIQ in its official layout (XiaoxiaoGuo/fashion-iq) or with FTI4CIR's per-category image folders,
read as CLIP4Cir reads it."""

from __future__ import annotations

import filecmp
import os
import random
from pathlib import Path

from cirlab.data.records import CIRQuery, EvalSet, Protocol
from cirlab.data.sources.base import CIRSource
from cirlab.data.sources.caption_rules import CaptionRules
from cirlab.data.sources.common import check_targets, read_records
from cirlab.errors import CirlabError
from cirlab.io import read_json

CATEGORIES = ("dress", "shirt", "toptee")
STRIP = ".?, "  # CLIP4Cir strips these from both ends of every caption
EXTS = {"auto": ("jpg", "png"), "jpg": ("jpg",), "png": ("png",)}  # image_ext -> extensions, preferred first
OFFICIAL = "official layout"
PER_CATEGORY = "per-category layout (FTI4CIR)"

LAYOUT = """  <root>/                        (e.g. fashionIQ_dataset/ or FashionIQ/)
    captions/cap.<category>.<split>.json       category: dress, shirt, toptee; split: train, val, test
    image_splits/split.<category>.<split>.json
  and the images either in the official layout (CLIP4Cir, SEARLE), one flat folder for all categories:
    images/<ASIN>.jpg  or  images/<ASIN>.png
  or in FTI4CIR's layout, one folder per category beside captions/ (used when there is no images/):
    dress/<ASIN>.jpg, shirt/<ASIN>.jpg, toptee/<ASIN>.jpg   (or .png)"""


class FashionIQCaptions(CaptionRules):
    """FashionIQ's two captions, stripped and joined: CLIP4Cir's rules in training and evaluation,
    SEARLE's in its prompt."""

    def eval_text(self, query: CIRQuery) -> str:
        c1, c2 = (c.strip(STRIP) for c in query.captions)
        return f"{c1.capitalize()} and {c2}"

    def query_texts(self, query: CIRQuery) -> list[str]:
        """SEARLE's rule (not CLIP4Cir's capitalised one): both captions stripped, joined in both orders."""
        c1, c2 = (c.strip(STRIP) for c in query.captions)
        return [f"{c1} and {c2}", f"{c2} and {c1}"]

    def prompt_text(self, query: CIRQuery) -> str:
        """Pic2Word's rule: one order, the second caption first, captions as given (not stripped)."""
        c1, c2 = query.captions
        return f"{c2} and {c1}"

    def train_text_choices(self, query: CIRQuery) -> list[str]:
        c1, c2 = (c.strip(STRIP) for c in query.captions)
        return [
            f"{c1.capitalize()} and {c2}",
            f"{c2.capitalize()} and {c1}",
            c1.capitalize(),
            c2.capitalize(),
        ]

    def train_text(self, query: CIRQuery, rng: random.Random) -> str:
        """CLIP4Cir's generate_randomized_fiq_caption; u exactly 0.25/0.5/0.75 falls to the last branch."""
        c1, c2 = (c.strip(STRIP) for c in query.captions)
        u = rng.random()
        if u < 0.25:
            return f"{c1.capitalize()} and {c2}"
        if 0.25 < u < 0.5:
            return f"{c2.capitalize()} and {c1}"
        if 0.5 < u < 0.75:
            return c1.capitalize()
        return c2.capitalize()


class FashionIQSource(FashionIQCaptions, CIRSource):
    name = "fashioniq"
    layout = LAYOUT
    readme_section = "FashionIQ"
    # mAP@10/@50 (one target: AP@K = 1/rank within K) is not in CLIP4Cir's or SEARLE's code; FTI4CIR's
    # tables report it per category beside the recalls
    protocol = Protocol(
        recall_ks=(10, 50),
        map_ks=(10, 50),
        exclude_reference=False,
        group_average=True,
        main_metric="average_recall",
    )

    def __init__(self, root: str | Path, categories=CATEGORIES, image_ext: str = "auto"):
        self.root = self.require_dir(Path(root), "dataset root")
        unknown = [c for c in categories if c not in CATEGORIES]
        if unknown or not categories:
            raise CirlabError(f"fashioniq: unknown categories {unknown}; choose from {list(CATEGORIES)}")
        if image_ext not in ("auto", "jpg", "png"):
            raise CirlabError(f"fashioniq: image_ext must be auto, jpg or png, not {image_ext!r}")
        self.categories = tuple(categories)
        self.image_ext = image_ext
        self._paths: dict[str, Path] = {}
        self._index: dict[str, list[Path]] | None = None  # per-category layout: ASIN -> its files
        found = [d for d in ("images", *CATEGORIES) if (self.root / d).is_dir()]
        self.image_dirs = ["images"] if "images" in found else found  # [] when neither layout is there
        if self.image_dirs == ["images"]:
            self.detected = f"{OFFICIAL}: images in {self.root / 'images'}"
        elif self.image_dirs:
            self.detected = f"{PER_CATEGORY}: images in {self._folders()} under {self.root}"
        else:
            self.detected = f"no images: neither images/ nor {', '.join(CATEGORIES)} folders in {self.root}"

    def _folders(self) -> str:
        return ", ".join(f"{d}/" for d in self.image_dirs)

    def image_path(self, name: str) -> Path:
        if self.image_dirs == ["images"]:
            return self._official_path(name)
        if not self.image_dirs:
            raise self.missing_image(f"image {name} not found: no image folder in {self.root}")
        return self._category_path(name)

    def _official_path(self, name: str) -> Path:
        """With image_ext=auto, .jpg (the reference code) then .png (its derivatives), cached once found."""
        if self.image_ext != "auto":
            return self.root / "images" / f"{name}.{self.image_ext}"
        if name not in self._paths:
            jpg, png = (self.root / "images" / f"{name}.{ext}" for ext in ("jpg", "png"))
            if not jpg.is_file() and not png.is_file():
                return jpg  # not cached: the images may still arrive
            self._paths[name] = jpg if jpg.is_file() else png
        return self._paths[name]

    def _category_path(self, name: str) -> Path:
        """FTI4CIR opens an image in its query's category folder. Image names are ASINs, so one index of the
        category folders (listed once) finds every name without knowing its category. An ASIN in two folders
        must be the same file in both: features are kept per name, so a second picture would be lost."""
        if self._index is None:
            self._index = {}
            for folder in self.image_dirs:
                files = [e.name for e in os.scandir(self.root / folder) if e.is_file()]
                chosen: dict[str, Path] = {}
                for ext in reversed(EXTS[self.image_ext]):  # the preferred extension written last wins
                    chosen |= {
                        f[: -len(ext) - 1]: self.root / folder / f for f in files if f.endswith(f".{ext}")
                    }
                for asin, path in chosen.items():
                    self._index.setdefault(asin, []).append(path)
        if name not in self._paths:
            paths = self._index.get(name)
            if not paths:
                raise self.missing_image(f"image {name} not found in {self._folders()} under {self.root}")
            if any(not filecmp.cmp(paths[0], p, shallow=False) for p in paths[1:]):
                listed = "\n".join(f"  {p}" for p in paths)
                raise CirlabError(
                    f"fashioniq: image {name} is in several category folders with different files:\n{listed}\n"
                    "Keep one picture per ASIN (the same file in every folder that has it)."
                )
            self._paths[name] = paths[0]
        return self._paths[name]

    def queries(self, category: str, split: str) -> list[CIRQuery]:
        path = self.require_file(self.root / "captions" / f"cap.{category}.{split}.json", f"{split} captions")
        keys = ("candidate", "captions") if split == "test" else ("candidate", "target", "captions")
        out = []
        for i, r in enumerate(read_records(path, keys)):
            if len(r["captions"]) != 2:
                raise CirlabError(f"{path}, record {i}: expected 2 captions, got {len(r['captions'])}")
            targets = () if split == "test" else (r["target"],)
            out.append(
                CIRQuery(
                    qid=f"{category}/{i}",
                    reference=r["candidate"],
                    captions=tuple(r["captions"]),
                    targets=targets,
                )
            )
        return out

    def train_queries(self) -> list[CIRQuery]:
        return [q for c in self.categories for q in self.queries(c, "train")]

    def eval_sets(self, split: str) -> list[EvalSet]:
        if split not in ("val", "test"):
            raise CirlabError(f"fashioniq: unknown eval split {split!r}; use val or test")
        sets = []
        for cat in self.categories:
            path = self.require_file(
                self.root / "image_splits" / f"split.{cat}.{split}.json", f"{split} image split"
            )
            gallery = read_json(path)
            if not isinstance(gallery, list) or not all(isinstance(n, str) for n in gallery):
                raise CirlabError(f"{path}: expected a JSON list of image names")
            queries = self.queries(cat, split)
            check_targets(self.name, split, queries, gallery, path)
            sets.append(EvalSet(queries=queries, gallery=gallery, group=cat))
        return sets

    def has_answers(self, split: str) -> bool:
        return split != "test"
