"""Text<->image retrieval: the metrics, and contrastive training of an image-text model.

The same code pretrains the tiny backbones on the synthetic captions (all weights, InfoNCE).
`CrossModalRetrieval` is `+method=crossmodal` (hxhhxx/Clip_crossmodal_retrieval, facts in
docs/methods/crossmodal.md): zero-shot evaluation, or training only a light head on the frozen
backbone with cached image features: `train=adapter` (residual bottleneck on the image side) or
`train=projections` (text_projection + visual projection + logit_scale), loss `margin` or `infonce`.
Protocol (hxhhxx/Clip_crossmodal_retrieval Evaluation.py, the CLIP_benchmark convention):
text->image R@K over every caption (hit: its own image in the top K); image->text R@K over
images (hit: ANY of the image's captions in the top K); rsum = sum of the six recalls.
"""

from __future__ import annotations

import logging
import random
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from cirlab.backbones.base import Backbone
from cirlab.errors import CirlabError
from cirlab.methods.losses import cosine_margin, symmetric_infonce
from cirlab.methods.retrieval_module import RetrievalModule, as_float64_tensors
from cirlab.retrieval.metrics import TOP_PREDICTIONS, Fraction, SetResult, hit_percent
from cirlab.retrieval.search import search

log = logging.getLogger("cirlab")


def crossmodal_recalls(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks=(1, 5, 10),
    backend: str = "exact",
    **search_options,
) -> dict[str, float]:
    """image_emb [N, D], text_emb [T, D] (normalised); text_to_image [T] = index of each caption's image."""
    t2i = search(text_emb, image_emb, max(ks), backend=backend, **search_options).indices
    i2t = search(image_emb, text_emb, max(ks), backend=backend, **search_options).indices
    return recalls_of_rankings(t2i, i2t, text_to_image, ks)


def recalls_of_rankings(
    t2i: torch.Tensor, i2t: torch.Tensor, text_to_image: torch.Tensor, ks=(1, 5, 10)
) -> dict[str, float]:
    """Recalls of the text->image [T, >=K] and image->text [N, >=K] rankings (gallery indices)."""
    out = {f"t2i_recall_at_{k}": v for k, v in hit_percent(t2i == text_to_image[:, None], ks).items()}
    owner = text_to_image[i2t]  # [N, K]: which image each retrieved caption belongs to
    hit = owner == torch.arange(len(i2t))[:, None]
    out.update({f"i2t_recall_at_{k}": v for k, v in hit_percent(hit, ks).items()})
    out["rsum"] = float(sum(map(Fraction, out.values())))  # exact sum, one rounding
    return out


def caption_id(image: str, j: int) -> str:
    """The id of an image's j-th caption in prediction files: `<image name>#<j>`."""
    return f"{image}#{j}"


class CaptionedImages(Dataset):
    """(pixels, one caption drawn at random per step) pairs; images decoded once and kept in memory."""

    def __init__(self, images: torch.Tensor, captions: list[list[str]], seed: int = 0):
        self.images, self.captions, self.seed = images, captions, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        rng = random.Random(f"{self.seed}-{self.epoch}-{i}")
        return self.images[i], rng.choice(self.captions[i])


class ContrastivePretraining(L.LightningModule):
    """CLIP's symmetric InfoNCE with a learnable temperature, all weights trained."""

    def __init__(self, backbone: Backbone, lr: float = 2e-3, weight_decay: float = 0.1, warmup: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.6593))  # log(1/0.07), as CLIP
        self.lr, self.weight_decay, self.warmup = lr, weight_decay, warmup

    def on_train_epoch_start(self) -> None:
        self.trainer.train_dataloader.dataset.epoch = self.current_epoch  # a fresh caption draw per epoch

    def training_step(self, batch, batch_idx):
        images, texts = batch
        loss = symmetric_infonce(
            self.backbone.encode_image(images),
            self.backbone.encode_texts(list(texts)),
            self.logit_scale.exp().clamp(max=100),
        )
        self.log("pretrain/loss", loss, prog_bar=True, on_epoch=True)
        return loss

    def on_train_start(self) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        """A log line per epoch with the time left: the progress bar only shows in a terminal."""
        loss = self.trainer.callback_metrics.get("pretrain/loss_epoch")
        done, epochs = self.current_epoch + 1, self.trainer.max_epochs
        elapsed = time.perf_counter() - self._started
        log.info(
            "pretraining %s: epoch %d/%d, loss %.3f, %.0f s elapsed, about %.0f s left",
            self.backbone.name,
            done,
            epochs,
            float(loss) if loss is not None else float("nan"),
            elapsed,
            elapsed / done * (epochs - done),
        )

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, self.lr, total_steps=self.trainer.estimated_stepping_batches, pct_start=self.warmup
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def evaluate_captions(
    backbone: Backbone, images: torch.Tensor, captions: list[list[str]], batch_size: int = 512
) -> dict[str, float]:
    backbone.eval()
    img = torch.cat(
        [
            F.normalize(backbone.encode_image(images[i : i + batch_size]).float(), dim=-1)
            for i in range(0, len(images), batch_size)
        ]
    )
    flat = [(j, c) for j, caps in enumerate(captions) for c in caps]
    txt = torch.cat(
        [
            F.normalize(backbone.encode_texts([c for _, c in flat[i : i + batch_size]]).float(), dim=-1)
            for i in range(0, len(flat), batch_size)
        ]
    )
    return crossmodal_recalls(img, txt, torch.tensor([j for j, _ in flat]))


def make_loader(images: torch.Tensor, captions: list[list[str]], batch_size: int, seed: int) -> DataLoader:
    return DataLoader(
        CaptionedImages(images, captions, seed),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def ranked_names(ranking, query_ids: list[str], gallery: list[str]) -> SetResult:
    """A ranking as prediction rows: query id -> top gallery names, and their scores."""
    return SetResult(
        {},
        {q: [gallery[i] for i in row] for q, row in zip(query_ids, ranking.indices.tolist())},
        {},
        dict(zip(query_ids, ranking.scores.tolist())),
    )


# ---- +method=crossmodal ----------------------------------------------------------------------------
TRAIN_MODES = ("none", "adapter", "projections")
LOSSES = ("margin", "infonce")


class ImageAdapter(torch.nn.Module):
    """CLIP-Adapter style residual bottleneck (reference `adaptor` mode): on the normalised image
    feature v, v' = ratio * ReLU(W2 ReLU(W1 v)) + (1 - ratio) * v; W1: D -> D/reduction, W2 back, no bias."""

    def __init__(self, dim: int, reduction: int = 4, ratio: float = 0.2):
        super().__init__()
        self.ratio = ratio
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim, dim // reduction, bias=False),
            torch.nn.ReLU(inplace=True),
            torch.nn.Linear(dim // reduction, dim, bias=False),
            torch.nn.ReLU(inplace=True),
        )

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.ratio * self.net(v) + (1 - self.ratio) * v


class PreProjectionImages(Backbone):
    """Encodes images up to, not including, the visual projection `model.visual.proj` (open_clip
    ViTs): what `train=projections` caches, so the projection itself stays trainable while the
    image tower never runs again. (ResNet towers end in the attention pool's c_proj, applied inside
    the pooling: no pre-projection feature exists to cache, hence ViT backbones only.)"""

    def __init__(self, backbone: Backbone):
        super().__init__()
        visual = getattr(getattr(backbone, "model", None), "visual", None)
        if not isinstance(getattr(visual, "proj", None), torch.Tensor):
            raise CirlabError(
                f"method.train=projections needs a backbone whose image tower ends in a projection "
                f"matrix visual.proj (open_clip ViT, e.g. backbone=clip_vit_b32); {backbone.name!r} "
                "has none. Use method.train=adapter with this backbone."
            )
        self.inner, self.visual = backbone, visual
        self.name = f"{backbone.name}-preproj"
        self.preprocess = backbone.preprocess
        self.image_size = backbone.image_size
        self.embed_dim = visual.proj.shape[0]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        proj = self.visual.proj
        self.visual.proj = None
        try:
            return self.inner.encode_image(images)
        finally:
            self.visual.proj = proj


class CrossModalRetrieval(RetrievalModule):
    """Text<->image retrieval on a frozen backbone with cached image features; validation/test score
    crossmodal_recalls ({split}/t2i_recall_at_K, i2t_recall_at_K, rsum) on a CaptionDataModule and keep
    both rankings as results (groups `text_to_image`: caption id -> images, `image_to_text`: image ->
    caption ids). A query is a text: `query_embedding` ignores the reference image."""

    frozen_image_encoder = True
    query_has_image = False
    data_kind = "captions"

    def __init__(
        self,
        backbone,
        train: str = "adapter",
        loss: str = "margin",
        margin: float = 0.1,
        adapter_ratio: float = 0.2,
        adapter_reduction: int = 4,
        init_temperature: float = 0.07,
        **kwargs,
    ):
        super().__init__(backbone, **kwargs)
        if train not in TRAIN_MODES:
            raise CirlabError(f"unknown method.train={train!r}; choose one of {', '.join(TRAIN_MODES[1:])}")
        if loss not in LOSSES:
            raise CirlabError(f"unknown method.loss={loss!r}; choose one of {', '.join(LOSSES)}")
        self.train_mode, self.loss_name, self.margin = train, loss, margin
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.adapter = (
            ImageAdapter(backbone.embed_dim, adapter_reduction, adapter_ratio) if train == "adapter" else None
        )
        # not a registered submodule: it only wraps the backbone (no weights of its own)
        self.__dict__["preproj"] = PreProjectionImages(backbone) if train == "projections" else None
        if train == "projections":
            model = backbone.model
            text_proj = model.text_projection
            for p in [
                model.visual.proj,
                model.logit_scale,
                *([text_proj] if isinstance(text_proj, torch.Tensor) else text_proj.parameters()),
            ]:
                p.requires_grad_(True)
            self.logit_scale = None  # the backbone's own (model.logit_scale) trains: see temperature()
        else:  # the reference's wrapper owns its temperature (trainable with the adapter)
            self.logit_scale = torch.nn.Parameter(
                torch.tensor(float(torch.log(torch.tensor(1 / init_temperature)))),
                requires_grad=train == "adapter",
            )

    @property
    def frozen_text_encoder(self) -> bool:
        """Frozen text tower (captions read from the text-feature table) unless its projection trains."""
        return self.train_mode != "projections"

    def feature_encoder(self) -> Backbone:
        """What the pipeline caches image features with."""
        return self.preproj if self.preproj is not None else self.backbone

    def on_train_epoch_start(self) -> None:
        self.backbone.eval()  # frozen towers: no dropout, BatchNorm statistics untouched

    # ---- embeddings -------------------------------------------------------------------------------
    def image_embedding(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise CirlabError("internal: crossmodal expects cached image features")
        v = x.float()
        if self.preproj is not None:
            v = v @ self.backbone.model.visual.proj.float()
        v = F.normalize(v, dim=-1)
        if self.adapter is not None:
            v = F.normalize(self.adapter(v), dim=-1)
        return v

    def text_embedding(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.text_features(list(texts)), dim=-1)

    def gallery_embedding(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_embedding(images)

    def query_embedding(self, reference, texts):
        return self.text_embedding(texts)

    # ---- training ---------------------------------------------------------------------------------
    def temperature_scale(self) -> torch.Tensor:
        log_scale = self.backbone.model.logit_scale if self.logit_scale is None else self.logit_scale
        return log_scale.exp().clamp(max=100)

    def training_step(self, batch, batch_idx):
        image, text = self.image_embedding(batch["image"]), self.text_embedding(batch["text"])
        if self.loss_name == "margin":
            loss = cosine_margin(image, text, self.margin)
        else:
            loss = symmetric_infonce(image, text, self.temperature_scale())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(image))
        return loss

    def optimizer_params(self) -> list:
        params = super().optimizer_params()
        if not params:
            raise CirlabError("method.train=none trains nothing: set the stage's max_epochs to 0")
        return params

    # ---- evaluation: [images, captions] loaders per split -------------------------------------------
    def _eval_step(self, batch: dict, dataloader_idx: int) -> None:
        emb = (
            self.image_embedding(batch["image"])
            if dataloader_idx == 0
            else self.text_embedding(batch["text"])
        )
        self._outputs[dataloader_idx].append(emb.float().cpu())  # in loader order: no gather

    def _score(self, split: str) -> None:
        if self.trainer.world_size > 1:
            raise CirlabError("method crossmodal evaluates on one device: use trainer=cpu or trainer=gpu")
        images, texts = (torch.cat(self._outputs[i]) for i in (0, 1))
        self._outputs.clear()
        pairs = self.eval_data.pairs(split)
        names = [n for n, _ in pairs]
        captions = [caption_id(n, j) for n, caps in pairs for j in range(len(caps))]
        opts = dict(backend=self.search_backend, **self.search_options)
        t2i = search(texts, images, TOP_PREDICTIONS, **opts)
        i2t = search(images, texts, TOP_PREDICTIONS, **opts)
        recalls = recalls_of_rankings(t2i.indices, i2t.indices, self.eval_data.text_to_image(split))
        metrics = {f"{split}/{k}": v for k, v in recalls.items()}
        self.results[split] = {
            "text_to_image": ranked_names(t2i, captions, names),
            "image_to_text": ranked_names(i2t, names, captions),
        }
        self.metrics.update(metrics)
        self.log_dict(as_float64_tensors(metrics, self.device), sync_dist=False)
