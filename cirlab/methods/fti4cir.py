"""FTI4CIR (Lin et al., SIGIR 2024): zero-shot CIR by fine-grained textual inversion (ZiChao111/FTI4CIR).

A reference image becomes ONE subject pseudo word S* (from its global CLIP feature) and r attribute pseudo
words A1*..Ar* (from its patch features; r per image, 1..topk), put into "a photo of * with * ... *"; the
query prompt adds "but {caption}". The network is `IMG2TEXT` (cirlab.methods.fti4cir_net); it trains on
images with one caption each, split into a subject and an attribute half (`split_caption`), by
L = L_con (image <-> pseudo description) + L_orth + lambda_reg * L_reg (the pseudo prompts pulled to the
all-words caption). The prompt evaluation and the seeded batches are SEARLE's/Pic2Word's (PromptQueries,
UnlabeledImages); what differs is here. docs/methods/fti4cir.md: facts, deviations, numbers.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.data.pos_tags import TAGGERS, make_tagger
from cirlab.errors import CirlabError
from cirlab.io import write_json
from cirlab.methods.fti4cir_net import IMG2TEXT, orthogonality_loss, regularisation_loss
from cirlab.methods.fti4cir_release import IMG2TEXT_FILE, released_layout
from cirlab.methods.searle import PromptQueries, UnlabeledImages, _feature_key
from cirlab.methods.searle_phi import Phi, distillation_loss
from cirlab.weights import Layout, cirlab_stage, strip_prefix

log = logging.getLogger("cirlab")


def split_caption(caption: str, tagger) -> tuple[str, str]:
    """The reference's split of a caption into (subject, attribute) (src/blip_caption.py): drop the
    trailing repeats of the last word (BLIP's artefact; one copy stays); fewer than 4 words -> (text,
    text), which the caller discards; else subject = the words up to and including the first NOUN,
    attribute = the rest; no noun -> the first 2 CHARACTERS and the rest (the reference's quirk), and a
    text of at most (noun position + 2) characters gives (subject, subject) (its other quirk)."""
    words = caption.split()
    if not words:
        return "", ""
    keep = len(words)
    while keep > 1 and words[keep - 2] == words[-1]:
        keep -= 1
    text = " ".join(words[:keep])
    if keep < 4:
        return text, text
    tags = tagger(text)
    noun = next((j + 1 for j, (_, pos) in enumerate(tags) if pos == "NOUN"), None)
    if noun is None:
        return text[:2], text[2:]
    subject = " ".join(w for w, _ in tags[:noun])
    return subject, (subject if len(text) <= noun + 2 else " ".join(w for w, _ in tags[noun:]))


def caption_pairs(
    images: list[tuple[str, list[str]]], tagger, prefix: str = ""
) -> list[tuple[str, str, str]]:
    """(image, subject, attribute) per image from its first caption that splits (subject != attribute),
    `prefix` stripped first (the synthetic captions' "a photo of ", as BLIP strips its own prompt)."""
    out = []
    for name, captions in images:
        for caption in captions:
            text = caption[len(prefix) :] if prefix and caption.startswith(prefix) else caption
            subject, attribute = split_caption(text, tagger)
            if subject != attribute:
                out.append((name, subject, attribute))
                break
    return out


def read_pairs_file(path: str | Path) -> list[tuple[str, str, str]]:
    """The reference's `blip_pairs.json`: a list of {"img_id", "subject", "attribute"}."""
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CirlabError(
            f"method.img2text.module.pairs_file={path}: not a readable JSON file ({err})"
        ) from err
    keys = ("img_id", "subject", "attribute")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and all(k in r for k in keys) for r in rows):
        raise CirlabError(
            f'method.img2text.module.pairs_file={path}: expected a JSON list of {{"img_id", "subject", "attribute"}}'
        )
    return [
        (str(r["img_id"]), str(r["subject"]), str(r["attribute"]))
        for r in rows
        if r["subject"] != r["attribute"]
    ]


def build_img2text(
    global_dim: int, patch_dim: int, token_dim: int, dropout: float = 0.5, **kwargs
) -> IMG2TEXT:
    """IMG2TEXT for a backbone. The authors' backbones have one width for the image embedding and the
    token embedding (768 for ViT-L/14 and B/32): their class as is. Where the two differ (the tiny
    backbone: 128 and 64), the latent features keep the image width (the relevance is <latent, g>) and
    phi_s / phi_a map from it to the token width: the same names, other shapes."""
    net = IMG2TEXT(global_dim, patch_dim, global_dim, dropout=dropout, **kwargs)
    if token_dim != global_dim:
        net.phi_s = Phi(global_dim, 4 * global_dim, token_dim, dropout)
        net.phi_a = Phi(global_dim, 4 * global_dim, token_dim, dropout)
    return net


class Tokens(NamedTuple):
    """An image's prompt tokens: [B, 1 + topk, D] (S*, then A*; attribute slots past r hold the literal
    placeholder's embedding, so a placeholder in a caption stays a word) and r [B]."""

    pseudo: torch.Tensor
    r: torch.Tensor


class FTI4CIR(UnlabeledImages, PromptQueries):
    """FTI4CIR: IMG2TEXT (`img2text`) trained on captioned images' cached global + patch features, then
    zero-shot CIR with "a photo of * with * ... * but {caption}"."""

    def __init__(
        self,
        backbone,
        prompt: str = "a photo of * with {attributes} but {}",
        description: str = "a photo of {subject} with {attributes}",
        placeholder: str = "*",
        num_k: int = 24,
        topk: int = 12,
        epsilon: float = 0.05,
        n_layers: int = 3,
        n_heads: int = 1,
        mlp_ratio: float = 2.0,
        dropout: float = 0.5,
        patch_width: int | None = None,
        temperature: float = 0.2,
        lambda_reg: float = 1.4,
        tagger: str = "synthetic",
        caption_prefix: str = "",
        pairs_file: str | None = None,
        image_dir: str | None = None,
        image_name: str = "{}",
        batch_size: int = 256,
        **kwargs,
    ):
        super().__init__(backbone, prompt=prompt, placeholder=placeholder, batch_size=batch_size, **kwargs)
        for field, text in (("prompt", prompt), ("description", description)):
            if "{attributes}" not in text:
                raise CirlabError(f"method.{field}={text!r} needs '{{attributes}}' (where the A* tokens go)")
        if "{subject}" not in description:
            raise CirlabError(f"method.description={description!r} needs '{{subject}}' (where S* goes)")
        if tagger not in TAGGERS:
            raise CirlabError(
                f"method.img2text.module.tagger={tagger!r}: valid taggers are {', '.join(TAGGERS)}"
            )
        if pairs_file and not image_dir:
            raise CirlabError("method.img2text.module.pairs_file needs image_dir: the folder of its images")
        self.trains_on_dataset_images = self.unlabeled_source is None and not pairs_file
        self.placeholder_id = backbone.token_id(placeholder)
        self.description = description
        self.temperature, self.lambda_reg = temperature, lambda_reg
        self.tagger, self.caption_prefix = tagger, caption_prefix
        self.pairs_file, self.image_dir, self.image_name = pairs_file, image_dir, image_name
        patch_dim = backbone.patch_dim
        # the tiny world only: a linear map to a narrower transformer (the reference: patch width itself)
        self.patch_proj = nn.Linear(patch_dim, patch_width) if patch_width else None
        self.img2text = build_img2text(
            backbone.embed_dim,
            patch_width or patch_dim,
            backbone.token_dim,
            num_k=num_k,
            topk=topk,
            epsilon=epsilon,
            n_layers=n_layers,
            n_heads=n_heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
        )
        self.topk = topk
        self.r_counts: dict[str, dict[int, int]] = {}  # split -> {r: number of reference images}
        self._query_tokens: dict[int, Tokens] = {}
        self._names_by_key: dict[str, str] | None = None

    # ---- prompts -------------------------------------------------------------------------------------
    def _stars(self, r: int) -> str:
        return " ".join([self.placeholder] * r)

    def query_prompt(self, r: int, text: str) -> str:
        return self.prompt.replace("{attributes}", self._stars(r)).replace("{}", text, 1)

    def describe(self, subject: str | None, attributes: str | None, r: int) -> str:
        """The description template with words or pseudo tokens (None: S*, or r attribute tokens)."""
        return self.description.format(
            subject=self.placeholder if subject is None else subject,
            attributes=self._stars(r) if attributes is None else attributes,
        )

    # ---- the network -----------------------------------------------------------------------------------
    def select(self, global_features: torch.Tensor, patches: torch.Tensor):
        p = patches.float()
        return self.img2text(global_features.float(), self.patch_proj(p) if self.patch_proj else p)

    def prompt_tokens_of(self, sel) -> Tokens:
        """A Selection's tokens for the prompts: S*, then A1*..Ar*, then the literal placeholder."""
        literal = self.backbone.model.token_embedding.weight[self.placeholder_id].to(sel.attributes.dtype)
        used = torch.arange(self.topk, device=sel.r.device)[None, :] < sel.r[:, None]
        attributes = torch.where(used[..., None], sel.attributes, literal)
        return Tokens(torch.cat([sel.subject[:, None], attributes], dim=1), sel.r)

    def tokens_of(self, global_features: torch.Tensor, patches: torch.Tensor) -> Tokens:
        return self.prompt_tokens_of(self.select(global_features, patches))

    # ---- evaluation: each query's reference image gives S* and its r attribute tokens -----------------
    def encode_queries(self, tokens: Tokens, texts: list[list[str]]) -> torch.Tensor:
        """Per query the mean of its texts' normalised prompt features, renormalised (FashionIQ: both
        caption orders, as the reference's evaluate.py), each prompt with its image's r tokens."""
        k = len(texts[0])
        if any(len(t) != k for t in texts):
            raise CirlabError("internal: queries of one batch have different numbers of texts")
        r = tokens.r.tolist()
        prompts = [self.query_prompt(r[i], t) for i, ts in enumerate(texts) for t in ts]
        with torch.no_grad():
            feats = self.backbone.encode_text_with_pseudo_tokens(
                self.backbone.tokenize(prompts).to(self.device),
                tokens.pseudo.to(self.device).repeat_interleave(k, 0),
                self.placeholder,
            )
            feats = F.normalize(feats.float(), dim=-1).view(len(texts), k, -1).mean(1)
        return F.normalize(feats, dim=-1)

    def _image_tokens(self, names: list[str], paths: list[Path]) -> Tokens:
        """The tokens of images by file, their patch features encoded here (one batch in memory)."""
        from cirlab.data.features import encode_image_patches

        out = []
        with torch.no_grad():
            for g, p in encode_image_patches(self.backbone, paths, self.batch_size, "reference patches"):
                t = self.tokens_of(g.to(self.device), p.to(self.device))
                out.append(Tokens(t.pseudo.cpu(), t.r.cpu()))
        return Tokens(torch.cat([t.pseudo for t in out]), torch.cat([t.r for t in out]))

    def _prepare(self, split: str) -> None:
        super()._prepare(split)
        source = self.eval_data.source
        self._query_tokens, counts = {}, Counter()
        for loader, queries in self._queries.items():
            refs = [q.reference for q in queries]
            uniq = list(dict.fromkeys(refs))
            tokens = self._image_tokens(uniq, [source.image_path(n) for n in uniq])
            counts.update(tokens.r.tolist())
            row = torch.tensor([{n: i for i, n in enumerate(uniq)}[r] for r in refs], dtype=torch.long)
            self._query_tokens[loader] = Tokens(tokens.pseudo[row], tokens.r[row])
        self.r_counts[split] = dict(sorted(counts.items()))
        log.info("FTI4CIR %s: attribute tokens r per reference image: %s", split, self.r_counts[split])
        if self._trainer is not None and not self.trainer.sanity_checking and self.trainer.is_global_zero:
            write_json(Path(self.trainer.default_root_dir) / f"r_counts.{split}.json", self.r_counts[split])

    def reference_tokens(self, batch: dict, dataloader_idx: int) -> Tokens:
        t = self._query_tokens[dataloader_idx]
        index = batch["index"].cpu()
        return Tokens(t.pseudo[index], t.r[index])

    def token_of(self, features: torch.Tensor) -> Tokens:
        """A query outside evaluation (`cirlab.load`): the reference is known by its cached global features
        (an image of the run's dataset), whose patches are encoded now."""
        if self.eval_data is None or not self.eval_data.features:
            raise CirlabError("FTI4CIR needs its run's dataset to embed a query (the reference's patches)")
        if self._names_by_key is None:
            self._names_by_key = {_feature_key(f): n for n, f in self.eval_data.features.items()}
        names = [self._names_by_key.get(_feature_key(f)) for f in features]
        if None in names:
            raise CirlabError(
                "FTI4CIR reads its attribute tokens from the reference's patch features: a reference must be "
                "an image of the run's dataset (cirlab.load queries with other images are not supported)"
            )
        source = self.eval_data.source
        return self._image_tokens(names, [source.image_path(n) for n in names])

    # ---- training ---------------------------------------------------------------------------------------
    def unlabeled_images(self, source) -> list[str]:
        """The training images: those with a (subject, attribute) caption (`training_pairs`)."""
        return [n for n, _, _ in self.training_pairs(source)[0]]

    def training_pairs(self, source) -> tuple[list[tuple[str, str, str]], list[Path]]:
        """(image, subject, attribute) triples and the image files: `pairs_file` (+ image_dir), else
        the captions of `image_splits` of `source` split by `tagger`, at most max_images drawn by seed."""
        if self.pairs_file:
            pairs = read_pairs_file(self.pairs_file)
            paths = [Path(self.image_dir) / self.image_name.format(n) for n, _, _ in pairs]
        else:
            try:
                images = [p for split in self.image_splits for p in source.image_captions(split)]
            except CirlabError as err:
                raise CirlabError(
                    f"FTI4CIR trains on captioned images and dataset {source.name!r} has none: give "
                    "method.img2text.module.pairs_file (a JSON list of {img_id, subject, attribute}) and "
                    "image_dir (its images)"
                ) from err
            images = list({n: c for n, c in images}.items())
            pairs = caption_pairs(images, make_tagger(self.tagger), self.caption_prefix)
            paths = [source.image_path(n) for n, _, _ in pairs]
        if self.max_images and len(pairs) > self.max_images:
            keep = sorted(
                torch.randperm(len(pairs), generator=torch.Generator().manual_seed(self.seed))[
                    : self.max_images
                ].tolist()
            )
            pairs, paths = [pairs[i] for i in keep], [paths[i] for i in keep]
        if not pairs:
            raise CirlabError("FTI4CIR found no (subject, attribute) caption pairs to train on")
        return pairs, paths

    def train_loader(self, dm):
        from cirlab.data.features import PatchFeatureCache

        if not self.cache_dir:
            raise CirlabError("internal: the stage needs cache_dir to cache patch features")
        pairs, paths = self.training_pairs(self.unlabeled_source or dm.source)
        log.info("FTI4CIR: %d training images with a (subject, attribute) caption", len(pairs))
        g, p = PatchFeatureCache(self.cache_dir).get(self.backbone, [str(q) for q in paths], paths)
        self._subjects = [s for _, s, _ in pairs]
        self._attributes = [a for _, _, a in pairs]
        self.backbone.eval()
        with torch.no_grad():  # f_both: the all-words caption, a fixed target
            texts = [self.describe(s, a, 0) for _, s, a in pairs]
            both = torch.cat(
                [
                    self.backbone.encode_texts(texts[i : i + 256]).float().cpu()
                    for i in range(0, len(texts), 256)
                ]
            )
            self._subject_prompts = self.backbone.tokenize(
                [self.describe(None, a, 0) for a in self._attributes]
            )
        return self.unlabeled_loader("img2text", g, p, both, torch.arange(len(pairs)))

    def training_step(self, batch, batch_idx):
        g, p, both, idx = batch
        sel = self.select(g, p)
        tokens = self.prompt_tokens_of(sel)
        r, rows = sel.r.tolist(), idx.tolist()
        encode, tok = self.backbone.encode_text_with_pseudo_tokens, self.backbone.tokenize
        pw = tok([self.describe(None, None, k) for k in r]).to(self.device)
        attr = tok([self.describe(self._subjects[i], None, k) for i, k in zip(rows, r)]).to(self.device)
        f_pw = encode(pw, tokens.pseudo, self.placeholder)
        f_subj = encode(self._subject_prompts[idx.cpu()].to(self.device), sel.subject, self.placeholder)
        f_attr = encode(attr, tokens.pseudo[:, 1:], self.placeholder)
        con = distillation_loss(g.float(), f_pw.float(), self.temperature)
        orth = orthogonality_loss(sel.local)
        reg = regularisation_loss(f_subj.float(), f_attr.float(), f_pw.float(), both.float())
        loss = con + orth + self.lambda_reg * reg
        n = len(g)
        self.log_dict({"train/con": con, "train/orth": orth, "train/reg": reg}, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/r_mean", sel.r.float().mean(), batch_size=n)
        return loss

    def optimizer_params(self) -> list:
        return [p for p in self.parameters() if p.requires_grad]

    # ---- weights: the authors' pickled model (read as data), cirlab's {'IMG2TEXT': ...} export ----------
    def stage_weights(self) -> nn.Module:
        if self.patch_proj is None:
            return self.img2text
        return nn.ModuleDict({"img2text": self.img2text, "patch_proj": self.patch_proj})

    def checkpoint_layouts(self) -> list[Layout]:
        if self.patch_proj is not None:  # the tiny world's projection: only cirlab's own checkpoints
            return [cirlab_stage("", "its img2text.* and patch_proj.* weights", without="backbone.")]
        n = self.img2text
        expect = {"num_k": n.num_k, "topk": n.topk, "epsilon": n.epsilon, "temperature": self.temperature}
        expect["hy_regLoss"] = self.lambda_reg
        return [
            released_layout(expect),
            IMG2TEXT_FILE.layout(),
            cirlab_stage("img2text.", "its img2text.* weights"),
        ]

    @classmethod
    def reference_files(cls, state: dict, epoch: int) -> dict:
        """IMG2TEXT's tensors under the authors' names ({'IMG2TEXT': state_dict}); their own format is a
        pickled module, which cirlab does not write (loading it runs code)."""
        if any(k.startswith("patch_proj.") for k in state):
            raise CirlabError(
                "method.img2text.module.patch_width: the authors' layout has no patch projection"
            )
        return {f"img2text_{epoch}.pt": IMG2TEXT_FILE.write(strip_prefix(state, "img2text."), epoch)}

    def checkpoint_monitor(self) -> str | None:
        """As Pic2Word: the best val epoch only where val is held out from the reported split."""
        if self.eval_data.val_split == self.eval_data.test_split:
            return None
        return super().checkpoint_monitor()
