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
from torch.optim.lr_scheduler import LambdaLR

from cirlab.backbones.blip import TUNED_BLIP, BlipTextSide, text_side_layouts
from cirlab.errors import CirlabError
from cirlab.methods.clip4cir import CLIP4CirCombiner, CLIP4CirFinetune
from cirlab.weights import strip_prefix

DIRECTIONS = ("text", "learned")
LEARNED_TOKENS = {"forward": "[fwd]", "backward": "[bwd]"}


def mark_text(caption: str, direction: str) -> str:
    """The reference's `__prepend_text__`: the marker before every chunk split on "and"."""
    marker = f" [{direction.upper()}] "
    return "and".join(marker + chunk for chunk in caption.split("and"))


def mark_learned(caption: str, direction: str) -> str:
    return f"{LEARNED_TOKENS[direction]} {caption}"


class BiDirectional:
    """Mixin over a CLIP4Cir stage: the direction markers as caption views, and its loss (forward
    queries) plus w * the reverse term of `reverse_logits`."""

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

    def loss(self, batch: dict) -> torch.Tensor:
        forward = super().loss(batch)
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
    """Stage I: the BLIP text encoder + text_proj train; two param groups (text_proj at proj_lr_scale x
    the lr; the stage's scheduler, `encoder_cosine`, moves the encoder group only)."""

    def __init__(self, backbone, reverse_weight: float = 0.4, proj_lr_scale: float | None = None, **kwargs):
        """kwargs: direction, bidirectional (BiDirectional), logit_scale, optimizer, ... (CLIP4Cir stage I)."""
        super().__init__(  # the reference trains with BERT dropout active
            backbone, reverse_weight=reverse_weight, encoders="text", eval_mode=False, **kwargs
        )
        self.proj_lr_scale = proj_lr_scale

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
        return {"tuned_blip.pt": TUNED_BLIP.write(strip_prefix(state, "backbone.model."), epoch)}

    def reverse_logits(self, batch: dict) -> torch.Tensor:
        return stage1_reverse_logits(
            self.image_features(batch["reference"]),
            self.text_features(batch["text_reverse"]),
            self.image_features(batch["target"]),
            self.logit_scale,
        )

    def optimizer_params(self) -> list:
        proj = list(self.backbone.text_proj_parameters())
        ids = {id(p) for p in proj}
        return [
            {"params": [p for p in self.backbone.text_parameters() if id(p) not in ids]},
            {"params": proj},
        ]

    def build_optimizer(self) -> torch.optim.Optimizer:
        if self.proj_lr_scale is None:
            raise CirlabError(
                "BLIP4CIR+Bi stage I trains text_proj at its own lr: set method.finetune.module.proj_lr_scale"
            )
        optimizer = super().build_optimizer()
        optimizer.param_groups[1]["lr"] *= self.proj_lr_scale  # before the scheduler records it
        return optimizer


def encoder_cosine(optimizer: torch.optim.Optimizer, epochs: int, min_lr: float = 0.0) -> LambdaLR:
    """The reference's per-epoch cosine on the first param group (the text encoder):
    lr = (lr0 - min_lr) * 0.5 * (1 + cos(pi * epoch / epochs)) + min_lr, NOT clamped after `epochs`
    (it rises again when training runs longer); the other groups keep their lr."""
    lr0 = optimizer.param_groups[0]["lr"]

    def cosine(epoch: int) -> float:
        return ((lr0 - min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / epochs)) + min_lr) / lr0

    return LambdaLR(optimizer, [cosine] + [lambda epoch: 1.0] * (len(optimizer.param_groups) - 1))


class Blip4CirCombiner(BiDirectional, CLIP4CirCombiner):
    """Stage II: the CLIP4Cir Combiner on the frozen stage-I BLIP (cached image features), with the
    reversed query combine(T_j raw, t_i backward) scored against normalize(r_i)."""

    def __init__(self, backbone, **kwargs):
        """kwargs: direction, bidirectional, reverse_weight (BiDirectional), CLIP4Cir stage II's own."""
        super().__init__(backbone, **kwargs)
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
