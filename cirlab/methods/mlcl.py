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

The augmented views cannot be encoded per step with a cached frozen backbone, so K views per training
reference image are encoded once (seeded) and cached on disk under a key like the feature cache's
(backbone fingerprint, augmentation, image list, K, seed); each step samples one of the K views.

Ablations: `mccl=False` trains the high level alone with a single CE (the CLIP4Cir loss, learnable
temperature) and retrieves with f_h alone — the untrained mid level is then not used;
`sscl=False` drops the two SSCL terms (and the augmented views).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from cirlab.cache import checksum as _checksum
from cirlab.data.datamodule import EpochSampler, collate
from cirlab.data.features import encode_images
from cirlab.data.transforms import TargetPad
from cirlab.data.transforms import to_rgb as _to_rgb
from cirlab.errors import CirlabError
from cirlab.io import load_torch, save_torch
from cirlab.methods.combiner import Combiner
from cirlab.methods.retrieval_module import RetrievalModule
from cirlab.weights import Layout, cirlab_stage

log = logging.getLogger("cirlab")


# ---- the multi-level combiner -------------------------------------------------------------------
class MultiLevelCombiner(nn.Module):
    """The Combiner plus the mid-level head `combiner_proj: Linear(H, D)`; `loss_weight` sets w."""

    def __init__(
        self,
        feature_dim: int,
        projection_dim: int | None = None,
        hidden_dim: int | None = None,
        dropout: float = 0.5,
    ):
        super().__init__()
        self.combiner = Combiner(feature_dim, projection_dim, hidden_dim, dropout)
        self.combiner_proj = nn.Linear(self.combiner.combiner_layer.out_features, feature_dim)
        self.loss_weight = nn.Parameter(torch.tensor(math.log(0.5)))

    @property
    def w(self) -> torch.Tensor:
        return 2 * torch.sigmoid(self.loss_weight)

    def project_text(self, text: torch.Tensor) -> torch.Tensor:
        c = self.combiner
        return c.dropout1(F.relu(c.text_projection_layer(text)))

    def fuse(self, image: torch.Tensor, text: torch.Tensor, t: torch.Tensor | None = None) -> dict:
        """All levels (un-normalised f_h, f_c; normalised f_s) and the concat feature `raw`.
        `t`: a text projection to reuse (SSCL's augmented branch shares the clean branch's)."""
        c = self.combiner
        t = self.project_text(text) if t is None else t
        v = c.dropout2(F.relu(c.image_projection_layer(image)))
        raw = torch.cat([t, v], dim=-1)
        h = c.dropout3(F.relu(c.combiner_layer(raw)))
        lam = c.dynamic_scalar(raw)
        return {
            "t": t,
            "raw": raw,
            "high": c.output_layer(h) + lam * text + (1 - lam) * image,
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


# ---- strong augmentation of the reference (reference `image_aug_transform`) ---------------------
def _rot(angle: int):
    return lambda im: im.rotate(angle, expand=True)


def _compose(*fs):
    def f(im):
        for g in fs:
            im = g(im)
        return im

    return f


class _Named:
    """A callable with a stable repr (keys the augmentation cache)."""

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name

    def __call__(self, x):
        return self.fn(x)

    def __repr__(self) -> str:
        return self.name


def augmentation(size: int, mean, std, target_ratio: float = 1.25) -> T.Compose:
    """TargetPad -> RandomResizedCrop -> RGB -> one of 7 ColorJitters -> one of 8 flips/rotations ->
    RandomAutocontrast -> RandomPerspective -> RandomGrayscale -> ToTensor -> Normalize."""
    hf, vf = T.functional.hflip, T.functional.vflip
    geometric = [
        _Named(lambda im: im, "identity"),
        _Named(hf, "hflip"),
        _Named(vf, "vflip"),
        _Named(_rot(90), "rot90"),
        _Named(_rot(180), "rot180"),
        _Named(_rot(270), "rot270"),
        _Named(_compose(hf, _rot(90)), "hflip+rot90"),
        _Named(_compose(hf, _rot(270)), "hflip+rot270"),
    ]
    return T.Compose(
        [
            TargetPad(target_ratio),
            T.RandomResizedCrop(size),
            _to_rgb,
            T.RandomChoice(
                [
                    T.ColorJitter(brightness=0.5),
                    T.ColorJitter(contrast=0.5),
                    T.ColorJitter(saturation=0.5),
                    T.ColorJitter(hue=0.5),
                    T.ColorJitter(0.1, 0.1, 0.1, 0.1),
                    T.ColorJitter(0.3, 0.3, 0.3, 0.3),
                    T.ColorJitter(0.5, 0.5, 0.5, 0.5),
                ]
            ),
            T.RandomChoice(geometric),
            T.RandomAutocontrast(p=0.5),
            T.RandomPerspective(p=0.5),
            T.RandomGrayscale(p=0.5),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def _normalize_of(preprocess) -> T.Normalize:
    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, T.Normalize):
            return t
    raise CirlabError(
        "MLCL's SSCL needs the backbone's preprocess to end in a torchvision Normalize; "
        "use a CLIP-style backbone or set method.sscl=false"
    )


def augmented_features(
    backbone,
    names: list[str],
    paths: list[Path],
    views: int,
    seed: int,
    cache_dir,
    batch_size: int = 256,
    num_workers: int = 0,
) -> dict[str, torch.Tensor]:
    """name -> [views, D] frozen embeddings of `views` seeded strong augmentations, cached on disk."""
    norm = _normalize_of(backbone.preprocess)
    aug = augmentation(backbone.image_size, norm.mean, norm.std)
    h = hashlib.sha1(b"mlcl-aug\0" + backbone.fingerprint().encode())
    h.update(repr(aug).encode())
    h.update(f"{views}\0{seed}\n".encode())
    for n, p in zip(names, paths):
        h.update(f"{n}\0{p}\n".encode())
    path = Path(cache_dir) / "features" / f"aug_{h.hexdigest()[:20]}.pt"
    if path.is_file():
        try:
            blob = load_torch(path)
            if blob.get("names") == names and blob.get("checksum") == _checksum(blob["features"]):
                log.info("MLCL: %s x %s augmented reference features from cache", len(names), views)
                return dict(zip(names, blob["features"]))
        except (CirlabError, KeyError, TypeError, AttributeError):
            pass
        log.warning("augmentation cache %s is corrupt or foreign: rebuilding it", path)
    feats = []
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        for k in range(views):
            torch.manual_seed(seed * 1000 + k)
            random.seed(seed * 1000 + k)  # RandomChoice draws from Python's random
            feats.append(
                encode_images(
                    backbone, paths, batch_size, 0, transform=aug, desc=f"MLCL augmented view {k + 1}/{views}"
                )
            )
    random.setstate(py_state)
    feats = torch.stack(feats, dim=1)  # [N, K, D]
    save_torch(path, {"names": names, "features": feats, "checksum": _checksum(feats)})
    log.info("MLCL: encoded %s x %s augmented reference views", len(names), views)
    return dict(zip(names, feats))


class AugmentedTriplets(Dataset):
    """The datamodule's triplets plus `reference_aug`: one of the K cached views, drawn per (seed, epoch, index)."""

    def __init__(self, triplets, aug: dict[str, torch.Tensor], seed: int):
        self.triplets, self.aug, self.seed, self.epoch = triplets, aug, seed, 0  # epoch: set by EpochSampler

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, i: int) -> dict:
        self.triplets.epoch = self.epoch
        item = self.triplets[i]
        views = self.aug[self.triplets.queries[i].reference]
        k = random.Random(f"aug-{self.seed}-{self.epoch}-{i}").randrange(len(views))
        item["reference_aug"] = views[k]
        return item


# ---- the Lightning module -----------------------------------------------------------------------
class MLCLCombiner(RetrievalModule):
    """Stage II of MLCL on a frozen backbone (cached image features)."""

    frozen_image_encoder = True
    frozen_text_encoder = True

    def __init__(
        self,
        backbone,
        projection_dim: int | None = None,
        hidden_dim: int | None = None,
        dropout: float = 0.5,
        lr: float = 2e-5,
        loss_weight_lr: float = 1e-3,
        learn_t: bool = True,
        logit_scale: float = 100.0,
        mccl: bool = True,
        sscl: bool = True,
        sscl_views: int = 2,
        seed: int = 0,
        cache_dir: str | None = None,
        **kwargs,
    ):
        super().__init__(backbone, **kwargs)
        if sscl and sscl_views < 1:
            raise CirlabError(
                f"method.sscl_views={sscl_views}: need at least 1 augmented view (or method.sscl=false)"
            )
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.mlc = MultiLevelCombiner(backbone.embed_dim, projection_dim, hidden_dim, dropout)
        self.fixed_log_scale = math.log(logit_scale)  # what --learn_t 0 keeps constant
        init = torch.tensor(self.fixed_log_scale)
        self.logit_scale = nn.Parameter(init.clone(), requires_grad=learn_t)
        self.logit_scale_sl = nn.Parameter(init.clone(), requires_grad=learn_t)
        self.lr, self.loss_weight_lr = lr, loss_weight_lr
        self.mccl, self.sscl, self.sscl_views, self.seed = mccl, sscl, sscl_views, seed
        self.cache_dir = cache_dir or ".cache/cirlab"

    def on_train_epoch_start(self) -> None:
        self.backbone.eval()

    # ---- the authors' combiner*.pt: one flat state dict, scalars of shape [1] ------------------------
    _SCALARS = ("loss_weight", "logit_scale", "logit_scale_sl")

    def stage_weights(self) -> nn.Module:
        own = nn.Module()
        own.mlc, own.logit_scale, own.logit_scale_sl = self.mlc, self.logit_scale, self.logit_scale_sl
        return own

    def checkpoint_layouts(self) -> list[Layout]:
        def from_reference(obj: dict) -> dict:
            ref = dict(obj["Combiner"])
            state = {
                f"mlc.{k}" if k.startswith("combiner_proj.") else f"mlc.combiner.{k}": v
                for k, v in ref.items()
                if k not in self._SCALARS
            }
            state["mlc.loss_weight"] = ref.get("loss_weight", torch.empty(0)).reshape(())
            for name in ("logit_scale", "logit_scale_sl"):  # absent when trained with --learn_t 0: constants
                state[name] = ref[name].reshape(()) if name in ref else torch.tensor(self.fixed_log_scale)
            return state

        return [
            Layout(
                "MLCL combiner file {'epoch': int, 'Combiner': state_dict} (combiner_proj.*, loss_weight)",
                lambda o: (
                    isinstance(o, dict)
                    and isinstance(o.get("Combiner"), dict)
                    and "combiner_proj.weight" in o["Combiner"]
                ),
                from_reference,
            ),
            cirlab_stage("", "its weights beside the backbone", without="backbone."),
        ]

    @classmethod
    def reference_files(cls, state: dict, epoch: int) -> dict:
        ref = {
            k.removeprefix("mlc.combiner.").removeprefix("mlc."): v
            for k, v in state.items()
            if k.startswith("mlc.")
        }
        ref.update({k: state[k].reshape(1) for k in ("logit_scale", "logit_scale_sl")})
        ref["loss_weight"] = ref["loss_weight"].reshape(1)
        return {"combiner.pt": {"epoch": epoch, "Combiner": ref}}

    def query_embedding(self, reference, texts):
        levels = self.mlc.fuse(self.image_features(reference), self.text_features(texts))
        return self.mlc.query(levels, multi_level=self.mccl)

    # ---- training data: triplets + cached augmented reference views ----------------------------
    def train_loader(self, dm):
        if not self.sscl:
            return None
        ds = dm.train_dataset()
        names = list(dict.fromkeys(q.reference for q in ds.queries))
        aug = augmented_features(
            self.backbone,
            names,
            [dm.source.image_path(n) for n in names],
            self.sscl_views,
            self.seed,
            self.cache_dir,
        )
        if len(ds) < dm.batch_size:
            raise CirlabError(
                f"{len(ds)} training triplets are fewer than one batch ({dm.batch_size}); "
                "lower method.combiner.batch_size"
            )
        data = AugmentedTriplets(ds, aug, dm.seed)
        return DataLoader(
            data,
            batch_size=dm.batch_size,
            sampler=EpochSampler(data, dm.seed),
            drop_last=True,
            num_workers=0,
            collate_fn=collate,
        )

    def compute_loss(self, reference, aug_reference, texts, target) -> dict:
        image, text = self.image_features(reference), self.text_features(texts)
        levels = self.mlc.fuse(image, text)
        scale = self.logit_scale.exp()
        if self.mccl:
            out = mccl_loss(levels, self.image_features(target), scale, self.mlc.w)
            loss = out["mccl"]
        else:
            out = {
                "high": _ce(
                    scale
                    * F.normalize(levels["high"], dim=-1)
                    @ F.normalize(self.image_features(target), dim=-1).T
                )
            }
            loss = out["high"]
        if self.sscl:
            if aug_reference is None:
                raise CirlabError(
                    "MLCL with method.sscl=true needs batches with 'reference_aug' "
                    "(MLCLCombiner.train_loader builds them); set method.sscl=false otherwise"
                )
            aug = self.mlc.fuse(self.image_features(aug_reference), text, t=levels["t"])
            out.update(sscl_loss(levels, aug, self.logit_scale_sl.exp()))
            loss = loss + out["sscl"]
        out["loss"] = loss
        return out

    def training_step(self, batch, batch_idx):
        out = self.compute_loss(
            batch["reference"], batch.get("reference_aug"), batch["text"], batch["target"]
        )
        n = len(batch["text"])
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=n)
        for k in ("high", "mid", "low", "sscl"):
            if k in out:
                self.log(f"train/{k}", out[k], batch_size=n)
        self.log("train/w", self.mlc.w.detach(), batch_size=n)
        self.log("train/scale", self.logit_scale.exp().detach(), batch_size=n)
        return out["loss"]

    def configure_optimizers(self):
        main = [
            p
            for n, p in self.named_parameters()
            if p.requires_grad and not n.startswith("backbone.") and n != "mlc.loss_weight"
        ]
        groups = [{"params": main, "lr": self.lr}]
        if self.mccl:  # w only enters the mCCL loss
            groups.append({"params": [self.mlc.loss_weight], "lr": self.loss_weight_lr})
        return torch.optim.Adam(groups, lr=self.lr)
