"""Base LightningModule of every CIR method: the shared retrieval evaluation.

Validation/test encode each eval set's gallery and queries (Lightning drives the loops, devices,
precision), gather them across processes by index (so DDP sampler padding never scores a query
twice), then rank and score on rank 0 in float32 with the dataset's protocol.
Subclasses define `query_embedding` (and training). A stage's optimiser and scheduler come from its
config (`module.optimizer` / `module.scheduler`, `_partial_: true`): the module only says which
parameters they step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from cirlab.backbones.base import Backbone
from cirlab.data.datamodule import with_view
from cirlab.data.records import CIRQuery
from cirlab.errors import CirlabError
from cirlab.retrieval.embedding_file import EmbeddingWriter
from cirlab.retrieval.metrics import SetResult, score_eval_set, split_metrics
from cirlab.weights import Layout, cirlab_stage


def as_float64_tensors(metrics: dict[str, float], device) -> dict[str, torch.Tensor]:
    """Logged as float64 tensors: Lightning stores a Python float as float32 (100/3 -> 33.33333206)."""
    return {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in metrics.items()}


class DiscardGalleryFiles(Callback):
    """Deletes the half-written gallery files (eval.gallery_on_disk) of an evaluation that raised:
    a LightningModule has no exception hook, a callback does, whatever raised (a step, a data loader)."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        pl_module.discard_gallery_files()


class RetrievalModule(L.LightningModule):
    def __init__(
        self,
        backbone: Backbone,
        search: str = "exact",
        search_options: dict | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.make_optimizer, self.make_scheduler = optimizer, scheduler
        self.search_backend = search
        self.search_options = dict(search_options or {})
        self._outputs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self.results: dict[str, dict[str, SetResult]] = {}
        self.metrics: dict[str, float] = {}
        # What the stage gives its module, in one place (cirlab.stage.build_stage) and nowhere else:
        self.eval_data = None  # the stage's datamodule, whose eval sets are scored
        self.gallery_on_disk: Path | None = None  # eval.gallery_on_disk: stream gallery embeddings to files
        # frozen text encoder: text -> raw feature of every text the stage can draw (from
        # cirlab.data.features.TextFeatureCache), so training runs no text encoder
        self.text_table: dict[str, torch.Tensor] | None = None
        self.stage_dir: Path | None = None  # the run's stage folder, when cirlab.load rebuilt this module
        self._writers: dict[int, EmbeddingWriter] = {}

    # ---- what a method defines ------------------------------------------------------------------
    frozen_image_encoder: bool = False  # True: batches carry cached image features [B, D], not pixels
    frozen_text_encoder: bool = False  # True: no text gradients; text features read from `text_table`
    query_has_image: bool = True  # False: a query is a text alone (text -> image retrieval)
    data_kind: str = "cir"  # the datamodule `kind` it trains and scores on (cross-modal: "captions")
    # False: training reads no image of the dataset's training split (SEARLE's phi on another source's
    # images), so a dataset without one (CIRCO) can be trained for
    trains_on_dataset_images: bool = True
    # batch key -> caption view (a function rewriting each raw caption, or None); "text" also builds the
    # eval queries. BLIP4CIR+Bi adds direction-marked views; the stage's datamodule serves them.
    text_views: dict = {"text": None}
    # batch key -> an image view served with each training triplet (e.g. MLCL's augmented references);
    # the stage's datamodule serves them.
    reference_views: dict = {}

    def train_loader(self, dm):
        """A method that trains on other data than the CIR triplets (e.g. SEARLE's phi on
        unlabeled images) returns its own DataLoader here; None = the datamodule's triplets."""
        return None

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalised) image features: cached embeddings pass through, pixels are encoded."""
        return x.float() if x.dim() == 2 else self.backbone.encode_image(x).float()

    def text_features(self, texts: list[str]) -> torch.Tensor:
        if not self.frozen_text_encoder:
            return self.backbone.encode_texts(texts).float()
        if self.text_table is None:  # built outside a stage (no table): encoded as they come
            with torch.no_grad():
                return self.backbone.encode_texts(texts).float()
        missing = [t for t in dict.fromkeys(texts) if t not in self.text_table]
        if missing:
            if self.training:
                raise CirlabError(
                    f"internal: training text {missing[0]!r} is not in the stage's text-feature table "
                    "(its datamodule's frozen_texts() must list every text a stage can draw)"
                )
            # evaluation of a text no dataset has (e.g. a query typed into cirlab.load().search)
            with torch.no_grad():
                self.text_table.update(zip(missing, self.backbone.encode_texts(missing).float().cpu()))
        return torch.stack([self.text_table[t] for t in texts]).to(self.device)

    def feature_encoder(self) -> Backbone:
        """What encodes the cached image features of a frozen-encoder stage."""
        return self.backbone

    def gallery_embedding(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_features(images), dim=-1)

    def query_embedding(self, reference: torch.Tensor, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def dataset_query_embedding(self, reference: torch.Tensor, query: CIRQuery) -> torch.Tensor:
        """A query in its dataset's raw form (e.g. FashionIQ's two captions), embedded as evaluation
        embeds it: the source's caption rule on the stage's text view, then `query_embedding`."""
        text = self.eval_data.source.eval_text(with_view(query, self.text_views.get("text")))
        return self.query_embedding(reference, [text])

    # ---- optimisation: the stage config's optimizer / scheduler on this module's parameters ---------
    def optimizer_params(self) -> list:
        """What the optimiser steps: parameters, or param groups with their own settings."""
        return [p for p in self.parameters() if p.requires_grad]

    def build_optimizer(self) -> torch.optim.Optimizer:
        if self.make_optimizer is None:
            raise CirlabError(
                f"{type(self).__name__} has no optimizer: set the stage's module.optimizer "
                "(e.g. {_target_: torch.optim.AdamW, _partial_: true, lr: 1e-4})"
            )
        return self.make_optimizer(params=self.optimizer_params())

    def configure_optimizers(self):
        optimizer = self.build_optimizer()
        if self.make_scheduler is None:
            return optimizer
        scheduler = self.make_scheduler(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ---- weights in and out in the reference layouts (cirlab/weights.py) -------------------------
    def stage_weights(self) -> torch.nn.Module:
        """The part of this module that is the stage's own weights (`method.<stage>.checkpoint` fills it)."""
        return self

    def checkpoint_layouts(self) -> list[Layout]:
        """File layouts `method.<stage>.checkpoint` accepts; methods add their authors' layouts."""
        return [cirlab_stage("", f"a {type(self).__name__} stage")]

    @classmethod
    def reference_files(cls, state: dict, epoch: int) -> dict:
        """This stage's weights in its authors' layout, {file name: object} (cirlab +task=export)."""
        return {}

    def checkpoint_monitor(self) -> str | None:
        """Metric that selects the best epoch (the val split's main metric); None = keep the last epoch."""
        return f"{self.eval_data.val_split}/{self.eval_data.source.protocol.main_metric}"

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["cirlab"] = {"method": type(self).__name__, "backbone": self.backbone.name}

    def configure_callbacks(self) -> list[Callback]:
        return [DiscardGalleryFiles()]

    # ---- evaluation loop ------------------------------------------------------------------------
    def _eval_step(self, batch: dict, dataloader_idx: int) -> None:
        if dataloader_idx % 2 == 0:
            emb = self.gallery_embedding(batch["image"])
            if self.gallery_on_disk is not None:
                self._stream_gallery(dataloader_idx, batch["index"], emb)
                return
        else:
            emb = self.query_embedding(batch["reference"], batch["text"])
        self._outputs[dataloader_idx].append((batch["index"], emb.float()))

    @property
    def _split(self) -> str:
        return self.eval_data.test_split if self.trainer.testing else self.eval_data.val_split

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def _stream_gallery(self, dataloader_idx: int, index: torch.Tensor, emb: torch.Tensor) -> None:
        if self.trainer.world_size > 1:
            raise CirlabError("eval.gallery_on_disk works with single-process evaluation; drop it under DDP")
        if dataloader_idx not in self._writers:
            n = len(self.eval_data.eval_sets(self._split)[dataloader_idx // 2].gallery)
            self._writers[dataloader_idx] = EmbeddingWriter(
                self.gallery_on_disk / f"{self._split}-{dataloader_idx}.npy", n
            )
        writer = self._writers[dataloader_idx]
        if int(index[0]) != writer.written:
            raise RuntimeError(
                f"gallery batch at row {int(index[0])} after {writer.written} rows: eval shuffles"
            )
        writer.append(emb.cpu().numpy())

    def discard_gallery_files(self) -> None:
        """Close and delete the gallery files not finished (an evaluation that stopped early)."""
        for writer in self._writers.values():
            writer.abort()
        self._writers.clear()

    def _gathered(self, dataloader_idx: int, n: int) -> torch.Tensor:
        idx = torch.cat([i for i, _ in self._outputs[dataloader_idx]]).to(self.device)
        emb = torch.cat([e for _, e in self._outputs[dataloader_idx]])
        if self.trainer.world_size > 1:
            idx = self.all_gather(idx).reshape(-1)
            emb = self.all_gather(emb).reshape(-1, emb.shape[-1])
        out = torch.zeros(n, emb.shape[-1], device=emb.device)
        out[idx] = emb  # duplicates from sampler padding write the same row twice
        return out.cpu()

    def _score(self, split: str) -> None:
        dm = self.eval_data
        source = dm.source
        results = {}
        for s, es in enumerate(dm.eval_sets(split)):
            writer = self._writers.pop(2 * s, None)
            gallery = writer.finish() if writer else self._gathered(2 * s, len(es.gallery))
            queries = self._gathered(2 * s + 1, len(es.queries))
            results[es.group] = score_eval_set(
                source.protocol,
                es,
                queries,
                gallery,
                has_answers=source.has_answers(split),
                backend=self.search_backend,
                **self.search_options,
            )
        self._outputs.clear()
        self.discard_gallery_files()  # none left unless a data loader has no eval set
        self.results[split] = results
        metrics = split_metrics(split, results, source.protocol)
        self.metrics.update(metrics)
        if metrics:
            # every rank scored the same gathered data: syncing averages identical values (no change)
            self.log_dict(as_float64_tensors(metrics, self.device), sync_dist=self.trainer.world_size > 1)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._score(self.eval_data.val_split)
        self._outputs.clear()
        self.discard_gallery_files()  # a sanity check's partial galleries

    def on_test_epoch_end(self) -> None:
        self._score(self.eval_data.test_split)
