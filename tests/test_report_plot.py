"""`cirlab-report --plot`: the leaderboard as a PNG, one line per method, seeds as mean and spread."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from cirlab.report import collect
from cirlab.report import main as report_main
from cirlab.report_plot import Point, series, write_plot

# method -> seed -> test metrics (recall@K and mAP@K, as on CIRCO)
RUNS = {
    "searle": {
        1: {"recall_at_1": 10.0, "recall_at_10": 40.0, "map_at_10": 12.0},
        2: {"recall_at_1": 14.0, "recall_at_10": 44.0, "map_at_10": 16.0},
    },
    "lincir": {
        1: {"recall_at_1": 20.0, "recall_at_10": 50.0, "map_at_10": 21.0},
        2: {"recall_at_1": 22.0, "recall_at_10": 56.0, "map_at_10": 25.0},
    },
}


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun"
    for i, (method, seeds) in enumerate(RUNS.items()):
        for seed, metrics in seeds.items():
            run = root / f"{i}_{method}_{seed}"
            (run / ".hydra").mkdir(parents=True)
            (run / ".hydra" / "overrides.yaml").write_text(f"- method={method}\n- seed={seed}\n")
            results = {
                "metrics": {f"test/{k}": v for k, v in metrics.items()},
                "main_metric": "test/recall_at_10",
                "method": method,
                "dataset": "circo",
                "config": {"seed": seed},
            }
            (run / "results.json").write_text(json.dumps(results))
    return root


def test_plot_draws_each_method_mean_and_spread(sweep, tmp_path, capsys):
    png = tmp_path / "out" / "board.png"
    report_main([str(sweep), "--plot", str(png)])
    assert "lincir" in capsys.readouterr().out  # the table is still printed
    with Image.open(png) as im:
        assert im.format == "PNG" and 600 <= im.width <= 3000 and 300 <= im.height <= 1500
    assert not [p for p in png.parent.iterdir() if p != png]  # no temp file left beside it

    # what is drawn: one line per method (seeds folded), the mean of its runs with their min and max
    lines = series(*collect([sweep]))
    assert set(lines) == {"searle", "lincir"}
    assert lines["lincir"]["test/recall_at_10"] == Point(53.0, 50.0, 56.0, 2)
    assert lines["searle"]["test/recall_at_1"] == Point(12.0, 10.0, 14.0, 2)
    assert lines["searle"]["test/map_at_10"] == Point(14.0, 12.0, 16.0, 2)
    assert write_plot(png, *collect([sweep]), []) == lines


def test_plot_splits_a_method_on_its_other_settings(sweep):
    columns, rows = collect([sweep])
    for r in rows:  # a swept setting other than the seed makes two lines of one method
        r["lr"] = "0.1" if r["run"].endswith("_1") else "0.2"
    lines = series([*columns[:2], "lr", *columns[2:]], rows)
    assert set(lines) == {"searle (lr=0.1)", "searle (lr=0.2)", "lincir (lr=0.1)", "lincir (lr=0.2)"}
    assert lines["lincir (lr=0.2)"]["test/recall_at_10"] == Point(56.0, 56.0, 56.0, 1)


def test_a_parts_own_seed_folds_like_the_runs_seed(sweep):
    columns, rows = collect([sweep])
    for r in rows:  # SEARLE-OTI's seeds are method.oti.seed: repeats of one setting, not two settings
        r["method.oti.seed"], r["seed"] = r.pop("seed"), None
    lines = series([*columns[:2], "method.oti.seed", *columns[2:]], rows)
    assert set(lines) == {"searle", "lincir"}
    assert lines["lincir"]["test/recall_at_10"] == Point(53.0, 50.0, 56.0, 2)


def test_plot_without_matplotlib_names_the_extra(sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(SystemExit) as exc:
        report_main([str(sweep), "--plot", str(tmp_path / "board.png")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert "pip install 'cirlab[report]'" in err and not (tmp_path / "board.png").exists()
