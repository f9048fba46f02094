"""Image decoding with errors that name the file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from cirlab.errors import CirlabError


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise CirlabError(
            f"image not found: {path}. Run `cirlab +task=check_data` to list every missing file, or set "
            "dataset.missing_images=skip to leave them out."
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CirlabError(
            f"corrupt or unreadable image: {path} ({err}). Replace the file, or set "
            "dataset.missing_images=skip to leave it out."
        ) from err
