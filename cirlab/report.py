"""Leaderboard of finished runs: `cirlab-report PATH...` (also printed at the end of a Hydra multirun).

Finds every `results.json` under the given run / multirun folders; one row per run with the swept
overrides as columns (from `<run>/.hydra/overrides.yaml`, without `hydra.*`, `logger=*` and keys
that are identical in every run) and the final metrics: each run's `main_metric` plus the recall@K
and mAP@K keys of the same split (a grouped benchmark's averages over its groups), sorted by the main
metric, best first.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from cirlab.errors import CirlabError
from cirlab.metric_keys import AT_K


def find_results(paths: list[str | Path]) -> list[Path]:
    """Every results.json under the given folders (or the files themselves), in a stable order."""
    found: dict[Path, None] = {}
    for p in map(Path, paths):
        if p.is_file() and p.name == "results.json":
            found[p.resolve()] = None
        elif p.is_dir():
            for f in sorted(p.rglob("results.json")):
                found[f.resolve()] = None
        else:
            raise CirlabError(f"{p} is neither a run folder nor a results.json")
    return list(found)


def parse_overrides(run_dir: Path) -> dict[str, str]:
    """key -> value of `<run>/.hydra/overrides.yaml` ('+method=x' -> method: x), minus hydra.* and logger."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    out: dict[str, str] = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if key in ("hydra", "logger") or key.startswith(("hydra.", "logger.")):
            continue
        out[key] = value
    return out


def collect(paths: list[str | Path]) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of the leaderboard; each row maps column -> value, rows sorted best first."""
    files = find_results(paths)
    if not files:
        raise CirlabError(
            f"no results.json under {', '.join(map(str, paths))}: "
            "give run folders (outputs/runs/...) or multirun folders (outputs/multirun/...)"
        )
    roots = [Path(p).resolve() for p in paths]
    runs = []
    for f in files:
        try:
            res = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as err:
            print(f"skipping unreadable {f}: {err}", file=sys.stderr)
            continue
        run_dir = f.parent
        root = next((r for r in roots if r == run_dir or r in run_dir.parents), None)
        name = str(run_dir.relative_to(root)) if root is not None and root != run_dir else run_dir.name
        runs.append((name, res, parse_overrides(run_dir)))

    keys = list(dict.fromkeys(k for _, _, ov in runs for k in ov))
    if len(runs) > 1:  # keep only what was swept (differs between runs)
        keys = [k for k in keys if len({ov.get(k) for _, _, ov in runs}) > 1]

    main_cols = list(dict.fromkeys(r.get("main_metric") for _, r, _ in runs if r.get("main_metric")))
    splits = {m.split("/")[0] for m in main_cols}
    at_k_cols = sorted(
        {
            k
            for _, r, _ in runs
            for k in r.get("metrics", {})
            if (m := AT_K.match(k)) and m["split"] in splits
        },
        key=lambda k: (k.split("/")[0], AT_K.match(k)["kind"] != "recall", int(AT_K.match(k)["k"])),
    )
    metric_cols = main_cols + [c for c in at_k_cols if c not in main_cols]

    rows = []
    for name, res, ov in runs:
        metrics = res.get("metrics", {})
        row: dict[str, Any] = {"run": name, "method_name": res.get("method", "")}
        row.update(
            {k: ov.get(k, "") for k in keys}
        )  # override keys never clash: "run"/"method_name" are not config keys
        row.update({c: metrics.get(c) for c in metric_cols})
        row["_score"] = metrics.get(res.get("main_metric"))
        rows.append(row)
    rows.sort(key=lambda r: (r["_score"] is None, -(r["_score"] or 0.0)))
    for r in rows:
        del r["_score"]
    return ["run", "method_name", *keys, *metric_cols], rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    table = [columns, *[[_cell(r[c]) for c in columns] for r in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    fmt = lambda line: "| " + " | ".join(v.ljust(w) for v, w in zip(line, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(table[0]), sep, *map(fmt, table[1:])])


def to_csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow(
            ["" if r[c] is None else round(r[c], 4) if isinstance(r[c], float) else r[c] for c in columns]
        )
    return buf.getvalue()


def report(paths: list[str | Path], fmt: str = "markdown") -> str:
    columns, rows = collect(paths)
    return to_csv(columns, rows) if fmt == "csv" else markdown(columns, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cirlab-report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run folders, multirun folders or results.json files")
    parser.add_argument("--csv", action="store_true", help="CSV instead of a markdown table")
    parser.add_argument(
        "--plot", metavar="FILE.png", help="also draw recall@K / mAP@K per method (matplotlib)"
    )
    args = parser.parse_args(argv)
    try:
        columns, rows = collect(args.paths)
        print(to_csv(columns, rows) if args.csv else markdown(columns, rows))
        if args.plot:
            from cirlab.report_plot import write_plot

            write_plot(args.plot, columns, rows, find_results(args.paths))
            print(f"plot: {args.plot}", file=sys.stderr)
    except CirlabError as err:
        print(f"cirlab-report error: {err}", file=sys.stderr)
        sys.exit(2)


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object


class ReportCallback(_HydraCallback):
    """Hydra callback: print the leaderboard of the sweep when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            table = report([sweep_dir])
        except CirlabError as err:
            print(f"no leaderboard: {err}")
            return
        print(f"\nLeaderboard ({sweep_dir}):\n{table}")


if __name__ == "__main__":
    main()
