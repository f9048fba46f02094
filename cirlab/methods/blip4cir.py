"""BLIP4CIR+Bi (Liu et al., WACV 2024): bi-directional training with a direction token.

Facts from Cuberick-Orion/Bi-Blip4CIR. The method is CLIP4Cir on a
BLIP backbone plus REVERSED queries: (target image + backward-marked text) should retrieve the
reference. Stage I fine-tunes the BLIP text encoder only (image encoder frozen: cached features),
query = normalize(r + t); stage II trains the Combiner on the frozen stage-I encoders.

Direction token (`direction`):
- `text` (default, the reference code): the literal markers " [FORWARD] " / " [BACKWARD] " are
  prepended to every chunk of `caption.split("and")` (also inside words such as "sandals"); the
  tokenizer splits them into ordinary word-pieces, learnable only through the fine-tuned encoder.
- `learned` (the paper's wording): one new token per direction, with its own trainable embedding
  row, prepended once to the text.
Eval queries carry the forward marker, as in the reference. `bidirectional=false` = BLIP4CIR.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from cirlab.backbones.blip import BlipTextSide, text_side_layouts, text_side_state, to_reference_text
from cirlab.errors import CirlabError
from cirlab.methods.clip4cir import CLIP4CirCombiner, CLIP4CirFinetune
from cirlab.methods.losses import batch_contrastive

DIRECTIONS = ("text", "learned")
LEARNED_TOKENS = {"forward": "[fwd]", "backward": "[bwd]"}


def mark_text(caption: str, direction: str) -> str:
    """The reference's `__prepend_text__`: the marker before every chunk split on "and"."""
    marker = f" [{direction.upper()}] "
    return "and".join(marker + chunk for chunk in caption.split("and"))


def mark_learned(caption: str, direction: str) -> str:
    return f"{LEARNED_TOKENS[direction]} {caption}"


class BiDirectional:
    """Mixin: the direction markers as caption views and the loss = forward + w * reverse."""

    def _setup_directions(self, backbone, direction: str, bidirectional: bool, reverse_weight: float) -> None:
        if direction not in DIRECTIONS:
            raise CirlabError(
                f"unknown method.direction={direction!r}; choose one of {', '.join(DIRECTIONS)}"
            )
        if not hasattr(backbone, "add_tokens"):
            raise CirlabError(
                f"BLIP4CIR+Bi needs a BLIP backbone (backbone=blip_tiny|blip_base), not {backbone.name!r}"
            )
        if direction == "learned":
            backbone.add_tokens(list(LEARNED_TOKENS.values()))
        mark = mark_text if direction == "text" else mark_learned
        self.direction, self.bidirectional, self.reverse_weight = direction, bidirectional, reverse_weight
        self.text_views = {"text": partial(mark, direction="forward")}
        if bidirectional:
            self.text_views["text_reverse"] = partial(mark, direction="backward")

    def bidirectional_loss(self, forward: torch.Tensor, batch: dict) -> torch.Tensor:
        if not self.bidirectional:
            return forward
        logits = self.reverse_logits(batch)
        reverse = F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))
        self.log("train/loss_forward", forward, batch_size=len(batch["text"]))
        self.log("train/loss_reverse", reverse, batch_size=len(batch["text"]))
        return forward + self.reverse_weight * reverse


def stage1_reverse_logits(
    reference: torch.Tensor, text_backward: torch.Tensor, target: torch.Tensor, scale: float
) -> torch.Tensor:
    """logit[i, j] = scale * <normalize(T_j + t_i), normalize(r_i)>, T_j the NORMALISED target
    feature of triplet j, t_i the raw backward-text feature, r_i the raw reference feature: the
    reversed query (target j, backward text i) must point back to reference i."""
    queries = F.normalize(
        F.normalize(target, dim=-1)[None, :, :] + text_backward[:, None, :], dim=-1
    )  # [B, B, D]
    return scale * torch.einsum("ijd,id->ij", queries, F.normalize(reference, dim=-1))


class Blip4CirFinetune(BiDirectional, CLIP4CirFinetune):
    """Stage I: the BLIP text encoder + text_proj train; two AdamW groups (text_proj at 100x lr),
    weight decay 0.05, per-epoch cosine on the encoder group only, NOT clamped after `cosine_epochs`
    (the reference's schedule rises again when training runs longer)."""

    def __init__(
        self,
        backbone,
        direction: str = "text",
        bidirectional: bool = True,
        reverse_weight: float = 0.4,
        lr: float = 5e-5,
        min_lr: float = 0.0,
        cosine_epochs: int = 10,
        proj_lr_scale: float = 100.0,
        weight_decay: float = 0.05,
        logit_scale: float = 100.0,
        **kwargs,
    ):
        super().__init__(
            backbone,
            encoders="text",
            lr=lr,
            weight_decay=weight_decay,
            logit_scale=logit_scale,
            eval_mode=False,
            **kwargs,
        )  # the reference trains with BERT dropout active
        self._setup_directions(backbone, direction, bidirectional, reverse_weight)
        self.min_lr, self.cosine_epochs, self.proj_lr_scale = min_lr, cosine_epochs, proj_lr_scale

    # ---- weights in and out in the reference's layout: stage I's own weights are the text side -------
    def stage_weights(self) -> torch.nn.Module:
        return BlipTextSide(self.backbone.model)

    def checkpoint_layouts(self):
        return text_side_layouts()

    @classmethod
    def reference_files(cls, state: dict, epoch: int) -> dict:
        """tuned_blip.pt as the reference saves it ({'epoch', 'BLIPTextEncoder': ...}; its optimizer state is
        not kept), so its combiner_train.py / validate.py load it with --blip-model-path. With
        direction=learned the word embedding carries the two extra direction rows."""
        return {
            "tuned_blip.pt": {"epoch": epoch, "BLIPTextEncoder": to_reference_text(text_side_state(state))}
        }

    def reverse_logits(self, batch: dict) -> torch.Tensor:
        return stage1_reverse_logits(
            self.image_features(batch["reference"]),
            self.text_features(batch["text_reverse"]),
            self.image_features(batch["target"]),
            self.logit_scale,
        )

    def training_step(self, batch, batch_idx):
        query = self.image_features(batch["reference"]) + self.text_features(batch["text"])
        forward = batch_contrastive(query, self.image_features(batch["target"]), self.logit_scale)
        loss = self.bidirectional_loss(forward, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(query))
        return loss

    def configure_optimizers(self):
        proj = {id(p) for p in self.backbone.text_proj_parameters()}
        encoder = [p for p in self.backbone.text_parameters() if id(p) not in proj]
        opt = torch.optim.AdamW(
            [
                {"params": encoder, "lr": self.lr, "weight_decay": self.weight_decay},
                {
                    "params": self.backbone.text_proj_parameters(),
                    "lr": self.lr * self.proj_lr_scale,
                    "weight_decay": self.weight_decay,
                },
            ]
        )

        def cosine(epoch: int) -> float:  # (lr0 - min) * 0.5 * (1 + cos(pi * e / max_epoch)) + min, unclamped
            return (
                (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / self.cosine_epochs))
                + self.min_lr
            ) / self.lr

        sched = torch.optim.lr_scheduler.LambdaLR(opt, [cosine, lambda epoch: 1.0])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class Blip4CirCombiner(BiDirectional, CLIP4CirCombiner):
    """Stage II: the CLIP4Cir Combiner on the frozen stage-I BLIP (cached image features), with the
    reversed query combine(T_j raw, t_i backward) scored against normalize(r_i)."""

    def __init__(
        self,
        backbone,
        direction: str = "text",
        bidirectional: bool = True,
        reverse_weight: float = 0.5,
        **kwargs,
    ):
        super().__init__(backbone, **kwargs)
        self._setup_directions(backbone, direction, bidirectional, reverse_weight)
        for p in (
            backbone.parameters()
        ):  # direction tokens added only now (stage II run on its own) stay frozen too
            p.requires_grad_(False)

    def reverse_logits(self, batch: dict) -> torch.Tensor:
        """logit[i, j] = scale * <combine(T_j raw, t_i backward), normalize(r_i)> (B x B combinations)."""
        target = self.image_features(batch["target"])  # raw: the Combiner's image input
        text = self.text_features(batch["text_reverse"])
        n = len(target)
        combined = self.combiner.combine(
            target[None, :, :].expand(n, n, -1), text[:, None, :].expand(n, n, -1)
        )
        return self.logit_scale * torch.einsum(
            "ijd,id->ij", combined, F.normalize(self.image_features(batch["reference"]), dim=-1)
        )

    def training_step(self, batch, batch_idx):
        query = self.query_embedding(batch["reference"], batch["text"])
        forward = batch_contrastive(query, self.image_features(batch["target"]), self.logit_scale)
        loss = self.bidirectional_loss(forward, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(query))
        return loss
