"""Image decoding with errors that name the file."""

from __future__ import annotations

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


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise not_found(path) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CirlabError(
            f"corrupt or unreadable image: {path} ({err}). Replace the file, or set "
            "dataset.missing_images=skip to leave it out."
        ) from err
