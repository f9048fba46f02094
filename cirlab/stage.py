"""One stage of a method, built in one place for training (cirlab.pipeline) and for inference
(cirlab.load, the demo): its module, with the weights it starts from, and the datamodule serving
exactly its inputs (cached features of a frozen image encoder, or pixels; its caption and reference
views; its batch size).

Why one factory: a stage built twice, by two sets of attribute assignments, drifted apart before
(dropout mode, a read-only text table). Here the module's evaluation data, text-feature table, gallery
folder and stage folder are given in `build_stage` alone, and the datamodule is never changed after it
is built. `mode="load"` reads the features the run cached and never encodes; a dataset that is not on
this machine leaves the stage without data (a gallery of other images can still be indexed).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cirlab.checkpoints import load_module_weights
from cirlab.data.datamodule import CIRDataModule
from cirlab.data.features import FeatureCache, TextFeatureCache
from cirlab.errors import CirlabError
from cirlab.methods.retrieval_module import RetrievalModule
from cirlab.weights import load_weights

log = logging.getLogger("cirlab")


@dataclass(frozen=True)
class Stage:
    name: str
    module: RetrievalModule
    datamodule: CIRDataModule | None  # None: loaded without its run's dataset
    weights_from: dict[str, str] | None  # method.<stage>.checkpoint, when given


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
    """The run's datamodule over `source` (CIR triplets or image captions): it lists the data; each
    stage serves it through its own `for_stage` copy."""
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


def image_splits(module: RetrievalModule, dm: CIRDataModule, train: bool) -> tuple[str, ...]:
    """The splits whose images and texts a stage reads (their features are cached together)."""
    return (("train",) if train and module.trains_on_dataset_images else ()) + (dm.val_split, dm.test_split)


def stage_features(
    cfg: DictConfig, name: str, module: RetrievalModule, dm: CIRDataModule, train: bool, mode: str
) -> dict[str, torch.Tensor] | None:
    """A frozen image encoder's features of every image the stage reads: encoded into the cache when
    training, only read from it when loading (None when the run's cache file is not here)."""
    names = dm.all_images(image_splits(module, dm, train))
    paths = [dm.source.image_path(n) for n in names]
    cache = FeatureCache(cfg.paths.cache_dir, batch_size=cfg.eval.batch_size, num_workers=dm.num_workers)
    if mode == "load":
        return cache.cached(module.feature_encoder(), names, paths)
    features = cache.get(module.feature_encoder(), names, paths)
    log.info(
        "stage %s: %s image features %s", name, len(names), "from cache" if cache.last_hit else "encoded"
    )
    return features


def stage_texts(
    cfg: DictConfig, name: str, module: RetrievalModule, dm: CIRDataModule, train: bool, mode: str
) -> dict[str, torch.Tensor] | None:
    """A frozen text encoder's features of every text the stage can see, from the text-feature cache
    (encoded when training; when loading, the run's very table or None)."""
    cache = TextFeatureCache(cfg.paths.cache_dir, batch_size=cfg.eval.batch_size)
    texts = dm.frozen_texts(image_splits(module, dm, train), module.text_views)
    if mode == "load":
        return cache.cached(module.backbone, texts)
    table = cache.get(module.backbone, texts)
    log.info("stage %s: %s text features (frozen text encoder)", name, len(table))
    return table


def given_weights(module: RetrievalModule, cfg: DictConfig, name: str) -> dict[str, str] | None:
    """method.<stage>.checkpoint: the stage's own weights, in cirlab's or the authors' layout."""
    file = cfg.method[name].get("checkpoint")
    if not file:
        return None
    layout = load_weights(
        module.stage_weights(), file, module.checkpoint_layouts(), f"method.{name}.checkpoint"
    )
    log.info("stage %s: weights from %s (%s)", name, file, layout)
    return {"file": str(file), "layout": layout}


def build_stage(
    cfg: DictConfig,
    name: str,
    backbone,
    data: CIRDataModule | None,
    stage_dir: Path,
    mode: Literal["train", "load"] = "train",
    trained: Path | None = None,
) -> Stage:
    """Stage `name` of the run `cfg` around the (shared) `backbone`, over the run's datamodule `data`.

    train: seeded as the run, features encoded into the cache, then the given weights file (the order
    the cache keys were made in). load: the given weights file, then the `trained` checkpoint (the
    stage's best), then the features and texts the run cached, read only."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # an untrained stage keeps the run's init
    module: RetrievalModule = instantiate(
        cfg.method[name].module,
        backbone=backbone,
        search=cfg.retrieval.search,
        search_options=OmegaConf.to_container(cfg.retrieval.options),
    )
    weights_from = None
    if mode == "load":
        weights_from = given_weights(module, cfg, name)
        if trained is not None:
            load_module_weights(module, trained)
    dm = None
    if data is not None:
        check_data_kind(cfg, module, data)
        train = cfg.method[name].max_epochs > 0
        cached = module.frozen_image_encoder and (mode == "train" or cfg.paths.get("cache_dir"))
        dm = data.for_stage(
            batch_size=cfg.method[name].batch_size,
            transform=backbone.preprocess,
            features=stage_features(cfg, name, module, data, train, mode) if cached else None,
            text_views=module.text_views,
            reference_views=module.reference_views,
        )
        if module.frozen_text_encoder and (mode == "train" or cfg.paths.get("cache_dir")):
            module.text_table = stage_texts(cfg, name, module, data, train, mode)
    if mode == "train":
        weights_from = given_weights(module, cfg, name)
    module.eval_data = dm
    if cfg.eval.get("gallery_on_disk") and mode == "train":
        module.gallery_on_disk = stage_dir / "gallery"
    if mode == "load":
        module.stage_dir = stage_dir
    return Stage(name, module, dm, weights_from)
