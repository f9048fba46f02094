"""Non-training tasks of the `cirlab` CLI (`+task=NAME`)."""
from __future__ import annotations

import sys

from hydra.utils import instantiate
from omegaconf import DictConfig

from cirlab.data.check import check_images, format_report
from cirlab.errors import CirlabError


def check_data(cfg: DictConfig) -> None:
    """List what is missing or unreadable in a dataset, with the expected layout; exit 2 on problems."""
    source = instantiate(cfg.dataset.source)
    splits = list(cfg.get("splits") or ["train", cfg.dataset.val_split, cfg.dataset.test_split])
    usable = []
    for split in dict.fromkeys(splits):
        try:
            (source.train_queries() if split == "train" else source.eval_sets(split))
            usable.append(split)
        except CirlabError as err:
            print(f"split {split}: {err}")
    report = check_images(source, usable)
    print(f"dataset {cfg.dataset.name} ({', '.join(usable)}): {format_report(report)}")
    if not report.ok or len(usable) < len(dict.fromkeys(splits)):
        if source.layout:
            print(f"expected layout:\n{source.layout}")
        sys.exit(2)


def report(cfg: DictConfig) -> None:
    """Leaderboard of finished runs: `cirlab +task=report [+runs=[DIR,...]]` (default: all of paths.output_dir)."""
    from cirlab.report import report as leaderboard

    runs = cfg.get("runs") or [cfg.paths.output_dir]
    print(leaderboard([runs] if isinstance(runs, str) else list(runs), "csv" if cfg.get("csv") else "markdown"))


TASKS = {"check_data": check_data, "report": report}


def run_task(cfg: DictConfig):
    if cfg.task not in TASKS:
        raise CirlabError(f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    return TASKS[cfg.task](cfg)
