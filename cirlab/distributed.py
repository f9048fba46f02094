"""Runs of several processes (DDP across GPUs and nodes): one run folder written by rank 0, and work
done before training split across the ranks.

Lightning starts the processes of `trainer=ddp` itself when nothing else did, and then keeps Hydra's
files to rank 0. Under torchrun or srun every process runs `cirlab` from the start; these helpers give
them the same arrangement.
"""

from __future__ import annotations

import os

from cirlab.errors import CirlabError


def rank_overrides(argv: list[str]) -> list[str]:
    """Hydra overrides for one process of a torchrun/srun launch: all write into the one run folder
    given by hydra.run.dir (a time-stamped default could differ between processes and nodes); ranks
    other than 0 write no `.hydra/` and log to `rank<N>.log`, as in Lightning's own launcher."""
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    if world == 1 or any(a.startswith("hydra.output_subdir=") for a in argv):
        return []  # one process, or one that Lightning's launcher started with these overrides
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        raise CirlabError(
            f"this is one of {world} processes (torchrun/srun): give hydra.run.dir=DIR, the run folder "
            "they all write into (the same on every node)"
        )
    rank = int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)
    return [] if rank == 0 else ["hydra.output_subdir=null", f"hydra.job.name=rank{rank}"]


def start_process_group_before_fit(trainer) -> None:
    """Start the process group before fit when torchrun or srun started the processes, so that work a
    stage does before training (SEARLE's OTI targets of phi) is split across the ranks. Lightning's own
    launcher starts its processes inside fit: there that work is done once, before, and its file shared."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    env = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.world_size > 1 and env is not None and not isinstance(env, LightningEnvironment):
        trainer.strategy.setup_environment()


def rank_and_world() -> tuple[int, int]:
    """(rank, number of ranks) of the process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(obj) -> list:
    """Every rank's `obj` (picklable), in rank order."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
