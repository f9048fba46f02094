"""Prediction files and the CIRR / CIRCO evaluation-server submission formats.

CIRR (Cuberick-Orion/CIRR, ABaldrati/CLIP4Cir:src/cirr_test_submission.py): two JSON files with
sorted keys, {"version": "rc2", "metric": "recall", "<pairid>": [top-50 names]} and the same with
"recall_subset" and the top-3 within the query's img_set. CIRCO (miccunifi/CIRCO): {"<query id>":
[50 unique COCO image ids as ints]}. Which format a split gets is its source's choice
(`CIRSource.write_submission`).
"""

from __future__ import annotations

from pathlib import Path

from cirlab.io import write_json
from cirlab.retrieval.metrics import SetResult


def merged_predictions(results: dict[str, SetResult]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for res in results.values():
        out.update(res.predictions)
    return out


def cirr_submission(results: dict[str, SetResult]) -> tuple[dict, dict]:
    recall = {"version": "rc2", "metric": "recall"}
    subset = {"version": "rc2", "metric": "recall_subset"}
    for res in results.values():
        recall.update({qid: names[:50] for qid, names in res.predictions.items()})
        subset.update({qid: names[:3] for qid, names in res.subset_predictions.items()})
    return recall, subset


def circo_submission(results: dict[str, SetResult]) -> dict[str, list[int]]:
    return {qid: [int(n) for n in names[:50]] for qid, names in merged_predictions(results).items()}


def write_cirr_submission(folder: Path, split: str, results: dict[str, SetResult]) -> list[Path]:
    recall, subset = cirr_submission(results)
    return [
        write_json(folder / f"recall_submission_{split}.json", recall, sort_keys=True),
        write_json(folder / f"recall_subset_submission_{split}.json", subset, sort_keys=True),
    ]


def write_circo_submission(folder: Path, split: str, results: dict[str, SetResult]) -> list[Path]:
    return [write_json(folder / f"circo_submission_{split}.json", circo_submission(results))]


def write_predictions(folder: Path, split: str, source, results: dict[str, SetResult]) -> list[Path]:
    """predictions.<split>.json always (top-50 per official query id); the source's submission files
    where the split has no public answers."""
    written = [write_json(folder / f"predictions.{split}.json", merged_predictions(results))]
    if not source.has_answers(split):
        written += source.write_submission(folder, split, results)
    return written
