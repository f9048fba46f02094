"""Pretraining of the small backbones on the synthetic captions, cached by config hash.

No pretrained weights can be downloaded in CI or here, so the tiny backbones (`tiny`, `blip_tiny`)
are trained by cirlab itself (CLIP InfoNCE on the synthetic benchmark's image captions) on first
use and cached by a hash of (model config, pretraining config): later runs load them in a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from tqdm.auto import tqdm

from cirlab.backbones.base import Backbone
from cirlab.data.images import load_image
from cirlab.data.sources.synthetic import synthetic_source
from cirlab.io import build_lock, load_torch, save_torch, write_json
from cirlab.methods.crossmodal import ContrastivePretraining, evaluate_captions, make_loader

log = logging.getLogger(__name__)


def plain(obj):
    """A plain JSON-able copy (also of an OmegaConf node)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, (DictConfig, ListConfig)):
        obj = OmegaConf.to_container(obj, resolve=True)
    return json.loads(json.dumps(obj))


def cache_path(cache_dir: str, name: str, model_cfg: dict, pretrain: dict) -> Path:
    key = hashlib.sha1(json.dumps([model_cfg, pretrain], sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / "backbones" / f"{name}-{key}.pt"


def load_or_pretrain(
    backbone: Backbone, cache_dir: str, model_cfg: dict, pretrain: dict, name: str
) -> Backbone:
    """Load the cached pretrained weights of (model_cfg, pretrain), or pretrain and cache them."""
    path = cache_path(cache_dir, name, model_cfg, pretrain)
    if _load_cached(backbone, path, name, warn=False):
        return backbone
    with build_lock(path):  # concurrent runs pretrain once; the others wait, then load its file
        if not _load_cached(backbone, path, name, warn=True):
            pretrain_on_captions(backbone, cache_dir, pretrain, path)
    return backbone


def _load_cached(backbone: Backbone, path: Path, name: str, warn: bool) -> bool:
    if not path.is_file():
        return False
    try:
        backbone.load_state_dict(load_torch(path)["state_dict"])
        return True
    except Exception as err:  # corrupt cache: retrain rather than fail
        if warn:
            log.warning("cached %s backbone %s unreadable (%s): pretraining again", name, path, err)
        return False


def _load_split(source, backbone, split, edits=False):
    pairs = source.image_captions(split, edits=edits)
    images = torch.stack(
        [
            backbone.preprocess(load_image(source.image_path(n)))
            for n, _ in tqdm(pairs, desc=f"loading {split} images", leave=False)
        ]
    )
    return images, [caps for _, caps in pairs]


def pretrain_on_captions(backbone: Backbone, cache_dir: str, cfg: dict, path: Path) -> dict:
    start = time.time()
    log.info(
        "pretraining the %s backbone on synthetic captions (first use; cached at %s)", backbone.name, path
    )
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    source = synthetic_source(cache_dir, **cfg.get("dataset", {}))
    train_x, train_caps = _load_split(source, backbone, "train", edits=cfg.get("edit_captions", False))
    test_x, test_caps = _load_split(source, backbone, "test")
    module = ContrastivePretraining(backbone, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    trainer = L.Trainer(
        max_epochs=cfg["epochs"],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        deterministic=False,
        reload_dataloaders_every_n_epochs=1,
        gradient_clip_val=cfg.get("grad_clip"),  # blip_tiny collapses to constant features without it
    )
    trainer.fit(module, train_dataloaders=make_loader(train_x, train_caps, cfg["batch_size"], cfg["seed"]))
    metrics = evaluate_captions(backbone, test_x, test_caps)
    seconds = time.time() - start
    log.info(
        "%s backbone pretrained in %.0f s: held-out text->image R@1 %.1f",
        backbone.name,
        seconds,
        metrics["t2i_recall_at_1"],
    )
    save_torch(path, {"backbone": backbone.name, "state_dict": backbone.state_dict(), "metrics": metrics})
    write_json(path.with_suffix(".json"), {"metrics": metrics, "pretrain": cfg, "seconds": seconds})
    return metrics
