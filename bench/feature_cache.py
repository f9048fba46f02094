"""One CLIP4Cir stage-II (Combiner) epoch on cached features (images and texts, as cirlab trains a
frozen-encoder stage) vs re-encoding both every batch, as the reference code does. Prints both times,
the ratio and where an epoch's time goes (encoders / Combiner forward-backward / data), measured in
one run. The tiny backbone encodes 32 px images cheaply, so the ratio is far smaller here than with a
real CLIP at 224-288 px, where encoding dominates an epoch."""

from __future__ import annotations

import time
from collections import defaultdict

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from cirlab.cli import CONF
from cirlab.data.datamodule import CIRDataModule
from cirlab.data.features import FeatureCache, TextFeatureCache


class EpochTimer(L.Callback):
    """Seconds of the last epoch and of its training steps (the rest is data loading)."""

    def on_train_epoch_start(self, trainer, pl_module):
        self.start, self.steps = time.perf_counter(), 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += time.perf_counter() - self.step_start

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def timed(seconds: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[key] += time.perf_counter() - t0

    return wrapper


def epoch_profile(module, dm) -> dict[str, float]:
    """The second epoch (the first warms up): total, encoders, Combiner forward-backward, data."""
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    encode = defaultdict(float)
    backbone = module.backbone
    originals = backbone.encode_image, backbone.encode_texts
    backbone.encode_image = timed(encode, "image", backbone.encode_image)
    backbone.encode_texts = timed(encode, "text", backbone.encode_texts)
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    backbone.encode_image, backbone.encode_texts = originals
    encoders = (encode["image"] + encode["text"]) / 2  # both epochs ran the same work
    return {
        "total": timer.seconds,
        "encoders": encoders,
        "combiner": timer.steps - encoders,
        "data": timer.seconds - timer.steps,
    }


def describe(p: dict[str, float]) -> str:
    return (
        f"{p['total']:.2f} s (encoders {p['encoders']:.2f}, Combiner fwd/bwd {p['combiner']:.2f}, "
        f"data {p['data']:.2f})"
    )


def compare(overrides: list[str], triplets: int | None = None) -> str:
    """One stage-II epoch on cached features vs re-encoding both sides, with the backbone of `overrides`
    (on the first `triplets` training triplets)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["method=clip4cir", "logger=none", *overrides])
    source = instantiate(cfg.dataset.source)
    torch.manual_seed(0)  # random-weight backbones: the same weights (cache key) in every run
    backbone = instantiate(cfg.backbone.model)
    dm = CIRDataModule(
        source, batch_size=cfg.method.combiner.batch_size, seed=0, transform=backbone.preprocess
    )
    if triplets:
        dm.train_dataset().queries = dm.train_dataset().queries[:triplets]
    queries = dm.train_dataset().queries
    names = list(dict.fromkeys(n for q in queries for n in (q.reference, q.targets[0])))
    t0 = time.perf_counter()
    features = FeatureCache(cfg.paths.cache_dir).get(backbone, names, [source.image_path(n) for n in names])
    texts = TextFeatureCache(cfg.paths.cache_dir).get(backbone, dm.frozen_texts(("train",), dm.text_views))
    t_cache = time.perf_counter() - t0

    def module(text_table):
        L.seed_everything(0, verbose=False)
        m = instantiate(cfg.method.combiner.module, backbone=backbone)
        m.text_table = text_table
        return m

    dm.train_dataset().lookup.features = features
    cached = epoch_profile(module(texts), dm)
    dm.train_dataset().lookup.features = None
    encoded = epoch_profile(module(None), dm)
    return (
        f"stage-II epoch, {cfg.backbone.name} backbone at {backbone.image_size} px, {len(queries)} triplets: "
        f"cached image + text features {describe(cached)}; re-encoding both {describe(encoded)}; "
        f"speed-up {encoded['total'] / cached['total']:.1f}x (caches ready in {t_cache:.1f} s)"
    )


def main() -> None:
    torch.set_num_threads(2)
    print(compare([]))
    # the reference's setting: a CLIP-size encoder (ViT-B/32's architecture, random weights: none can be
    # downloaded here) at 224 px, where encoding dominates; a few batches keep the bench short
    print(compare(["backbone=clip_vit_b32", "backbone.pretrained=null"], triplets=192))


if __name__ == "__main__":
    main()
