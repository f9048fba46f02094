"""An unreadable checkpoint in a run folder: a clear error naming the file and how to go on, exit 2, and
nothing else in the folder touched; following the advice resumes the run."""

from __future__ import annotations

import pytest
from conftest import results
from fixtures.make_images import materialize

ARGS = [
    "+method=clip4cir_combiner",
    "dataset=fashioniq",
    "method.combiner.max_epochs=1",
    "method.combiner.batch_size=8",
    "eval.visualize=false",
]


def snapshot(run):
    """The stages' files (Hydra rewrites .hydra/ and the log at every start)."""
    return {p: p.read_bytes() for p in sorted((run / "stages").rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_last_checkpoint_on_resume(damage, cli, tmp_path):
    root = materialize("fashioniq", tmp_path / "fiq")
    run = tmp_path / "run"
    code, out, err = cli(*ARGS, f"dataset.root={root}", run_dir=run)
    assert code == 0, err
    expected = results(run)["metrics"]
    # an interrupted stage: its last.ckpt written, done.json and results.json not yet
    (run / "stages" / "combiner" / "done.json").unlink()
    (run / "results.json").unlink()
    last = run / "stages" / "combiner" / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"\x00not a checkpoint" * 64, "empty": b""}[damage]
    )
    before = snapshot(run)

    code, out, err = cli(*ARGS, f"dataset.root={root}", "resume=true", run_dir=run)
    assert code == 2
    assert f"cannot load checkpoint {last}" in err and f"delete {last}" in err and "Traceback" not in err
    assert snapshot(run) == before  # nothing else lost, the damaged file left as it was

    last.unlink()  # the advice: the stage restarts from its first epoch
    code, out, err = cli(*ARGS, f"dataset.root={root}", "resume=true", run_dir=run)
    assert code == 0, err
    assert results(run)["metrics"] == expected


def test_corrupt_best_checkpoint_of_a_finished_stage(cli, tmp_path):
    """A finished stage reloads its best weights on resume: a damaged best.ckpt says how to train it anew."""
    root = materialize("fashioniq", tmp_path / "fiq")
    run = tmp_path / "run"
    code, out, err = cli(*ARGS, f"dataset.root={root}", run_dir=run)
    assert code == 0, err
    expected = results(run)["metrics"]
    stage = run / "stages" / "combiner"
    best = stage / "checkpoints" / "best.ckpt"
    best.write_bytes(best.read_bytes()[:100])
    before = snapshot(run)
    code, out, err = cli(*ARGS, f"dataset.root={root}", "resume=true", run_dir=run)
    assert code == 2 and "Traceback" not in err
    assert (
        f"cannot load checkpoint {best}" in err and f"delete {stage / 'done.json'} and {best.parent}" in err
    )
    assert snapshot(run) == before

    (stage / "done.json").unlink()
    for f in best.parent.iterdir():
        f.unlink()
    code, out, err = cli(*ARGS, f"dataset.root={root}", "resume=true", run_dir=run)
    assert code == 0, err
    assert results(run)["metrics"] == expected
