"""CLIP4Cir (Baldrati et al.): stage I task-oriented fine-tuning, stage II Combiner.

Facts from ABaldrati/CLIP4Cir (docs/methods/clip4cir.md): stage I query = normalize(f_img(ref) +
f_txt(text)) of raw features, loss = CE(100 * q @ t^T, arange(B)), AdamW lr 2e-6 eps 1e-7 wd 0.01,
backbone kept in eval mode; stage II Combiner on the frozen backbone, Adam lr 2e-5 (optimisers:
conf/method/clip4cir.yaml, reference values in experiments/clip4cir_*).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cirlab.backbones.openclip import TUNED_CLIP
from cirlab.errors import CirlabError
from cirlab.methods.combiner import Combiner, CombinerStage
from cirlab.methods.losses import batch_contrastive
from cirlab.methods.retrieval_module import RetrievalModule
from cirlab.weights import strip_prefix

ENCODERS = ("both", "text", "image")


class CLIP4CirFinetune(RetrievalModule):
    """Stage I: fine-tune the backbone's encoders with the sum-fusion contrastive loss."""

    def __init__(
        self,
        backbone,
        encoders: str = "both",
        logit_scale: float = 100.0,
        eval_mode: bool = True,
        **kwargs,
    ):
        super().__init__(backbone, **kwargs)
        if encoders not in ENCODERS:
            raise CirlabError(
                f"unknown method.finetune.encoders={encoders!r}; choose one of {', '.join(ENCODERS)}"
            )
        self.encoders, self.logit_scale, self.eval_mode = encoders, logit_scale, eval_mode
        trainable = {
            "both": backbone.parameters(),
            "text": backbone.text_parameters(),
            "image": backbone.image_parameters(),
        }[encoders]
        keep = {id(p) for p in trainable}
        for p in backbone.parameters():
            p.requires_grad_(id(p) in keep)

    @property
    def frozen_image_encoder(self) -> bool:
        return self.encoders == "text"

    def on_train_epoch_start(self) -> None:
        # eval_mode: the reference never calls .train() (BatchNorm statistics stay frozen); otherwise
        # train mode (BLIP4CIR+Bi: BERT dropout on), set here as the backbone may arrive in either
        self.backbone.train(not self.eval_mode)

    def query_embedding(self, reference, texts):
        return F.normalize(self.image_features(reference) + self.text_features(texts), dim=-1)

    def loss(self, batch: dict) -> torch.Tensor:
        query = self.image_features(batch["reference"]) + self.text_features(batch["text"])
        return batch_contrastive(query, self.image_features(batch["target"]), self.logit_scale)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["text"]))
        return loss

    @classmethod
    def reference_files(cls, state: dict, epoch: int) -> dict:
        """CLIP4Cir's `tuned_clip_*.pt`: {'epoch', 'CLIP': state dict in OpenAI clip names}."""
        return {"tuned_clip.pt": TUNED_CLIP.write(strip_prefix(state, "backbone."), epoch)}

    def optimizer_params(self) -> list:
        return [p for p in self.backbone.parameters() if p.requires_grad]


class CLIP4CirCombiner(CombinerStage, RetrievalModule):
    """Stage II: the Combiner on a frozen backbone (image features come from the cache)."""

    frozen_image_encoder = True
    frozen_text_encoder = True

    def __init__(
        self,
        backbone,
        projection_dim: int | None = None,
        hidden_dim: int | None = None,
        dropout: float = 0.5,
        logit_scale: float = 100.0,
        gather_negatives: bool = False,
        **kwargs,
    ):
        super().__init__(backbone, **kwargs)
        self.gather_negatives = gather_negatives
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.build_combiner(
            backbone.embed_dim, projection_dim=projection_dim, hidden_dim=hidden_dim, dropout=dropout
        )
        self.logit_scale = logit_scale

    def build_combiner(self, feature_dim: int, **sizes) -> None:
        """The stage's trainable fusion; MLCL builds its multi-level combiner here instead."""
        self.combiner = Combiner(feature_dim, **sizes)

    def on_train_epoch_start(self) -> None:
        self.backbone.eval()

    @torch.no_grad()
    def image_features(self, x):
        return super().image_features(x)

    def query_embedding(self, reference, texts):
        return self.combiner.combine(self.image_features(reference), self.text_features(texts))

    def loss(self, batch: dict) -> torch.Tensor:
        query = self.query_embedding(batch["reference"], batch["text"])
        return batch_contrastive(
            query, self.image_features(batch["target"]), self.logit_scale, gather=self.gather_negatives
        )

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["text"]))
        return loss

    def optimizer_params(self) -> list:
        return list(self.combiner.parameters())
