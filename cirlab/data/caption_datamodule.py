"""The datamodule of text<->image retrieval (`dataset.kind: captions`), the counterpart of
CIRDataModule with the same pipeline-facing interface (use, all_images, batch_size, loaders).

Batches: train {image, text (one caption of the image drawn per epoch), index}; evaluation loaders
come in a pair per split: [images {index, image}, captions {index, text, image_index}].
Images are cached embeddings (frozen image encoder) or preprocessed pixels.
"""
from __future__ import annotations

import random
from typing import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from cirlab.data.datamodule import EpochSampler, GalleryDataset, ImageLookup
from cirlab.data.sources.captions import CaptionSource
from cirlab.errors import CirlabError


class CaptionPairs(Dataset):
    """One (image, caption) pair per image; the caption is drawn uniformly at random from the image's
    captions, seeded by (seed, epoch, index) as the reference draws one of 5 per step."""

    def __init__(self, pairs: list[tuple[str, list[str]]], lookup: ImageLookup, seed: int):
        self.pairs, self.lookup, self.seed = pairs, lookup, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        name, caps = self.pairs[i]
        rng = random.Random(f"{self.seed}-{self.epoch}-{i}")
        return {"image": self.lookup(name), "text": rng.choice(caps), "index": i}


class CaptionTexts(Dataset):
    def __init__(self, pairs: list[tuple[str, list[str]]]):
        self.flat = [(j, c) for j, (_, caps) in enumerate(pairs) for c in caps]

    def __len__(self) -> int:
        return len(self.flat)

    def __getitem__(self, i: int) -> dict:
        j, text = self.flat[i]
        return {"index": i, "text": text, "image_index": j}


class CaptionDataModule(L.LightningDataModule):
    kind = "captions"

    def __init__(self, source: CaptionSource, batch_size: int = 64, eval_batch_size: int = 256,
                 num_workers: int = 0, seed: int = 0, val_split: str = "val", test_split: str = "test"):
        super().__init__()
        self.source = source
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.seed = num_workers, seed
        self.val_split, self.test_split = val_split, test_split
        self.transform: Callable | None = None
        self.features: dict[str, torch.Tensor] | None = None
        self._train: CaptionPairs | None = None

    def use(self, transform: Callable | None = None, features: dict[str, torch.Tensor] | None = None) -> None:
        self.transform, self.features = transform, features
        self._train = None

    def pairs(self, split: str) -> list[tuple[str, list[str]]]:
        return self.source.image_captions(split)

    def text_to_image(self, split: str) -> torch.Tensor:
        return torch.tensor([j for j, (_, caps) in enumerate(self.pairs(split)) for _ in caps])

    def all_images(self, splits: tuple[str, ...] = ("train", "val", "test")) -> list[str]:
        seen: dict[str, None] = {}
        for split in splits:
            seen.update(dict.fromkeys(n for n, _ in self.pairs(split)))
        return list(seen)

    def _lookup(self) -> ImageLookup:
        if self.transform is None and self.features is None:
            raise CirlabError("internal: datamodule used before the pipeline configured it")
        return ImageLookup(self.source, self.transform, self.features)

    def train_dataset(self) -> CaptionPairs:
        if self._train is None:
            self._train = CaptionPairs(self.pairs("train"), self._lookup(), self.seed)
        return self._train

    def train_dataloader(self) -> DataLoader:
        ds = self.train_dataset()  # EpochSampler: order and caption draw follow (seed, epoch), also on resume
        return DataLoader(ds, batch_size=self.batch_size, sampler=EpochSampler(ds, self.seed),
                          drop_last=len(ds) > self.batch_size, num_workers=self.num_workers)

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        pairs = self.pairs(split)
        kw = dict(batch_size=self.eval_batch_size, num_workers=self.num_workers)
        return [DataLoader(GalleryDataset([n for n, _ in pairs], self._lookup()), **kw),
                DataLoader(CaptionTexts(pairs), **kw)]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.val_split)

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.test_split)
