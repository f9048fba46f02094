"""Shared test helpers: run the real `cirlab` CLI on tiny configs.

The synthetic benchmark and the pretrained tiny and blip_tiny backbones are cached in
<repo>/.cache/cirlab, so they are built once per machine (about 5 minutes, both at once under
`make test`) and reused by every integration test.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see cirlab/cli.py
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # (inherited by the CLI runs a test starts)
    if "torch" in sys.modules:  # already loaded by a plugin: the variable came too late for it
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "cirlab"


# A quarter-size synthetic benchmark for the tests that compare two runs of the same code (resume, DDP,
# cluster, export, demo): they assert equality, which holds at any size, and the default benchmark's 400
# val and 400 test queries made most of their time. Generated once into CACHE, like the default one.
SMALL = (
    "++dataset.source.n_pretrain=1000",
    "++dataset.source.n_train=1000",
    "++dataset.source.n_val=100",
    "++dataset.source.n_test=100",
)
PREBUILT = ("tiny", "blip_tiny")  # the backbones of the integration tests


def pytest_configure(config):
    """`make test` (two xdist workers) on a cold cache: both small backbones start pretraining at once, in
    the background, so that both cores work on them (about 5 minutes) while the workers run the tests
    that need neither; a test that needs one waits on its cache lock. Warm, each check takes seconds."""
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(config.option, "numprocesses", None):
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    config.cirlab_prepare_dir = Path(tempfile.mkdtemp(prefix="cirlab-prepare-"))  # removed at unconfigure
    env = cli_env(config.cirlab_prepare_dir) | {"OMP_NUM_THREADS": "1"}
    config.cirlab_prepare = []
    for name in PREBUILT:
        with (CACHE.parent / f"prepare-{name}.log").open("w") as log:
            command = [sys.executable, "-m", "cirlab.cli", "+task=prepare", f"backbone={name}"]
            command.append(f"hydra.run.dir={env['CIRLAB_OUTPUTS']}/{name}")
            config.cirlab_prepare.append(
                subprocess.Popen(
                    command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )


def prepare(tmp_path: Path, backbone: str = "tiny") -> None:
    """The backbone built into CACHE (or waited for while another process builds it)."""
    run_cli(tmp_path, "+task=prepare", f"backbone={backbone}", run_dir=tmp_path / f"prepare-{backbone}")


def pytest_unconfigure(config):
    for proc in getattr(config, "cirlab_prepare", []):  # done by now unless the run stopped early
        kill_group(proc)
    if hasattr(config, "cirlab_prepare_dir"):
        shutil.rmtree(config.cirlab_prepare_dir, ignore_errors=True)
    import multiprocessing

    for child in multiprocessing.active_children():  # left by a test that timed out in mp.spawn: its
        child.terminate()  # ranks are not daemons, so the interpreter's exit would wait for them forever
        child.join()


# ---- processes: each test's subprocess leads a group of its own, stopped as a whole ---------------------
# (one implementation for tests and benches: bench/_procs.py, which runs without pytest)
sys.path.insert(0, str(ROOT / "bench"))
from _procs import family, free_port, kill_group, process_group, run_group  # noqa: E402, F401


def cli_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a `cirlab` run under `tmp_path`. Its temporary files too (TMPDIR): what a
    process killed on purpose cannot remove (wandb's media folders, Gradio's uploads) goes with the
    test's folder, not into /tmp."""
    env = dict(os.environ)
    (tmp_path / ".tmp").mkdir(parents=True, exist_ok=True)
    env.update(
        {
            "CIRLAB_CACHE": str(CACHE),
            "CIRLAB_OUTPUTS": str(tmp_path / "outputs"),
            "TMPDIR": str(tmp_path / ".tmp"),
            "WANDB_MODE": "offline",
            "WANDB_SILENT": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_cli(
    tmp_path: Path,
    *args: str,
    run_dir: Path | None = None,
    check: bool = True,
    logger: str = "none",
    process: bool = False,
) -> subprocess.CompletedProcess:
    """`cirlab *args`, its exit code and output. In this process by default: a new interpreter spends
    about 7 s of CPU importing torch, Lightning and torchmetrics, which over the suite's runs was a fifth
    of `make test`. `process=True` where it must be a process of its own: DDP (Lightning starts the
    other ranks by re-running the command line) and the submitit launcher; on a timeout its whole
    process group is stopped, ranks included (run_group)."""
    run_dir = run_dir or tmp_path / "run"
    argv = [*args, f"logger={logger}", f"hydra.run.dir={run_dir}"]
    if process:
        proc = run_group(
            [sys.executable, "-m", "cirlab.cli", *argv],
            cwd=ROOT,
            env=cli_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=900,
        )
    else:
        proc = run_in_process(tmp_path, argv)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"cirlab {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def main_in_process(argv: list[str]) -> subprocess.CompletedProcess:
    """`cirlab.cli.main()` as `python -m cirlab.cli *argv` would run it in this environment (working
    folder, exit code; an uncaught exception exits 1 with its traceback on stderr)."""
    from hydra.core.global_hydra import GlobalHydra

    from cirlab.cli import main

    saved = sys.argv, os.getcwd()
    root_log = logging.getLogger()
    saved_log = list(root_log.handlers), root_log.level
    sys.argv = ["cirlab", *argv]
    os.chdir(ROOT)
    out, err, code = io.StringIO(), io.StringIO(), 0
    GlobalHydra.instance().clear()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        GlobalHydra.instance().clear()
        sys.argv = saved[0]
        os.chdir(saved[1])
        # Hydra gave the root logger a handler writing into the run's folder (its log file): closed here, or
        # a later test's logging (e.g. Gradio's start-up) writes into a folder pytest has removed and fails
        for handler in root_log.handlers:
            if handler not in saved_log[0]:
                handler.close()
        root_log.handlers[:] = saved_log[0]
        root_log.setLevel(saved_log[1])
    return subprocess.CompletedProcess(["cirlab", *argv], code, out.getvalue(), err.getvalue())


def run_in_process(tmp_path: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """main_in_process in the environment run_cli gives a subprocess, restored afterwards."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(cli_env(tmp_path))
    try:
        return main_in_process(argv)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def session_folder(tmp_path_factory) -> Path:
    """A folder of this pytest session alone, common to its xdist workers: the base temp folder (a fresh
    `pytest-N`, or `--basetemp` emptied at the start), or under xdist the controller's, the parent of each
    worker's. Never the parent of a plain session's base temp: that one holds every earlier session's."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_runs(folder: Path):
    """`run(*args)`: the run folder of `cirlab *args` under `folder`, made by the first caller (a lock
    file: xdist workers wait for it) and reused by the others."""
    from cirlab.io import build_lock

    def run(*args: str) -> Path:
        run_dir = folder / re.sub(r"\W+", "_", " ".join(args)).strip("_")
        with build_lock(run_dir):
            if not (run_dir / "results.json").is_file():
                run_cli(folder, *args, run_dir=run_dir)
        return run_dir

    return run


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """`shared_run(*args)`: the run folder of `cirlab *args`, made once per test session and shared by its
    xdist workers: the zero-shot baselines several tests compare against are the same runs. A run of an
    earlier session (an older checkout's baseline) is never reused."""
    return shared_runs(session_folder(tmp_path_factory) / "shared-runs")


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def evaluation_scores(retriever, gallery: list[str], query) -> dict[str, float]:
    """Image name -> the score evaluation gives `query` (a query of the run's dataset, or a caption of a
    cross-modal run), from the run's cached features and the module's embeddings as evaluation uses them:
    not through `Retriever.index/search` or the demo, whose rankings these scores judge."""
    import torch

    module, features = retriever.module, retriever.data.features
    assert features, "the run has no cached image features to recompute evaluation's scores from"
    with torch.no_grad():
        images = torch.stack([features[n] for n in gallery]).to(module.device)
        emb = module.gallery_embedding(images).float().cpu()
        if isinstance(query, str):
            q = module.query_embedding(None, [query])
        else:
            q = module.dataset_query_embedding(features[query.reference][None].to(module.device), query)
    return dict(zip(gallery, (emb @ q.float().cpu()[0]).tolist()))


def assert_same_ranking(got: list[str], expected: list[str], score: dict[str, float]) -> None:
    """`got` is evaluation's ranking `expected` (same length, not empty) but for swaps of images whose
    scores tie to 1e-6: one query scored alone here and a whole batch in evaluation sum in another BLAS
    order (last-bit differences; seen in CI: 1.2e-7). `score` is evaluation's (`evaluation_scores`), never
    the scores of the code that ranked `got`; it must order `expected` as evaluation did."""
    assert expected, "evaluation ranked nothing for this query"
    assert len(got) == len(expected), f"{len(got)} results where evaluation has {len(expected)}: {got}"
    assert len(set(got)) == len(got), f"an image twice in {got}"
    top = [score[n] for n in expected]
    assert all(a >= b - 1e-6 for a, b in zip(top, top[1:])), f"scores {top} do not order {expected}"
    assert len(top) == 1 or top[0] - top[-1] > 1e-6, f"every score ties ({top}): they cannot judge a ranking"
    swapped = [(a, b) for a, b in zip(got, expected) if a != b]
    assert all(a in score and abs(score[a] - score[b]) < 1e-6 for a, b in swapped), (got, expected, swapped)


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """Run `cirlab` in-process: returns (exit code, stdout, stderr). The environment is run_cli's for the
    whole test, so a test may change a variable (monkeypatch.setenv) between two calls."""
    for key, value in cli_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def call(*args: str, run_dir: Path | None = None, logger: str = "none") -> tuple[int, str, str]:
        run_dir = run_dir or tmp_path / "run"
        proc = main_in_process([*args, f"logger={logger}", f"hydra.run.dir={run_dir}"])
        return proc.returncode, proc.stdout, proc.stderr

    return call


@pytest.fixture(scope="session")
def synthetic_root() -> Path:
    """The default synthetic benchmark folder (generated on first use)."""
    from cirlab.data.synthetic import SyntheticSpec, ensure

    return ensure(SyntheticSpec(), CACHE)


# ---- a small random BLIP ------------------------------------------------------------------------
BLIP_VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "[",
    "]",
    "forward",
    "backward",
    "is",
    "red",
    "and",
    "longer",
    "has",
    "sand",
    "als",
    "a",
    "##l",
    "##s",
]
SMALL_BLIP = {
    "image_text_hidden_size": 16,
    "vision_config": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 16,
        "patch_size": 8,
        "initializer_range": 0.02,
    },  # HF default 1e-10 makes a random ViT image-blind
    "text_config": {
        "vocab_size": len(BLIP_VOCAB),
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "encoder_hidden_size": 16,
        "max_position_embeddings": 32,
        "pad_token_id": 0,
    },
}


@pytest.fixture
def small_blip(tmp_path):
    """A random BLIP with a hand-written WordPiece vocab (BLIP4CIR+Bi unit tests, experiment checks)."""
    import torch

    from cirlab.backbones.blip import BlipBackbone

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(BLIP_VOCAB))
    torch.manual_seed(0)
    return BlipBackbone(config=SMALL_BLIP, vocab_file=str(vocab), max_length=32, name="blip_small")
