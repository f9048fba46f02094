"""MLCL (Zhao et al., ICASSP 2024): multi-level combiner + mCCL + SSCL, stage II on a frozen backbone.

Facts from JWargrave/MLCL (docs/methods/mlcl.md). "Multi-level" = three outputs of the combiner
(not CLIP layers), all computed from the raw (un-normalised) features f_ref, f_txt:

* low  f_s = normalize(f_ref + f_txt)                                   (no parameters)
* mid  f_c = combiner_proj(h)                                           (h = hidden layer of the Combiner)
* high f_h = output_layer(h) + lambda * f_txt + (1 - lambda) * f_ref    (the CLIP4Cir Combiner, reused
  from `cirlab.methods.combiner.Combiner`: its projections, hidden layer, output layer, dynamic scalar)

with w = 2 * sigmoid(loss_weight), loss_weight initialised to log(0.5), so w = 2/3 at init.

Training and inference weight the high and mid levels OPPOSITELY — this is what the reference code
does and is kept on purpose (see the README, "MLCL"):

* training (mCCL):  L = w * CE(s f_h f_tgt^T) + (2 - w) * CE(s f_c f_tgt^T) + 1 * CE(s f_s f_tgt^T)
* inference query:  q = normalize((2 - w) * f_h + w * f_c + f_s)       (each level L2-normalised first)

s = exp(logit_scale) (learnable, init 100). SSCL: a strongly augmented view of the reference goes
through the same combiner (same text projection output, new image-projection dropout mask);
CE(s2 * normalize(raw) @ normalize(raw_aug)^T) + CE(s2 * normalize(f_h) @ normalize(f_h_aug)^T)
with labels arange(B) (clean -> augmented only), raw = concat(text proj, image proj) and
s2 = exp(logit_scale_sl) (learnable, init 100). Total = mCCL + SSCL.

The augmented views come from the datamodule as the batch key `reference_aug`
(cirlab/data/augmented.py: K cached views per training reference image, one drawn per step).

Ablations: `mccl=False` trains the high level alone with a single CE (the CLIP4Cir loss, learnable
temperature) and retrieves with f_h alone — the untrained mid level is then not used;
`sscl=False` drops the two SSCL terms (and the augmented views).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.data.augmented import AugmentedReferences
from cirlab.errors import CirlabError
from cirlab.methods.clip4cir import CLIP4CirCombiner
from cirlab.methods.combiner import Combiner
from cirlab.methods.losses import batch_contrastive
from cirlab.weight_map import Rule, WeightMap
from cirlab.weights import Layout, SavedFile, cirlab_stage


# ---- the multi-level combiner -------------------------------------------------------------------
class MultiLevelCombiner(nn.Module):
    """The Combiner plus the mid-level head `combiner_proj: Linear(H, D)`; `loss_weight` sets w."""

    def __init__(self, feature_dim: int, **sizes):  # the Combiner's projection_dim, hidden_dim, dropout
        super().__init__()
        self.combiner = Combiner(feature_dim, **sizes)
        self.combiner_proj = nn.Linear(self.combiner.combiner_layer.out_features, feature_dim)
        self.loss_weight = nn.Parameter(torch.tensor(math.log(0.5)))

    @property
    def w(self) -> torch.Tensor:
        return 2 * torch.sigmoid(self.loss_weight)

    def fuse(self, image: torch.Tensor, text: torch.Tensor, t: torch.Tensor | None = None) -> dict:
        """All levels (un-normalised f_h, f_c; normalised f_s) and the concat feature `raw`, from the
        Combiner's steps. `t`: a text projection to reuse (SSCL's augmented branch shares the clean one's)."""
        c = self.combiner
        t = c.project_text(text) if t is None else t
        raw = torch.cat([t, c.project_image(image)], dim=-1)
        h = c.hidden(raw)
        return {
            "t": t,
            "raw": raw,
            "high": c.mix(h, c.dynamic_scalar(raw), image, text),
            "mid": self.combiner_proj(F.relu(h)),  # the reference's ReLU(Dropout(p=0)(ReLU(.)))
            "low": F.normalize(image + text, dim=-1),
        }

    def query(self, levels: dict, multi_level: bool = True) -> torch.Tensor:
        """Inference: normalize((2 - w) * f_h + w * f_c + f_s) (reference `combine_features_weighted`)."""
        high = F.normalize(levels["high"], dim=-1)
        if not multi_level:
            return high
        w = self.w
        return F.normalize((2 - w) * high + w * F.normalize(levels["mid"], dim=-1) + levels["low"], dim=-1)


def _ce(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def mccl_loss(levels: dict, target: torch.Tensor, scale: torch.Tensor, w: torch.Tensor) -> dict:
    """w * CE_high + (2 - w) * CE_mid + CE_low against normalize(target), in-batch negatives."""
    tgt = F.normalize(target, dim=-1)
    ce = {k: _ce(scale * F.normalize(levels[k], dim=-1) @ tgt.T) for k in ("high", "mid", "low")}
    ce["mccl"] = w * ce["high"] + (2 - w) * ce["mid"] + ce["low"]
    return ce


def sscl_loss(clean: dict, aug: dict, scale: torch.Tensor) -> dict:
    """CE(s2 * raw @ raw_aug^T) + CE(s2 * f_h @ f_h_aug^T): positive = the same query's other view."""
    out = {
        k: _ce(scale * F.normalize(clean[k], dim=-1) @ F.normalize(aug[k], dim=-1).T) for k in ("raw", "high")
    }
    out["sscl"] = out["raw"] + out["high"]
    return out


# ---- the authors' combiner*.pt: one flat state dict, scalars of shape [1] -------------------------------
SCALAR = ((1,), ())  # nn.Parameter(torch.ones(1)) in the reference, a 0-d tensor here
MLCL_FILE = SavedFile(
    "Combiner",
    WeightMap(
        (
            Rule("combiner_proj.*", "mlc.combiner_proj.*"),
            Rule("loss_weight", "mlc.loss_weight", SCALAR),
            Rule("logit_scale", "logit_scale", SCALAR),  # both absent when trained with --learn_t 0
            Rule("logit_scale_sl", "logit_scale_sl", SCALAR),
            Rule("*", "mlc.combiner.*"),  # the CLIP4Cir Combiner's names
        )
    ),
    "MLCL combiner file {'epoch': int, 'Combiner': state_dict} (combiner_proj.*, loss_weight)",
    marks=("combiner_proj.weight",),
)


# ---- the Lightning module -----------------------------------------------------------------------
class MLCLCombiner(CLIP4CirCombiner):
    """Stage II of MLCL: CLIP4Cir's stage II (frozen backbone, cached image features) with the
    multi-level combiner, learnable temperatures and the mCCL + SSCL loss."""

    def __init__(
        self,
        backbone,
        loss_weight_lr: float | None = None,
        learn_t: bool = True,
        mccl: bool = True,
        sscl: bool = True,
        sscl_views: int = 2,
        seed: int = 0,
        cache_dir: str | None = None,
        **kwargs,
    ):
        """kwargs: CLIP4Cir's stage II (projection_dim, hidden_dim, dropout, logit_scale, optimizer, ...)."""
        super().__init__(backbone, **kwargs)
        if self.gather_negatives:
            raise CirlabError("MLCL's losses use the local batch only: drop gather_negatives")
        self.fixed_log_scale = math.log(self.logit_scale)  # what --learn_t 0 keeps constant
        init = torch.tensor(self.fixed_log_scale)
        self.logit_scale = nn.Parameter(init.clone(), requires_grad=learn_t)
        self.logit_scale_sl = nn.Parameter(init.clone(), requires_grad=learn_t)
        self.loss_weight_lr, self.mccl, self.sscl = loss_weight_lr, mccl, sscl
        if sscl:
            if sscl_views < 1:
                raise CirlabError(
                    f"method.sscl_views={sscl_views}: need at least 1 augmented view (or method.sscl=false)"
                )
            self.reference_views = {
                "reference_aug": AugmentedReferences(backbone, sscl_views, seed, cache_dir or ".cache/cirlab")
            }

    def build_combiner(self, feature_dim: int, **sizes) -> None:
        self.mlc = MultiLevelCombiner(feature_dim, **sizes)

    # ---- weights in and out: MLCL_FILE --------------------------------------------------------------
    def stage_weights(self) -> nn.Module:
        own = nn.Module()
        own.mlc, own.logit_scale, own.logit_scale_sl = self.mlc, self.logit_scale, self.logit_scale_sl
        return own

    def checkpoint_layouts(self) -> list[Layout]:
        constant = torch.tensor(self.fixed_log_scale)  # what a file trained with --learn_t 0 lacks
        return [
            MLCL_FILE.layout({"logit_scale": constant, "logit_scale_sl": constant}),
            cirlab_stage("", "its weights beside the backbone", without="backbone."),
        ]

    @classmethod
    def reference_files(cls, state: dict, epoch: int) -> dict:
        return {"combiner.pt": MLCL_FILE.write(state, epoch)}

    def query_embedding(self, reference, texts):
        levels = self.mlc.fuse(self.image_features(reference), self.text_features(texts))
        return self.mlc.query(levels, multi_level=self.mccl)

    def compute_loss(self, reference, aug_reference, texts, target) -> dict:
        image, text = self.image_features(reference), self.text_features(texts)
        levels = self.mlc.fuse(image, text)
        scale = self.logit_scale.exp()
        if self.mccl:
            out = mccl_loss(levels, self.image_features(target), scale, self.mlc.w)
            loss = out["mccl"]
        else:
            out = {"high": batch_contrastive(levels["high"], self.image_features(target), scale)}
            loss = out["high"]
        if self.sscl:
            if aug_reference is None:
                raise CirlabError(
                    "MLCL with method.sscl=true needs batches with 'reference_aug' "
                    "(the datamodule serves its reference_views); set method.sscl=false otherwise"
                )
            aug = self.mlc.fuse(self.image_features(aug_reference), text, t=levels["t"])
            sl = sscl_loss(levels, aug, self.logit_scale_sl.exp())  # its "high" is not mCCL's: renamed
            out.update(sscl=sl["sscl"], sscl_raw=sl["raw"], sscl_high=sl["high"])
            loss = loss + out["sscl"]
        out["loss"] = loss
        return out

    def loss(self, batch: dict) -> torch.Tensor:
        out = self.compute_loss(
            batch["reference"], batch.get("reference_aug"), batch["text"], batch["target"]
        )
        n = len(batch["text"])
        for k in ("high", "mid", "low", "sscl"):
            if k in out:
                self.log(f"train/{k}", out[k], batch_size=n)
        self.log("train/w", self.mlc.w.detach(), batch_size=n)
        self.log("train/scale", self.logit_scale.exp().detach(), batch_size=n)
        return out["loss"]

    def optimizer_params(self) -> list:
        """The combiner and temperatures; w in its own group (loss_weight_lr), only with mCCL."""
        main = [
            p
            for n, p in self.named_parameters()
            if p.requires_grad and not n.startswith("backbone.") and n != "mlc.loss_weight"
        ]
        groups = [{"params": main}]
        if self.mccl:  # w only enters the mCCL loss
            if self.loss_weight_lr is None:
                raise CirlabError(
                    "MLCL with mCCL trains w at its own lr: set method.combiner.module.loss_weight_lr"
                )
            groups.append({"params": [self.mlc.loss_weight], "lr": self.loss_weight_lr})
        return groups
