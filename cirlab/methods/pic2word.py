"""Pic2Word (Saito et al., CVPR 2023): zero-shot CIR by mapping a picture to one word token
(google-research/composed_image_retrieval).

A small MLP (`IM2TEXT`) maps an image's raw CLIP feature to one pseudo-word token; trained on unlabeled
images only, so that the frozen text tower's feature of "a photo of *" (token at `*`) retrieves its own
image in the batch (symmetric InfoNCE at CLIP's frozen logit scale). Queries: "a photo of * , {caption}".
What is SEARLE's too (the prompt evaluation, the unlabeled images' cached features) comes from
cirlab.methods.searle; docs/methods/pic2word.md lists the differences and deviations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.data.records import CIRQuery
from cirlab.errors import CirlabError
from cirlab.methods.searle import PromptQueries, UnlabeledImages
from cirlab.weight_map import Rule, WeightMap
from cirlab.weights import Layout, SavedFile, cirlab_stage, strip_prefix


class IM2TEXT(nn.Module):
    """The reference mapping network: `n_layer` blocks Linear -> Dropout -> ReLU (dropout before the
    activation), then `fc_out`; state-dict keys `layers.{i}.0.*` and `fc_out.*` as the authors' files."""

    def __init__(
        self,
        embed_dim: int,
        middle_dim: int = 512,
        output_dim: int = 512,
        n_layer: int = 2,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.fc_out = nn.Linear(middle_dim, output_dim)  # created first, as the reference (key order)
        dims = [embed_dim] + [middle_dim] * n_layer
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(d, middle_dim), nn.Dropout(dropout), nn.ReLU()) for d in dims[:-1]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.fc_out(x)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric image<->text InfoNCE over the batch, row i's positive in column i; inputs normalised here."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The reference's per-step lr factor: linear warmup (step+1)/warmup, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


class Pic2Word(UnlabeledImages, PromptQueries):
    """Pic2Word: IM2TEXT (`img2text`) trained on unlabeled images' cached raw features, then zero-shot CIR
    with the prompt; FashionIQ's captions by the source's `prompt_text` rule (one order, second first)."""

    def __init__(
        self,
        backbone,
        prompt: str = "a photo of * , {}",
        train_prompt: str = "a photo of *",
        placeholder: str = "*",
        middle_dim: int = 512,
        n_layer: int = 2,
        dropout: float = 0.1,
        warmup_steps: int = 10000,
        batch_size: int = 128,
        **kwargs,
    ):
        super().__init__(backbone, prompt=prompt, placeholder=placeholder, batch_size=batch_size, **kwargs)
        if placeholder not in train_prompt:
            raise CirlabError(f"method.train_prompt={train_prompt!r} needs the placeholder {placeholder!r}")
        backbone.token_id(placeholder)  # one token, or a clear error now rather than at the first batch
        self.img2text = IM2TEXT(backbone.embed_dim, middle_dim, backbone.token_dim, n_layer, dropout)
        self.train_prompt, self.warmup_steps = train_prompt, warmup_steps

    def query_texts(self, query: CIRQuery) -> list[str]:
        return [self.eval_data.source.prompt_text(query)]

    def token_of(self, features: torch.Tensor) -> torch.Tensor:
        return self.img2text(features)

    def train_loader(self, dm):
        _, _, x = self.unlabeled_features(dm)
        return self.unlabeled_loader("img2text", x)

    def _global_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Under DDP the reference's negatives: every rank's rows, this rank's first (the only ones with
        gradients)."""
        if self.trainer.world_size == 1:
            return x
        rows = self.all_gather(x)
        return torch.cat([x, *(rows[r] for r in range(len(rows)) if r != self.global_rank)])

    def training_step(self, batch, batch_idx):
        (x,) = batch
        tokens = self.backbone.tokenize([self.train_prompt]).to(self.device).expand(len(x), -1)
        text = self.backbone.encode_text_with_pseudo_tokens(tokens, self.img2text(x), self.placeholder)
        image, text = (
            self._global_batch(F.normalize(x, dim=-1)),
            self._global_batch(F.normalize(text, dim=-1)),
        )
        loss = contrastive_loss(image, text, self.backbone.model.logit_scale.exp().detach())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x))
        return loss

    def optimizer_params(self) -> list:
        """The reference's two groups: weight decay on the weight matrices, none on the biases."""
        named = list(self.img2text.named_parameters())
        return [
            {"params": [p for n, p in named if not n.endswith("bias")]},
            {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
        ]

    def configure_optimizers(self):
        optimizer = self.build_optimizer()
        # the schedule's length is the run's steps (outside a Trainer, e.g. a config check: unknown, 1)
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        warmup = self.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- the authors' files: only state_dict_img2text is read (`module.` keys from their DDP runs, or none)
    IMG2TEXT_FILE = SavedFile(
        "state_dict_img2text",
        WeightMap((Rule("module.*", "*"),)),
        "Pic2Word checkpoint {'state_dict_img2text': ...} (their main.py's epoch_<n>.pt, the re-hosted "
        "pic2word_large.pt, cirlab's export)",
    )

    def stage_weights(self) -> nn.Module:
        return self.img2text

    def checkpoint_layouts(self) -> list[Layout]:
        return [self.IMG2TEXT_FILE.layout(), cirlab_stage("img2text.", "its img2text.* weights")]

    @classmethod
    def reference_files(cls, state: dict, epoch: int) -> dict:
        """IM2TEXT in the re-hosted release's layout (`state_dict_img2text`, `module.` keys, plus the epoch), as
        LinCIR's loaders read Pic2Word files. The authors' own eval script also loads a CLIP `state_dict` from
        the file, which is not written: the CLIP is OpenAI's, unchanged."""
        return {f"epoch_{epoch}.pt": cls.IMG2TEXT_FILE.write(strip_prefix(state, "img2text."), epoch)}

    def checkpoint_monitor(self) -> str | None:
        """As SEARLE's phi: the best val epoch only where val is held out from the reported split."""
        if self.eval_data.val_split == self.eval_data.test_split:
            return None
        return super().checkpoint_monitor()
