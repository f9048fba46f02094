"""What a dataset source provides: an image index, CIR splits in common records, and its protocol."""

from __future__ import annotations

from pathlib import Path

from cirlab.data.records import CIRQuery, EvalSet, Protocol
from cirlab.data.sources.caption_rules import CaptionRules
from cirlab.data.sources.layout import FolderLayout
from cirlab.data.sources.submission import Submission
from cirlab.errors import CirlabError


class CIRSource(FolderLayout, CaptionRules, Submission):
    """Base class of every dataset source (synthetic, jsonl, fashioniq, cirr, circo, shoes, ...).

    A subclass reads its dataset's official layout and fills the methods below; the datamodule,
    the metrics and every method work from these alone. Its other jobs are its parts: the folder
    tree and its errors (`FolderLayout`), the texts a method encodes (`CaptionRules`), the evaluation
    server's files (`Submission`).
    """

    name: str = "source"
    protocol: Protocol = Protocol()

    def image_path(self, name: str) -> Path:
        raise NotImplementedError

    def train_queries(self) -> list[CIRQuery]:
        raise NotImplementedError

    def eval_sets(self, split: str) -> list[EvalSet]:
        raise NotImplementedError

    def image_captions(self, split: str) -> list[tuple[str, list[str]]]:
        """(image name, captions) pairs, for text<->image retrieval and backbone pretraining."""
        raise CirlabError(f"dataset {self.name!r} has no image captions")

    def train_images(self) -> list[str]:
        """Images of the training triplets, in a stable order (for the feature cache)."""
        seen: dict[str, None] = {}
        for q in self.train_queries():
            seen.setdefault(q.reference)
            for t in q.targets:
                seen.setdefault(t)
        return list(seen)

    def unlabeled_images(self) -> list[str]:
        """Images usable without labels (SEARLE's phi): by default those of the training triplets."""
        return self.train_images()

    def concept_vocabulary(self) -> list[str] | None:
        """The dataset's own concept names (SEARLE's vocabulary): `vocabulary.txt` in its root folder,
        one a line; None when it ships none."""
        path = Path(getattr(self, "root", "")) / "vocabulary.txt"
        if not path.is_file():
            return None
        return list(
            dict.fromkeys(n.strip() for n in path.read_text(encoding="utf-8-sig").splitlines() if n.strip())
        )
