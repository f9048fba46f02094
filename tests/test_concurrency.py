"""Two runs started at once on one fresh cache (parallel sweep launchers do this): the shared cache
entries (synthetic benchmark, features) are built once under a file lock and never read half-written;
both runs finish with the numbers of a lone run."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CACHE, ROOT, cli_env, prepare, process_group, results

RACE = """
import random, sys, time
import cirlab.data.synthetic as synthetic
random.seed(0)                      # as seed_everything does before the dataset source is built
renders, render = [], synthetic.Generator.render
def counted(self, *args):           # the slow run is on a busier core: still writing images when the other is done
    renders.append(time.sleep(0.003 if sys.argv[2] == "slow" else 0))
    return render(self, *args)
synthetic.Generator.render = counted
root = synthetic.ensure(synthetic.SyntheticSpec(n_pretrain=300, n_train=300, n_val=40, n_test=40), sys.argv[1])
print(len(renders), root)
"""


def test_two_runs_generate_the_synthetic_benchmark_once(tmp_path):
    """Started together, one fast and one slow: neither writes into a folder the other has already renamed
    into place (a temp name from the seeded `random` would be the same in both), neither fails."""
    cache = tmp_path / "cache"
    with contextlib.ExitStack() as stack:  # a failure or a timeout stops both process groups
        procs = [
            stack.enter_context(
                process_group(
                    [sys.executable, "-c", RACE, str(cache), speed],
                    cwd=ROOT,
                    text=True,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            )
            for speed in ("fast", "slow")
        ]
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    renders, roots = zip(*(out.strip().splitlines()[-1].split(" ", 1) for out in outputs))
    assert sorted(int(n) > 0 for n in renders) == [False, True]  # generated once: the other run waited
    assert len(set(roots)) == 1
    root = Path(roots[0])
    assert (root / "spec.json").is_file() and len(list((root / "images").iterdir())) > 500
    assert sorted(p.name for p in cache.iterdir()) == [root.name, root.name + ".lock"]  # no temp folder left


ZEROSHOT_SMALL = [
    "+method=zeroshot",
    "+dataset.source.n_pretrain=300",
    "dataset.source.n_train=300",
    "dataset.source.n_val=60",
    "dataset.source.n_test=60",
    "eval.visualize=false",
]


def fresh_cache(cache: Path) -> Path:
    """A cache holding only the pretrained tiny backbone (its key is the model and pretraining config, no path)."""
    prepare(cache.parent)
    (cache / "backbones").mkdir(parents=True)
    for f in (CACHE / "backbones").glob("tiny-*"):
        shutil.copy(f, cache / "backbones" / f.name)
    return cache


@pytest.mark.slow
def test_two_cli_runs_at_once_on_a_fresh_cache(cli, tmp_path, monkeypatch):
    """Two `cirlab +method=zeroshot` at once, the benchmark and features not yet cached: both finish with
    the numbers of a lone run (a small synthetic spec; about 30 s, mostly two interpreter start-ups)."""
    cache = fresh_cache(tmp_path / "cache")
    env = cli_env(tmp_path) | {"CIRLAB_CACHE": str(cache)}
    with contextlib.ExitStack() as stack:  # a failure or a timeout stops both process groups
        procs = [
            stack.enter_context(
                process_group(
                    [
                        sys.executable,
                        "-m",
                        "cirlab.cli",
                        *ZEROSHOT_SMALL,
                        "logger=none",
                        f"hydra.run.dir={tmp_path / f'run{i}'}",
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
            for i in (0, 1)
        ]
        outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert "pretraining" not in "".join(outputs)  # the copied backbone was used
    assert len([p for p in cache.iterdir() if p.name.startswith("synthetic-") and p.is_dir()]) == 1

    monkeypatch.setenv("CIRLAB_CACHE", str(fresh_cache(tmp_path / "lone-cache")))
    code, out, err = cli(*ZEROSHOT_SMALL, run_dir=tmp_path / "lone")
    assert code == 0, err
    lone = results(tmp_path / "lone")["metrics"]
    assert lone and results(tmp_path / "run0")["metrics"] == lone
    assert results(tmp_path / "run1")["metrics"] == lone
