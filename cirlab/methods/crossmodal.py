"""Text<->image retrieval: the metrics, and contrastive training of an image-text model.

The same code pretrains the tiny backbones on the synthetic captions (all weights, InfoNCE).
Protocol (hxhhxx/Clip_crossmodal_retrieval Evaluation.py, the CLIP_benchmark convention):
text->image R@K over every caption (hit: its own image in the top K); image->text R@K over
images (hit: ANY of the image's captions in the top K); rsum = sum of the six recalls.
"""
from __future__ import annotations

import random

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from cirlab.backbones.base import Backbone
from cirlab.methods.losses import symmetric_infonce
from cirlab.retrieval.search import exact_search


def crossmodal_recalls(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                       ks=(1, 5, 10)) -> dict[str, float]:
    """image_emb [N, D], text_emb [T, D] (normalised); text_to_image [T] = index of each caption's image."""
    kmax = max(ks)
    _, t2i = exact_search(text_emb, image_emb, kmax)
    out = {f"t2i_recall_at_{k}": (t2i[:, :k] == text_to_image[:, None]).any(1).float().mean().item() * 100
           for k in ks}
    _, i2t = exact_search(image_emb, text_emb, kmax)
    owner = text_to_image[i2t]  # [N, kmax]: which image each retrieved caption belongs to
    hit = owner == torch.arange(len(image_emb))[:, None]
    out.update({f"i2t_recall_at_{k}": hit[:, :k].any(1).float().mean().item() * 100 for k in ks})
    out["rsum"] = sum(out.values())
    return out


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
        loss = symmetric_infonce(self.backbone.encode_image(images), self.backbone.encode_texts(list(texts)),
                                 self.logit_scale.exp().clamp(max=100))
        self.log("pretrain/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, self.lr, total_steps=self.trainer.estimated_stepping_batches,
                                                    pct_start=self.warmup)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def evaluate_captions(backbone: Backbone, images: torch.Tensor, captions: list[list[str]],
                      batch_size: int = 512) -> dict[str, float]:
    backbone.eval()
    img = torch.cat([F.normalize(backbone.encode_image(images[i:i + batch_size]).float(), dim=-1)
                     for i in range(0, len(images), batch_size)])
    flat = [(j, c) for j, caps in enumerate(captions) for c in caps]
    txt = torch.cat([F.normalize(backbone.encode_texts([c for _, c in flat[i:i + batch_size]]).float(), dim=-1)
                     for i in range(0, len(flat), batch_size)])
    return crossmodal_recalls(img, txt, torch.tensor([j for j, _ in flat]))


def make_loader(images: torch.Tensor, captions: list[list[str]], batch_size: int, seed: int) -> DataLoader:
    return DataLoader(CaptionedImages(images, captions, seed), batch_size=batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))
