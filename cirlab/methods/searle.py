"""SEARLE (Baldrati et al., ICCV 2023): zero-shot CIR by textual inversion (miccunifi/SEARLE).

The reference image becomes one pseudo-word token v* in the text tower's token-embedding space, put at
the `$` of a prompt like "a photo of $ that {relative caption}"; the prompt feature retrieves targets.
- `+method=searle_oti` (SearleOTI): v* by optimisation (OTI) per reference image, before evaluation.
- `+method=searle` (Searle): v* = phi(image feature), phi distilled from OTI tokens of unlabeled images.
Both work on frozen cached image features; OTI tokens are stored atomically and resumably.
phi files in the authors' layout (`SEARLE_ViT-B32.pt`, `phi_20.pt`: {'Phi': state_dict}) load with
`method.phi.checkpoint` and come out of `cirlab +task=export` as `phi.pt`.
This module holds the LightningModules and what Pic2Word shares with them (`PromptQueries`: the prompt
evaluation; `UnlabeledImages`: the training images' features); phi and its losses are in searle_phi,
OTI in searle_oti, the token files in searle_tokens, the vocabulary, concepts and phrases in searle_text.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cirlab.data.records import CIRQuery
from cirlab.errors import CirlabError
from cirlab.methods.retrieval_module import RetrievalModule
from cirlab.methods.searle_oti import oti
from cirlab.methods.searle_phi import Phi, cosine_loss, distillation_loss
from cirlab.methods.searle_text import SearleText
from cirlab.methods.searle_tokens import OTIStore, settings_key
from cirlab.weight_map import SAME_NAMES
from cirlab.weights import Layout, SavedFile, cirlab_stage, strip_prefix

log = logging.getLogger("cirlab")


def _feature_key(features: torch.Tensor) -> str:
    """An image's identity by its raw features' bits (the run's cached features name no file)."""
    return hashlib.sha1(features.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


class PromptQueries(RetrievalModule):
    """Zero-shot CIR by a prompt (SEARLE, Pic2Word): the reference image's pseudo token at the prompt's
    placeholder, the query text at its '{}', the prompt's feature retrieves; frozen backbone."""

    frozen_image_encoder = True
    fill = "first"  # which placeholders of a prompt get the token: the first (SEARLE, Pic2Word) or "all" (LinCIR)

    def __init__(self, backbone, prompt: str = "a photo of $ that {}", placeholder: str = "$", **kwargs):
        super().__init__(backbone, **kwargs)
        if placeholder not in prompt or "{}" not in prompt:
            raise CirlabError(
                f"method.prompt={prompt!r} needs a {placeholder!r} (the pseudo token) and a '{{}}' (the text)"
            )
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.prompt, self.placeholder = prompt, placeholder
        self._queries: dict[int, list] = {}  # query loader index -> its queries (set per evaluation)

    def on_train_epoch_start(self) -> None:  # the backbone is frozen: no dropout, whatever Lightning set
        self.backbone.eval()

    def query_texts(self, query: CIRQuery) -> list[str]:
        """The texts of one query put into the prompt, their features averaged (SEARLE's rule)."""
        return self.eval_data.source.query_texts(query)

    def prompt_tokens(self, texts: list[str]) -> torch.Tensor:
        return self.backbone.tokenize([self.prompt.format(t) for t in texts]).to(self.device)

    def encode_queries(self, tokens: torch.Tensor, texts: list[list[str]]) -> torch.Tensor:
        """Query features: per query the mean of its texts' normalised prompt features, renormalised
        (one text: just its feature; FashionIQ: both caption orders, as the reference's validate.py)."""
        n_texts = {len(t) for t in texts}
        if len(n_texts) != 1:
            raise CirlabError(f"internal: queries of one batch have different numbers of texts {n_texts}")
        k = n_texts.pop()
        with torch.no_grad():
            feats = self.backbone.encode_text_with_pseudo_tokens(
                self.prompt_tokens([t for ts in texts for t in ts]),
                tokens.to(self.device).repeat_interleave(k, 0),
                self.placeholder,
                fill=self.fill,
            )
            feats = F.normalize(feats.float(), dim=-1).view(len(texts), k, -1).mean(1)
        return F.normalize(feats, dim=-1)

    def _prepare(self, split: str) -> None:
        """Before an evaluation: the queries of each query loader (their texts are built per query)."""
        self._queries = {2 * s + 1: es.queries for s, es in enumerate(self.eval_data.eval_sets(split))}

    def on_validation_start(self) -> None:  # also before the sanity check (trainer=gpu runs one)
        self._prepare(self.eval_data.val_split)

    def on_test_start(self) -> None:
        self._prepare(self.eval_data.test_split)

    def reference_tokens(self, batch: dict, dataloader_idx: int) -> torch.Tensor:
        """The pseudo tokens of an evaluation batch's reference images."""
        return self.token_of(self.image_features(batch["reference"]))

    def token_of(self, features: torch.Tensor) -> torch.Tensor:
        """The pseudo token of reference images given by their raw features (phi, or OTI)."""
        raise NotImplementedError

    def query_embedding(self, reference, texts):
        return self.encode_queries(self.token_of(self.image_features(reference)), [[t] for t in texts])

    def dataset_query_embedding(self, reference, query: CIRQuery) -> torch.Tensor:
        """The query's texts (SEARLE on FashionIQ: both caption orders) averaged, as in evaluation."""
        texts = [self.query_texts(query)]
        return self.encode_queries(self.token_of(self.image_features(reference)), texts)

    def _eval_step(self, batch: dict, dataloader_idx: int) -> None:
        if dataloader_idx % 2 == 0:
            return super()._eval_step(batch, dataloader_idx)
        queries = self._queries[dataloader_idx]
        texts = [self.query_texts(queries[i]) for i in batch["index"].tolist()]
        emb = self.encode_queries(self.reference_tokens(batch, dataloader_idx), texts)
        self._outputs[dataloader_idx].append((batch["index"], emb))


class _SearleBase(PromptQueries):
    def __init__(
        self,
        backbone,
        concepts: dict | None = None,
        phrases: dict | None = None,
        oti: dict | None = None,
        token_dir: str | None = None,
        **kwargs,
    ):
        super().__init__(backbone, **kwargs)
        self.concepts_cfg = dict(concepts or {})
        self.phrases_cfg = dict(phrases or {})
        self.oti_cfg = dict(oti or {})  # method.oti: inverting needs all of it
        self.token_dir = token_dir
        self._text: SearleText | None = None

    def vocabulary_and_phrases(self) -> SearleText:
        """The text side (vocabulary, concept embeddings, phrase bank, templates) of this backbone and the
        evaluated source, built on first use."""
        if self._text is None:
            self.backbone.eval()
            self._text = SearleText(self.backbone, self.eval_data.source, self.concepts_cfg, self.phrases_cfg)
        return self._text

    def store(self, tag: str) -> OTIStore:
        text = self.vocabulary_and_phrases()
        key = settings_key(self.backbone, text, self.oti_cfg)
        if self.token_dir:
            folder = Path(self.token_dir)
        elif self._trainer is not None:
            folder = Path(self.trainer.default_root_dir) / "oti_tokens"
        elif self.stage_dir is not None:
            folder = self.stage_dir / "oti_tokens"
        else:
            raise CirlabError("set method.token_dir: the folder of the OTI token files")
        return OTIStore(folder / f"{tag}-{key}.pt", key)

    def invert(self, names: list[str], features: torch.Tensor, tag: str) -> torch.Tensor:
        self.backbone.eval()
        text = self.vocabulary_and_phrases()
        cfg = self.oti_cfg

        def invert_chunk(feats):
            with torch.enable_grad(), torch.inference_mode(False):
                tok, ema, _ = oti(self.backbone, text, feats.clone(), cfg)
            return tok, ema

        return self.store(tag).compute(
            names, features, invert_chunk, int(cfg["batch_size"]), int(cfg["save_every"])
        )


class SearleOTI(_SearleBase):
    """SEARLE-OTI: each reference image of the evaluated split gets its own OTI token before evaluation."""

    def __init__(self, backbone, **kwargs):
        super().__init__(backbone, **kwargs)
        self._query_tokens: dict[int, torch.Tensor] = {}
        self._stored: dict[str, torch.Tensor] | None = None  # feature key -> stored token (oti_tokens)

    def _prepare(self, split: str) -> None:
        super()._prepare(split)
        dm = self.eval_data
        self._query_tokens = {}
        for loader, queries in self._queries.items():
            refs = [q.reference for q in queries]
            uniq = list(dict.fromkeys(refs))
            feats = torch.stack([dm.features[n] for n in uniq])
            tokens = self.invert(uniq, feats, f"{dm.source.name}")
            row = {n: i for i, n in enumerate(uniq)}
            self._query_tokens[loader] = tokens[[row[r] for r in refs]]

    def reference_tokens(self, batch: dict, dataloader_idx: int) -> torch.Tensor:
        return self._query_tokens[dataloader_idx][batch["index"].cpu()]

    def token_of(self, features: torch.Tensor) -> torch.Tensor:
        """A query outside evaluation (`cirlab.load`, the demo): see `oti_tokens`."""
        return self.oti_tokens(features)

    def oti_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """The OTI tokens of reference images given by their raw features. An image the run inverted (a
        reference of its evaluated splits, recognised by its cached features) reuses its stored token, so
        its queries rank exactly as in evaluation; any other image is inverted now with the run's OTI
        settings (steps, seed, `oti.batch_size` images at a time), not stored."""
        if self.eval_data is None:
            raise CirlabError(
                "SEARLE-OTI needs its run's dataset to embed a query (the concept vocabulary, the stored tokens)"
            )
        if self._stored is None:
            store, features_of = self.store(self.eval_data.source.name), self.eval_data.features or {}
            self._stored = {
                _feature_key(features_of[n]): store.ema[store.row[n]] for n in store.names if n in features_of
            }
        keys = [_feature_key(f) for f in features]
        new = [i for i, key in enumerate(keys) if key not in self._stored]
        fresh = {}
        if new:
            self.backbone.eval()
            with torch.enable_grad(), torch.inference_mode(False):
                chunks = features[new].float().split(int(self.oti_cfg["batch_size"]))
                text = self.vocabulary_and_phrases()
                ema = torch.cat([oti(self.backbone, text, c.clone(), self.oti_cfg)[1] for c in chunks])
            fresh = dict(zip(new, ema))
        return torch.stack([fresh[i] if i in fresh else self._stored[key] for i, key in enumerate(keys)])

    def training_step(self, batch, batch_idx):
        raise CirlabError("searle_oti has nothing to train: keep max_epochs: 0")

    def configure_optimizers(self):
        return None


class UnlabeledImages:
    """A stage trained on unlabeled images' cached raw features (SEARLE's phi, Pic2Word's mapping): which
    images (at most `max_images` of `image_splits`, drawn by `seed`; `unlabeled_source`, e.g.
    dataset=imagenet's source, or None: the evaluated dataset), their features, and the seeded batches."""

    def __init__(
        self,
        backbone,
        max_images: int | None = None,
        cache_dir: str | None = None,
        image_splits: tuple = ("train",),
        unlabeled_source=None,
        batch_size: int = 256,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(backbone, **kwargs)
        self.max_images, self.cache_dir, self.image_splits = max_images, cache_dir, tuple(image_splits)
        self.unlabeled_source = unlabeled_source
        self.trains_on_dataset_images = unlabeled_source is None
        self.batch_size, self.seed = batch_size, seed
        self._shuffle: torch.Generator | None = None  # the batch order (unlabeled_loader)
        self._shuffle_key = ""  # its checkpoint key: "<stage>_shuffle_rng"

    def unlabeled_images(self, source) -> list[str]:
        """The training images: the captioned images of `image_splits` where the source has captions
        (synthetic: the CIR-train and pretraining images; captions unused), else its unlabeled images
        (an ImageNet folder, or the training triplets' images); at most max_images, drawn by seed."""
        try:
            names = [n for split in self.image_splits for n, _ in source.image_captions(split)]
        except CirlabError:
            names = source.unlabeled_images()
        names = list(dict.fromkeys(names))
        if self.max_images and len(names) > self.max_images:
            names = sorted(random.Random(self.seed).sample(names, self.max_images), key=names.index)
        return names

    def unlabeled_features(self, dm) -> tuple:
        """(source, image names, their raw features [N, D]): the run's cached features where the images
        are the evaluated dataset's, else encoded once into the feature cache."""
        from cirlab.data.features import FeatureCache

        source = self.unlabeled_source or dm.source
        names = self.unlabeled_images(source)
        if not names:
            raise CirlabError(f"dataset {source.name!r} has no unlabeled training images")
        feats = dict(dm.features or {}) if source is dm.source else {}  # another source: other names
        missing = [n for n in names if n not in feats]
        if missing:
            if not self.cache_dir:
                raise CirlabError("internal: the stage needs cache_dir to cache unlabeled image features")
            cache = FeatureCache(self.cache_dir)
            feats.update(cache.get(self.backbone, missing, [source.image_path(n) for n in missing]))
        return source, names, torch.stack([feats[n] for n in names]).float()

    def unlabeled_loader(self, stage: str, *tensors: torch.Tensor) -> DataLoader:
        """Shuffled whole batches of `tensors` (one row per image); the order comes from a generator
        seeded here that runs on from epoch to epoch (its state goes into the stage's checkpoints)."""
        if len(tensors[0]) < self.batch_size:
            raise CirlabError(
                f"{len(tensors[0])} unlabeled images are fewer than one batch ({self.batch_size}): "
                f"lower method.{stage}.batch_size"
            )
        self._shuffle = torch.Generator().manual_seed(self.seed)
        self._shuffle_key = f"{stage}_shuffle_rng"
        return DataLoader(
            TensorDataset(*tensors),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=self._shuffle,
        )

    # The shuffle generator runs on from epoch to epoch: a resumed run takes up its state at the checkpoint,
    # so the epochs after it see the batches of an uninterrupted run.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[self._shuffle_key] = self._shuffle.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self._shuffle_key in checkpoint:  # absent from checkpoints written before it was saved
            self._shuffle.set_state(checkpoint[self._shuffle_key])


class Searle(UnlabeledImages, _SearleBase):
    """SEARLE: phi maps a raw image feature to its pseudo token; trained by distillation from OTI tokens
    of unlabeled images (plus the phrase regulariser), then zero-shot CIR with the prompt."""

    def __init__(
        self,
        backbone,
        dropout: float = 0.5,
        temperature: float = 0.25,
        lambda_distil: float = 1.0,
        lambda_gpt: float = 0.75,
        top_k_concepts: int = 150,
        token_norm: float | str | None = None,
        **kwargs,
    ):
        super().__init__(backbone, **kwargs)
        d = backbone.embed_dim
        self.phi = Phi(d, 4 * d, backbone.token_dim, dropout)
        self.temperature = temperature
        self.lambda_distil, self.lambda_gpt, self.top_k_concepts = lambda_distil, lambda_gpt, top_k_concepts
        if not (token_norm is None or token_norm == "oti" or isinstance(token_norm, (int, float))):
            raise CirlabError(
                f"method.phi.module.token_norm={token_norm!r}: use null (reference), oti or a number"
            )
        self.token_norm = token_norm
        # the norm phi's tokens are scaled to (token_norm=oti: the OTI targets' mean norm; a checkpoint keeps it)
        self.register_buffer(
            "target_norm", torch.tensor(float(token_norm) if isinstance(token_norm, (int, float)) else 0.0)
        )
        self._concepts: torch.Tensor | None = None

    def train_loader(self, dm):
        # vocabulary and phrases first: a missing or refused file stops the run before OTI
        text = self.vocabulary_and_phrases()
        source, names, x = self.unlabeled_features(dm)
        start = time.time()
        tokens = self.invert(names, x, f"{source.name}-unlabeled")
        if self.token_norm == "oti":
            self.target_norm.fill_(tokens.norm(dim=-1).mean().item())
        log.info("phi: OTI targets for %d unlabeled images ready in %.0f s", len(names), time.time() - start)
        self._concepts = text.concepts_of(x, self.top_k_concepts)
        return self.unlabeled_loader("phi", x, tokens, torch.arange(len(x)))

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        """phi's pseudo tokens. The reference uses phi's raw output; the distillation loss only sees its
        direction, so with token_norm set the direction is kept and the norm fixed (an option)."""
        out = self.phi(features)
        if self.token_norm is None:
            return out
        return F.normalize(out, dim=-1) * self.target_norm

    def training_step(self, batch, batch_idx):
        x, target, idx = batch
        pred = self.tokens(x)
        loss = self.lambda_distil * distillation_loss(target, pred, self.temperature)
        self.log("train/distil", loss, batch_size=len(x))
        if self.lambda_gpt > 0:
            text = self.vocabulary_and_phrases()
            bank = text.bank
            gen = torch.Generator().manual_seed(self.seed * 1000003 + self.global_step)
            p_idx = bank.sample(self._concepts[idx.cpu()], gen, pooled=False)
            f_p = self.backbone.encode_text_with_pseudo_tokens(bank.tokens_all[p_idx].to(self.device), pred)
            gpt = cosine_loss(f_p, bank.features[p_idx].to(self.device))
            self.log("train/gpt", gpt, batch_size=len(x))
            loss = loss + self.lambda_gpt * gpt
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x))
        return loss

    def token_of(self, features: torch.Tensor) -> torch.Tensor:
        return self.tokens(features)

    def optimizer_params(self) -> list:
        return list(self.phi.parameters())

    # ---- phi files (cirlab/weights.py): the reference's names are Phi's own ---------------------------
    PHI_FILE = SavedFile(
        "Phi",
        SAME_NAMES,
        "SEARLE phi file {'Phi': state_dict} (release SEARLE_ViT-B32.pt / SEARLE_ViT-L14.pt, "
        "training phi_<epoch>.pt, cirlab's exported phi.pt)",
    )

    def stage_weights(self) -> nn.Module:
        return self.phi

    def checkpoint_layouts(self) -> list[Layout]:
        if self.token_norm == "oti":
            raise CirlabError(
                "method.phi.module.token_norm=oti takes the norm of the OTI targets while training, "
                "which a phi file does not carry: give that number (method.phi.module.token_norm=X; "
                "cirlab's exported phi.pt holds it under 'token_norm') or null, the reference"
            )
        return [self.PHI_FILE.layout(), cirlab_stage("phi.", "its phi.* weights")]

    @classmethod
    def reference_files(cls, state: dict, epoch: int) -> dict:
        """phi.pt as the reference's train_phi.py saves it; a run with token_norm adds the norm its tokens
        were scaled to (the reference code ignores the key and uses phi's raw output)."""
        out = cls.PHI_FILE.write(strip_prefix(state, "phi."), epoch)
        norm = float(state.get("target_norm", 0.0))
        if norm > 0:
            out["token_norm"] = norm
        return {"phi.pt": out}

    def checkpoint_monitor(self) -> str | None:
        """The reference judges phi on CIRR val and never on the split it reports. So: the best val epoch
        only when val is held out from the reported split (synthetic; CIRR with test_split=test1), else the
        last epoch (FashionIQ/CIRR/CIRCO report val itself)."""
        if self.eval_data.val_split == self.eval_data.test_split:
            return None
        return super().checkpoint_monitor()
