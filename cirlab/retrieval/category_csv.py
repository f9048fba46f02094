"""The per-category table of a grouped benchmark (FashionIQ): `metrics_per_category.csv` beside
results.json, one row per category and the average, in the columns the papers' FashionIQ tables use
(Recall@10, Recall@50, mAP@10, mAP@50)."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from cirlab.io import write_text

GROUPED = re.compile(r"^(?P<split>[^/]+)/(?P<group>[^/]+)/(?P<kind>recall|map)_at_(?P<k>\d+)$")
HEADERS = {"recall": "Recall@{k}", "map": "mAP@{k}"}


def category_rows(metrics: dict[str, float], split: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of `split`'s per-group recall@K and mAP@K, the average row last; empty when the
    split's metrics have no groups."""
    cells: dict[str, dict[tuple[str, int], float]] = {}
    for key, value in metrics.items():
        m = GROUPED.match(key)
        if m and m["split"] == split:
            cells.setdefault(m["group"], {})[(m["kind"], int(m["k"]))] = value
    if not cells:
        return [], []
    columns = sorted({c for row in cells.values() for c in row}, key=lambda c: (c[0] != "recall", c[1]))
    groups = sorted(g for g in cells if g != "average") + (["average"] if "average" in cells else [])
    header = ["category", *(HEADERS[kind].format(k=k) for kind, k in columns)]
    rows = [[g, *(f"{cells[g][c]:.2f}" if c in cells[g] else "" for c in columns)] for g in groups]
    return header, rows


def write_category_csv(path: str | Path, metrics: dict[str, float], split: str) -> Path | None:
    """The table of `category_rows`, written atomically; None (no file) for a benchmark without groups."""
    header, rows = category_rows(metrics, split)
    if not rows:
        return None
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerows([header, *rows])
    return write_text(path, buf.getvalue())
