"""Image decoding with errors that name the file.

Images are decoded as the reference code decodes them (`PIL.Image.open`, nothing else): in the file's own
mode (palette, RGBA, LA, CMYK, 16-bit grey ...) and without applying an EXIF orientation. The transforms
pad, resize and crop in that mode and convert to RGB after the centre crop, as openai/CLIP's `_transform`
and CLIP4Cir's `targetpad_transform` do; converting here would change the pixels of every non-RGB file
(Pillow resizes palette images with NEAREST, RGBA premultiplied; a pad fill 0 is white in CMYK).
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from cirlab.errors import CirlabError


def not_found(path: Path, more: int = 0) -> CirlabError:
    others = f" (and {more} other images)" if more else ""
    return CirlabError(
        f"image not found: {path}{others}. Run `cirlab +task=check_data` to list every missing file, or set "
        "dataset.missing_images=skip to leave them out."
    )


def check_present(paths: list[Path]) -> None:
    """Every file is there (one stat each: milliseconds for a benchmark's evaluation images), so that a
    missing one stops a run before its backbone is built or pretrained, not minutes later."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise not_found(missing[0], len(missing) - 1)


# Part of every image-feature cache key: bump it when the pixels `load_image` hands to a transform change,
# so that features cached from the old pixels are never reused ("raw-1": the file's own mode; before it,
# caches held features of images converted to RGB at decoding).
DECODE_VERSION = "raw-1"


# Pillow refuses an image of more than 2 x Image.MAX_IMAGE_PIXELS (a decompression-bomb guard; the reference
# code runs under that default too). This variable raises the limit (a number of pixels, or "none") for every
# decoding in the process: cirlab's, and Gradio's of the demo's uploads.
PIXEL_LIMIT_ENV = "CIRLAB_MAX_IMAGE_PIXELS"


def apply_pixel_limit() -> None:
    """Set Pillow's limit from $CIRLAB_MAX_IMAGE_PIXELS when it is set (unset: Pillow's default stays)."""
    value = os.environ.get(PIXEL_LIMIT_ENV, "").strip()
    if not value:
        return
    if value.lower() == "none":
        Image.MAX_IMAGE_PIXELS = None
        return
    try:
        Image.MAX_IMAGE_PIXELS = int(value)
    except ValueError:
        raise CirlabError(f"{PIXEL_LIMIT_ENV}={value}: give a number of pixels or none (no limit)") from None


def too_large(path: Path, err: Exception) -> CirlabError:
    return CirlabError(
        f"image too large to decode safely: {path} ({err}). Pillow refuses images over twice "
        f"PIL.Image.MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS} pixels) as a decompression-bomb guard. If you "
        f"trust the file, raise the limit with {PIXEL_LIMIT_ENV}=<pixels> (or none), or set "
        "PIL.Image.MAX_IMAGE_PIXELS in Python; or downscale the file, or set dataset.missing_images=skip "
        "to leave it out."
    )


apply_pixel_limit()


def load_image(path: str | Path) -> Image.Image:
    """The image at `path` decoded in its own mode, no EXIF rotation (the preprocess converts to RGB)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now (errors name the file here) and release the file handle
            return img
    except FileNotFoundError as err:
        raise not_found(path) from err
    except Image.DecompressionBombError as err:
        raise too_large(path, err) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CirlabError(
            f"corrupt or unreadable image: {path} ({err}). Replace the file, or set "
            "dataset.missing_images=skip to leave it out."
        ) from err
