"""A split's prediction files: predictions.<split>.json always, and the evaluation server's files
(their formats: `cirlab.data.sources.submission`) where the split has no public answers."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cirlab.io import write_json
from cirlab.retrieval.metrics import SetResult


def merged(rankings: Iterable[dict[str, list[str]]]) -> dict[str, list[str]]:
    """One ranking per query id over all eval sets (FashionIQ has one set per category)."""
    out: dict[str, list[str]] = {}
    for ranking in rankings:
        out.update(ranking)
    return out


def write_predictions(folder: Path, split: str, source, results: dict[str, SetResult]) -> list[Path]:
    """predictions.<split>.json always (top-50 per official query id); the source's submission files
    where the split has no public answers."""
    predictions = merged(res.predictions for res in results.values())
    written = [write_json(folder / f"predictions.{split}.json", predictions)]
    if not source.has_answers(split):
        subset = merged(res.subset_predictions for res in results.values())
        written += source.write_submission(folder, split, predictions, subset)
    return written
