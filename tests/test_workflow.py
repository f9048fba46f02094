"""Research workflow: leaderboard (cirlab-report), retrieval visualisation, Python API (cirlab.load)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from conftest import SMALL, assert_same_ranking, evaluation_scores, results, run_cli, run_group
from PIL import Image

from cirlab.errors import CirlabError
from cirlab.report import collect
from cirlab.report import main as report_main
from cirlab.retrieval.visualize import GREEN, TEXT_WIDTH, QueryView, grid_size, write_visualization


# ---- leaderboard ------------------------------------------------------------------------------
def fake_run(folder: Path, overrides: list[str], metrics: dict[str, float], method: str) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / "results.json").write_text(
        json.dumps(
            {
                "metrics": metrics,
                "main_metric": "test/recall_at_10",
                "method": method,
                "dataset": "synthetic",
                "backbone": "tiny",
            }
        )
    )
    return folder


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun" / "2026-01-01_00-00-00"
    fake_run(
        root / "0_fusion=image",
        ["+method=zeroshot", "logger=none", "method.fusion=image", "hydra.run.dir=/x", "seed=1"],
        {
            "test/recall_at_1": 4.75,
            "test/recall_at_10": 19.75,
            "test/recall_at_50": 47.0,
            "test/mean_recall": 20.0,
            "val/recall_at_10": 30.0,
        },
        "zeroshot-image",
    )
    fake_run(
        root / "1_fusion=sum",
        ["+method=zeroshot", "logger=wandb", "method.fusion=sum", "seed=1"],
        {
            "test/recall_at_1": 7.75,
            "test/recall_at_10": 36.0,
            "test/recall_at_50": 66.25,
            "test/mean_recall": 33.0,
            "val/recall_at_10": 48.25,
        },
        "zeroshot-sum",
    )
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_report_rows_columns_and_order(sweep):
    columns, rows = collect([sweep])
    # swept keys only: hydra.*, logger and keys identical in every run (+method, seed) are dropped
    assert columns == [
        "run",
        "method_name",
        "method.fusion",
        "test/recall_at_10",
        "test/recall_at_1",
        "test/recall_at_50",
    ]
    assert [r["run"] for r in rows] == ["1_fusion=sum", "0_fusion=image"]  # best main metric first
    assert [r["method.fusion"] for r in rows] == ["sum", "image"]
    assert [r["method_name"] for r in rows] == ["zeroshot-sum", "zeroshot-image"]
    assert [r["test/recall_at_10"] for r in rows] == [36.0, 19.75]
    assert [r["test/recall_at_1"] for r in rows] == [7.75, 4.75]
    assert [r["test/recall_at_50"] for r in rows] == [66.25, 47.0]


def test_report_markdown_and_csv(sweep, capsys):
    report_main([str(sweep)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[1].startswith("|--")
    assert "method.fusion" in lines[0] and "test/recall_at_10" in lines[0] and "logger" not in lines[0]
    assert "sum" in lines[2] and "36.00" in lines[2] and "image" in lines[3] and "19.75" in lines[3]

    report_main([str(sweep), "--csv"])
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["method.fusion"], float(r["test/recall_at_10"])) for r in table] == [
        ("sum", 36.0),
        ("image", 19.75),
    ]


def test_report_without_runs_is_an_error(tmp_path, capsys):
    with pytest.raises(CirlabError, match="no results.json"):
        collect([tmp_path])
    with pytest.raises(SystemExit) as exc:
        report_main([str(tmp_path)])
    assert exc.value.code == 2 and "no results.json" in capsys.readouterr().err


def test_report_shows_a_grouped_benchmarks_average_recall_and_map(tmp_path):
    """FashionIQ: beside the main metric, the category averages of R@K and mAP@K (not each category)."""
    for name, score in (("a", 30.0), ("b", 40.0)):
        metrics = {"val/average_recall": score, "val/dress/recall_at_10": 1.0}
        metrics.update(
            {f"val/average/{kind}_at_{k}": score + k for kind in ("map", "recall") for k in (50, 10)}
        )
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(
            json.dumps({"metrics": metrics, "main_metric": "val/average_recall", "method": name})
        )
    columns, rows = collect([tmp_path])
    assert columns[2:] == [
        "val/average_recall",
        "val/average/recall_at_10",
        "val/average/recall_at_50",
        "val/average/map_at_10",
        "val/average/map_at_50",
    ]
    assert [r["run"] for r in rows] == ["b", "a"] and rows[0]["val/average/map_at_50"] == 90.0


# ---- visualisation ----------------------------------------------------------------------------
def test_visualization_grid_and_html(tmp_path):
    colours = {
        "r": (255, 0, 0),
        "g": (0, 255, 0),
        "b": (0, 0, 255),
        "y": (255, 255, 0),
        "w": (250, 250, 250),
        "k": (10, 10, 10),
    }
    for name, rgb in colours.items():
        Image.new("RGB", (30, 20), rgb).save(tmp_path / f"{name}.png")
    path_of = lambda name: tmp_path / f"{name}.png"  # noqa: E731
    views = [
        QueryView("q0", "r", "make it green", ("g",), ["b", "g", "y", "w", "k"], [0.9, 0.8, 0.7, 0.6, 0.5]),
        QueryView("q1", "b", "make it yellow", ("y",), ["y", "r", "g", "w", "k"], [0.95, 0.5, 0.4, 0.3, 0.2]),
        QueryView("q2", "y", "make it black", ("k",), ["r", "g", "b", "w", "y"], None),
        QueryView("q3", "g", "make it white", ("w",), ["w", "r", "b", "y", "k"], None),
    ]
    n, k = 3, 4
    png, page = write_visualization(tmp_path / "stage", "test", views, path_of, n=n, k=k)
    assert png.name == "retrieval_test.png" and page.name == "retrieval_test.html"
    img = Image.open(png).convert("RGB")
    tile, pad = 96, 4
    cell = tile + 2 * pad
    # exact layout: reference tile | text column | k result tiles; one row per query (first n queries)
    assert img.size == grid_size(n, k) == (TEXT_WIDTH + (k + 1) * cell, n * cell)
    # the target is outlined green where it was retrieved: q0 rank 2, q1 rank 1; q2 (a miss) has no outline
    result_x = lambda rank: cell + TEXT_WIDTH + (rank - 1) * cell  # noqa: E731
    assert img.getpixel((result_x(2) + 1, 0 * cell + cell // 2)) == GREEN
    assert img.getpixel((result_x(1) + 1, 1 * cell + cell // 2)) == GREEN
    assert all(img.getpixel((result_x(r) + 1, 2 * cell + cell // 2)) != GREEN for r in range(1, k + 1))
    # the result tile shows the retrieved image: q0's rank-1 tile centre is blue
    assert img.getpixel((result_x(1) + cell // 2, cell // 2)) == colours["b"]

    html = page.read_text()
    assert all(f">{q}<" in html for q in ("q0", "q1", "q2", "q3"))  # the page has every query, not only n
    assert "make it yellow" in html and "target at rank 1" in html and "target at rank 2" in html
    assert "0.950" in html  # scores shown
    assert html.count("<tr data-hit=") == 4 and html.count('class="hit"') == 3  # q0, q1, q3 hit in top-4


def test_page_thumbnails_small_files_as_they_are_large_ones_shrunk(tmp_path):
    import base64

    from cirlab.retrieval.visualize import data_uri

    def decoded(uri: str) -> tuple[str, bytes]:
        head, b64 = uri.split(",", 1)
        return head, base64.b64decode(b64)

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "small.png")
    Image.new("RGB", (40, 20), (30, 200, 30)).save(tmp_path / "small.jpg", quality=90)
    Image.new("RGB", (500, 300), (30, 30, 200)).save(tmp_path / "big.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    for name, mime in (("small.png", "png"), ("small.jpg", "jpeg")):  # embedded byte for byte
        assert decoded(data_uri(tmp_path / name)) == (
            f"data:image/{mime};base64",
            (tmp_path / name).read_bytes(),
        )
    head, body = decoded(data_uri(tmp_path / "big.jpg", size=96))
    assert head == "data:image/jpeg;base64" and Image.open(io.BytesIO(body)).size == (96, 58)
    head, body = decoded(data_uri(tmp_path / "broken.jpg"))  # a placeholder, not a crash
    assert Image.open(io.BytesIO(body)).getpixel((0, 0)) == (255, 0, 255)


# ---- end to end: pipeline visualisation + Python API / cirlab-query ---------------------------
@pytest.mark.slow
def test_trained_run_visualisation_and_search_agree(tmp_path, capsys):
    import cirlab
    from cirlab.api import main as query_main
    from cirlab.data.sources.synthetic import synthetic_source

    run_dir = tmp_path / "run"
    run_cli(tmp_path, "+method=clip4cir_combiner", "method.combiner.max_epochs=3", *SMALL, run_dir=run_dir)
    res = results(run_dir)
    stage = run_dir / "stages" / "combiner"
    for split in ("val", "test"):
        assert Image.open(stage / f"retrieval_{split}.png").size == grid_size(8, 5)
        assert (stage / f"retrieval_{split}.html").stat().st_size > 0

    cfg = res["config"]
    source = synthetic_source(
        cfg["paths"]["cache_dir"],
        **{k: v for k, v in cfg["dataset"]["source"].items() if k not in ("_target_", "cache_dir")},
    )
    (es,) = source.eval_sets("test")
    predictions = json.loads((stage / "predictions.test.json").read_text())
    right = [q for q in es.queries if predictions[q.qid][0] == q.targets[0]]
    assert right, "the trained model ranks no test target first"

    retriever = cirlab.load(run_dir)
    assert retriever.stage == "combiner"
    retriever.index([source.image_path(n) for n in es.gallery])
    for q in right[:5]:
        hits = retriever.search(source.image_path(q.reference), source.eval_text(q), k=5)
        assert hits[0][0] == source.image_path(q.targets[0])
        # evaluation's features, query embedding and ranking: the run's own top-5, exactly
        assert [p for p, _ in hits] == [source.image_path(n) for n in predictions[q.qid][:5]]
        assert all(a[1] >= b[1] for a, b in zip(hits, hits[1:]))

    # the console script on a small gallery folder (the query's top-20 + its reference)
    q = right[0]
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for n in [*predictions[q.qid][:20], q.reference]:
        (gallery / source.image_path(n).name).symlink_to(source.image_path(n))
    query_main(
        [
            "--run",
            str(run_dir),
            "--gallery",
            str(gallery),
            "--image",
            str(source.image_path(q.reference)),
            "--text",
            source.eval_text(q),
            "-k",
            "3",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].split()[0] == "1" and lines[0].split()[-1] == str(
        gallery / source.image_path(q.targets[0]).name
    )


def assert_search_equals_predictions(run_dir: Path, n: int = 5, k: int = 10) -> None:
    """`cirlab.load(run).search` on the run's test gallery: each of n test queries gets its row of the
    run's predictions.test.json, and the demo's backend shows the same."""
    import cirlab
    from cirlab.demo import load_backend

    retriever = cirlab.load(run_dir)
    source = retriever.data.source
    predictions = json.loads((run_dir / "stages" / retriever.stage / "predictions.test.json").read_text())
    (es,) = source.eval_sets("test")
    retriever.index([source.image_path(name) for name in es.gallery])
    name_of = {source.image_path(name): name for name in es.gallery}
    score = {}
    for q in es.queries[:n]:
        reference, text = source.image_path(q.reference), source.eval_text(q)
        hits = [name_of[p] for p, _ in retriever.search(reference, text, k=k)]
        score[q.qid] = evaluation_scores(retriever, es.gallery, q)
        assert_same_ranking(hits, predictions[q.qid][:k], score[q.qid])
    backend = load_backend(run_dir, log=lambda *_: None)
    for q in backend.gallery.queries[:n]:
        hits = [h.name for h in backend.search(q.reference, q.text, k=k).hits]
        assert_same_ranking(hits, predictions[q.qid][:k], score[q.qid])


@pytest.mark.slow
def test_searle_runs_search_as_evaluated(tmp_path):
    """SEARLE (phi, evaluated untrained: no OTI needed) and SEARLE-OTI (a dataset reference reuses its
    stored token; a new image is inverted on the spot): load().search and the demo equal the run's
    predictions, and the SEARLE-OTI visualisation shows evaluation's scores."""
    tokens = f"method.token_dir={tmp_path / 'tokens'}"
    phi = tmp_path / "phi"
    run_cli(tmp_path, "+method=searle", "method.phi.max_epochs=0", tokens, *SMALL, run_dir=phi)
    assert_search_equals_predictions(phi)

    oti = tmp_path / "oti"
    run_cli(
        tmp_path,
        "+method=searle_oti",
        "method.oti.steps=20",
        "method.oti.batch_size=64",
        tokens,
        *SMALL,
        run_dir=oti,
    )
    assert_search_equals_predictions(oti)
    import cirlab

    retriever = cirlab.load(oti)
    source = retriever.data.source
    (es,) = source.eval_sets("test")
    retriever.index([source.image_path(n) for n in es.gallery])
    q = es.queries[0]
    top = retriever.search(source.image_path(q.reference), source.eval_text(q), k=1)[0]
    stage = oti / "stages" / "eval"
    html = (stage / "retrieval_test.html").read_text()  # every result tile carries its evaluated score
    assert f"#1 &middot; {top[1]:.3f}" in html and html.count(" &middot; ") == 5 * len(es.queries)
    assert Image.open(stage / "retrieval_test.png").size == grid_size(8, 5)

    upload = tmp_path / "new.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(upload)  # an image the run never saw: inverted now
    hits = retriever.search(upload, "has a blue circle on the left", k=3)
    assert len(hits) == 3 and hits[0][1] >= hits[1][1] >= hits[2][1]


@pytest.mark.slow
def test_crossmodal_run_searches_as_evaluated(tmp_path):
    """Cross-modal (adapter trained one epoch): predictions.test.json holds both rankings; load().search of
    a caption (no reference image) is its text -> image row."""
    import cirlab
    from cirlab.methods.crossmodal import caption_id

    run_dir = tmp_path / "run"
    run_cli(
        tmp_path,
        "+method=crossmodal",
        "dataset=synthetic_captions",
        "method.finetune.max_epochs=1",
        *SMALL,
        run_dir=run_dir,
    )
    predictions = json.loads((run_dir / "stages" / "finetune" / "predictions.test.json").read_text())
    retriever = cirlab.load(run_dir)
    pairs = retriever.data.pairs("test")
    names = [n for n, _ in pairs]
    assert len(predictions) == len(names) + sum(len(c) for _, c in pairs)
    retriever.index([retriever.data.source.image_path(n) for n in names])
    name_of = {retriever.data.source.image_path(n): n for n in names}
    for image, captions in pairs[:5]:
        hits = [name_of[p] for p, _ in retriever.search(None, captions[0], k=10)]
        expected = predictions[caption_id(image, 0)][:10]
        score = evaluation_scores(retriever, names, captions[0])
        assert_same_ranking(hits, expected, score)
        assert all(c.startswith(tuple(names)) for c in predictions[image][:10])  # image -> caption ids


def test_report_task_of_the_cli(sweep, cli):
    code, out, _ = cli("+task=report", f"+runs='{sweep}'")
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert len(lines) == 4 and "36.00" in lines[2] and "19.75" in lines[3]


def test_import_is_cheap_and_load_is_lazy():
    import sys

    code = "import sys, cirlab; assert 'torch' not in sys.modules, 'import cirlab pulled torch'; print(cirlab.load.__module__)"
    out = run_group(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert out.stdout.strip() == "cirlab.api"


def test_load_and_query_errors(tmp_path, capsys):
    import cirlab
    from cirlab.api import main as query_main

    with pytest.raises(CirlabError, match="not a cirlab run folder"):
        cirlab.load(tmp_path)
    with pytest.raises(CirlabError, match="neither a run folder nor a checkpoint"):
        cirlab.load(tmp_path / "missing")
    with pytest.raises(SystemExit) as exc:
        query_main(
            ["--run", str(tmp_path), "--gallery", str(tmp_path / "none"), "--image", "x.png", "--text", "t"]
        )
    assert exc.value.code == 2 and "is not a folder" in capsys.readouterr().err
