"""On-disk caches of frozen-backbone embeddings: images (`FeatureCache`) and texts (`TextFeatureCache`).

Encoding is the slowest part of every frozen-backbone stage (~25x a Combiner epoch), so embeddings
are computed once and stored (a `cirlab.cache` entry) under a key that hashes (backbone weights,
preprocessing and `images.DECODE_VERSION`, or batch size, the image or text list; ENCODE_VERSION). A
different backbone or list gets a new file; a truncated or foreign file fails its verification and is
rebuilt, never used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cirlab.cache import CacheEntry, stable_repr
from cirlab.data.images import DECODE_VERSION, load_image

if TYPE_CHECKING:  # data sits below backbones: only the type is named here
    from cirlab.backbones.base import Backbone

# Part of every feature cache key (images, texts, augmented views): bump it when the same backbone and
# images or texts would give other cached embeddings through this file's path (`encode_images`,
# `encode_texts`: batching, eval mode, dtype, what is stored), so that features encoded by the old code
# are encoded again, not reused. The backbone's own code is its fingerprint's; the pixels DECODE_VERSION's.
ENCODE_VERSION = 1


def encode_version() -> str:
    """ENCODE_VERSION as a line of a key: empty at version 1, so that the keys of older caches hold."""
    return "" if ENCODE_VERSION == 1 else f"encode {ENCODE_VERSION}\n"


class ImageFiles(Dataset):
    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[i]))


@contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """`module` in eval mode, then every submodule back in ITS OWN mode. Not `module.train(was)`: that
    would put a submodule kept in eval mode (e.g. a BLIP inside its wrapper) in train mode, so a stage's
    dropout would depend on whether this run encoded the cache or found it built."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def encode_images(
    backbone: Backbone,
    paths: list[Path],
    batch_size: int = 256,
    num_workers: int = 0,
    desc: str = "encoding images",
    transform=None,
) -> torch.Tensor:
    """Raw embeddings of `paths`; `transform` (default: the backbone's preprocess) maps PIL -> tensor."""
    loader = DataLoader(
        ImageFiles(paths, transform or backbone.preprocess), batch_size=batch_size, num_workers=num_workers
    )
    with evaluating(backbone):
        out = [
            backbone.encode_image(x.to(backbone.device)).float().cpu()
            for x in tqdm(loader, desc=desc, leave=False, disable=len(loader) < 2)
        ]
    return torch.cat(out)


class FeatureCache:
    """Raw image embeddings of a list of images, one cache entry per (backbone, preprocessing, images)."""

    what = "feature cache"

    def __init__(self, cache_dir: str | Path, batch_size: int = 256, num_workers: int = 0):
        self.dir = Path(cache_dir) / "features"
        self.batch_size, self.num_workers = batch_size, num_workers
        self.last_hit: bool | None = None

    def key(self, backbone: Backbone, names: list[str], paths: list[Path]) -> str:
        h = hashlib.sha1(backbone.fingerprint().encode())
        h.update(stable_repr(backbone.preprocess).encode())
        h.update(f"decode {DECODE_VERSION}\n".encode())  # other decoded pixels, other features
        h.update(encode_version().encode())
        for n, p in zip(names, paths):
            h.update(f"{n}\0{p}\n".encode())
        return h.hexdigest()[:20]

    def encode(self, backbone: Backbone, paths: list[Path]) -> dict:
        """What an entry holds besides the names."""
        desc = f"caching features ({len(paths)} images)"
        return {"features": encode_images(backbone, paths, self.batch_size, self.num_workers, desc=desc)}

    def result(self, names: list[str], blob: dict) -> dict[str, torch.Tensor]:
        return dict(zip(names, blob["features"]))

    def entry(self, backbone: Backbone, names: list[str], paths: list[Path]) -> CacheEntry:
        return CacheEntry(self.dir / f"{self.key(backbone, names, paths)}.pt", what=self.what)

    def get(self, backbone: Backbone, names: list[str], paths: list[Path]):
        """name -> embedding for every image, from the cache or freshly encoded."""
        entry = self.entry(backbone, names, paths)
        blob = entry.get(
            lambda: {"names": names, **self.encode(backbone, paths)},
            valid=lambda blob: blob["names"] == names,
        )
        self.last_hit = entry.hit
        return self.result(names, blob)

    def cached(self, backbone: Backbone, names: list[str], paths: list[Path]):
        """What `get` returns, from the cache file of exactly these images, or None: never encodes."""
        blob, _ = self.entry(backbone, names, paths).read(valid=lambda blob: blob["names"] == names)
        return None if blob is None else self.result(names, blob)


@torch.no_grad()
def encode_image_patches(
    backbone: Backbone, paths: list[Path], batch_size: int = 256, desc: str = "encoding image patches"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(raw global [b, E], local features [b, T, W]) of `paths`, a batch at a time, from the backbone's
    `encode_image_with_patches` (FTI4CIR): one batch in memory, as a ViT-L/14's are 1 MB an image."""
    loader = DataLoader(ImageFiles(paths, backbone.preprocess), batch_size=batch_size)
    with evaluating(backbone):
        for x in tqdm(loader, desc=desc, leave=False, disable=len(loader) < 2):
            g, p = backbone.encode_image_with_patches(x.to(backbone.device))
            yield g.float().cpu(), p.float().cpu()


class PatchFeatureCache(FeatureCache):
    """`FeatureCache` of (global [N, E], local features [N, T, W]) pairs: its own file prefix and key line,
    so that an entry never collides with the plain features of the same images."""

    what = "patch feature cache"

    def key(self, backbone: Backbone, names: list[str], paths: list[Path]) -> str:
        h = hashlib.sha1(b"patches\n")
        h.update(super().key(backbone, names, paths).encode())
        return "patches_" + h.hexdigest()[:20]

    def encode(self, backbone: Backbone, paths: list[Path]) -> dict:
        desc = f"caching patch features ({len(paths)} images)"
        pairs = list(encode_image_patches(backbone, paths, self.batch_size, desc))
        return {"global": torch.cat([g for g, _ in pairs]), "local": torch.cat([p for _, p in pairs])}

    def result(self, names: list[str], blob: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return blob["global"], blob["local"]


@torch.no_grad()
def encode_texts(backbone: Backbone, texts: list[str], batch_size: int, desc: str = "encoding texts"):
    """Raw text embeddings of `texts`, in batches of `batch_size` taken in the given order."""
    starts = range(0, len(texts), batch_size)
    with evaluating(backbone):
        out = [
            backbone.encode_texts(texts[i : i + batch_size]).float().cpu()
            for i in tqdm(starts, desc=desc, leave=False, disable=len(starts) < 2)
        ]
    return torch.cat(out) if out else torch.zeros(0, backbone.embed_dim)


class TextFeatureCache:
    """Frozen-text-encoder features of every text a stage can draw (each training caption view, each
    evaluation query text), so that the stage runs no text encoder while it trains.

    Why a table and not a memo filled as batches come: float results depend on the batch a text was
    encoded in, so a memo filled by whichever batch came first would give a resumed run other floats.
    Here the texts are encoded sorted, in batches of a fixed size: the same floats in every run."""

    def __init__(self, cache_dir: str | Path, batch_size: int = 256):
        self.dir = Path(cache_dir) / "features"
        self.batch_size = batch_size
        self.last_hit: bool | None = None

    def entry(self, backbone: Backbone, texts: list[str]) -> CacheEntry:
        """The cache entry of exactly these texts (sorted, as they are encoded) with this backbone."""
        h = hashlib.sha1(f"{backbone.fingerprint()}\0{self.batch_size}".encode())
        h.update(encode_version().encode())
        for t in texts:
            h.update(f"{t}\0".encode())
        return CacheEntry(self.dir / f"text_{h.hexdigest()[:20]}.pt", what="text feature cache")

    def get(self, backbone: Backbone, texts: list[str]) -> dict[str, torch.Tensor]:
        """text -> raw embedding for every distinct text, from the cache or freshly encoded."""
        texts = sorted(set(texts))
        entry = self.entry(backbone, texts)

        def encode() -> dict:
            desc = f"caching text features ({len(texts)} texts)"
            return {"texts": texts, "features": encode_texts(backbone, texts, self.batch_size, desc)}

        blob = entry.get(encode, valid=lambda blob: blob["texts"] == texts)
        self.last_hit = entry.hit
        return dict(zip(texts, blob["features"]))

    def cached(self, backbone: Backbone, texts: list[str]) -> dict[str, torch.Tensor] | None:
        """text -> embedding from the cache file of exactly these texts, or None: never encodes."""
        texts = sorted(set(texts))
        blob, _ = self.entry(backbone, texts).read(valid=lambda blob: blob["texts"] == texts)
        return None if blob is None else dict(zip(texts, blob["features"]))
