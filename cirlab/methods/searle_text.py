"""SEARLE text side: concept vocabulary, image-concept association, phrases.

- Vocabulary (`method.concepts.vocabulary=PATH`): the reference's Open Images V7 class list
  `oidv7-class-descriptions.csv` (columns LabelName,DisplayName; the DisplayName column is used), or a
  plain text file, one concept per line. The synthetic benchmark ships `vocabulary.txt` ("colour shape"
  names), used by default; the real benchmarks ship none.
- Association: concept text embedding = mean of the L2-normalised features of the 24 PALAVRA templates
  filled with " c ", renormalised; score = cosine with the normalised image feature; top-k over the
  WHOLE vocabulary, as the reference ranks before it drops the problematic concepts.
- Phrases: the reference's `concept_to_phrases.pkl` (GPT-Neo 2.7B, 256 per concept) or a JSON file
  {concept: [phrases]}, or the template generator (default; a documented deviation: no LM can be
  downloaded here), or a HF causal LM with the reference sampling settings.
- A concept is "problematic" (dropped) if any of its phrases does not contain it verbatim.
- `SearleText` builds all of them once per backbone, for OTI, phi training and the queries.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pickle
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from cirlab.errors import CirlabError

PLACEHOLDER = " $ "

# PALAVRA templates, verbatim from miccunifi/SEARLE src/utils.py get_templates (docs/methods/searle.md#templates)
TEMPLATES = [
    "This is a photo of a {}",
    "This photo contains a {}",
    "A photo of a {}",
    "This is an illustration of a {}",
    "This illustration contains a {}",
    "An illustrations of a {}",
    "This is a sketch of a {}",
    "This sketch contains a {}",
    "A sketch of a {}",
    "This is a diagram of a {}",
    "This diagram contains a {}",
    "A diagram of a {}",
    "A {}",
    "We see a {}",
    "{}",
    "We see a {} in this photo",
    "We see a {} in this image",
    "We see a {} in this illustration",
    "We see a {} photo",
    "We see a {} image",
    "We see a {} illustration",
    "{} photo",
    "{} image",
    "{} illustration",
]

# template generator (deviation, docs/methods/searle.md#cirlab-vs-the-reference): "a photo of {c} that " + a clause
CLAUSES = [
    "is on the table",
    "is in the street",
    "was taken outdoors",
    "was taken indoors",
    "is on the left",
    "is on the right",
    "is in the middle",
    "has nothing on the left",
    "has nothing on the right",
    "has nothing in the middle",
    "is next to another object",
    "is alone",
    "is small",
    "is large",
    "is in the center of the image",
    "is on a plain background",
    "is drawn with sharp edges",
    "is slightly blurred",
    "is shown from the front",
    "appears twice",
    "is bright",
    "is dark",
    "is partly hidden",
    "is close to the camera",
    "is far away",
    "is the only thing in the picture",
    "has a simple shape",
    "is colourful",
    "is seen from above",
    "is in a corner",
    "stands out",
    "is easy to recognise",
]

# the reference's sampling settings for GPT phrases (docs/methods/searle.md#phrases)
LM_SETTINGS = dict(
    do_sample=True, max_length=35, num_return_sequences=256, temperature=0.5, no_repeat_ngram_size=2
)


VOCABULARY_SOURCE = (
    "SEARLE's vocabulary is the Open Images V7 class list data/oidv7-class-descriptions.csv "
    "of github.com/miccunifi/SEARLE"
)


def read_vocabulary(path: str | Path) -> list[str]:
    """Concept names, stripped and de-duplicated in file order: the DisplayName column of a CSV with
    that header (names may hold quoted commas), else one name per line."""
    path = Path(path)
    if not path.is_file():
        raise CirlabError(
            f"concept vocabulary {path} not found (method.concepts.vocabulary). {VOCABULARY_SOURCE}: "
            "download it there, or give a text file with one concept name per line"
        )
    text = path.read_text(encoding="utf-8-sig")
    header = next(csv.reader(io.StringIO(text)), [])
    if "DisplayName" in header:
        names = [row["DisplayName"] or "" for row in csv.DictReader(io.StringIO(text))]
    elif path.suffix.lower() == ".csv":
        raise CirlabError(
            f"concept vocabulary {path} is a CSV without a DisplayName column (header {header}): "
            "give the Open Images class list (LabelName,DisplayName) or a text file, one name per line"
        )
    else:
        names = text.splitlines()
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not names:
        raise CirlabError(f"concept vocabulary {path} is empty")
    return names


def default_vocabulary(source) -> list[str]:
    """The dataset's own vocabulary (the synthetic benchmark ships one; the real benchmarks none)."""
    names = source.concept_vocabulary()
    if not names:
        raise CirlabError(
            f"dataset {source.name!r} ships no concept vocabulary: give "
            "method.concepts.vocabulary=PATH (one concept name per line, e.g. the Open Images class names)"
        )
    return names


def clean_phrase(text: str) -> str:
    """The reference's post-processing: newline runs -> '. ', dot runs -> '.'."""
    return re.sub(r"\.+", ".", re.sub(r"\n+", ". ", text)).strip()


def template_phrases(concepts: list[str], per_concept: int | None = None) -> dict[str, list[str]]:
    """One phrase per clause (None: all 32), cycling the clauses for more."""
    n = check_per_concept(per_concept) or len(CLAUSES)
    return {c: [f"a photo of {c} that {CLAUSES[i % len(CLAUSES)]}" for i in range(n)] for c in concepts}


def check_per_concept(per_concept) -> int | None:
    if per_concept is None:
        return None
    if isinstance(per_concept, bool) or not isinstance(per_concept, int) or per_concept < 1:
        raise CirlabError(
            f"method.phrases.per_concept={per_concept!r}: a positive integer, or null for all phrases"
        )
    return per_concept


@torch.no_grad()
def lm_phrases(
    model, tokenizer, concepts: list[str], batch_concepts: int = 1, **overrides
) -> dict[str, list[str]]:
    """Phrases from a HF causal LM: prompt 'a photo of {c} that', the reference's generate() settings
    (sampling, max_length 35, 256 sequences, temperature 0.5, no_repeat_ngram_size 2); the decoded text
    keeps the prompt."""
    settings = {**LM_SETTINGS, **overrides}
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    out: dict[str, list[str]] = {}
    for c in concepts:
        c = c.strip()
        enc = tokenizer([f"a photo of {c} that"], return_tensors="pt", padding=True)
        seqs = model.generate(**enc.to(model.device), pad_token_id=tokenizer.pad_token_id, **settings)
        out[c] = [clean_phrase(t) for t in tokenizer.batch_decode(seqs, skip_special_tokens=True)]
    return out


class _Refused(pickle.UnpicklingError):
    pass


class _PlainUnpickler(pickle.Unpickler):
    """Loads only pickle's built-in containers and scalars (dict, list, str, int, ...): any class or
    function reference is refused before it is resolved, so a phrases file can never run code."""

    def find_class(self, module: str, name: str):
        raise _Refused(f"it references {module}.{name}")


PHRASES_FORMAT = (
    "the reference's concept_to_phrases.pkl (release asset GPTNeo27B.zip of github.com/miccunifi/SEARLE) "
    "or a JSON object {concept: [phrase, ...]}"
)


def load_phrases(path: str | Path) -> dict[str, list[str]]:
    """{concept: [phrases]} from a pickle (read with `_PlainUnpickler`) or a JSON file."""
    path = Path(path)
    if not path.is_file():
        raise CirlabError(f"phrases file {path} not found (method.phrases.file): {PHRASES_FORMAT}")
    raw = path.read_bytes()
    if path.suffix.lower() in (".pkl", ".pickle") or raw[:1] == b"\x80":
        try:
            obj = _PlainUnpickler(io.BytesIO(raw)).load()
        except _Refused as err:
            raise CirlabError(
                f"phrases file {path} refused: a phrases pickle holds only a dict of lists of strings, "
                f"but {err}. Use the authors' file or a JSON object {{concept: [phrase, ...]}}"
            ) from err
        except Exception as err:  # truncated or not a pickle
            raise CirlabError(
                f"phrases file {path} is not a readable pickle ({type(err).__name__}: {err})"
            ) from err
    else:
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CirlabError(f"phrases file {path} is not valid JSON: {err}") from err
    if not isinstance(obj, dict) or not all(isinstance(v, list) for v in obj.values()):
        raise CirlabError(
            f"phrases file {path} must map each concept to a list of phrases ({PHRASES_FORMAT})"
        )
    return {str(k).strip(): [str(p) for p in v] for k, v in obj.items()}


def usable_concepts(phrases: dict[str, list[str]]) -> set[str]:
    """Concepts whose every phrase contains the concept verbatim (the reference's filter, inverted)."""
    return {c for c, ps in phrases.items() if ps and all(c in p for p in ps)}


@torch.no_grad()
def concept_embeddings(backbone, concepts: list[str], batch: int = 512) -> torch.Tensor:
    """Prompt-ensembled, normalised concept text features [C, D]."""
    texts = [t.format(f" {c} ") for c in concepts for t in TEMPLATES]
    feats = torch.cat(
        [backbone.encode_texts(texts[i : i + batch]).float() for i in range(0, len(texts), batch)]
    )
    feats = F.normalize(feats, dim=-1).view(len(concepts), len(TEMPLATES), -1).mean(1)
    return F.normalize(feats, dim=-1)


def associate(
    image_features: torch.Tensor, concept_emb: torch.Tensor, top_k: int, chunk: int = 4096
) -> torch.Tensor:
    """Indices [N, k] of the top-k concepts per image by cosine similarity, best first (in chunks of
    images: 100k images x 20k concepts would not fit in memory at once)."""
    emb = concept_emb.T.to(image_features.device)
    k = min(top_k, concept_emb.shape[0])
    return torch.cat(
        [
            (F.normalize(image_features[i : i + chunk].float(), dim=-1) @ emb).topk(k, dim=-1).indices.cpu()
            for i in range(0, len(image_features), chunk)
        ]
    )


class PhraseBank:
    """The phrases of every usable concept (its first `per_concept`, None = all), their plain text
    features, and their '$' versions tokenised (first occurrence replaced for OTI, all for phi training).
    Concepts may have different phrase counts: phrases are stored flat, concept c owning rows
    start[c] .. start[c] + count[c] - 1."""

    def __init__(
        self, backbone, vocabulary: list[str], phrases: dict[str, list[str]], per_concept: int | None
    ):
        n = check_per_concept(per_concept)
        ok = usable_concepts(phrases)
        self.concepts = [c for c in vocabulary if c in ok]
        if not self.concepts:
            raise CirlabError(
                "no concept of the vocabulary has usable phrases (each phrase must contain its "
                "concept verbatim): check method.phrases"
            )
        self.index = {c: i for i, c in enumerate(self.concepts)}
        lists = [phrases[c][:n] for c in self.concepts]
        self.count = torch.tensor([len(ps) for ps in lists])
        self.start = torch.cumsum(self.count, 0) - self.count
        self.max_count = int(self.count.max())
        flat = [p for ps in lists for p in ps]
        digest = hashlib.sha1()
        for c, ps in zip(self.concepts, lists):
            digest.update(json.dumps([c, ps]).encode())
        self.digest = digest.hexdigest()
        with torch.no_grad():
            self.features = torch.cat(
                [backbone.encode_texts(flat[i : i + 512]).float() for i in range(0, len(flat), 512)]
            ).cpu()  # [P, D]
        self.tokens_first = backbone.tokenize(
            [p.replace(c, PLACEHOLDER, 1) for c, ps in zip(self.concepts, lists) for p in ps]
        )
        self.tokens_all = backbone.tokenize(
            [p.replace(c, PLACEHOLDER) for c, ps in zip(self.concepts, lists) for p in ps]
        )

    def sample(self, candidates: torch.Tensor, generator: torch.Generator, pooled: bool) -> torch.Tensor:
        """One phrase row per image from its candidate concepts [N, k] (bank indices, -1 = dropped).
        pooled=True: uniform over all phrases of the candidates (the reference's OTI pool); False: a
        uniform candidate concept, then a uniform phrase of it (the reference's phi training).
        By rejection, so with every candidate usable and equal counts it draws exactly a column and a
        phrase index."""
        n, k = candidates.shape
        rows = torch.arange(n)
        concept = candidates[rows, torch.randint(k, (n,), generator=generator)]
        phrase = torch.randint(self.max_count, (n,), generator=generator)
        while True:
            bad = concept < 0
            if pooled:
                bad |= phrase >= self.count[concept.clamp(min=0)]
            if not bad.any():
                break
            redo = rows[bad]
            concept[redo] = candidates[redo, torch.randint(k, (len(redo),), generator=generator)]
            if pooled:
                phrase[redo] = torch.randint(self.max_count, (len(redo),), generator=generator)
        while not pooled and (bad := phrase >= self.count[concept]).any():
            phrase[bad] = torch.randint(self.max_count, (int(bad.sum()),), generator=generator)
        return self.start[concept] + phrase


def build_phrases(cfg: dict, vocabulary: list[str]) -> dict[str, list[str]]:
    kind = cfg.get("generator", "template")
    if cfg.get("file"):
        return load_phrases(cfg["file"])
    if kind == "template":
        return template_phrases(vocabulary, cfg.get("per_concept"))
    if kind == "lm":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name = cfg.get("lm") or "EleutherAI/gpt-neo-2.7B"
        try:
            tok = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name)
        except OSError as err:
            raise CirlabError(
                f"cannot load the phrase LM {name!r} ({err}); use method.phrases.generator=template "
                "or a pregenerated method.phrases.file=PATH"
            ) from err
        n = check_per_concept(cfg.get("per_concept")) or LM_SETTINGS["num_return_sequences"]
        return lm_phrases(model, tok, vocabulary, num_return_sequences=n)
    raise CirlabError(f"unknown method.phrases.generator={kind!r}; choose template or lm")


class SearleText:
    """Everything text-side both variants need, built once per backbone: vocabulary, concept
    embeddings of the whole vocabulary, phrase bank of the usable concepts, tokenised PALAVRA templates."""

    def __init__(self, backbone, source, concepts: dict, phrases: dict):
        vocab = (
            read_vocabulary(concepts["vocabulary"])
            if concepts.get("vocabulary")
            else default_vocabulary(source)
        )
        self.vocabulary = vocab
        self.bank = PhraseBank(backbone, vocab, build_phrases(phrases, vocab), phrases.get("per_concept"))
        # vocabulary row -> bank row; -1: a problematic concept (or one without phrases)
        self.bank_row = torch.tensor([self.bank.index.get(c, -1) for c in vocab])
        self.concept_emb = concept_embeddings(backbone, vocab)
        self.templates = backbone.tokenize([t.format(PLACEHOLDER) for t in TEMPLATES])
        self.digest = hashlib.sha1(
            json.dumps([vocab, self.bank.digest, phrases, concepts], sort_keys=True, default=str).encode()
        ).hexdigest()[:12]

    def concepts_of(self, features: torch.Tensor, top_k: int) -> torch.Tensor:
        """Bank rows [N, k] of each image's top-k concepts, ranked over the whole vocabulary, the
        problematic ones then dropped (-1), as the reference: an image keeps fewer than k usable concepts
        rather than reaching further down its ranking."""
        rows = self.bank_row[associate(features, self.concept_emb, top_k)]
        empty = int((rows < 0).all(1).sum())
        if empty:
            raise CirlabError(
                f"{empty} of {len(rows)} images have no usable concept among their top {top_k} (all "
                "dropped as problematic or without phrases): raise the top-k or check method.phrases"
            )
        return rows
