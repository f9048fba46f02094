"""What a dataset source provides: an image index, CIR splits in common records, and its protocol."""
from __future__ import annotations

import random
from pathlib import Path

from cirlab.data.records import CIRQuery, EvalSet, Protocol
from cirlab.errors import CirlabError


class CIRSource:
    """Base class of every dataset source (synthetic, jsonl, fashioniq, cirr, circo, shoes, ...).

    A subclass reads its dataset's official layout and fills the methods below; the datamodule,
    the metrics and every method work from these alone.
    """

    name: str = "source"
    protocol: Protocol = Protocol()
    layout: str = ""  # the expected folder tree, shown when something is missing
    readme_section: str = ""

    def image_path(self, name: str) -> Path:
        raise NotImplementedError

    def train_queries(self) -> list[CIRQuery]:
        raise NotImplementedError

    def eval_sets(self, split: str) -> list[EvalSet]:
        raise NotImplementedError

    def has_answers(self, split: str) -> bool:
        """False for test splits scored by an evaluation server (then a submission file is written)."""
        return True

    def train_text(self, query: CIRQuery, rng: random.Random) -> str:
        """The caption rule at training time (FashionIQ randomises the order of its two captions)."""
        return self.eval_text(query)

    def eval_text(self, query: CIRQuery) -> str:
        return query.captions[0]

    def image_captions(self, split: str) -> list[tuple[str, list[str]]]:
        """(image name, captions) pairs, for text<->image retrieval and backbone pretraining."""
        raise CirlabError(f"dataset {self.name!r} has no image captions")

    def unlabeled_images(self) -> list[str]:
        """Images usable without labels (SEARLE's phi): by default those of the training triplets."""
        return self.train_images()

    def train_images(self) -> list[str]:
        """Images of the training triplets, in a stable order (for the feature cache)."""
        seen: dict[str, None] = {}
        for q in self.train_queries():
            seen.setdefault(q.reference)
            for t in q.targets:
                seen.setdefault(t)
        return list(seen)

    # ---- helpers for subclasses -----------------------------------------------------------------
    def require_dir(self, path: Path, what: str) -> Path:
        if not path.is_dir():
            raise CirlabError(
                f"{self.name}: {what} folder not found: {path}\nExpected layout under dataset.root:\n"
                f"{self.layout}" + (f"\nWhere to get the data: README section '{self.readme_section}'."
                                    if self.readme_section else ""))
        return path

    def require_file(self, path: Path, what: str) -> Path:
        if not path.is_file():
            raise CirlabError(
                f"{self.name}: {what} not found: {path}\nExpected layout under dataset.root:\n{self.layout}")
        return path
