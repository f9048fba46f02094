"""What a dataset source provides: an image index, CIR splits in common records, and its protocol."""

from __future__ import annotations

import random
from pathlib import Path

from cirlab.data.records import CIRQuery, EvalSet, Protocol
from cirlab.errors import CirlabError


class ImageNotFound(CirlabError):
    """An image the annotations name is not on disk: the data check lists these instead of stopping."""


class CIRSource:
    """Base class of every dataset source (synthetic, jsonl, fashioniq, cirr, circo, shoes, ...).

    A subclass reads its dataset's official layout and fills the methods below; the datamodule,
    the metrics and every method work from these alone.
    """

    name: str = "source"
    protocol: Protocol = Protocol()
    layout: str = ""  # the expected folder tree(s), shown when something is missing
    readme_section: str = ""
    detected: str = ""  # which accepted layout was found on disk, for sources that accept several

    def image_path(self, name: str) -> Path:
        raise NotImplementedError

    def train_queries(self) -> list[CIRQuery]:
        raise NotImplementedError

    def eval_sets(self, split: str) -> list[EvalSet]:
        raise NotImplementedError

    def has_answers(self, split: str) -> bool:
        """False for test splits scored by an evaluation server (then a submission file is written)."""
        return True

    def write_submission(self, folder: Path, split: str, results: dict) -> list[Path]:
        """The evaluation server's files for a split without public answers (`results`: eval-set group ->
        `cirlab.retrieval.metrics.SetResult`); none by default."""
        return []

    def train_text(self, query: CIRQuery, rng: random.Random) -> str:
        """The caption rule at training time (FashionIQ randomises the order of its two captions)."""
        return self.eval_text(query)

    def train_text_choices(self, query: CIRQuery) -> list[str]:
        """Every text `train_text` can return for `query` (a frozen text encoder encodes them all once)."""
        return [self.train_text(query, random.Random(0))]

    def eval_text(self, query: CIRQuery) -> str:
        return query.captions[0]

    def query_texts(self, query: CIRQuery) -> list[str]:
        """The texts a prompt-based zero-shot method (SEARLE) fills into its prompt, their features
        averaged: by default just the caption rule's."""
        return [self.eval_text(query)]

    def concept_vocabulary(self) -> list[str] | None:
        """The dataset's own concept names (SEARLE's vocabulary): `vocabulary.txt` in its root folder,
        one a line; None when it ships none."""
        path = Path(getattr(self, "root", "")) / "vocabulary.txt"
        if not path.is_file():
            return None
        return list(
            dict.fromkeys(n.strip() for n in path.read_text(encoding="utf-8-sig").splitlines() if n.strip())
        )

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
    def layout_help(self) -> str:
        """The accepted tree(s) and what was found, so a wrong root or folder is fixed in one go."""
        return (
            f"Expected layout under dataset.root:\n{self.layout}"
            + (f"\nDetected: {self.detected}" if self.detected else "")
            + (
                f"\nWhere to get the data: README section '{self.readme_section}'."
                if self.readme_section
                else ""
            )
        )

    def missing_image(self, what: str) -> ImageNotFound:
        """The error for an absent image: where it was looked for, the accepted layouts, how to list them all."""
        return ImageNotFound(
            f"{self.name}: {what}\n{self.layout_help()}\n`cirlab +task=check_data "
            f"dataset={self.name} dataset.root=...` lists every missing image."
        )

    def require_dir(self, path: Path, what: str) -> Path:
        if not path.is_dir():
            raise CirlabError(f"{self.name}: {what} folder not found: {path}\n{self.layout_help()}")
        return path

    def require_file(self, path: Path, what: str) -> Path:
        if not path.is_file():
            raise CirlabError(f"{self.name}: {what} not found: {path}\n{self.layout_help()}")
        return path
