"""`cirlab-report --plot FILE.png`: the leaderboard as a picture, so a sweep reads at a glance.

One panel per metric family of the leaderboard (recall@K, mAP@K), one line per method: runs that
differ only in their seed (`seed`, or a part's own such as `method.oti.seed`) are one line, their
mean with the min-max spread as error bars.
Works on `cirlab.report.collect`'s (columns, rows); matplotlib is the optional extra `cirlab[report]`.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cirlab.errors import CirlabError
from cirlab.io import write_atomic
from cirlab.metric_keys import AT_K  # the columns of collect() to draw

# row keys that name or distinguish runs rather than set them up: they never split a line
NOT_SETTINGS = ("run", "method_name", "seed")
MARKERS = "osD^vP*Xhp<>"


@dataclass(frozen=True)
class Point:
    """One method at one metric over its runs (seeds)."""

    mean: float
    low: float
    high: float
    runs: int


def metric_columns(columns: list[str]) -> list[str]:
    """The recall@K / mAP@K columns, per split and family (recall before mAP) by K."""
    found = [c for c in columns if AT_K.match(c)]

    def order(c: str) -> tuple:
        m = AT_K.match(c)
        return m["split"], bool(m["average"]), m["kind"] != "recall", int(m["k"])

    return sorted(found, key=order)


def is_seed(column: str) -> bool:
    """A seed of the run or of one of its parts (`seed`, `method.oti.seed`): repeats, not settings."""
    return column == "seed" or column.endswith(".seed")


def series(columns: list[str], rows: list[dict[str, Any]]) -> dict[str, dict[str, Point]]:
    """label -> metric column -> Point, best mean main metric (the leaderboard's first metric) first;
    a label is the method, with the swept settings (other than the seed) that tell apart its lines."""
    metrics = metric_columns(columns)
    settings = [c for c in columns if c not in NOT_SETTINGS and not is_seed(c) and "/" not in c]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method_name"], *(row[k] for k in settings)), []).append(row)
    main = next((c for c in columns if "/" in c), None)

    def best_first(item: tuple) -> tuple:
        scores = [r[main] for r in item[1] if r.get(main) is not None]
        return not scores, -statistics.fmean(scores) if scores else 0.0

    out: dict[str, dict[str, Point]] = {}
    for key, runs in sorted(groups.items(), key=best_first):
        siblings = [other for other in groups if other[0] == key[0]]
        varying = [
            f"{k}={v}"
            for i, (k, v) in enumerate(zip(settings, key[1:]), 1)
            if len({s[i] for s in siblings}) > 1
        ]
        label = f"{key[0]} ({', '.join(varying)})" if varying else str(key[0] or "?")
        points = {}
        for col in metrics:
            values = [r[col] for r in runs if r.get(col) is not None]
            if values:
                points[col] = Point(statistics.fmean(values), min(values), max(values), len(values))
        out[label] = points
    return out


def _panel_title(col: str, several_splits: bool) -> str:
    m = AT_K.match(col)
    title = "recall@K" if m["kind"] == "recall" else "mAP@K"
    if m["average"]:
        title += ", mean over categories"
    return f"{m['split']}: {title}" if several_splits else title


def _datasets(results_files: list[Path]) -> list[str]:
    names = set()
    for f in results_files:
        try:
            names.add(str(json.loads(Path(f).read_text()).get("dataset", "?")))
        except (OSError, ValueError):
            continue  # collect() already named the unreadable file
    return sorted(names)


def write_plot(
    path: str | Path, columns: list[str], rows: list[dict[str, Any]], results_files: list[Path]
) -> dict[str, dict[str, Point]]:
    """Draw the leaderboard into the PNG `path` (written atomically); returns what was plotted."""
    try:
        from matplotlib.figure import Figure  # renders a PNG with Agg; no pyplot, no display
    except ImportError as err:
        raise CirlabError("--plot needs matplotlib: pip install 'cirlab[report]'") from err
    lines = series(columns, rows)
    metrics = metric_columns(columns)
    if not metrics:
        raise CirlabError("nothing to plot: the runs have no recall@K or mAP@K metrics")
    panels: dict[tuple, list[str]] = {}
    for col in metrics:
        m = AT_K.match(col)
        panels.setdefault((m["split"], bool(m["average"]), m["kind"]), []).append(col)
    splits = sorted({key[0] for key in panels})

    ncols = min(3, len(lines)) or 1  # the legend below the panels, never over the title
    legend_rows = -(-len(lines) // ncols)
    fig = Figure(
        figsize=(max(7.2, 4.2 * len(panels)), 4.2 + 0.28 * legend_rows), dpi=110, layout="constrained"
    )
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, cols in zip(axes, panels.values()):
        x = range(len(cols))
        for i, (label, points) in enumerate(lines.items()):
            xs = [j for j, c in zip(x, cols) if c in points]
            mean = [points[c].mean for c in cols if c in points]
            spread = [
                [points[c].mean - points[c].low for c in cols if c in points],
                [points[c].high - points[c].mean for c in cols if c in points],
            ]
            runs = max((p.runs for p in points.values()), default=1)
            name = f"{label} ({runs} runs)" if runs > 1 else label
            yerr = spread if runs > 1 else None
            ax.errorbar(
                xs,
                mean,
                yerr=yerr,
                label=name,
                color=f"C{i % 10}",
                marker=MARKERS[i % len(MARKERS)],
                capsize=4,
            )
        ax.set_xticks(list(x), [AT_K.match(c)["k"] for c in cols])
        ax.set_title(_panel_title(cols[0], len(splits) > 1))
        ax.set_xlabel("K")
        ax.set_ylabel(f"{'recall' if AT_K.match(cols[0])['kind'] == 'recall' else 'mAP'}@K (%)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    several = any(p.runs > 1 for points in lines.values() for p in points.values())
    fig.suptitle(
        f"{', '.join(_datasets(results_files)) or '?'}, {', '.join(splits)} split"
        + (": mean over seeds, bars min-max" if several else ""),
        fontweight="bold",
    )
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, title="method")
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    return lines
