"""The CIRR / CIRCO evaluation-server submission formats: a test split without public answers is scored
from these files, so they are part of what a benchmark's source knows.

CIRR (Cuberick-Orion/CIRR, ABaldrati/CLIP4Cir:src/cirr_test_submission.py): two JSON files with
sorted keys, {"version": "rc2", "metric": "recall", "<pairid>": [top-50 names]} and the same with
"recall_subset" and the top-3 within the query's img_set. CIRCO (miccunifi/CIRCO): {"<query id>":
[50 unique COCO image ids as ints]}.
"""

from __future__ import annotations

from pathlib import Path

from cirlab.io import write_json

RankedNames = dict[str, list[str]]  # query id -> image names, best first


class Submission:
    """Which splits have public answers and the server's files for those without (a `CIRSource` part):
    all answered, no files, by default."""

    def has_answers(self, split: str) -> bool:
        """False for test splits scored by an evaluation server (then a submission file is written)."""
        return True

    def write_submission(
        self, folder: Path, split: str, predictions: RankedNames, subset_predictions: RankedNames
    ) -> list[Path]:
        """The evaluation server's files for a split without public answers (`predictions`: every query's
        ranking, `subset_predictions`: CIRR's within its img_set); none by default."""
        return []


def cirr_submission(predictions: RankedNames, subset_predictions: RankedNames) -> tuple[dict, dict]:
    recall = {"version": "rc2", "metric": "recall"} | {qid: names[:50] for qid, names in predictions.items()}
    subset = {"version": "rc2", "metric": "recall_subset"} | {
        qid: names[:3] for qid, names in subset_predictions.items()
    }
    return recall, subset


def circo_submission(predictions: RankedNames) -> dict[str, list[int]]:
    return {qid: [int(n) for n in names[:50]] for qid, names in predictions.items()}


def write_cirr_submission(
    folder: Path, split: str, predictions: RankedNames, subset_predictions: RankedNames
) -> list[Path]:
    recall, subset = cirr_submission(predictions, subset_predictions)
    return [
        write_json(folder / f"recall_submission_{split}.json", recall, sort_keys=True),
        write_json(folder / f"recall_subset_submission_{split}.json", subset, sort_keys=True),
    ]


def write_circo_submission(folder: Path, split: str, predictions: RankedNames) -> list[Path]:
    return [write_json(folder / f"circo_submission_{split}.json", circo_submission(predictions))]
