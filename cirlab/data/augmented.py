"""Strongly augmented views of the training reference images (MLCL's SSCL, JWargrave/MLCL
`image_aug_transform`), served with the triplets under their own batch key.

A frozen, cached backbone cannot encode a fresh augmentation per step, so K seeded views per training
reference image are encoded once and cached on disk under a key like the feature cache's (backbone
fingerprint, augmentation, image list, K, seed); each (epoch, triplet) draws one of the K views.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path

import torch
from torchvision import transforms as T

from cirlab.cache import CacheEntry, stable_repr
from cirlab.data.features import encode_images, encode_version
from cirlab.data.images import DECODE_VERSION
from cirlab.data.records import CIRQuery
from cirlab.data.transforms import TargetPad, to_rgb
from cirlab.errors import CirlabError

log = logging.getLogger("cirlab")


def _rot(angle: int):
    return lambda im: im.rotate(angle, expand=True)


def _compose(*fs):
    def f(im):
        for g in fs:
            im = g(im)
        return im

    return f


class _Named:
    """A callable with a stable repr (keys the augmentation cache)."""

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name

    def __call__(self, x):
        return self.fn(x)

    def __repr__(self) -> str:
        return self.name


def augmentation(size: int, mean, std, target_ratio: float = 1.25) -> T.Compose:
    """TargetPad -> RandomResizedCrop -> RGB -> one of 7 ColorJitters -> one of 8 flips/rotations ->
    RandomAutocontrast -> RandomPerspective -> RandomGrayscale -> ToTensor -> Normalize."""
    hf, vf = T.functional.hflip, T.functional.vflip
    geometric = [
        _Named(lambda im: im, "identity"),
        _Named(hf, "hflip"),
        _Named(vf, "vflip"),
        _Named(_rot(90), "rot90"),
        _Named(_rot(180), "rot180"),
        _Named(_rot(270), "rot270"),
        _Named(_compose(hf, _rot(90)), "hflip+rot90"),
        _Named(_compose(hf, _rot(270)), "hflip+rot270"),
    ]
    return T.Compose(
        [
            TargetPad(target_ratio),
            T.RandomResizedCrop(size),
            to_rgb,
            T.RandomChoice(
                [
                    T.ColorJitter(brightness=0.5),
                    T.ColorJitter(contrast=0.5),
                    T.ColorJitter(saturation=0.5),
                    T.ColorJitter(hue=0.5),
                    T.ColorJitter(0.1, 0.1, 0.1, 0.1),
                    T.ColorJitter(0.3, 0.3, 0.3, 0.3),
                    T.ColorJitter(0.5, 0.5, 0.5, 0.5),
                ]
            ),
            T.RandomChoice(geometric),
            T.RandomAutocontrast(p=0.5),
            T.RandomPerspective(p=0.5),
            T.RandomGrayscale(p=0.5),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def _normalize_of(preprocess) -> T.Normalize:
    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, T.Normalize):
            return t
    raise CirlabError(
        "MLCL's SSCL needs the backbone's preprocess to end in a torchvision Normalize; "
        "use a CLIP-style backbone or set method.sscl=false"
    )


def augmented_features(
    backbone, names: list[str], paths: list[Path], views: int, seed: int, cache_dir, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """name -> [views, D] frozen embeddings of `views` seeded strong augmentations, cached on disk."""
    norm = _normalize_of(backbone.preprocess)
    aug = augmentation(backbone.image_size, norm.mean, norm.std)
    h = hashlib.sha1(b"mlcl-aug\0" + backbone.fingerprint().encode())
    h.update(stable_repr(aug).encode())
    h.update(f"decode {DECODE_VERSION}\n".encode())
    h.update(encode_version().encode())
    h.update(f"{views}\0{seed}\n".encode())
    for n, p in zip(names, paths):
        h.update(f"{n}\0{p}\n".encode())

    def encode() -> dict:
        feats = []
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            for k in range(views):
                torch.manual_seed(seed * 1000 + k)
                random.seed(seed * 1000 + k)  # RandomChoice draws from Python's random
                feats.append(
                    encode_images(
                        backbone, paths, batch_size, 0, transform=aug, desc=f"augmented view {k + 1}/{views}"
                    )
                )
        random.setstate(py_state)
        log.info("encoded %s x %s augmented reference views", len(names), views)
        return {"names": names, "features": torch.stack(feats, dim=1)}  # [N, K, D]

    entry = CacheEntry(
        Path(cache_dir) / "features" / f"aug_{h.hexdigest()[:20]}.pt", what="augmentation cache"
    )
    blob = entry.get(encode, valid=lambda blob: blob["names"] == names)
    return dict(zip(names, blob["features"]))


class AugmentedReferences:
    """A reference view (a stage datamodule's reference_views): per training triplet, one of `views` cached strong
    augmentations of its reference image, drawn per (seed, epoch, index)."""

    def __init__(self, backbone, views: int, seed: int, cache_dir):
        self.backbone, self.views, self.seed, self.cache_dir = backbone, views, seed, cache_dir
        self.features: dict[str, torch.Tensor] = {}

    def prepare(self, source, queries: list[CIRQuery]) -> None:
        """Encode (or load) the views of the training queries' reference images."""
        names = list(dict.fromkeys(q.reference for q in queries))
        self.features = augmented_features(
            self.backbone, names, [source.image_path(n) for n in names], self.views, self.seed, self.cache_dir
        )

    def __call__(self, query: CIRQuery, seed: int, epoch: int, index: int) -> torch.Tensor:
        views = self.features[query.reference]
        return views[random.Random(f"aug-{seed}-{epoch}-{index}").randrange(len(views))]
