"""Runs a method's stages in order and writes the run's artefacts.

For each stage: build it (cirlab/stage.py: the LightningModule around the shared, in-memory backbone
and a datamodule serving cached image features if its image encoder is frozen), fit with
checkpoints (cirlab/checkpoints.py), reload the best
checkpoint, validate and test, write predictions/submission files. A finished stage leaves
`stages/<name>/done.json`; a resumed run (`resume=true`) skips finished stages (reloading
their best weights) and continues the interrupted one from its last checkpoint.
"""

from __future__ import annotations

import logging
import random
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from cirlab.checkpoints import SafeCheckpointIO, load_module_weights
from cirlab.data.datamodule import CIRDataModule
from cirlab.data.images import check_present
from cirlab.data.sources.readable import ReadableOnly, describe
from cirlab.distributed import start_process_group_before_fit
from cirlab.errors import CirlabError
from cirlab.io import read_json, write_json
from cirlab.methods.retrieval_module import RetrievalModule
from cirlab.retrieval.category_csv import write_category_csv
from cirlab.retrieval.submission import write_predictions
from cirlab.stage import build_datamodule, build_stage

log = logging.getLogger("cirlab")


class BatchSeed(Callback):
    """Reseed every RNG before each training batch from (seed, epoch, batch): dropout masks then
    depend on the batch's position alone, whatever consumed random numbers before it (loader set-up
    differs between a fresh and a resumed run), so a resumed run matches an uninterrupted one."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        value = (self.seed * 1_000_003 + trainer.current_epoch * 10_007 + batch_idx) % 2**32
        torch.manual_seed(value)
        random.seed(value)
        np.random.seed(value)


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def build_logger(cfg: DictConfig, stage: str, stage_dir: Path):
    if not cfg.get("logger"):
        return False
    return instantiate(cfg.logger, name=f"{cfg.get('run_name') or 'cirlab'}-{stage}", save_dir=str(stage_dir))


def close_logger(logger) -> None:
    """A logger with a per-stage run to end says so with `close()` (cirlab/loggers.py)."""
    if hasattr(logger, "close"):
        logger.close()


class PhaseTimer:
    """Wall seconds per phase of a run (dataset, backbone, each stage's features / train / eval): where a
    cold start's time goes, in results.json (`phase_wall_time_s`) and the closing table."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 2)


def reuse_finished(module: RetrievalModule, name: str, done: Path) -> dict[str, Any]:
    """A resumed run's finished stage: its best weights back into the module, its record as it was."""
    record = read_json(done)
    if record.get("best_checkpoint"):
        load_module_weights(module, Path(record["best_checkpoint"]))
    log.info("stage %s already finished: reusing %s", name, done)
    return record


def build_trainer(
    cfg: DictConfig, name: str, checkpoints: list[ModelCheckpoint], logger, stage_dir: Path
) -> L.Trainer:
    return instantiate(
        cfg.trainer,
        max_epochs=max(cfg.method[name].max_epochs, 1),
        callbacks=[*checkpoints, BatchSeed(cfg.seed)],
        logger=logger,
        default_root_dir=str(stage_dir),
        plugins=[SafeCheckpointIO()],
        reload_dataloaders_every_n_epochs=1,
    )


def fit(
    trainer: L.Trainer,
    module: RetrievalModule,
    dm: CIRDataModule,
    checkpoint: ModelCheckpoint,
    last: Path,
    resume: bool,
) -> dict[str, Any]:
    """Train (from the stage's last checkpoint when resuming), then reload the selected weights."""
    ckpt_path = str(last) if resume and last.is_file() else None
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    start_process_group_before_fit(
        trainer
    )  # torchrun/srun: the ranks share the work of train_loader (SEARLE's OTI)
    loader = module.train_loader(dm)
    if loader is None:
        trainer.fit(module, dm, ckpt_path=ckpt_path)
    else:
        trainer.fit(
            module, train_dataloaders=loader, val_dataloaders=dm.val_dataloader(), ckpt_path=ckpt_path
        )
    best = (checkpoint.best_model_path if checkpoint.monitor else "") or str(last)
    load_module_weights(module, Path(best))
    return {"best_checkpoint": best, "epochs": trainer.current_epoch}


def evaluate(trainer: L.Trainer, module: RetrievalModule, dm: CIRDataModule) -> dict[str, float]:
    module.metrics.clear()
    trainer.validate(module, dm, verbose=False)
    trainer.test(module, dm, verbose=False)
    return dict(sorted(module.metrics.items()))


def write_outputs(
    cfg: DictConfig, module: RetrievalModule, dm: CIRDataModule, stage_dir: Path, logger
) -> None:
    """Predictions (and submission files) and the retrieval pictures of every evaluated split."""
    for split, results in module.results.items():
        write_predictions(stage_dir, split, dm.source, results)
        visualize(cfg, module, dm, split, stage_dir, logger)


def run_stage(
    cfg: DictConfig, name: str, backbone, data: CIRDataModule, run_dir: Path, resume: bool, timer: PhaseTimer
) -> dict[str, Any]:
    scfg = cfg.method[name]
    stage_dir = run_dir / "stages" / name
    done = stage_dir / "done.json"
    if resume and done.is_file():  # its weights (and the backbone's) as the stage left them; no data
        return reuse_finished(
            build_stage(cfg, name, backbone, None, stage_dir, mode="load").module, name, done
        )
    with timer(f"{name}/features"):
        stage = build_stage(cfg, name, backbone, data, stage_dir)
    module, dm = stage.module, stage.datamodule

    record: dict[str, Any] = {"stage": name, "best_checkpoint": None}
    if stage.weights_from:
        record["weights_from"] = stage.weights_from
    ckpt_dir = stage_dir / "checkpoints"
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor=module.checkpoint_monitor(),
        mode="max",
        save_top_k=1,
        enable_version_counter=False,
        save_on_train_epoch_end=True,
    )  # a whole-epoch state: resume starts the next epoch
    # last.ckpt every epoch; its own callback, as save_last=True (Lightning >= 2.6) writes it only in an
    # epoch that also saves best.ckpt, and a resume would then repeat every epoch since the best one
    last_checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, filename="last", enable_version_counter=False, save_on_train_epoch_end=True
    )
    logger = build_logger(cfg, name, stage_dir)
    # best first: last.ckpt then holds its state
    trainer = build_trainer(cfg, name, [checkpoint, last_checkpoint], logger, stage_dir)
    train = scfg.max_epochs > 0
    if train:
        with timer(f"{name}/train"):
            record.update(fit(trainer, module, dm, checkpoint, ckpt_dir / "last.ckpt", resume))
    record["selected_on"] = selection(checkpoint.monitor, train, record.get("weights_from"))
    with timer(f"{name}/eval"):
        record["metrics"] = evaluate(trainer, module, dm)
        if rank_zero_only.rank == 0:  # under DDP every rank holds the same gathered results
            write_outputs(cfg, module, dm, stage_dir, logger)
    if rank_zero_only.rank == 0:
        write_json(done, record)
    close_logger(logger)
    return record


def selection(monitor: str | None, trained: bool, weights_from: dict | None) -> str:
    """How this stage's weights were chosen, for results.json and the results table."""
    if trained:
        return f"best {monitor}" if monitor else "last epoch"
    return "given checkpoint (no training)" if weights_from else "no training"


def visualize(
    cfg: DictConfig, module: RetrievalModule, dm: CIRDataModule, split: str, stage_dir: Path, logger
) -> None:
    """retrieval_<split>.png/.html in the stage folder when eval.visualize (cirlab/retrieval/visualize.py)."""
    if not cfg.eval.get("visualize", False):
        return
    from cirlab.retrieval.visualize import visualize_split

    visualize_split(
        module,
        dm,
        split,
        stage_dir,
        n=cfg.eval.get("visualize_n", 8),
        k=cfg.eval.get("visualize_k", 5),
        logger=logger,
    )


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    start = time.time()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    resume = bool(cfg.resume)
    for name in cfg.method.stages:  # config errors before any data or model work
        if name not in cfg.method:
            raise CirlabError(
                f"method.stages names {name!r} but method has no such stage; "
                f"stages defined: {[k for k in cfg.method if k not in ('name', 'stages')]}"
            )
        file = cfg.method[name].get("checkpoint")  # its type and every other value: cirlab/schema.py
        if file and not Path(file).is_file():
            raise CirlabError(f"method.{name}.checkpoint={file}: no such file")
    timer = PhaseTimer()
    with timer("dataset"):  # the synthetic benchmark is generated here on first use
        source = instantiate(cfg.dataset.source)
        skip_missing = cfg.dataset.get("missing_images") == "skip"
        if skip_missing:
            source = ReadableOnly(source)
        dm = build_datamodule(cfg, source)
        images = dm.all_images((dm.val_split, dm.test_split))  # annotation errors now, not after pretraining
        if not skip_missing:
            check_present([source.image_path(name) for name in images])
    with timer("backbone"):  # backbone=tiny|blip_tiny are pretrained here on first use
        backbone = instantiate(cfg.backbone.model)
    stages: dict[str, Any] = {}
    for name in cfg.method.stages:
        stages[name] = run_stage(cfg, name, backbone, dm, run_dir, resume, timer)
    final = stages[cfg.method.stages[-1]]
    results = {
        "metrics": final["metrics"],
        "stages": {k: v["metrics"] for k, v in stages.items()},
        "method": cfg.method.name,
        "dataset": cfg.dataset.name,
        "backbone": cfg.backbone.name,
        "main_metric": f"{cfg.dataset.test_split}/{source.protocol.main_metric}",
        "reported_split": cfg.dataset.test_split,
        # how each stage's weights were chosen; "best <split>/..." on the reported split is not held out
        "selection": {k: v.get("selected_on", "unknown") for k, v in stages.items()},
        "config": OmegaConf.to_container(cfg, resolve=True),
        "git_commit": git_commit(),
        "wall_time_s": round(time.time() - start, 2),
        "phase_wall_time_s": timer.seconds,  # this process's phases (a resumed run: since the resume)
    }
    if isinstance(source, ReadableOnly):  # the numbers are over fewer queries than the full benchmark's
        results["skipped_images"] = source.skipped
        log.info(
            "dataset.missing_images=skip, skipped/all: %s (`cirlab +task=check_data` lists the images)",
            describe(source.skipped),
        )
    if rank_zero_only.rank == 0:
        write_json(run_dir / "results.json", results)
        # a grouped benchmark's (FashionIQ) per-category table, as the papers print it
        write_category_csv(run_dir / "metrics_per_category.csv", results["metrics"], cfg.dataset.test_split)
    return results
