"""The real `cirlab` CLI: usage, friendly errors, and the methods beating their baselines."""

import json
from pathlib import Path

import pytest
from conftest import CACHE, results, run_cli


def test_bare_cirlab_lists_choices_and_exits_2(tmp_path):
    proc = run_cli(tmp_path, check=False)
    assert proc.returncode == 2
    for word in (
        "methods:",
        "clip4cir",
        "zeroshot",
        "datasets:",
        "synthetic",
        "backbones:",
        "tiny",
        "cirlab method=clip4cir",
    ):
        assert word in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_shows_usage(tmp_path):
    proc = run_cli(tmp_path, "--help", check=False)
    assert proc.returncode == 0 and "methods:" in proc.stdout


@pytest.mark.parametrize(
    "override,valid",
    [("+method=nope", "clip4cir"), ("dataset=nope", "synthetic"), ("backbone=nope", "clip_vit_b32")],
)
def test_unknown_group_option_names_the_valid_ones(tmp_path, override, valid):
    args = [override] if override.startswith("+method") else ["+method=zeroshot", override]
    proc = run_cli(tmp_path, *args, check=False)
    assert proc.returncode == 2
    assert "Could not find" in proc.stderr and valid in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_jsonl_folder_is_clear(tmp_path):
    proc = run_cli(
        tmp_path, "+method=zeroshot", "dataset=jsonl", f"dataset.path={tmp_path}/absent", check=False
    )
    assert proc.returncode == 2
    assert "dataset root folder not found" in proc.stderr and "triplets.train.jsonl" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_image_listed_but_absent_is_named(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    row = {"id": "q", "reference": "images/missing.png", "text": "make it red", "target": "images/t.png"}
    for split in ("val", "test"):
        (data / f"triplets.{split}.jsonl").write_text(json.dumps(row) + "\n")
    proc = run_cli(tmp_path, "+method=zeroshot", "dataset=jsonl", f"dataset.path={data}", check=False)
    assert proc.returncode == 2
    assert "image not found" in proc.stderr and "missing.png" in proc.stderr
    assert "Traceback" not in proc.stderr


def _zeroshot(shared_run, fusion):
    return results(shared_run("+method=zeroshot", f"method.fusion={fusion}"))["metrics"]


@pytest.mark.slow
def test_zeroshot_baselines_write_results(shared_run):
    m = {f: _zeroshot(shared_run, f) for f in ("image", "text", "sum")}
    for fusion, metrics in m.items():
        assert {f"test/recall_at_{k}" for k in (1, 5, 10, 50)} <= set(metrics)
        print(fusion, {k: round(v, 2) for k, v in metrics.items() if k.startswith("test/")})
    # the benchmark leaves headroom: every zero-shot baseline well below 50% R@10
    assert max(v["test/recall_at_10"] for v in m.values()) < 50
    assert m["text"]["test/recall_at_10"] < m["sum"]["test/recall_at_10"]


@pytest.mark.slow
def test_clip4cir_beats_zeroshot_on_held_out_test(tmp_path, shared_run):
    zs = _zeroshot(shared_run, "sum")["test/recall_at_10"]
    run_dir = tmp_path / "clip4cir"
    proc = run_cli(tmp_path, "+method=clip4cir", run_dir=run_dir)
    res = results(run_dir)
    stage1 = res["stages"]["finetune"]["test/recall_at_10"]
    stage2 = res["stages"]["combiner"]["test/recall_at_10"]
    print(f"test R@10: zero-shot sum {zs:.2f}, stage I {stage1:.2f}, stage I + Combiner {stage2:.2f}")
    assert stage1 >= zs + 5 and stage2 >= stage1 + 5
    assert res["metrics"]["test/recall_at_10"] == stage2
    assert "Results: clip4cir on synthetic" in proc.stdout
    for key in ("config", "git_commit", "wall_time_s", "stages"):
        assert key in res
    preds = json.loads((run_dir / "stages" / "combiner" / "predictions.test.json").read_text())
    assert len(preds) == 400 and all(len(v) == 50 for v in preds.values())


def test_method_is_chosen_with_or_without_plus(cli):
    """`method: null` in the defaults: `method=X` and the append form `+method=X` compose the same."""
    code, plain, err = cli("--cfg", "job", "method=zeroshot")
    assert code == 0, err
    code, plus, err = cli("--cfg", "job", "+method=zeroshot")
    assert code == 0, err
    assert plain == plus and "_target_: cirlab.methods.zeroshot.ZeroShot" in plain


def test_a_method_picks_its_default_dataset_and_the_command_line_wins(cli):
    code, out, err = cli("--cfg", "job", "method=crossmodal")
    assert code == 0, err
    assert "name: synthetic_captions\n" in out
    code, out, err = cli("--cfg", "job", "method=crossmodal", "dataset=coco")
    assert code == 0, err
    assert "name: coco\n" in out


def test_declared_keys_override_without_plus(cli):
    code, out, err = cli("--cfg", "job", "method=clip4cir", "retrieval.options.chunk=100")
    assert code == 0, err
    assert "chunk: 100" in out and "encoders: both" in out
    code, _, err = cli("--cfg", "job", "method=clip4cir", "retrieval.options.chunks=100")
    assert code == 2 and "chunks" in err  # a misspelt option is refused, not ignored


def test_ckpt_path_points_to_resume(cli):
    code, _, err = cli("method=zeroshot", "ckpt_path=/some/file.ckpt")
    assert code == 2
    assert "resume=true" in err and "method.<stage>.checkpoint=FILE" in err


def test_prepare_builds_the_dataset_and_backbone_and_trains_nothing(cli, tmp_path):
    spec = ["++dataset.source.n_pretrain=40", "dataset.source.n_train=40", "dataset.source.n_val=8"]
    code, out, err = cli("+task=prepare", *spec, "dataset.source.n_test=8", run_dir=tmp_path / "run")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[-2].startswith("dataset synthetic ready in ") and lines[-1].startswith(
        "backbone tiny ready in "
    )
    root = Path(lines[-2].split(": ", 1)[1])
    assert root.parent == CACHE and (root / "spec.json").is_file()
    assert json.loads((root / "spec.json").read_text())["n_test"] == 8
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "outputs").exists()
