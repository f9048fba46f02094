"""SIGKILL in the middle of an epoch (or of an OTI pass) for every kind of stage, then `resume=true`: the
metrics equal those of an uninterrupted run.

One helper for all stage kinds: the killed run is a process of its own; the helper measures the time
between two saves of the stage's progress file (`last.ckpt`, or the OTI token file), kills 0.4 of such a
period after the second save, checks the file still holds that second save (so the kill hit the middle of
the next epoch / chunk, not a boundary), resumes, runs the stage uninterrupted and compares every metric of
results.json. The resumed and the uninterrupted run go in the test's process (run_cli), on the killed
run's thread count: a new interpreter costs about 7 s of CPU.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMALL, cli_env, kill_group, results, run_cli

from cirlab.cache import RECORDED, CacheEntry

TIMEOUT = 600
MARK = 1234.5  # no OTI token holds it


def checkpoint_epoch(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


def oti_images(path: Path) -> int:
    return len(torch.load(path, map_location="cpu", weights_only=True)["names"])


def mark_saved_tokens(path: Path) -> list[str]:
    """Overwrite the raw tokens of the images the killed run saved with MARK (a valid entry: key and
    checksum rewritten) and return their names. Evaluation reads the EMA tokens only, so the metrics stay
    the uninterrupted run's; OTI reseeds per chunk, so only the mark tells a resume that read the file
    from one that optimised those images again."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    payload = {k: v for k, v in blob.items() if k not in RECORDED}
    payload["tokens"] = torch.full_like(payload["tokens"], MARK)
    CacheEntry(path, blob["key"]).save(payload)
    return list(payload["names"])


def assert_marks_kept(path: Path, marked: list[str]) -> None:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    row = {n: i for i, n in enumerate(blob["names"])}
    assert len(row) == len(blob["names"]) > len(marked), "no image was added after the resume, or one twice"
    is_mark = (blob["tokens"] == MARK).flatten(1).all(dim=1)
    lost = [n for n in marked if n not in row or not is_mark[row[n]]]
    assert not lost, (
        f"the resume optimised (or dropped) {len(lost)} of the {len(marked)} saved images: {lost[:3]}"
    )
    assert int(is_mark.sum()) == len(marked), "images not saved before the kill carry the mark"


@dataclass
class Case:
    args: list[str]
    watch: str  # the progress file: a glob pattern in the run folder
    progress: Callable[[Path], int]  # what that file holds: an epoch, a number of OTI tokens


def lightning_case(method: str, stage: str, *extra: str) -> Case:
    """A training stage alone, 3 short epochs: killed in the third, resumed from the second's last.ckpt."""
    return Case(
        [f"+method={method}", f"method.stages=[{stage}]", f"method.{stage}.max_epochs=3", *extra],
        f"stages/{stage}/checkpoints/last.ckpt",
        checkpoint_epoch,
    )


CASES = {
    # stage I of CLIP4Cir: pixels through the image tower (BatchNorm running statistics), both encoders
    "clip4cir_finetune": lightning_case(
        "clip4cir", "finetune", "method.finetune.batch_size=32", "+trainer.limit_train_batches=12"
    ),
    # MLCL's Combiner: a random augmented view per (seed, epoch, triplet)
    "mlcl_combiner": lightning_case(
        "mlcl", "combiner", "method.combiner.batch_size=64", "+trainer.limit_train_batches=20"
    ),
    # BLIP4CIR+Bi stage I: learned direction tokens, two optimiser groups, cosine schedule per epoch
    "blip4cir_bi_finetune": lightning_case(
        "blip4cir_bi",
        "finetune",
        "method.direction=learned",
        "method.finetune.batch_size=32",
        "+trainer.limit_train_batches=16",
    ),
    # SEARLE: phi distilled from OTI targets (cached in token_dir before the first epoch; few OTI steps:
    # what is resumed here is phi's training)
    "searle_phi": lightning_case(
        "searle",
        "phi",
        "method.phi.batch_size=64",
        "method.phi.module.max_images=640",
        "method.oti.steps=5",
        "method.token_dir={run}/tokens",
    ),
    # the cross-modal retrieval adapter on cached image features
    "crossmodal_adapter": lightning_case(
        "crossmodal",
        "finetune",
        "dataset=synthetic_captions",
        "method.finetune.batch_size=64",
        "+trainer.limit_train_batches=20",
    ),
    # SEARLE-OTI: killed inside the OTI of the evaluated references, between two saves of the token file
    "searle_oti": Case(
        [
            "+method=searle_oti",
            "method.oti.steps=20",
            "method.oti.save_every=32",
            "method.token_dir={run}/tokens",
        ],
        "tokens/*.pt",
        oti_images,
    ),
}


def arguments(case: Case, run_dir: Path) -> list[str]:
    return [a.replace("{run}", str(run_dir)) for a in case.args] + [*SMALL, "eval.visualize=false"]


def start(tmp_path: Path, case: Case, run_dir: Path) -> subprocess.Popen:
    """The CLI in the background, on this process's thread count (the floats depend on it), its output
    in <run_dir>.log; in a process group of its own, for kill_group."""
    env = cli_env(tmp_path) | {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, "-m", "cirlab.cli", *arguments(case, run_dir), "logger=none"]
    cmd.append(f"hydra.run.dir={run_dir}")
    log = run_dir.with_suffix(".log")
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log.read_text()[-5000:]


def progress_file(run_dir: Path, pattern: str) -> Path | None:
    files = sorted(run_dir.glob(pattern))
    assert len(files) <= 1, files
    return files[0] if files else None


def saved(proc: subprocess.Popen, run_dir: Path, pattern: str, after: int | None) -> int:
    """Wait until the progress file is written anew; its mtime in ns."""
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        assert proc.poll() is None, f"the run ended before its progress file was saved twice:\n{output(proc)}"
        file = progress_file(run_dir, pattern)
        if file and (mtime := file.stat().st_mtime_ns) != after:
            return mtime
        time.sleep(0.05)
    raise AssertionError(f"{run_dir / pattern} was not written within {TIMEOUT} s")


def kill_mid_period(proc: subprocess.Popen, case: Case, run_dir: Path) -> int:
    """SIGKILL 0.4 of a save period after the second save; returns the progress the file still holds."""
    first = saved(proc, run_dir, case.watch, None)
    t0 = time.time()
    saved(proc, run_dir, case.watch, first)
    t1 = time.time()
    held = case.progress(progress_file(run_dir, case.watch))
    time.sleep(0.4 * (t1 - t0))  # well into the training batches, which come before validation
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert case.progress(progress_file(run_dir, case.watch)) == held, "killed at a save, not between two"
    return held


@pytest.mark.parametrize("name", CASES)
@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_same_metrics(name, tmp_path):
    case = CASES[name]
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    killed = start(tmp_path, case, killed_dir)
    try:
        held = kill_mid_period(killed, case, killed_dir)
    finally:
        kill_group(killed)  # what the run started too (it was killed alone, as a crash would be)
    assert held > 0 if case.progress is oti_images else held == 1
    assert not (killed_dir / "results.json").exists()

    if case.progress is oti_images:
        marked = mark_saved_tokens(progress_file(killed_dir, case.watch))
    resumed = run_cli(tmp_path, *arguments(case, killed_dir), "resume=true", run_dir=killed_dir)
    if case.progress is oti_images:  # the token file was read, not recomputed
        assert_marks_kept(progress_file(killed_dir, case.watch), marked)
    else:
        assert "resuming from" in resumed.stdout + resumed.stderr
    run_cli(tmp_path, *arguments(case, straight_dir), run_dir=straight_dir)
    assert case.progress(progress_file(straight_dir, case.watch)) > held  # it saved to the very end
    if case.progress is checkpoint_epoch:  # the weights at the end, whichever epoch was selected
        weights = [
            torch.load(d / case.watch, weights_only=True)["state_dict"] for d in (straight_dir, killed_dir)
        ]
        for key, value in weights[0].items():
            assert torch.allclose(weights[1][key].float(), value.float(), atol=1e-6), key
    expected, got = results(straight_dir), results(killed_dir)
    assert got["stages"].keys() == expected["stages"].keys()
    for stage, metrics in expected["stages"].items():
        assert got["stages"][stage].keys() == metrics.keys()
        for key, value in metrics.items():
            assert got["stages"][stage][key] == pytest.approx(value, abs=1e-6), (stage, key)
