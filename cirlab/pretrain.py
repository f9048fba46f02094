"""The recipe that makes the small backbones (`backbone=tiny`, `backbone=blip_tiny`): built untrained
(cirlab.backbones), then pretrained with CLIP's InfoNCE (cirlab.methods.crossmodal) on the synthetic
benchmark's image captions (cirlab.data) on first use.

No pretrained weights can be downloaded in CI or here, so cirlab trains these itself and caches the
weights (a `cirlab.cache` entry) by a hash of (model config, pretraining config, RECIPE_VERSION):
later runs load them in a second. It sits above backbones, data and methods, which never import it.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from tqdm.auto import tqdm

from cirlab.backbones.base import Backbone, as_json_data
from cirlab.backbones.blip import BlipBackbone, vocab_config, wordpiece_vocab
from cirlab.backbones.openclip import OpenCLIPBackbone, load_backbone_weights
from cirlab.cache import CacheEntry, digest, versions
from cirlab.data import synthetic
from cirlab.data.images import load_image
from cirlab.data.sources.synthetic import synthetic_source
from cirlab.errors import CirlabError
from cirlab.io import write_json, write_text
from cirlab.methods.crossmodal import ContrastivePretraining, evaluate_captions, make_loader

log = logging.getLogger(__name__)

# Part of the pretrained backbones' cache key: bump it when the same (model config, pretraining config)
# would train other weights: the recipe (`pretrain_on_captions`, ContrastivePretraining's loss,
# `make_loader`, `sincos_positions`, the seeding, the split and captions it reads) or how a backbone is
# built before it, so that backbones trained by the old code are trained again, not loaded. The
# benchmark it trains on is keyed by synthetic.GENERATOR_VERSION, also in the key.
RECIPE_VERSION = 1


def pretrained_tiny(
    cache_dir: str,
    model_cfg: dict,
    pretrain: dict,
    preprocess: str = "clip",
    checkpoint: str | None = None,
    name: str = "tiny",
) -> OpenCLIPBackbone:
    """`backbone=tiny`: a small open_clip CLIP; `checkpoint` replaces the pretraining by its weights."""
    model_cfg, pretrain = as_json_data(model_cfg), as_json_data(pretrain)
    torch.manual_seed(pretrain["seed"])  # the same initial weights whatever ran before
    backbone = OpenCLIPBackbone(model_cfg=model_cfg, preprocess=preprocess, name=name)
    if checkpoint:
        load_backbone_weights(backbone, checkpoint)
        return backbone
    return load_or_pretrain(backbone, cache_dir, model_cfg, pretrain, name)


def caption_vocab(cache_dir: str, dataset: dict | None = None) -> list[str]:
    """blip_tiny's WordPiece vocab: every word of the synthetic captions and modification texts."""
    source = synthetic_source(cache_dir, **(dataset or {}))
    texts = [c for _, caps in source.image_captions("train") for c in caps]
    texts += [c for q in source.train_queries() for c in q.captions]
    return wordpiece_vocab(texts)


def pretrained_blip_tiny(
    cache_dir: str,
    model_cfg: dict,
    pretrain: dict,
    preprocess: str = "clip",
    checkpoint: str | None = None,
    name: str = "blip_tiny",
    max_length: int = 32,
) -> BlipBackbone:
    """`backbone=blip_tiny`: a small BLIP; `checkpoint`, a save_pretrained folder, replaces it, a
    weights file is loaded over the pretrained weights."""
    if checkpoint and Path(checkpoint).is_dir():
        return BlipBackbone(checkpoint=checkpoint, preprocess=preprocess, name=name, max_length=max_length)
    if checkpoint and not Path(checkpoint).is_file():  # before pretraining, not after minutes of it
        raise CirlabError(f"backbone.checkpoint={checkpoint}: no such file or folder")
    pretrain = as_json_data(pretrain)
    vocab = caption_vocab(cache_dir, pretrain.get("dataset"))
    vocab_path = Path(cache_dir) / "backbones" / f"{name}-vocab-{len(vocab)}.txt"
    if not vocab_path.is_file() or vocab_path.read_text().split("\n") != vocab:
        write_text(vocab_path, "\n".join(vocab))
    config = vocab_config(model_cfg, vocab)
    torch.manual_seed(pretrain["seed"])  # the same initial weights whatever ran before
    backbone = BlipBackbone(
        config=config, vocab_file=str(vocab_path), preprocess=preprocess, name=name, max_length=max_length
    )
    if pretrain.get("position_init") == "sincos":
        sincos_positions(
            backbone.model.vision_model.embeddings.position_embedding, pretrain.get("position_scale", 1.0)
        )
    backbone = load_or_pretrain(backbone, cache_dir, {"blip": config, "vocab": vocab}, pretrain, name)
    if checkpoint:
        backbone.load_weights_file(checkpoint)
    return backbone


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid * grid, dim] 2-D sin-cos position codes (MAE's fixed ViT embedding; row-major patches):
    a quarter of the channels sin(y * w), then cos(y * w), sin(x * w), cos(x * w), w = 10000^(-i / (dim / 4))."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    steps = torch.arange(grid, dtype=torch.float64)
    ys, xs = torch.meshgrid(steps, steps, indexing="ij")
    angles = [c.flatten()[:, None] * omega for c in (ys, xs)]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1).float()


@torch.no_grad()
def sincos_positions(position_embedding: torch.Tensor, scale: float) -> None:
    """blip_tiny's ViT positions start as `scale` x 2-D sin-cos codes (the [CLS] slot at zero), still trained:
    HF BLIP initialises them at random, and from the synthetic images alone the 32 px ViT then learns
    poorly where a patch is, while the captions name positions (measured: docs/backbones.md#blip_tiny)."""
    n, dim = position_embedding.shape[1:]
    grid = math.isqrt(n - 1)
    if dim % 4 or grid * grid != n - 1:
        raise CirlabError(
            f"backbone.model.pretrain.position_init=sincos needs a square patch grid and a ViT width divisible "
            f"by 4 (got {n - 1} patches, width {dim}): use position_init=random"
        )
    position_embedding[0, 0] = 0
    position_embedding[0, 1:] = scale * sincos_2d(grid, dim)


def load_or_pretrain(
    backbone: Backbone, cache_dir: str, model_cfg: dict, pretrain: dict, name: str
) -> Backbone:
    """The cached pretrained weights of (model_cfg, pretrain) loaded into `backbone`, or it is
    pretrained and they are cached (a concurrent run waits for them)."""
    made_by = versions(recipe=RECIPE_VERSION, generator=synthetic.GENERATOR_VERSION)
    key = digest(model_cfg, pretrain, *made_by, length=12)
    path = Path(cache_dir) / "backbones" / f"{name}-{key}.pt"
    own = {k: v.shape for k, v in backbone.state_dict().items()}

    def fits(blob: dict) -> bool:
        return {k: v.shape for k, v in blob["state_dict"].items()} == own

    def pretrain_it() -> dict:
        with torch_threads(pretrain.get("threads")):
            metrics = pretrain_on_captions(backbone, cache_dir, pretrain, path)
        return {"backbone": backbone.name, "state_dict": backbone.state_dict(), "metrics": metrics}

    entry = CacheEntry(path, what=f"cached {name} backbone")
    backbone.load_state_dict(entry.get(pretrain_it, valid=fits)["state_dict"])
    return backbone


@contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to `n` inside (unchanged for None). Another thread count sums floats
    in another order, and a from-scratch training amplifies that into other weights (docs/backbones.md):
    pinned, `cirlab` and `make test` build the same backbone on any machine."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    """Train all of `backbone`'s weights on the synthetic captions; its held-out recalls (also written
    to `path`.json with the settings and the time taken)."""
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
        gradient_clip_val=cfg.get("grad_clip"),  # blip_tiny: gets a from-scratch BLIP past its first steps
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
    write_json(path.with_suffix(".json"), {"metrics": metrics, "pretrain": cfg, "seconds": seconds})
    return metrics
