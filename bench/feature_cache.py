"""One CLIP4Cir stage-II (Combiner) epoch reading cached features vs re-encoding the images,
as the reference code does every batch. Prints both times and the ratio, measured in one run.
The tiny backbone encodes 32 px images cheaply, so the ratio is far smaller here than with a real
CLIP at 224-288 px, where image encoding dominates an epoch."""

from __future__ import annotations

import time

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from cirlab.cli import CONF
from cirlab.data.datamodule import CIRDataModule
from cirlab.data.features import FeatureCache


class EpochTimer(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def epoch_seconds(module, dm) -> float:
    """Seconds of the second epoch: the first also fills the frozen text encoder's memo."""
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
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    return timer.seconds


def main() -> None:
    torch.set_num_threads(2)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["method=clip4cir", "logger=none"])
    source = instantiate(cfg.dataset.source)
    backbone = instantiate(cfg.backbone.model)
    dm = CIRDataModule(source, batch_size=cfg.method.combiner.batch_size, seed=0)
    names = dm.all_images(("train",))
    cache = FeatureCache(cfg.paths.cache_dir)
    t0 = time.perf_counter()
    features = cache.get(backbone, names, [source.image_path(n) for n in names])
    t_cache = time.perf_counter() - t0

    def module():
        L.seed_everything(0, verbose=False)
        return instantiate(cfg.method.combiner.module, backbone=backbone)

    dm.use(features=features)
    cached = epoch_seconds(module(), dm)
    dm.use(transform=backbone.preprocess)
    encoded = epoch_seconds(module(), dm)
    print(
        f"stage-II epoch on {len(dm.train_dataset())} triplets (tiny backbone): "
        f"cached features {cached:.2f} s, re-encoding images {encoded:.2f} s, "
        f"speed-up {encoded / cached:.1f}x (cache {'hit' if cache.last_hit else 'built'} in {t_cache:.1f} s)"
    )


if __name__ == "__main__":
    main()
