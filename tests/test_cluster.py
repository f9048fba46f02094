"""Beyond one process, shown on this machine: two torchrun "nodes" (gloo on 127.0.0.1) evaluate exactly as
one process and leave one run folder written by rank 0; SEARLE's OTI split across ranks gives one
process's tokens; a seed x lr sweep through submitit's local launcher and a 4-trial Optuna search run and
print their leaderboards. The commands are README "Scaling out"'s."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CACHE, ROOT, SMALL, cli_env, free_port, process_group, results, run_cli
from omegaconf import OmegaConf

from cirlab.distributed import rank_overrides
from cirlab.errors import CirlabError

OTI = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/method/searle_oti.yaml").oti)


def test_rank_overrides(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    assert rank_overrides(["+method=zeroshot"]) == []  # one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(CirlabError, match="hydra.run.dir"):
        rank_overrides(["+method=zeroshot"])
    args = ["+method=zeroshot", "hydra.run.dir=run"]
    assert rank_overrides(args) == ["hydra.output_subdir=null", "hydra.job.name=rank1"]
    assert rank_overrides([*args, "hydra.output_subdir=null"]) == []  # Lightning's launcher set them
    monkeypatch.setenv("RANK", "0")
    assert rank_overrides(args) == []


@pytest.mark.slow
def test_torchrun_two_nodes_evaluate_as_one_process(tmp_path):
    run = tmp_path / "ddp"
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
    with contextlib.ExitStack() as stack:  # a node that fails or times out: both groups stopped
        nodes = [
            stack.enter_context(
                process_group(
                    [
                        *torchrun,
                        *(f"--node-rank={rank}", f"--rdzv-endpoint=127.0.0.1:{port}"),
                        *("-m", "cirlab.cli", "+method=clip4cir_combiner", "method.combiner.max_epochs=1"),
                        *("trainer=ddp", "trainer.num_nodes=2", "trainer.devices=1", f"hydra.run.dir={run}"),
                        *SMALL,
                        "logger=none",
                    ],
                    cwd=ROOT,
                    env=cli_env(tmp_path),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
            for rank in (0, 1)
        ]
        outputs = [p.communicate(timeout=900)[0] for p in nodes]
    for rank, (p, out) in enumerate(zip(nodes, outputs)):
        assert p.returncode == 0, f"node {rank}:\n{out[-5000:]}"
    ddp = results(run)
    assert ddp["config"]["trainer"]["num_nodes"] == 2
    # written once: rank 0 wrote .hydra/ and the run's files, rank 1 only its log
    assert sorted(p.name for p in run.iterdir()) == [
        ".hydra",
        "cli.log",
        "rank1.log",
        "results.json",
        "stages",
    ]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (run / "rank1.log").read_text()

    # the trained weights evaluated by one process: the same metrics and rankings
    stage = run / "stages/combiner"
    one = tmp_path / "one"
    run_cli(
        tmp_path,
        "+method=clip4cir_combiner",
        "method.combiner.max_epochs=0",
        f"method.combiner.checkpoint={stage / 'checkpoints/best.ckpt'}",
        *SMALL,
        run_dir=one,
    )
    assert results(one)["metrics"] == ddp["metrics"]
    for split in ("val", "test"):
        file = f"stages/combiner/predictions.{split}.json"
        assert json.loads((one / file).read_text()) == json.loads((run / file).read_text())


def oti_inputs(folder: Path):
    """The pretrained tiny backbone, a SEARLE text side and five synthetic images (chunks of 2: 2, 2, 1)."""
    from omegaconf import OmegaConf

    from cirlab.data.features import encode_images
    from cirlab.data.synthetic import SyntheticSpec, ensure
    from cirlab.methods.searle_text import SearleText
    from cirlab.pretrain import pretrained_tiny

    tiny = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/backbone/tiny.yaml").model)
    backbone = pretrained_tiny(str(CACHE), tiny["model_cfg"], tiny["pretrain"]).eval()
    vocab = folder / "vocab.txt"
    vocab.write_text("red circle\nblue square\ngreen triangle\nyellow cross\n")
    text = SearleText(backbone, None, {"vocabulary": str(vocab)}, {"generator": "template", "per_concept": 8})
    root = ensure(SyntheticSpec(), CACHE)
    rows = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()[:5]]
    names = [r["image"] for r in rows]
    return backbone, text, names, encode_images(backbone, [root / n for n in names])


def invert_with(backbone, text, seen: list[int]):
    from cirlab.methods.searle_oti import oti

    def invert(features):
        seen.append(len(features))
        tokens, ema, _ = oti(backbone, text, features, {**OTI, "steps": 3, "top_k": 2})
        return tokens, ema

    return invert


def oti_rank(rank: int, folder: Path, counts: dict) -> None:
    import torch.distributed as dist

    from cirlab.methods.searle_tokens import OTIStore

    dist.init_process_group("gloo", init_method=f"file://{folder / 'init'}", rank=rank, world_size=2)
    backbone, text, names, feats = oti_inputs(folder)
    seen: list[int] = []
    OTIStore(folder / "split.pt", "k").compute(names, feats, invert_with(backbone, text, seen), 2, 2)
    counts[rank] = seen
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters
def test_oti_split_across_ranks_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    from cirlab.methods.searle_tokens import OTIStore

    with mp.Manager() as manager:  # its server process stops with the block
        counts = manager.dict()
        mp.spawn(oti_rank, args=(tmp_path, counts), nprocs=2, join=True)
        counts = dict(counts)
    assert counts == {0: [2, 1], 1: [2]}  # chunks 0 and 2 on rank 0, chunk 1 on rank 1

    backbone, text, names, feats = oti_inputs(tmp_path)
    one = OTIStore(tmp_path / "one.pt", "k")
    one.compute(names, feats, invert_with(backbone, text, []), 2, 2)
    split = OTIStore(tmp_path / "split.pt", "k")  # the merged file rank 0 wrote
    assert split.names == one.names == names
    assert torch.equal(torch.stack(split.tokens), torch.stack(one.tokens))
    assert torch.equal(torch.stack(split.ema), torch.stack(one.ema))
    assert not list(tmp_path.glob("split.rank*"))  # the ranks' own files are merged and gone


def leaderboard_rows(stdout: str) -> list[str]:
    table = stdout[stdout.index("Leaderboard (") :].splitlines()[1:]
    return [line for line in table if line.startswith("| ") and not line.startswith("| run ")]


@pytest.mark.slow
def test_submitit_local_sweep(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = run_cli(
        tmp_path,
        "-m",
        "+experiment=sweep_clip4cir_combiner",
        "hydra/launcher=submitit_local",
        "seed=0",
        "method.combiner.module.optimizer.lr=5e-4,1e-3",
        "method.combiner.max_epochs=1",
        *SMALL,
        process=True,
    )
    (sweep,) = (tmp_path / "outputs/multirun").iterdir()
    assert len(list(sweep.glob(".submitit/*"))) >= 2  # the jobs went through submitit
    runs = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert len(runs) == 2 and all(results(r)["config"]["resume"] for r in runs)
    rows = leaderboard_rows(proc.stdout)
    assert len(rows) == 2 and any("| 0.0005 " in r for r in rows) and any("| 0.001 " in r for r in rows)


def test_sweep_job_folder_names_fit_the_file_system():
    from cirlab.cli import short_dirname

    assert short_dirname("lr=0.1,seed=0") == "lr=0.1,seed=0"
    long = ",".join(f"++dataset.source.n_{s}=1000" for s in ("pretrain", "train", "val", "test")) + ",lr=1e-3"
    assert len(long) > 100
    cut = short_dirname(long, limit=100)
    assert cut.startswith(long[:100]) and len(cut) == 109  # the first 100 bytes, "-", 8 hex digits
    assert short_dirname(long[:-1] + "4", limit=100) != cut  # another override, another name
    assert short_dirname("é" * 200, limit=159)[:80] == "é" * 79 + "-"  # a 2-byte character is not split


@pytest.mark.slow
def test_optuna_search(tmp_path):
    """Optuna trials on the small benchmark: its four overrides make the job folder names long (cut)."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = run_cli(
        tmp_path, "-m", "+experiment=optuna_clip4cir_combiner", "method.combiner.max_epochs=1", *SMALL
    )
    (sweep,) = (tmp_path / "outputs/multirun").iterdir()
    trials = [results(p.parent) for p in sweep.glob("*/results.json")]
    assert (
        len(trials) == 4
        and len({t["config"]["method"]["combiner"]["module"]["optimizer"]["lr"] for t in trials}) == 4
    )
    best = max(t["metrics"][t["main_metric"]] for t in trials)  # what each run returned to Optuna
    optuna = (sweep / "optimization_results.yaml").read_text()
    assert f"best_value: {best}" in optuna
    assert len(leaderboard_rows(proc.stdout)) == 4


def test_slurm_sweep_makes_one_sbatch_array(cli, tmp_path, monkeypatch):
    """The README's SLURM sweep composes into one sbatch job array with the documented keys (the submission
    is caught before sbatch: no cluster here)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from submitit.slurm.slurm import SlurmExecutor

    scripts = []

    class Submitted(Exception):
        pass

    def submit(executor, command):
        scripts.append(executor._make_submission_file_text(command, "uid"))
        raise Submitted

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # as if srun were here
    monkeypatch.setattr(SlurmExecutor, "_submit_command", submit)
    code, _, _ = cli("-m", "+experiment=sweep_clip4cir_combiner", "trainer=gpu", "hydra.launcher.partition=P")
    assert code != 0 and len(scripts) == 1
    for option in (
        "partition=P",
        "time=240",
        "gpus-per-node=1",
        "ntasks-per-node=1",
        "nodes=1",
        "array=0-8%9",
    ):
        assert f"#SBATCH --{option}\n" in scripts[0], (option, scripts[0])
    assert "#SBATCH --signal=USR2@120" in scripts[0]
