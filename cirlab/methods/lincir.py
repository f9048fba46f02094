"""LinCIR (Gu et al., CVPR 2024): zero-shot CIR trained on text alone (navervision/lincir).

SEARLE's phi and prompt evaluation, trained without a single image by self-masking projection: a
caption's raw feature f (frozen text tower) plus noise of a random per-caption scale goes through phi;
the token fills EVERY placeholder of the caption with its keyword runs masked, and the feature of that
text is pulled onto f (MSE). The noise stands in for the gap between the text features phi learns from
and the image features it reads at test time. Queries as SEARLE's (`a photo of $ that {}`), every `$`
filled. What is SEARLE's (phi, its file layout, the prompt evaluation) is imported from there;
docs/methods/lincir.md lists the facts, the deviations and the numbers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cirlab.data import pos_tags
from cirlab.data.datamodule import EpochSampler
from cirlab.data.pos_tags import Tagger, make_tagger, runs
from cirlab.errors import CirlabError
from cirlab.methods.searle import PromptQueries, Searle
from cirlab.methods.searle_phi import Phi
from cirlab.weights import Layout, cirlab_stage, strip_prefix

KEYWORD_POS = ("NOUN", "PROPN", "ADJ", "DET")  # the reference's keyword tags (spaCy's coarse `pos_`)
TAGGERS = ("auto", *pos_tags.TAGGERS)  # auto: the bundled grammar's word list for its own captions


def clean_caption(text: str | None, placeholder: str = "$") -> str:
    """The reference's clean-up: CC12M's `<PERSON>` -> person, lower case, no placeholder character (it
    would be read as a mask), stripped."""
    return (text or "").replace("<PERSON>", "person").lower().replace(placeholder, "").strip()


def mask_keywords(caption: str, keywords: list[str], rng: random.Random, placeholder: str = "$") -> str:
    """The reference's self-masking of a cleaned caption: every occurrence (plain substring replace, so
    `a dog` also hits `a doghouse`) of each keyword run, in order, becomes the placeholder; at the first
    keyword that is empty or not in the caption (and for a caption without any), one word drawn by `rng`
    is masked instead and the rest are skipped. Spaces around the placeholder (one token, as the
    reference's added `[$]`), whitespace then collapsed. Deviation: empty words (double spaces) are never
    drawn (the reference's `''.replace` would put a mask between every two characters)."""
    out = caption
    for keyword in keywords or [""]:
        if keyword and keyword in caption:
            out = out.replace(keyword, f" {placeholder} ")
            continue
        words = [w for w in caption.split(" ") if w]
        if words:
            out = out.replace(rng.sample(words, 1)[0], f" {placeholder} ")
        break
    return " ".join(out.split())


def read_corpus(path: str | Path) -> list[str]:
    """A caption corpus file: `.txt`, one caption a line; `.jsonl`, one object a line with `text`,
    `caption` or `captions` (a list; cirlab's captions.jsonl: records of split val/test are left out,
    they describe held-out images)."""
    path = Path(path)
    if not path.is_file():
        raise CirlabError(f"method.corpus={path}: no such file (a .txt, one caption a line, or a .jsonl)")
    lines = [line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return [line.strip() for line in lines]
    out: list[str] = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CirlabError(f"{path}, line {n}: not JSON ({e.msg})") from e
        if not isinstance(record, dict) or not any(k in record for k in ("text", "caption", "captions")):
            raise CirlabError(f"{path}, line {n}: expected an object with 'text', 'caption' or 'captions'")
        if record.get("split") in ("val", "test"):
            continue
        caps = record.get("captions", [record.get("text", record.get("caption"))])
        out += [c for c in caps if isinstance(c, str)]
    return out


class MaskedCaptions(Dataset):
    """(cleaned caption, masked caption) per index; the masking's random word is drawn from (seed,
    epoch, index) as cirlab's other loaders draw, so a resumed run masks as an uninterrupted one. The
    keyword runs of a caption are the same every epoch: tagged once, on first use."""

    def __init__(self, captions: list[str], tagger: Tagger, seed: int, placeholder: str = "$"):
        self.captions = [clean_caption(c, placeholder) for c in captions]
        self.tagger, self.seed, self.placeholder = tagger, seed, placeholder
        self.epoch = 0  # set by EpochSampler
        self._keywords: dict[int, list[str]] = {}

    def __len__(self) -> int:
        return len(self.captions)

    def keywords(self, i: int) -> list[str]:
        if i not in self._keywords:
            self._keywords[i] = runs(self.tagger(self.captions[i]), KEYWORD_POS)
        return self._keywords[i]

    def __getitem__(self, i: int) -> dict:
        text = self.captions[i]
        rng = random.Random(f"{self.seed}-{self.epoch}-{i}")
        return {
            "text": text,
            "masked": mask_keywords(text, self.keywords(i), rng, self.placeholder),
            "index": i,
        }


class LinCIR(PromptQueries):
    """LinCIR: SEARLE's phi trained on captions only (self-masking projection with noisy text features),
    then zero-shot CIR with the prompt, every placeholder filled."""

    fill = "all"
    trains_on_dataset_images = False  # captions only: no image of a training split is read

    def __init__(
        self,
        backbone,
        dropout: float = 0.5,
        noise_scale: float = 1.0,
        l2_normalize: bool = False,
        tagger: str = "auto",
        corpus: str | None = None,
        image_splits: tuple = ("train",),
        edit_captions: bool = False,
        max_captions: int | None = None,
        batch_size: int = 256,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(backbone, **kwargs)
        if tagger not in TAGGERS:
            raise CirlabError(f"method.phi.module.tagger={tagger!r}; valid: {', '.join(TAGGERS)}")
        backbone.token_id(self.placeholder)  # one token, or a clear error now
        d = backbone.embed_dim
        self.phi = Phi(d, 4 * d, backbone.token_dim, dropout)
        self.noise_scale, self.l2_normalize, self.tagger = noise_scale, l2_normalize, tagger
        self.corpus, self.image_splits, self.edit_captions = corpus, tuple(image_splits), edit_captions
        self.max_captions, self.batch_size, self.seed = max_captions, batch_size, seed

    # ---- the training text ----------------------------------------------------------------------
    def captions(self, source) -> list[str]:
        """The corpus: `corpus` (a file), else the captions of the evaluated dataset's `image_splits`
        (synthetic: the train + pretraining images'; `edit_captions` adds its modification-grammar ones);
        at most `max_captions`, drawn by seed."""
        if self.corpus:
            caps = read_corpus(self.corpus)
        else:
            kw = {"edits": True} if self.edit_captions else {}
            try:
                caps = [c for s in self.image_splits for _, cs in source.image_captions(s, **kw) for c in cs]
            except TypeError as e:
                raise CirlabError(
                    f"method.phi.module.edit_captions: dataset {source.name!r} has no edit captions "
                    "(the bundled synthetic benchmark has)"
                ) from e
            except CirlabError as e:
                raise CirlabError(
                    f"{e}: LinCIR trains on captions; give a corpus file, method.corpus=PATH "
                    "(.txt one caption a line, or .jsonl)"
                ) from e
        if self.max_captions and len(caps) > self.max_captions:
            caps = [
                caps[i] for i in sorted(random.Random(self.seed).sample(range(len(caps)), self.max_captions))
            ]
        if not caps:
            raise CirlabError("LinCIR's caption corpus is empty")
        return caps

    def tagger_of(self, source) -> Tagger:
        """`auto`: the bundled benchmark's word list for its own captions, spaCy for any other text."""
        name = self.tagger
        if name == "auto":
            name = "synthetic" if not self.corpus and source.name.startswith("synthetic") else "spacy"
        return make_tagger(name)

    def train_loader(self, dm):
        ds = MaskedCaptions(self.captions(dm.source), self.tagger_of(dm.source), self.seed, self.placeholder)
        if len(ds) < self.batch_size:
            raise CirlabError(
                f"{len(ds)} captions are fewer than one batch ({self.batch_size}): lower method.phi.batch_size"
            )
        return DataLoader(ds, batch_size=self.batch_size, sampler=EpochSampler(ds, self.seed), drop_last=True)

    # ---- self-masking projection ------------------------------------------------------------------
    def masked_tokens(self, masked: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of the masked captions and which rows kept a placeholder; a row whose placeholders
        were all cut off by the context length becomes `a photo of $` (the reference's fallback)."""
        tokens = self.backbone.tokenize(masked)
        kept = (tokens == self.backbone.token_id(self.placeholder)).any(dim=1)
        if not kept.all():
            tokens[~kept] = self.backbone.tokenize([f"a photo of {self.placeholder}"])[0]
        return tokens.to(self.device), kept

    def training_step(self, batch, batch_idx):
        b = self.backbone
        tokens, kept = self.masked_tokens(batch["masked"])
        with torch.no_grad():
            f = b.encode_text(b.tokenize(batch["text"]).to(self.device)).float()
        # per caption one scale u ~ U[0, 1), per dimension N(0, 1)
        noise = self.noise_scale * torch.rand(len(f), 1, device=f.device) * torch.randn_like(f)
        pred = b.encode_text_with_pseudo_tokens(tokens, self.tokens(f + noise), self.placeholder, fill="all")
        loss = F.mse_loss(pred.float(), f)
        n = len(f)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/feature_norm", f.norm(dim=-1).mean(), batch_size=n)
        self.log("train/noise_norm", noise.norm(dim=-1).mean(), batch_size=n)
        self.log("train/masked_rate", kept.float().mean(), batch_size=n)
        return loss

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """phi's tokens of its input: a (noisy) text feature in training, an image feature at test time;
        with `l2_normalize` (the reference's --l2_normalize, off by default) both normalised first."""
        return self.phi(F.normalize(x, dim=-1) if self.l2_normalize else x)

    def token_of(self, features: torch.Tensor) -> torch.Tensor:
        return self.tokens(features)

    def optimizer_params(self) -> list:
        return list(self.phi.parameters())

    # ---- weights: LinCIR's files are SEARLE's {'epoch', 'Phi'} ----------------------------------------
    def stage_weights(self) -> nn.Module:
        return self.phi

    def checkpoint_layouts(self) -> list[Layout]:
        return [Searle.PHI_FILE.layout(), cirlab_stage("phi.", "its phi.* weights")]

    @classmethod
    def reference_files(cls, state: dict, epoch: int) -> dict:
        """phi_best.pt as the reference's train_phi.py saves it (its `epoch` field holds a step count)."""
        return {"phi_best.pt": Searle.PHI_FILE.write(strip_prefix(state, "phi."), epoch)}

    def checkpoint_monitor(self) -> str | None:
        """The reference keeps phi_best by CIRR val R@1: val R@1 where val is held out from the reported
        split (the dataset's main metric where it has no R@1), else the last epoch."""
        dm = self.eval_data
        if dm.val_split == dm.test_split:
            return None
        protocol = dm.source.protocol
        if 1 in protocol.recall_ks and not protocol.group_average:
            return f"{dm.val_split}/recall_at_1"
        return super().checkpoint_monitor()
