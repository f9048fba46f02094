"""The datamodule of text<->image retrieval (`dataset.kind: captions`), the counterpart of
CIRDataModule with the same pipeline-facing interface (for_stage, all_images, frozen_texts, loaders).

Batches: train {image, text (one caption of the image drawn per epoch), index}; evaluation loaders
come in a pair per split: [images {index, image}, captions {index, text, image_index}].
Images are cached embeddings (frozen image encoder) or preprocessed pixels.
"""

from __future__ import annotations

import random

import torch
from torch.utils.data import DataLoader, Dataset

from cirlab.data.datamodule import CIRDataModule, EpochSampler, GalleryDataset, ImageLookup
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


class CaptionDataModule(CIRDataModule):
    """(image, captions) data for text<->image retrieval. Set-up, `for_stage`, the image lookup and the
    val/test loader plumbing are CIRDataModule's; only the datasets differ."""

    kind = "captions"

    def pairs(self, split: str) -> list[tuple[str, list[str]]]:
        return self.source.image_captions(split)

    def text_to_image(self, split: str) -> torch.Tensor:
        return torch.tensor([j for j, (_, caps) in enumerate(self.pairs(split)) for _ in caps])

    def eval_sets(self, split: str):
        raise CirlabError(
            "a captions dataset has no CIR queries to visualise: drop eval.visualize (predictions.<split>.json "
            "has both rankings)"
        )

    def all_images(self, splits: tuple[str, ...] = ("train", "val", "test")) -> list[str]:
        seen: dict[str, None] = {}
        for split in splits:
            seen.update(dict.fromkeys(n for n, _ in self.pairs(split)))
        return list(seen)

    def frozen_texts(self, splits: tuple[str, ...], text_views=None) -> list[str]:  # captions: no views
        texts: dict[str, None] = {}
        for split in splits:
            texts.update(dict.fromkeys(c for _, caps in self.pairs(split) for c in caps))
        return list(texts)

    def train_dataset(self) -> CaptionPairs:
        if self._train is None:
            self._train = CaptionPairs(self.pairs("train"), self._lookup(), self.seed)
        return self._train

    def train_dataloader(self) -> DataLoader:
        ds = self.train_dataset()  # EpochSampler: order and caption draw follow (seed, epoch), also on resume
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=EpochSampler(ds, self.seed),
            drop_last=len(ds) > self.batch_size,
            **self.loader_options(),
        )

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        pairs = self.pairs(split)
        kw = dict(batch_size=self.eval_batch_size, **self.loader_options())
        return [
            DataLoader(GalleryDataset([n for n, _ in pairs], self._lookup()), **kw),
            DataLoader(CaptionTexts(pairs), **kw),
        ]
