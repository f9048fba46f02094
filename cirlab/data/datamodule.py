"""One LightningDataModule over any CIR source.

Images are served either as pixels (a stage that trains the image encoder) or as cached
embeddings (a frozen image encoder): `features` maps image name -> embedding. Batches are dicts:
train {reference, target, text, + the stage's extra text and reference views}, gallery {index, image},
query {index, reference, text}.
Validation/test loaders come in pairs per eval set: [gallery_0, queries_0, gallery_1, ...].
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cirlab.data.images import load_image
from cirlab.data.records import CIRQuery, EvalSet
from cirlab.data.sources.base import CIRSource
from cirlab.errors import CirlabError


class ImageLookup:
    """name -> model input: a cached embedding if available, else preprocessed pixels."""

    def __init__(
        self, source: CIRSource, transform: Callable | None, features: dict[str, torch.Tensor] | None
    ):
        self.source, self.transform, self.features = source, transform, features

    def __call__(self, name: str) -> torch.Tensor:
        if self.features is not None:
            return self.features[name]
        return self.transform(load_image(self.source.image_path(name)))


CaptionView = Callable[[str], str] | None  # rewrites each raw caption before the source's caption rule
# (query, seed, epoch, index) -> an extra model input of the triplet's reference (prepared once with
# `prepare(source, train_queries)`), e.g. cirlab.data.augmented.AugmentedReferences
ReferenceView = Callable[[CIRQuery, int, int, int], torch.Tensor]


def with_view(query: CIRQuery, view: CaptionView) -> CIRQuery:
    return query if view is None else dataclasses.replace(query, captions=[view(c) for c in query.captions])


class TripletDataset(Dataset):
    """Training triplets; the caption rule's randomness is seeded by (seed, epoch, index), so a
    resumed run sees the same texts as an uninterrupted one.

    `text_views` maps batch key -> caption view: a method that needs several texts per triplet
    (BLIP4CIR+Bi: forward- and backward-marked) gets each under its own key, each view marking
    the raw captions BEFORE the source's caption rule, with its own random draw (as the reference).
    `reference_views` maps batch key -> reference view (MLCL: an augmented view of the reference).
    """

    def __init__(
        self,
        queries: list[CIRQuery],
        source: CIRSource,
        lookup: ImageLookup,
        seed: int,
        text_views: dict[str, CaptionView] | None = None,
        reference_views: dict[str, ReferenceView] | None = None,
    ):
        self.queries, self.source, self.lookup, self.seed = queries, source, lookup, seed
        self.text_views = text_views or {"text": None}
        self.reference_views = reference_views or {}
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i: int) -> dict:
        q = self.queries[i]
        item = {"reference": self.lookup(q.reference), "target": self.lookup(q.targets[0]), "index": i}
        for key, view in self.text_views.items():
            rng = random.Random(f"{self.seed}-{self.epoch}-{i}" + ("" if key == "text" else f"-{key}"))
            item[key] = self.source.train_text(with_view(q, view), rng)
        for key, view in self.reference_views.items():
            item[key] = view(q, self.seed, self.epoch, i)
        return item


class EpochSampler(DistributedSampler):
    """Shuffles by (seed, epoch) at iteration time. Lightning calls `set_epoch` at every epoch
    start, also after a resume, so the order never depends on when the loader was built (a loader
    built before the checkpoint was restored would otherwise replay epoch 0's order).

    Under DDP each rank takes positions rank::world of that same order (padded as DistributedSampler
    pads), so the global batches are those of one process with world x the batch. Being a
    DistributedSampler, Lightning leaves it alone; its own wrapper would shuffle the order again."""

    def __init__(self, dataset: Dataset, seed: int):  # any dataset with an `epoch` attribute
        ddp = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if ddp else (1, 0)
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=False, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = self.dataset.epoch = epoch  # the caption rule draws from (seed, epoch, index) too

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=gen).tolist()
        order += order[: self.total_size - len(order)]
        return iter(order[self.rank : self.total_size : self.num_replicas])


class GalleryDataset(Dataset):
    def __init__(self, names: list[str], lookup: ImageLookup):
        self.names, self.lookup = names, lookup

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "image": self.lookup(self.names[i])}


class QueryDataset(Dataset):
    def __init__(
        self, queries: list[CIRQuery], source: CIRSource, lookup: ImageLookup, view: CaptionView = None
    ):
        self.queries, self.source, self.lookup, self.view = queries, source, lookup, view

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i: int) -> dict:
        q = self.queries[i]
        return {
            "index": i,
            "reference": self.lookup(q.reference),
            "text": self.source.eval_text(with_view(q, self.view)),
        }


class CIRDataModule(L.LightningDataModule):
    kind = "cir"  # what a method's `data_kind` must match (CaptionDataModule: "captions")

    def __init__(
        self,
        source: CIRSource,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        val_split: str = "val",
        test_split: str = "test",
        pin_memory: bool = False,
        transform: Callable | None = None,
        features: dict[str, torch.Tensor] | None = None,
        text_views: dict[str, CaptionView] | None = None,
        reference_views: dict[str, ReferenceView] | None = None,
        read_eval_sets: dict[str, list[EvalSet]] | None = None,
    ):
        """What a stage reads is fixed here, never changed afterwards: `transform` (pixels) or `features`
        (name -> cached embedding of a frozen image encoder); `text_views`, the stage's caption views
        ("text" also builds the eval queries); `reference_views`, its extra training inputs.
        `read_eval_sets`: the eval sets another datamodule over this source has read (shared, not re-read)."""
        super().__init__()
        self.source = source
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.seed, self.pin_memory = num_workers, seed, pin_memory
        self.val_split, self.test_split = val_split, test_split
        self.transform, self.features = transform, features
        self.text_views: dict[str, CaptionView] = text_views or {"text": None}
        self.reference_views: dict[str, ReferenceView] = reference_views or {}
        self._eval_sets: dict[str, list[EvalSet]] = {} if read_eval_sets is None else read_eval_sets
        self._train: TripletDataset | None = None

    def for_stage(
        self,
        batch_size: int,
        transform: Callable | None = None,
        features: dict[str, torch.Tensor] | None = None,
        text_views: dict[str, CaptionView] | None = None,
        reference_views: dict[str, ReferenceView] | None = None,
    ) -> CIRDataModule:
        """A new datamodule over the same data serving one stage's inputs (the run's datamodule is never
        changed: each stage gets its own). The annotations read so far are shared, not read again."""
        return type(self)(
            self.source,
            batch_size=batch_size,
            eval_batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            seed=self.seed,
            val_split=self.val_split,
            test_split=self.test_split,
            pin_memory=self.pin_memory,
            transform=transform,
            features=features,
            text_views=text_views,
            reference_views=reference_views,
            read_eval_sets=self._eval_sets,
        )

    def eval_sets(self, split: str) -> list[EvalSet]:
        if split not in self._eval_sets:
            self._eval_sets[split] = self.source.eval_sets(split)
        return self._eval_sets[split]

    def all_images(self, splits: tuple[str, ...] = ("train", "val", "test")) -> list[str]:
        """Every image a run may touch, in a stable order (the feature cache's image list)."""
        seen: dict[str, None] = {}
        if "train" in splits:
            seen.update(dict.fromkeys(self.source.train_images()))
        for split in splits:
            if split == "train":
                continue
            for es in self.eval_sets(split):
                seen.update(dict.fromkeys(es.gallery))
                seen.update(dict.fromkeys(q.reference for q in es.queries))
        return list(seen)

    def frozen_texts(self, splits: tuple[str, ...], text_views: dict[str, CaptionView]) -> list[str]:
        """Every text a stage with `text_views` on `splits` can see (each training caption view's every
        possible draw, each evaluation query text): the rows of a frozen text encoder's feature table."""
        texts: dict[str, None] = {}
        if "train" in splits:
            for q in self.source.train_queries():
                for view in text_views.values():
                    texts.update(dict.fromkeys(self.source.train_text_choices(with_view(q, view))))
        for split in splits:
            if split != "train":
                for es in self.eval_sets(split):
                    view = text_views.get("text")
                    texts.update(dict.fromkeys(self.source.eval_text(with_view(q, view)) for q in es.queries))
        return list(texts)

    def _lookup(self) -> ImageLookup:
        if self.transform is None and self.features is None:
            raise CirlabError(
                "internal: a datamodule without a stage's inputs (see for_stage) serves no batches"
            )
        return ImageLookup(self.source, self.transform, self.features)

    # ---- loaders --------------------------------------------------------------------------------
    def train_dataset(self) -> TripletDataset:
        if self._train is None:
            queries = [q for q in self.source.train_queries() if q.targets]
            if not queries:
                raise CirlabError(f"dataset {self.source.name!r} has no training triplets")
            for view in self.reference_views.values():
                view.prepare(self.source, queries)
            self._train = TripletDataset(
                queries, self.source, self._lookup(), self.seed, self.text_views, self.reference_views
            )
        return self._train

    def loader_options(self) -> dict:
        """Worker processes and pinned memory of every loader. Not persistent_workers: the pipeline
        builds new loaders each epoch (reload_dataloaders_every_n_epochs=1), so workers could not be kept."""
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory}

    def train_dataloader(self) -> DataLoader:
        ds = self.train_dataset()
        if len(ds) < self.batch_size:
            raise CirlabError(
                f"{len(ds)} training triplets are fewer than one batch ({self.batch_size}); "
                "lower method.batch_size"
            )
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=EpochSampler(ds, self.seed),
            drop_last=True,
            collate_fn=collate,
            **self.loader_options(),
        )

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        lookup = self._lookup()
        loaders = []
        for es in self.eval_sets(split):
            queries = QueryDataset(es.queries, self.source, lookup, self.text_views.get("text"))
            for ds in (GalleryDataset(es.gallery, lookup), queries):
                loaders.append(
                    DataLoader(
                        ds, batch_size=self.eval_batch_size, collate_fn=collate, **self.loader_options()
                    )
                )
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.val_split)

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.test_split)


def collate(items: list[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], int):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out
