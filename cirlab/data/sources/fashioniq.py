"""FashionIQ in its official layout (XiaoxiaoGuo/fashion-iq), read as CLIP4Cir reads it."""

from __future__ import annotations

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

LAYOUT = """  <root>/                        (e.g. fashionIQ_dataset/)
    captions/cap.<category>.<split>.json       category: dress, shirt, toptee; split: train, val, test
    image_splits/split.<category>.<split>.json
    images/<ASIN>.jpg  or  images/<ASIN>.png   (one flat folder for all categories)"""


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
    protocol = Protocol(
        recall_ks=(10, 50), exclude_reference=False, group_average=True, main_metric="average_recall"
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

    def image_path(self, name: str) -> Path:
        """With image_ext=auto, .jpg (the reference code) then .png (its derivatives), cached once found."""
        if self.image_ext != "auto":
            return self.root / "images" / f"{name}.{self.image_ext}"
        if name not in self._paths:
            jpg, png = (self.root / "images" / f"{name}.{ext}" for ext in ("jpg", "png"))
            if not jpg.is_file() and not png.is_file():
                return jpg  # not cached: the images may still arrive
            self._paths[name] = jpg if jpg.is_file() else png
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
