"""What a GPU run waits for: decoding + preprocessing real-size JPEGs with 0 vs N DataLoader workers.

FashionIQ/CIRR images are JPEGs of a few hundred pixels, padded (`targetpad`) and resized to 288 px for
RN50x4. A GPU encodes such a batch in milliseconds, so the data side sets the pace of feature caching and
of stage I. This bench writes 500x500 JPEGs of noise + shapes to a temporary folder, then times the exact
loader cirlab uses (`encode_images`' dataset: `load_image` + the backbone transform) with 0, 1 and all
workers, `pin_memory` as `trainer=gpu` sets it. No model runs: images/s here is the ceiling of any run.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cirlab.data.features import ImageFiles
from cirlab.data.transforms import build_transform

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def write_jpegs(folder: Path, n: int, size: int = 500) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size * 4 // 5, 3), dtype=np.uint8)  # FashionIQ-like 4:5
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def images_per_second(paths: list[Path], workers: int, pin: bool) -> tuple[float, torch.Tensor]:
    loader = DataLoader(
        ImageFiles(paths, build_transform("targetpad", 288, CLIP_MEAN, CLIP_STD)),
        batch_size=32,
        num_workers=workers,
        pin_memory=pin and torch.cuda.is_available(),
        persistent_workers=False,
    )
    start = time.perf_counter()
    first = None
    for batch in loader:
        first = batch if first is None else first
    return len(paths) / (time.perf_counter() - start), first


def main() -> None:
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), 384)
        rates, reference = {}, None
        for workers in sorted({0, 1, cores}):
            rate, first = images_per_second(paths, workers, pin=workers > 0)
            rates[workers] = rate
            reference = first if reference is None else reference
            assert torch.equal(first, reference), "workers changed the pixels"
    base = rates[0]
    parts = ", ".join(f"{w} workers {r:,.0f} img/s ({r / base:.2f}x)" for w, r in rates.items())
    print(
        f"real-size images (500x400 JPEG -> targetpad 288, batch 32, {cores} cores): {parts}; identical tensors"
    )


if __name__ == "__main__":
    main()
