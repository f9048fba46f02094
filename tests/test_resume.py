"""Kill a CLIP4Cir run with SIGKILL in the middle of stage II, resume it, get the same numbers."""

import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SMALL, cli_env, process_group, results, run_cli

ARGS = ["+method=clip4cir", "method.finetune.max_epochs=1", "method.combiner.max_epochs=6", *SMALL]


@pytest.mark.slow
def test_sigkill_mid_stage_two_then_resume_gives_same_metrics(tmp_path):
    straight = tmp_path / "straight"
    run_cli(tmp_path, *ARGS, run_dir=straight)
    expected = results(straight)["metrics"]

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "cirlab.cli", *ARGS, "logger=none", f"hydra.run.dir={killed}"]
    last = killed / "stages" / "combiner" / "checkpoints" / "last.ckpt"
    env = cli_env(tmp_path)
    with process_group(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        deadline = time.time() + 600
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)  # the run alone, as a crash would; the block then stops its group
        proc.wait()
    assert not (killed / "results.json").exists()
    assert (killed / "stages" / "finetune" / "done.json").exists()

    resumed = run_cli(tmp_path, *ARGS, "resume=true", run_dir=killed)
    assert "stage finetune already finished" in resumed.stderr + resumed.stdout
    got = results(killed)["metrics"]
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
