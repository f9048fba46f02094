"""Tiny-backbone image encoding throughput with 0 vs 2 dataloader workers, measured in one run."""
from __future__ import annotations

import time

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from cirlab.cli import CONF
from cirlab.data.features import encode_images


def main() -> None:
    torch.set_num_threads(2)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+method=zeroshot", "logger=none"])
    source = instantiate(cfg.dataset.source)
    backbone = instantiate(cfg.backbone.model)
    names = source.eval_sets("test")[0].gallery
    paths = [source.image_path(n) for n in names]
    rates = {}
    for workers in (0, 2):
        start = time.perf_counter()
        encode_images(backbone, paths, batch_size=256, num_workers=workers)
        rates[workers] = len(paths) / (time.perf_counter() - start)
    print(f"encoding {len(paths)} images (tiny backbone, 32 px): 0 workers {rates[0]:,.0f} img/s, "
          f"2 workers {rates[2]:,.0f} img/s, ratio {rates[2] / rates[0]:.2f}x")


if __name__ == "__main__":
    main()
