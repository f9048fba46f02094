"""Checks shared by the official-benchmark sources, so every one reports bad files the same way."""

from __future__ import annotations

from pathlib import Path

from cirlab.data.records import CIRQuery
from cirlab.errors import CirlabError
from cirlab.io import read_json


def read_records(path: Path, keys: tuple[str, ...]) -> list[dict]:
    """A JSON list of objects that all have `keys`; errors name the file and the record index."""
    rows = read_json(path)
    if not isinstance(rows, list):
        raise CirlabError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        missing = [k for k in keys if not isinstance(row, dict) or k not in row]
        if missing:
            raise CirlabError(f"{path}, record {i}: missing field(s) {', '.join(missing)}")
    return rows


def check_targets(
    name: str,
    split: str,
    queries: list[CIRQuery],
    gallery: list[str],
    gallery_file: Path,
    hint: str = "The annotation files do not match each other.",
) -> None:
    """Every target must be rankable, else recall is silently wrong."""
    names = set(gallery)
    for q in queries:
        absent = [t for t in q.targets if t not in names]
        if absent:
            raise CirlabError(
                f"{name}: query {q.qid} of split {split} has target {absent[0]} that is not in "
                f"the gallery file {gallery_file}. {hint}"
            )
