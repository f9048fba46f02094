"""`backbone=tiny`: a small open_clip CLIP pretrained on the synthetic captions on first use.

No pretrained weights can be downloaded in CI or here, so the default backbone is trained by
cirlab itself (CLIP InfoNCE on the synthetic benchmark's image captions) and cached by a hash of
(model config, pretraining config): later runs load it in a second.
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

from cirlab.backbones.openclip import OpenCLIPBackbone, load_backbone_weights
from cirlab.data.images import load_image
from cirlab.data.sources.synthetic import synthetic_source
from cirlab.io import load_torch, save_torch, write_json
from cirlab.methods.crossmodal import ContrastivePretraining, evaluate_captions, make_loader

log = logging.getLogger(__name__)


def _load_split(source, backbone, split):
    pairs = source.image_captions(split)
    images = torch.stack([backbone.preprocess(load_image(source.image_path(n)))
                          for n, _ in tqdm(pairs, desc=f"loading {split} images", leave=False)])
    return images, [caps for _, caps in pairs]


def pretrained_tiny(cache_dir: str, model_cfg: dict, pretrain: dict, preprocess: str = "clip",
                    checkpoint: str | None = None, name: str = "tiny") -> OpenCLIPBackbone:
    model_cfg = json.loads(json.dumps(model_cfg))  # plain dict, also from an OmegaConf node
    pretrain = json.loads(json.dumps(pretrain))
    torch.manual_seed(pretrain["seed"])  # the same initial weights whatever ran before
    backbone = OpenCLIPBackbone(model_cfg=model_cfg, preprocess=preprocess, name=name)
    if checkpoint:
        load_backbone_weights(backbone, checkpoint)
        return backbone
    key = hashlib.sha1(json.dumps([model_cfg, pretrain], sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / "backbones" / f"{name}-{key}.pt"
    if path.is_file():
        try:
            backbone.load_state_dict(load_torch(path)["state_dict"])
            return backbone
        except Exception as err:  # corrupt cache: retrain rather than fail
            log.warning("cached tiny backbone %s unreadable (%s): pretraining again", path, err)
    _pretrain(backbone, cache_dir, pretrain, path)
    return backbone


def _pretrain(backbone: OpenCLIPBackbone, cache_dir: str, cfg: dict, path: Path) -> None:
    start = time.time()
    log.info("pretraining the tiny backbone on synthetic captions (first use; cached at %s)", path)
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    source = synthetic_source(cache_dir, **cfg.get("dataset", {}))
    train_x, train_caps = _load_split(source, backbone, "train")
    test_x, test_caps = _load_split(source, backbone, "test")
    module = ContrastivePretraining(backbone, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    trainer = L.Trainer(max_epochs=cfg["epochs"], accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, deterministic=False,
                        reload_dataloaders_every_n_epochs=1)
    trainer.fit(module, train_dataloaders=make_loader(train_x, train_caps, cfg["batch_size"], cfg["seed"]))
    metrics = evaluate_captions(backbone, test_x, test_caps)
    log.info("tiny backbone pretrained in %.0f s: held-out text->image R@1 %.1f", time.time() - start,
             metrics["t2i_recall_at_1"])
    save_torch(path, {"backbone": backbone.name, "state_dict": backbone.state_dict(), "metrics": metrics})
    write_json(path.with_suffix(".json"), {"metrics": metrics, "pretrain": cfg, "seconds": time.time() - start})
