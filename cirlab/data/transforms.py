"""Image preprocessing of CLIP4Cir (ABaldrati/CLIP4Cir:src/data_utils.py), reference-exact.

`squarepad` pads to a square, `targetpad` pads only images whose aspect ratio exceeds the
target ratio (1.25) up to that ratio; both then Resize(bicubic) + CenterCrop + RGB + Normalize.
torchvision has no such pads, hence written here.

Images arrive in their file's own mode (`cirlab.data.images.load_image`): pad (fill 0 in that mode: palette
index 0, transparent black, white in CMYK), resize and crop happen in it, and `to_rgb` comes after the
crop, in the order of openai/CLIP's `_transform` (`clip`) and CLIP4Cir's, SEARLE's and Bi-Blip4CIR's
`squarepad_transform` / `targetpad_transform` (BLIP4CIR+Bi too: BLIP's normalisation equals CLIP's).
"""

from __future__ import annotations

from collections.abc import Sequence

import torchvision.transforms.functional as F
from PIL import Image
from torchvision import transforms as T

PREPROCESS_MODES = ("clip", "squarepad", "targetpad")


class SquarePad:
    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        m = max(w, h)
        hp, vp = int((m - w) / 2), int((m - h) / 2)
        return F.pad(image, [hp, vp, hp, vp], 0, "constant")


class TargetPad:
    def __init__(self, target_ratio: float = 1.25):
        self.target_ratio = target_ratio

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if max(w, h) / min(w, h) < self.target_ratio:
            return image
        s = max(w, h) / self.target_ratio
        hp, vp = max(int((s - w) / 2), 0), max(int((s - h) / 2), 0)
        return F.pad(image, [hp, vp, hp, vp], 0, "constant")


def to_rgb(image: Image.Image) -> Image.Image:
    """After the centre crop, never at decoding (see the module docstring)."""
    return image.convert("RGB")


def build_transform(
    mode: str, size: int, mean: Sequence[float], std: Sequence[float], target_ratio: float = 1.25
) -> T.Compose:
    if mode not in PREPROCESS_MODES:
        from cirlab.errors import CirlabError

        raise CirlabError(f"unknown preprocess {mode!r}; choose one of {', '.join(PREPROCESS_MODES)}")
    pad = {"clip": [], "squarepad": [SquarePad()], "targetpad": [TargetPad(target_ratio)]}[mode]
    return T.Compose(
        pad
        + [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            to_rgb,
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
