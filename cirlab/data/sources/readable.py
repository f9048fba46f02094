"""`dataset.missing_images=skip`: any source, without what its missing or unreadable images would break.

Real FashionIQ has dead ASIN URLs and 0-byte downloads. Skipping drops the queries whose reference or
target image is unusable and such gallery images; `skipped` counts both per split, so that results.json
and the results table say how far the numbers are from the full benchmark's.
"""

from __future__ import annotations

import random
from pathlib import Path

from cirlab.data.check import image_problem
from cirlab.data.records import CIRQuery, EvalSet
from cirlab.data.sources.base import CIRSource
from cirlab.data.sources.submission import RankedNames


class ReadableOnly(CIRSource):
    """Wraps a source (CIR or captions). Every data, caption-rule and submission method of CIRSource is
    defined here, passing to the wrapped source (filtered where images matter): a default inherited from
    CIRSource would silently replace the wrapped source's own rule (tests/test_missing_images.py checks
    that none is left). The folder-layout helpers only serve a source's own constructor."""

    def __init__(self, source):
        self.source = source
        self.skipped: dict[str, dict[str, dict[str, int]]] = {}  # split -> what -> {skipped, of}
        self._usable: dict[str, bool] = {}

    def __getattr__(self, attr: str):  # root, categories, vocabulary, ... of the wrapped source
        if attr == "source":  # not set yet (unpickling): no recursion
            raise AttributeError(attr)
        return getattr(self.source, attr)

    name = property(lambda self: self.source.name)
    protocol = property(lambda self: self.source.protocol)
    layout = property(lambda self: self.source.layout)
    readme_section = property(lambda self: self.source.readme_section)
    detected = property(lambda self: self.source.detected)

    def usable(self, name: str) -> bool:
        if name not in self._usable:
            self._usable[name] = image_problem(self.source, name) is None
        return self._usable[name]

    def _count(self, split: str, what: str, kept: int, total: int) -> None:
        self.skipped.setdefault(split, {})[what] = {"skipped": total - kept, "of": total}

    def _query_ok(self, q: CIRQuery) -> bool:
        return self.usable(q.reference) and all(map(self.usable, q.targets))

    def image_path(self, name: str) -> Path:
        return self.source.image_path(name)

    def train_queries(self) -> list[CIRQuery]:
        queries = self.source.train_queries()
        kept = [q for q in queries if self._query_ok(q)]
        self._count("train", "queries", len(kept), len(queries))
        return kept

    def eval_sets(self, split: str) -> list[EvalSet]:
        sets = self.source.eval_sets(split)
        kept = [
            EvalSet(
                queries=[q for q in es.queries if self._query_ok(q)],
                gallery=[n for n in es.gallery if self.usable(n)],
                group=es.group,
            )
            for es in sets
        ]
        for what in ("queries", "gallery"):
            total = sum(len(getattr(es, what)) for es in sets)
            self._count(split, what, sum(len(getattr(es, what)) for es in kept), total)
        return kept

    def image_captions(self, split: str, **kwargs) -> list[tuple[str, list[str]]]:
        pairs = self.source.image_captions(split, **kwargs)
        kept = [(n, caps) for n, caps in pairs if self.usable(n)]
        self._count(split, "images", len(kept), len(pairs))
        return kept

    def train_images(self) -> list[str]:
        return [n for n in self.source.train_images() if self.usable(n)]

    def unlabeled_images(self) -> list[str]:
        return [n for n in self.source.unlabeled_images() if self.usable(n)]

    def has_answers(self, split: str) -> bool:
        return self.source.has_answers(split)

    def write_submission(
        self, folder: Path, split: str, predictions: RankedNames, subset_predictions: RankedNames
    ) -> list[Path]:
        return self.source.write_submission(folder, split, predictions, subset_predictions)

    def train_text(self, query: CIRQuery, rng: random.Random) -> str:
        return self.source.train_text(query, rng)

    def train_text_choices(self, query: CIRQuery) -> list[str]:
        return self.source.train_text_choices(query)

    def eval_text(self, query: CIRQuery) -> str:
        return self.source.eval_text(query)

    def query_texts(self, query: CIRQuery) -> list[str]:  # SEARLE's prompt rule of the wrapped source
        return self.source.query_texts(query)

    def prompt_text(self, query: CIRQuery) -> str:  # Pic2Word's prompt rule of the wrapped source
        return self.source.prompt_text(query)

    def concept_vocabulary(self) -> list[str] | None:
        return self.source.concept_vocabulary()


def describe(skipped: dict[str, dict[str, dict[str, int]]]) -> str:
    """'val: 2/40 queries, 1/31 gallery; train: 3/300 queries' (skipped/all, per split)."""
    return "; ".join(
        f"{split}: " + ", ".join(f"{c['skipped']}/{c['of']} {what}" for what, c in counts.items())
        for split, counts in skipped.items()
    )
