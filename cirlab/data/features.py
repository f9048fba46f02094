"""On-disk cache of frozen-backbone image embeddings.

Encoding images is the slowest part of every frozen-backbone stage (~25x a Combiner epoch), so
embeddings are computed once and stored under a key that hashes (backbone weights, preprocessing,
image list). A different backbone or image list gets a new file; a truncated or foreign file
fails its checksum and is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cirlab.backbones.base import Backbone
from cirlab.data.images import load_image
from cirlab.errors import CirlabError
from cirlab.io import build_lock, load_torch, save_torch

log = logging.getLogger(__name__)


class ImageFiles(Dataset):
    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[i]))


def _checksum(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().numpy().tobytes()).hexdigest()


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
    was_training = backbone.training
    backbone.eval()
    out = [
        backbone.encode_image(x.to(backbone.device)).float().cpu()
        for x in tqdm(loader, desc=desc, leave=False, disable=len(loader) < 2)
    ]
    backbone.train(was_training)
    return torch.cat(out)


class FeatureCache:
    def __init__(self, cache_dir: str | Path, batch_size: int = 256, num_workers: int = 0):
        self.dir = Path(cache_dir) / "features"
        self.batch_size, self.num_workers = batch_size, num_workers
        self.last_hit: bool | None = None

    def key(self, backbone: Backbone, names: list[str], paths: list[Path]) -> str:
        h = hashlib.sha1(backbone.fingerprint().encode())
        # repr of a plain function in the transform carries its memory address ("at 0x7f..."), which
        # changes every process: without stripping it the cache never hit across runs
        h.update(re.sub(r" at 0x[0-9a-fA-F]+", "", repr(backbone.preprocess)).encode())
        for n, p in zip(names, paths):
            h.update(f"{n}\0{p}\n".encode())
        return h.hexdigest()[:20]

    def get(self, backbone: Backbone, names: list[str], paths: list[Path]) -> dict[str, torch.Tensor]:
        """name -> embedding for every image, from the cache or freshly encoded."""
        key = self.key(backbone, names, paths)
        path = self.dir / f"{key}.pt"
        self.last_hit = True
        feats = self._read(path, names, warn=False)
        if feats is None:
            with build_lock(path):  # concurrent runs encode once; the others wait, then read its file
                feats = self._read(path, names, warn=True)
                if feats is None:
                    self.last_hit = False
                    feats = encode_images(
                        backbone,
                        paths,
                        self.batch_size,
                        self.num_workers,
                        desc=f"caching features ({len(paths)} images)",
                    )
                    save_torch(path, {"names": names, "features": feats, "checksum": _checksum(feats)})
        return dict(zip(names, feats))

    def cached(
        self, backbone: Backbone, names: list[str], paths: list[Path]
    ) -> dict[str, torch.Tensor] | None:
        """name -> embedding from the cache file of exactly these images, or None: never encodes."""
        feats = self._read(self.dir / f"{self.key(backbone, names, paths)}.pt", names, warn=False)
        return None if feats is None else dict(zip(names, feats))

    @staticmethod
    def _read(path: Path, names: list[str], warn: bool) -> torch.Tensor | None:
        """The cached features, or None if absent, corrupt or for other images."""
        if not path.is_file():
            return None
        try:
            blob = load_torch(path)
            if (
                isinstance(blob, dict)
                and blob.get("names") == names
                and blob.get("checksum") == _checksum(blob["features"])
            ):
                return blob["features"]
        except (CirlabError, KeyError, TypeError):
            pass
        if warn:
            log.warning("feature cache %s is corrupt or foreign: rebuilding it", path)
        return None
