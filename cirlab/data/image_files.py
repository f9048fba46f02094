"""Which files of a folder are images: one rule for `cirlab-query --gallery` and `cirlab-demo --gallery`."""

from __future__ import annotations

from pathlib import Path

from cirlab.errors import CirlabError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def list_images(folder: str | Path) -> list[Path]:
    """The files under `folder` (recursively) whose extension is an image's, sorted. Whether each one
    decodes is the caller's question; a `folder` that is not one is a CirlabError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CirlabError(f"--gallery {folder} is not a folder")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
