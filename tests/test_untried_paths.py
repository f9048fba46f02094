"""Paths no other test runs: a Hydra multirun with its leaderboard, the csv and wandb loggers, faiss end to
end, data-loader workers, clip4cir_finetune and captions_jsonl, the "fewer than one batch" errors, and a
resumed run folder written by another method. All on the small official-layout fixtures (seconds each)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import results
from fixtures.make_images import materialize

FIQ_COMBINER = [
    "+method=clip4cir_combiner",
    "dataset=fashioniq",
    "method.combiner.max_epochs=1",
    "method.combiner.batch_size=8",
    "eval.visualize=false",
]


def cirr_zeroshot(root, *extra):
    return ["+method=zeroshot", "dataset=cirr", f"dataset.root={root}", *extra]


def test_multirun_prints_the_leaderboard(cli, tmp_path):
    root = materialize("cirr", tmp_path / "cirr")
    sweep = tmp_path / "sweep"
    code, out, err = cli("-m", *cirr_zeroshot(root, "method.fusion=image,text"), f"hydra.sweep.dir={sweep}")
    assert code == 0, err
    runs = {
        json.loads(f.read_text())["method"]: json.loads(f.read_text()) for f in sweep.rglob("results.json")
    }
    assert set(runs) == {"zeroshot-image", "zeroshot-text"}
    table = [line for line in out[out.index("Leaderboard") :].splitlines() if line.startswith("|")]
    header, *rows = [
        [cell.strip() for cell in line.strip("|").split("|")] for line in table if "---" not in line
    ]
    rows = {row[header.index("method_name")]: dict(zip(header, row)) for row in rows}
    assert set(rows) == set(runs)
    for method, res in runs.items():
        assert rows[method]["val/recall_at_1"] == f"{res['metrics']['val/recall_at_1']:.2f}"


def test_csv_logger_writes_the_metrics_exactly(cli, tmp_path):
    """12 queries: recalls like 100/12 are not float32 numbers, so the csv shows whether they were logged as
    float64 (the value in results.json) or rounded to float32."""
    root = materialize("cirr", tmp_path / "cirr")
    run = tmp_path / "run"
    code, out, err = cli(*cirr_zeroshot(root, "method.fusion=image"), run_dir=run, logger="csv")
    assert code == 0, err
    files = list((run / "stages" / "eval").rglob("metrics.csv"))
    assert len(files) == 1
    logged = {}
    for row in csv.DictReader(files[0].open()):
        logged.update({k: float(v) for k, v in row.items() if v and k.startswith("val/")})
    metrics = results(run)["metrics"]
    assert logged and logged.keys() <= metrics.keys()
    assert any(torch.tensor(v).item() != v for v in logged.values())  # some value is not a float32 number
    for key, value in logged.items():
        assert value == metrics[key], key


def test_wandb_logger_offline_writes_its_run(cli, tmp_path):
    """WANDB_MODE=offline (cli_env): no network; the run's records land in the stage folder for `wandb sync`."""
    pytest.importorskip("wandb")
    root = materialize("cirr", tmp_path / "cirr")
    run = tmp_path / "run"
    code, out, err = cli(*cirr_zeroshot(root), run_dir=run, logger="wandb")
    assert code == 0, err
    records = list((run / "stages" / "eval" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1 and records[0].stat().st_size > 0


def test_faiss_end_to_end_equals_exact(cli, tmp_path, monkeypatch):
    pytest.importorskip("faiss")
    import cirlab.retrieval.search as search

    calls = []
    real = search.faiss_search
    monkeypatch.setattr(search, "faiss_search", lambda *a, **k: calls.append(k) or real(*a, **k))
    root = materialize("cirr", tmp_path / "cirr")
    out = {}
    for backend in ("exact", "faiss"):
        run = tmp_path / backend
        code, _, err = cli(
            *cirr_zeroshot(root, f"retrieval.search={backend}", "retrieval.options.index_type=flat"),
            run_dir=run,
        )
        assert code == 0, err
        out[backend] = (
            results(run)["metrics"],
            (run / "stages" / "eval" / "predictions.val.json").read_text(),
        )
    assert calls and all(k.get("index_type") == "flat" for k in calls)  # faiss did the ranking
    assert out["faiss"] == out["exact"]


def test_two_loader_workers_equal_none(cli, tmp_path):
    """A one-epoch Combiner (shuffled triplets, feature encoding, evaluation) with num_workers=2 and 0:
    the same weights and metrics."""
    root = materialize("fashioniq", tmp_path / "fiq")
    got = {}
    for workers in (2, 0):  # 2 first: it also encodes the features into the cache with workers
        run = tmp_path / f"w{workers}"
        code, out, err = cli(*FIQ_COMBINER, f"dataset.root={root}", f"num_workers={workers}", run_dir=run)
        assert code == 0, err
        weights = torch.load(run / "stages" / "combiner" / "checkpoints" / "last.ckpt", weights_only=True)[
            "state_dict"
        ]
        got[workers] = (results(run)["metrics"], weights)
    assert got[2][0] == got[0][0]
    assert got[2][1].keys() == got[0][1].keys()
    for key in got[0][1]:
        assert torch.equal(got[2][1][key], got[0][1][key]), key


def test_clip4cir_finetune_runs(cli, tmp_path):
    root = materialize("fashioniq", tmp_path / "fiq")
    run = tmp_path / "run"
    code, out, err = cli(
        "+method=clip4cir_finetune",
        "dataset=fashioniq",
        f"dataset.root={root}",
        "method.finetune.max_epochs=1",
        "method.finetune.batch_size=8",
        "eval.visualize=false",
        run_dir=run,
    )
    assert code == 0, err
    res = results(run)
    assert list(res["stages"]) == ["finetune"] and "val/average_recall" in res["metrics"]
    assert res["selection"] == {"finetune": "best val/average_recall"}


def captions_jsonl(root):
    from PIL import Image

    (root / "images").mkdir(parents=True)
    rows = []
    for i, colour in enumerate(
        [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (90, 0, 90)]
    ):
        Image.new("RGB", (16, 16), colour).save(root / "images" / f"{i}.png")
        rows.append(
            {
                "image": f"images/{i}.png",
                "captions": [f"picture {i}", f"colour {colour}"],
                "split": ("train", "val", "test")[i % 3],
            }
        )
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_captions_jsonl_with_crossmodal(cli, tmp_path):
    root = captions_jsonl(tmp_path / "caps")
    run = tmp_path / "run"
    code, out, err = cli(
        "+method=crossmodal",
        "method.stages=[zeroshot]",
        "dataset=captions_jsonl",
        f"dataset.path={root}",
        run_dir=run,
    )
    assert code == 0, err
    metrics = results(run)["metrics"]
    assert {"test/t2i_recall_at_1", "test/i2t_recall_at_1", "test/rsum"} <= metrics.keys()
    # a CIR method on a captions dataset: the clear error
    code, out, err = cli(
        "+method=zeroshot", "dataset=captions_jsonl", f"dataset.path={root}", run_dir=tmp_path / "r2"
    )
    assert code == 2 and "needs a cir dataset" in err and "Pick a CIR dataset" in err


@pytest.mark.parametrize("case", ["stage_two", "mlcl", "searle_phi"])
def test_fewer_than_one_batch(case, cli, tmp_path):
    root = materialize("fashioniq", tmp_path / "fiq")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("dress\nshirt\nred dress\ndog\n")
    args, expected = {
        "stage_two": (
            FIQ_COMBINER + ["method.combiner.batch_size=64"],
            "36 training triplets are fewer than one batch (64); lower method.batch_size",
        ),
        "mlcl": (
            ["+method=mlcl", "method.stages=[combiner]", "method.combiner.batch_size=64"],
            "36 training triplets are fewer than one batch (64); lower method.batch_size",
        ),
        "searle_phi": (
            [
                "+method=searle",
                f"method.concepts.vocabulary={vocab}",
                "method.phrases.per_concept=4",
                "method.oti.steps=1",
                "method.phi.module.max_images=4",
                f"method.token_dir={tmp_path / 't'}",
            ],
            "4 unlabeled images are fewer than one batch (256): lower method.phi.batch_size",
        ),
    }[case]
    code, out, err = cli(*args, "dataset=fashioniq", f"dataset.root={root}", "eval.visualize=false")
    assert code == 2, err
    assert expected in err and "Traceback" not in err


def test_resume_with_another_method_or_backbone_is_a_clear_error(cli, tmp_path):
    """A finished clip4cir_combiner stage resumed as MLCL's combiner, or over another backbone: the
    checkpoint's stamp says so."""
    root = materialize("fashioniq", tmp_path / "fiq")
    run = tmp_path / "run"
    code, out, err = cli(*FIQ_COMBINER, f"dataset.root={root}", run_dir=run)
    assert code == 0, err
    before = (run / "results.json").read_bytes()
    code, out, err = cli(
        "+method=mlcl",
        "method.stages=[combiner]",
        "dataset=fashioniq",
        f"dataset.root={root}",
        "resume=true",
        run_dir=run,
    )
    assert code == 2
    assert "was written by method CLIP4CirCombiner" in err and "but this run is MLCLCombiner" in err
    assert "Traceback" not in err
    assert (run / "results.json").read_bytes() == before  # nothing of the first run lost

    # the same method over another backbone's stage checkpoint (a run folder reused with backbone=...)
    best = run / "stages" / "combiner" / "checkpoints" / "best.ckpt"
    ckpt = torch.load(best, weights_only=True)
    torch.save(ckpt | {"cirlab": ckpt["cirlab"] | {"backbone": "clip_vit_b32"}}, best)
    code, out, err = cli(*FIQ_COMBINER, f"dataset.root={root}", "resume=true", run_dir=run)
    assert (
        code == 2
        and "with backbone 'clip_vit_b32', but this run is CLIP4CirCombiner with backbone 'tiny'" in err
    )
