"""Runs a method's stages in order and writes the run's artefacts.

For each stage: build the LightningModule around the (shared, in-memory) backbone, serve cached
image features if the stage's image encoder is frozen, fit with checkpoints, reload the best
checkpoint, validate and test, write predictions/submission files. A finished stage leaves
`stages/<name>/done.json`; a resumed run (`resume=true`) skips finished stages (reloading
their best weights) and continues the interrupted one from its last checkpoint.
"""

from __future__ import annotations

import logging
import os
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
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from cirlab.data.datamodule import CIRDataModule
from cirlab.data.features import FeatureCache, TextFeatureCache
from cirlab.data.images import check_present
from cirlab.data.sources.readable import ReadableOnly, describe
from cirlab.distributed import connect
from cirlab.errors import CirlabError
from cirlab.io import read_json, save_torch, write_json
from cirlab.methods.retrieval_module import RetrievalModule
from cirlab.retrieval.submission import write_predictions
from cirlab.weights import load_strict, load_weights

log = logging.getLogger("cirlab")


class SafeCheckpointIO(TorchCheckpointIO):
    """Checkpoints load with weights_only=True: a checkpoint file can never run code.
    An unreadable one (truncated by a full disk, copied half-way) stops with what to delete: the
    run folder's other stages are kept.
    Saved like every cirlab file (cirlab.io.atomic_path): a temp file beside the checkpoint, fsync,
    rename, fsync of the folder. Lightning's own atomic save stages the file in $TMPDIR and moves it:
    with a node-local /tmp and the run on NFS/Lustre that is a copy a kill can leave half-written, and a
    full /tmp stops checkpointing although the run folder has room."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:  # Lightning's refusal (a TypeError)
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_torch(path, checkpoint)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        try:
            return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CirlabError(f"cannot load checkpoint {path}: {first}{restart_hint(Path(path))}") from err


def restart_hint(ckpt: Path) -> str:
    """How to go on past an unreadable checkpoint of stage folder `stages/<stage>/checkpoints/`."""
    if ckpt.parent.name != "checkpoints":
        return ""
    stage = ckpt.parent.parent
    if ckpt.name == "last.ckpt":
        return (
            f"\nThe file is damaged: delete {ckpt} and resume again to restart stage {stage.name} "
            "from its first epoch (finished stages are kept)."
        )
    return (
        f"\nThe file is damaged: delete {stage / 'done.json'} and {ckpt.parent} and resume again to "
        f"train stage {stage.name} anew (the other stages are kept)."
    )


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


def check_data_kind(cfg: DictConfig, module: RetrievalModule, dm: CIRDataModule) -> None:
    """A method trains and scores one kind of data: CIR triplets or image captions."""
    wanted, given = module.data_kind, dm.kind
    if wanted != given:
        raise CirlabError(
            f"method {cfg.method.name!r} needs a {wanted} dataset, but dataset={cfg.dataset.name} is {given}. "
            + (
                "Pick a captions dataset: synthetic_captions, coco, flickr30k, captions_jsonl."
                if wanted == "captions"
                else "Pick a CIR dataset, e.g. dataset=synthetic."
            )
        )


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


def cached_images(module: RetrievalModule, dm: CIRDataModule, trained: bool) -> list[str]:
    """The images whose features a frozen-encoder stage caches (the cache file is keyed by this list)."""
    return dm.all_images(image_splits(module, dm, trained))


def cached_texts(module: RetrievalModule, dm: CIRDataModule, trained: bool) -> list[str]:
    """The texts whose features a frozen-text-encoder stage caches (the cache file is keyed by this list)."""
    return dm.frozen_texts(image_splits(module, dm, trained))


def build_module(cfg: DictConfig, name: str, backbone, dm: CIRDataModule, stage_dir: Path) -> RetrievalModule:
    module: RetrievalModule = instantiate(
        cfg.method[name].module,
        backbone=backbone,
        search=cfg.retrieval.search,
        search_options=OmegaConf.to_container(cfg.retrieval.options),
    )
    check_data_kind(cfg, module, dm)
    module.eval_data = dm
    if cfg.eval.gallery_on_disk:
        module.gallery_on_disk = stage_dir / "gallery"
    return module


def reuse_finished(module: RetrievalModule, name: str, done: Path) -> dict[str, Any]:
    """A resumed run's finished stage: its best weights back into the module, its record as it was."""
    record = read_json(done)
    if record.get("best_checkpoint"):
        load_module_weights(module, Path(record["best_checkpoint"]))
    log.info("stage %s already finished: reusing %s", name, done)
    return record


def feed_data(cfg: DictConfig, name: str, module: RetrievalModule, backbone, dm: CIRDataModule) -> None:
    """Cached image features when the stage's image encoder is frozen, else preprocessed pixels."""
    train = cfg.method[name].max_epochs > 0
    if module.frozen_image_encoder:
        names = cached_images(module, dm, train)
        cache = FeatureCache(cfg.paths.cache_dir, batch_size=cfg.eval.batch_size, num_workers=dm.num_workers)
        encoder = module.feature_encoder()
        dm.use(
            features=cache.get(encoder, names, [dm.source.image_path(n) for n in names]),
            text_views=module.text_views,
            reference_views=module.reference_views,
        )
        log.info(
            "stage %s: %s image features %s", name, len(names), "from cache" if cache.last_hit else "encoded"
        )
    else:
        dm.use(
            transform=backbone.preprocess,
            text_views=module.text_views,
            reference_views=module.reference_views,
        )
    dm.batch_size = cfg.method[name].batch_size
    if module.frozen_text_encoder:
        module.text_table = text_table(cfg, module, dm, train)
        log.info("stage %s: %s text features (frozen text encoder)", name, len(module.text_table))


def text_table(cfg: DictConfig, module: RetrievalModule, dm: CIRDataModule, train: bool) -> dict:
    """A frozen-text-encoder stage's features of every text it can see, from the text-feature cache."""
    cache = TextFeatureCache(cfg.paths.cache_dir, batch_size=cfg.eval.batch_size)
    return cache.get(module.backbone, cached_texts(module, dm, train))


def load_given_weights(module: RetrievalModule, name: str, file: str) -> dict[str, str]:
    """method.<stage>.checkpoint: the stage's own weights, in cirlab's or the authors' layout."""
    layout = load_weights(
        module.stage_weights(), file, module.checkpoint_layouts(), f"method.{name}.checkpoint"
    )
    log.info("stage %s: weights from %s (%s)", name, file, layout)
    return {"file": str(file), "layout": layout}


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
    connect(trainer)  # torchrun/srun: the ranks share the work of train_loader (SEARLE's OTI)
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
    module.metrics = {}
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


def image_splits(module: RetrievalModule, dm: CIRDataModule, train: bool) -> tuple[str, ...]:
    """The splits whose images and texts a stage reads (their features are cached together)."""
    return (("train",) if train and module.trains_on_dataset_images else ()) + (dm.val_split, dm.test_split)


def run_stage(
    cfg: DictConfig, name: str, backbone, dm: CIRDataModule, run_dir: Path, resume: bool, timer: PhaseTimer
) -> dict[str, Any]:
    scfg = cfg.method[name]
    stage_dir = run_dir / "stages" / name
    module = build_module(cfg, name, backbone, dm, stage_dir)
    done = stage_dir / "done.json"
    if resume and done.is_file():
        return reuse_finished(module, name, done)
    with timer(f"{name}/features"):
        feed_data(cfg, name, module, backbone, dm)

    record: dict[str, Any] = {"stage": name, "best_checkpoint": None}
    if scfg.get("checkpoint"):
        record["weights_from"] = load_given_weights(module, name, scfg.checkpoint)
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


def load_module_weights(module: torch.nn.Module, path: Path) -> None:
    ckpt = SafeCheckpointIO().load_checkpoint(path)
    stamp = ckpt.get("cirlab", {})
    mine = {"method": type(module).__name__, "backbone": module.backbone.name}
    if stamp and stamp != mine:
        raise CirlabError(
            f"checkpoint {path} was written by method {stamp['method']} with backbone "
            f"{stamp['backbone']!r}, but this run is {mine['method']} with backbone {mine['backbone']!r}"
        )
    if not isinstance(ckpt.get("state_dict"), dict):
        raise CirlabError(f"checkpoint {path} holds no state_dict: is it a Lightning checkpoint of cirlab?")
    load_strict(module, ckpt["state_dict"], f"checkpoint {path}")  # names the keys that do not fit


def on_gpu(cfg: DictConfig) -> bool:
    """Whether the run's trainer puts the model on a GPU (`accelerator: auto` does when CUDA is here)."""
    accelerator = cfg.trainer.accelerator
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def loader_workers(cfg: DictConfig) -> int:
    """`num_workers`, with auto = none on CPU and the cores per device (at most 8) on a GPU. Workers never
    change the data (each item is drawn from (seed, epoch, index)), only how fast it arrives."""
    if cfg.num_workers != "auto":
        return int(cfg.num_workers)
    if not on_gpu(cfg):
        return 0
    devices = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) and cfg.trainer.devices > 0 else 1
    return min(8, max(1, (os.cpu_count() or 1) // devices))


def build_datamodule(cfg: DictConfig, source) -> CIRDataModule:
    """The dataset config's datamodule (CIR triplets or image captions) over `source`."""
    if "datamodule" not in cfg.dataset:
        raise CirlabError(
            f"dataset {cfg.dataset.name!r} names no datamodule: add `datamodule: {{_target_: "
            "cirlab.data.datamodule.CIRDataModule}` (CaptionDataModule for image captions) to its config"
        )
    return instantiate(
        cfg.dataset.datamodule,
        source,
        eval_batch_size=cfg.eval.batch_size,
        num_workers=loader_workers(cfg),
        pin_memory=on_gpu(cfg),
        seed=cfg.seed,
        val_split=cfg.dataset.val_split,
        test_split=cfg.dataset.test_split,
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
        L.seed_everything(cfg.seed, workers=True, verbose=False)
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
    return results
