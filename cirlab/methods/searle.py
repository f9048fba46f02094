"""SEARLE (Baldrati et al., ICCV 2023): zero-shot CIR by textual inversion (miccunifi/SEARLE).

The reference image becomes one pseudo-word token v* in the text tower's token-embedding space, put at
the `$` of a prompt like "a photo of $ that {relative caption}"; the prompt feature retrieves targets.
- `+method=searle_oti` (SearleOTI): v* by optimisation (OTI) per reference image, before evaluation.
- `+method=searle` (Searle): v* = phi(image feature), phi distilled from OTI tokens of unlabeled images.
Both work on frozen cached image features; OTI tokens are stored atomically and resumably.
phi files in the authors' layout (`SEARLE_ViT-B32.pt`, `phi_20.pt`: {'Phi': state_dict}) load with
`method.phi.checkpoint` and come out of `cirlab +task=export` as `phi.pt`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cirlab.cache import CacheEntry
from cirlab.data.records import CIRQuery
from cirlab.distributed import all_gather, rank_and_world
from cirlab.errors import CirlabError
from cirlab.methods import searle_text as st
from cirlab.methods.retrieval_module import RetrievalModule
from cirlab.weights import Layout, cirlab_stage, strip_prefix, wrapped

log = logging.getLogger("cirlab")


class Phi(nn.Module):
    """The reference textual-inversion MLP (state-dict keys layers.0/3/6, as SEARLE's phi.py)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, dropout: float = 0.5):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def distillation_loss(v1: torch.Tensor, v2: torch.Tensor, temperature: float = 0.25) -> torch.Tensor:
    """Symmetric NT-Xent between OTI tokens v1 and predicted tokens v2 (docs/methods/searle.md#phi-training): numerator
    exp(cos(v1_i, v2_i)/t) for both rows of pair i, denominator the row sum over the other 2B-1."""
    z = F.normalize(torch.cat([v1, v2]), dim=-1)
    sim = z @ z.T / temperature
    n = len(v1)
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    pos = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, pos)


def cosine_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """CosineEmbeddingLoss(target=1) = mean(1 - cos)."""
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


class SearleText:
    """Everything text-side both variants need, built once per backbone: vocabulary, concept
    embeddings of the whole vocabulary, phrase bank of the usable concepts, tokenised PALAVRA templates."""

    def __init__(self, backbone, source, concepts: dict, phrases: dict):
        vocab = (
            st.read_vocabulary(concepts["vocabulary"])
            if concepts.get("vocabulary")
            else st.default_vocabulary(source)
        )
        self.vocabulary = vocab
        self.bank = st.PhraseBank(
            backbone, vocab, st.build_phrases(phrases, vocab), phrases.get("per_concept")
        )
        # vocabulary row -> bank row; -1: a problematic concept (or one without phrases)
        self.bank_row = torch.tensor([self.bank.index.get(c, -1) for c in vocab])
        self.concept_emb = st.concept_embeddings(backbone, vocab)
        self.templates = backbone.tokenize([t.format(st.PLACEHOLDER) for t in st.TEMPLATES])
        self.digest = hashlib.sha1(
            json.dumps([vocab, self.bank.digest, phrases, concepts], sort_keys=True, default=str).encode()
        ).hexdigest()[:12]

    def concepts_of(self, features: torch.Tensor, top_k: int) -> torch.Tensor:
        """Bank rows [N, k] of each image's top-k concepts, ranked over the whole vocabulary, the
        problematic ones then dropped (-1), as the reference: an image keeps fewer than k usable concepts
        rather than reaching further down its ranking."""
        rows = self.bank_row[st.associate(features, self.concept_emb, top_k)]
        empty = int((rows < 0).all(1).sum())
        if empty:
            raise CirlabError(
                f"{empty} of {len(rows)} images have no usable concept among their top {top_k} (all "
                "dropped as problematic or without phrases): raise the top-k or check method.phrases"
            )
        return rows


def oti(
    backbone, text: SearleText, features: torch.Tensor, cfg: dict, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Optimisation-based textual inversion of a batch of images (each its own token; the batch is only
    parallelism): AdamW, per step a random PALAVRA template (L_cos to the image) and a random phrase of
    one of the image's top-k concepts with '$' for its first occurrence (L_gpt to the plain phrase),
    loss (l_cos*L_cos + l_gpt*L_gpt)/(l_cos+l_gpt), EMA of the tokens. The phrase is drawn uniformly from
    all phrases of the image's usable top-k concepts, as the reference's pool. `cfg`: the settings of
    conf/method/searle_oti.yaml's `oti`. Returns (tokens, ema, losses)."""
    gen = generator or torch.Generator().manual_seed(int(cfg["seed"]))
    device = backbone.device
    feats = features.float().to(device)
    n = len(feats)
    concepts = text.concepts_of(feats, int(cfg["top_k"]))  # [n, k] bank rows, -1 = dropped
    bank = text.bank
    token = (
        (torch.randn(n, backbone.token_dim, generator=gen) * cfg["init_std"]).to(device).requires_grad_(True)
    )
    ema = token.detach().clone()
    opt = torch.optim.AdamW([token], lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    lc, lg = float(cfg["lambda_cos"]), float(cfg["lambda_gpt"])
    losses = []
    for _ in range(int(cfg["steps"])):
        t_idx = torch.randint(len(text.templates), (n,), generator=gen)
        p_idx = bank.sample(concepts, gen, pooled=True)
        f_a = backbone.encode_text_with_pseudo_tokens(text.templates[t_idx].to(device), token)
        loss = lc * cosine_loss(f_a, feats)
        if lg > 0:
            f_p = backbone.encode_text_with_pseudo_tokens(bank.tokens_first[p_idx].to(device), token)
            loss = loss + lg * cosine_loss(f_p, bank.features[p_idx].to(device))
        loss = loss / (lc + lg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            ema.mul_(cfg["ema_decay"]).add_(token.detach(), alpha=1 - cfg["ema_decay"])
        losses.append(loss.item())
    return token.detach().cpu(), ema.cpu(), losses


class OTIStore:
    """Tokens of named images in one cache entry ({names, tokens, ema} under `key`), written atomically
    every `save_every` images: a killed run continues with the images not yet done. A file of other
    settings or a damaged one is an error, not rebuilt: the token folder may be the user's own."""

    def __init__(self, path: str | Path, key: str):
        self.entry = CacheEntry(path, key, what="OTI token file")
        self.names: list[str] = []
        self.tokens: list[torch.Tensor] = []
        self.ema: list[torch.Tensor] = []
        blob, why = self.entry.read()
        if why:
            raise CirlabError(
                f"OTI token file {self.entry.path} {why}; delete it or choose another method.token_dir"
            )
        if blob is not None:
            self.names = list(blob["names"])
            self.tokens = list(blob["tokens"])
            self.ema = list(blob["ema"])
        self.row = {n: i for i, n in enumerate(self.names)}

    def save(self) -> None:
        self.entry.save(
            {
                "names": self.names,
                "tokens": torch.stack(self.tokens) if self.tokens else torch.empty(0),
                "ema": torch.stack(self.ema) if self.ema else torch.empty(0),
            }
        )

    def compute(
        self, names: list[str], features: torch.Tensor, invert, chunk: int, save_every: int
    ) -> torch.Tensor:
        """EMA tokens [len(names), d] in the order of `names`; only the missing ones are optimised,
        by `invert(features) -> (tokens, ema)` in chunks. In a process group (DDP) rank r of W optimises
        chunks r, r+W, ... (saved in its own file) and the store merges them: the chunks of one process,
        so its tokens (a chunk's OTI depends on that chunk alone)."""
        pos = {n: i for i, n in enumerate(names)}
        todo = [n for n in dict.fromkeys(names) if n not in self.row]
        rank, world = rank_and_world()
        if world > 1:  # the same list on every rank, whatever each one's file held
            todo = list(dict.fromkeys(n for part in all_gather(todo) for n in part))
        chunks = [todo[c : c + chunk] for c in range(0, len(todo), chunk)]
        if world == 1:
            self._optimise(chunks, features, pos, invert, save_every)
        else:
            path = self.entry.path
            shard = OTIStore(path.with_name(f"{path.stem}.rank{rank}of{world}.pt"), self.entry.key)
            mine = [[n for n in c if n not in shard.row] for c in chunks[rank::world]]
            shard._optimise(mine, features, pos, invert, save_every)
            merged = {
                n: (t, e)
                for part in all_gather((shard.names, shard.tokens, shard.ema))
                for n, t, e in zip(*part)
            }
            for n in todo:
                if n not in self.row:
                    self._add(n, *merged[n])
            if rank == 0 and todo:
                self.save()
            shard.entry.path.unlink(missing_ok=True)
        return torch.stack([self.ema[self.row[n]] for n in names])

    def _optimise(self, chunks: list[list[str]], features, pos: dict, invert, save_every: int) -> None:
        chunks = [c for c in chunks if c]
        total, done, since_save, start = sum(map(len, chunks)), 0, 0, time.time()
        for names in chunks:
            tok, ema = invert(features[[pos[n] for n in names]])
            for j, n in enumerate(names):
                self._add(n, tok[j], ema[j])
            done += len(names)
            since_save += len(names)
            if since_save >= save_every:
                self.save()
                since_save = 0
            log.info("OTI: %d/%d images (%.0f s)", done, total, time.time() - start)
        if since_save:
            self.save()

    def _add(self, name: str, token: torch.Tensor, ema: torch.Tensor) -> None:
        self.row[name] = len(self.names)
        self.names.append(name)
        self.tokens.append(token)
        self.ema.append(ema)


def _oti_key(backbone, text: SearleText, oti_cfg: dict) -> str:
    h = hashlib.sha1(backbone.fingerprint().encode())
    h.update(text.digest.encode())
    h.update(json.dumps({k: oti_cfg[k] for k in sorted(oti_cfg) if k != "save_every"}).encode())
    return h.hexdigest()[:16]


def _feature_key(features: torch.Tensor) -> str:
    """An image's identity by its raw features' bits (the run's cached features name no file)."""
    return hashlib.sha1(features.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


class _SearleBase(RetrievalModule):
    frozen_image_encoder = True

    def __init__(
        self,
        backbone,
        prompt: str = "a photo of $ that {}",
        concepts: dict | None = None,
        phrases: dict | None = None,
        oti: dict | None = None,
        token_dir: str | None = None,
        **kwargs,
    ):
        super().__init__(backbone, **kwargs)
        if "$" not in prompt or "{}" not in prompt:
            raise CirlabError(
                f"method.prompt={prompt!r} needs a '$' (the pseudo token) and a '{{}}' (the text)"
            )
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.prompt = prompt
        self.concepts_cfg = dict(concepts or {})
        self.phrases_cfg = dict(phrases or {})
        self.oti_cfg = dict(oti or {})  # method.oti: inverting needs all of it
        self.token_dir = token_dir
        self._text: SearleText | None = None
        self._queries: dict[int, list] = {}  # query loader index -> its queries (set per evaluation)

    def text(self) -> SearleText:
        if self._text is None:
            self.backbone.eval()
            self._text = SearleText(self.backbone, self.eval_data.source, self.concepts_cfg, self.phrases_cfg)
        return self._text

    def store(self, tag: str) -> OTIStore:
        text = self.text()
        key = _oti_key(self.backbone, text, self.oti_cfg)
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
        text = self.text()
        cfg = self.oti_cfg

        def invert_chunk(feats):
            with torch.enable_grad(), torch.inference_mode(False):
                tok, ema, _ = oti(self.backbone, text, feats.clone(), cfg)
            return tok, ema

        return self.store(tag).compute(
            names, features, invert_chunk, int(cfg["batch_size"]), int(cfg["save_every"])
        )

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
        """The source's query texts (FashionIQ: both caption orders) averaged, as in evaluation."""
        texts = [self.eval_data.source.query_texts(query)]
        return self.encode_queries(self.token_of(self.image_features(reference)), texts)

    def _eval_step(self, batch: dict, dataloader_idx: int) -> None:
        if dataloader_idx % 2 == 0:
            return super()._eval_step(batch, dataloader_idx)
        queries = self._queries[dataloader_idx]
        texts = [self.eval_data.source.query_texts(queries[i]) for i in batch["index"].tolist()]
        emb = self.encode_queries(self.reference_tokens(batch, dataloader_idx), texts)
        self._outputs[dataloader_idx].append((batch["index"], emb))


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
                ema = torch.cat([oti(self.backbone, self.text(), c.clone(), self.oti_cfg)[1] for c in chunks])
            fresh = dict(zip(new, ema))
        return torch.stack([fresh[i] if i in fresh else self._stored[key] for i, key in enumerate(keys)])

    def training_step(self, batch, batch_idx):
        raise CirlabError("searle_oti has nothing to train: keep max_epochs: 0")

    def configure_optimizers(self):
        return None


class Searle(_SearleBase):
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
        max_images: int | None = None,
        cache_dir: str | None = None,
        image_splits: tuple = ("train",),
        unlabeled_source=None,
        batch_size: int = 256,
        seed: int = 0,
        token_norm: float | str | None = None,
        **kwargs,
    ):
        super().__init__(backbone, **kwargs)
        d = backbone.embed_dim
        self.phi = Phi(d, 4 * d, backbone.token_dim, dropout)
        self.temperature = temperature
        self.lambda_distil, self.lambda_gpt, self.top_k_concepts = lambda_distil, lambda_gpt, top_k_concepts
        self.max_images, self.cache_dir, self.image_splits = max_images, cache_dir, tuple(image_splits)
        self.unlabeled_source = (
            unlabeled_source  # e.g. dataset=imagenet's source; None: the evaluated dataset
        )
        self.trains_on_dataset_images = unlabeled_source is None
        if not (token_norm is None or token_norm == "oti" or isinstance(token_norm, (int, float))):
            raise CirlabError(
                f"method.phi.module.token_norm={token_norm!r}: use null (reference), oti or a number"
            )
        self.token_norm = token_norm
        # the norm phi's tokens are scaled to (token_norm=oti: the OTI targets' mean norm; a checkpoint keeps it)
        self.register_buffer(
            "target_norm", torch.tensor(float(token_norm) if isinstance(token_norm, (int, float)) else 0.0)
        )
        self.batch_size, self.seed = batch_size, seed
        self._concepts: torch.Tensor | None = None
        self._shuffle: torch.Generator | None = None  # phi's batch order (train_loader)

    def unlabeled_images(self, source) -> list[str]:
        """phi's training images: the captioned images of `image_splits` where the source has captions
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

    def train_loader(self, dm):
        from cirlab.data.features import FeatureCache

        text = self.text()  # vocabulary and phrases first: a missing or refused file stops the run before OTI
        source = self.unlabeled_source or dm.source
        names = self.unlabeled_images(source)
        if not names:
            raise CirlabError(f"dataset {source.name!r} has no unlabeled training images for phi")
        feats = dict(dm.features or {}) if source is dm.source else {}  # another source: other names
        missing = [n for n in names if n not in feats]
        if missing:
            if not self.cache_dir:
                raise CirlabError("internal: Searle needs cache_dir to cache unlabeled image features")
            cache = FeatureCache(self.cache_dir)
            feats.update(cache.get(self.backbone, missing, [source.image_path(n) for n in missing]))
        x = torch.stack([feats[n] for n in names]).float()
        start = time.time()
        tokens = self.invert(names, x, f"{source.name}-unlabeled")
        if self.token_norm == "oti":
            self.target_norm.fill_(tokens.norm(dim=-1).mean().item())
        log.info("phi: OTI targets for %d unlabeled images ready in %.0f s", len(names), time.time() - start)
        self._concepts = text.concepts_of(x, self.top_k_concepts)
        if len(x) < self.batch_size:
            raise CirlabError(
                f"{len(x)} unlabeled images are fewer than one batch ({self.batch_size}): "
                "lower method.phi.batch_size"
            )
        self._shuffle = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            TensorDataset(x, tokens, torch.arange(len(x))),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=self._shuffle,
        )

    # The shuffle generator runs on from epoch to epoch: a resumed run takes up its state at the checkpoint,
    # so the epochs after it see the batches of an uninterrupted run.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["phi_shuffle_rng"] = self._shuffle.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "phi_shuffle_rng" in checkpoint:  # absent from checkpoints written before it was saved
            self._shuffle.set_state(checkpoint["phi_shuffle_rng"])

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        """phi's pseudo tokens. The reference uses phi's raw output; the distillation loss only sees its
        direction, so with token_norm set the direction is kept and the norm fixed (an option)."""
        out = self.phi(features)
        if self.token_norm is None:
            return out
        return F.normalize(out, dim=-1) * self.target_norm

    def on_train_epoch_start(self) -> None:
        self.backbone.eval()

    def training_step(self, batch, batch_idx):
        x, target, idx = batch
        pred = self.tokens(x)
        loss = self.lambda_distil * distillation_loss(target, pred, self.temperature)
        self.log("train/distil", loss, batch_size=len(x))
        if self.lambda_gpt > 0:
            text = self.text()
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

    # ---- phi files (cirlab/weights.py) --------------------------------------------------------------
    def stage_weights(self) -> nn.Module:
        return self.phi

    def checkpoint_layouts(self) -> list[Layout]:
        if self.token_norm == "oti":
            raise CirlabError(
                "method.phi.module.token_norm=oti takes the norm of the OTI targets while training, "
                "which a phi file does not carry: give that number (method.phi.module.token_norm=X; "
                "cirlab's exported phi.pt holds it under 'token_norm') or null, the reference"
            )
        return [
            wrapped(
                "Phi",
                "SEARLE phi file {'Phi': state_dict} (release SEARLE_ViT-B32.pt / SEARLE_ViT-L14.pt, "
                "training phi_<epoch>.pt, cirlab's exported phi.pt)",
            ),
            cirlab_stage("phi.", "its phi.* weights"),
        ]

    @classmethod
    def reference_files(cls, state: dict, epoch: int) -> dict:
        """phi.pt as the reference's train_phi.py saves it; a run with token_norm adds the norm its tokens
        were scaled to (the reference code ignores the key and uses phi's raw output)."""
        out = {"Phi": strip_prefix(state, "phi."), "epoch": epoch}
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
