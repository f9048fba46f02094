"""SEARLE text side: concept vocabulary, image-concept association, phrases (facts: shared/spec/searle.md).

- Vocabulary: one concept name per line (`method.concepts.vocabulary=PATH`); the synthetic benchmark
  ships `vocabulary.txt` ("colour shape" names) and is used by default.
- Association (spec §4): concept text embedding = mean of the L2-normalised features of the 24 PALAVRA
  templates filled with " c ", renormalised; score = cosine with the normalised image feature; top-k.
- Phrases (spec §5): a JSON file {concept: [phrases]}, or the template generator (default; a documented
  deviation: no LM can be downloaded here), or a HF causal LM with the reference sampling settings.
- A concept is "problematic" (excluded) if any of its phrases does not contain it verbatim.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from cirlab.errors import CirlabError

PLACEHOLDER = " $ "

# PALAVRA templates, verbatim from miccunifi/SEARLE src/utils.py get_templates (spec §6.1)
TEMPLATES = [
    "This is a photo of a {}", "This photo contains a {}", "A photo of a {}", "This is an illustration of a {}",
    "This illustration contains a {}", "An illustrations of a {}", "This is a sketch of a {}",
    "This sketch contains a {}", "A sketch of a {}", "This is a diagram of a {}", "This diagram contains a {}",
    "A diagram of a {}", "A {}", "We see a {}", "{}", "We see a {} in this photo", "We see a {} in this image",
    "We see a {} in this illustration", "We see a {} photo", "We see a {} image", "We see a {} illustration",
    "{} photo", "{} image", "{} illustration",
]

# template generator (deviation, spec §5 fallback): "a photo of {c} that " + a clause
CLAUSES = [
    "is on the table", "is in the street", "was taken outdoors", "was taken indoors", "is on the left",
    "is on the right", "is in the middle", "has nothing on the left", "has nothing on the right",
    "has nothing in the middle", "is next to another object", "is alone", "is small", "is large",
    "is in the center of the image", "is on a plain background", "is drawn with sharp edges",
    "is slightly blurred", "is shown from the front", "appears twice", "is bright", "is dark",
    "is partly hidden", "is close to the camera", "is far away", "is the only thing in the picture",
    "has a simple shape", "is colourful", "is seen from above", "is in a corner", "stands out",
    "is easy to recognise",
]

# the reference's sampling settings for GPT phrases (spec §5)
LM_SETTINGS = dict(do_sample=True, max_length=35, num_return_sequences=256, temperature=0.5, no_repeat_ngram_size=2)


def read_vocabulary(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise CirlabError(f"concept vocabulary {path} not found: give method.concepts.vocabulary=PATH "
                          "(a text file, one concept name per line)")
    names = list(dict.fromkeys(line.strip() for line in path.read_text().splitlines() if line.strip()))
    if not names:
        raise CirlabError(f"concept vocabulary {path} is empty")
    return names


def default_vocabulary(source) -> list[str]:
    """The dataset's own vocabulary: `vocabulary.txt` in its folder; for a synthetic benchmark generated
    before that file existed, the same names rebuilt from its spec."""
    root = getattr(source, "root", None)
    if root is not None and (Path(root) / "vocabulary.txt").is_file():
        return read_vocabulary(Path(root) / "vocabulary.txt")
    if root is not None and getattr(source, "name", "") == "synthetic" and (Path(root) / "spec.json").is_file():
        from cirlab.data.synthetic import Generator, SyntheticSpec

        gen = Generator(SyntheticSpec(**json.loads((Path(root) / "spec.json").read_text())))
        return [f"{c} {s}" for c, s in gen.objects]
    raise CirlabError(f"dataset {getattr(source, 'name', '?')!r} ships no concept vocabulary: give "
                      "method.concepts.vocabulary=PATH (one concept name per line, e.g. the Open Images class names)")


def clean_phrase(text: str) -> str:
    """The reference's post-processing: newline runs -> '. ', dot runs -> '.'."""
    return re.sub(r"\.+", ".", re.sub(r"\n+", ". ", text)).strip()


def template_phrases(concepts: list[str], per_concept: int = 32) -> dict[str, list[str]]:
    if per_concept < 1:
        raise CirlabError("method.phrases.per_concept must be >= 1")
    return {c: [f"a photo of {c} that {CLAUSES[i % len(CLAUSES)]}" for i in range(per_concept)] for c in concepts}


@torch.no_grad()
def lm_phrases(model, tokenizer, concepts: list[str], batch_concepts: int = 1, **overrides) -> dict[str, list[str]]:
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


def load_phrases(path: str | Path) -> dict[str, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise CirlabError(f"phrases file {path} not found (method.phrases.file): a JSON object "
                          "{concept: [phrase, ...]}")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CirlabError(f"phrases file {path} is not valid JSON: {err}") from err
    if not isinstance(obj, dict) or not all(isinstance(v, list) for v in obj.values()):
        raise CirlabError(f"phrases file {path} must map each concept to a list of phrases")
    return {str(k).strip(): [str(p) for p in v] for k, v in obj.items()}


def usable_concepts(phrases: dict[str, list[str]]) -> set[str]:
    """Concepts whose every phrase contains the concept verbatim (the reference's filter, inverted)."""
    return {c for c, ps in phrases.items() if ps and all(c in p for p in ps)}


@torch.no_grad()
def concept_embeddings(backbone, concepts: list[str], batch: int = 512) -> torch.Tensor:
    """Prompt-ensembled, normalised concept text features [C, D]."""
    texts = [t.format(f" {c} ") for c in concepts for t in TEMPLATES]
    feats = torch.cat([backbone.encode_texts(texts[i:i + batch]).float() for i in range(0, len(texts), batch)])
    feats = F.normalize(feats, dim=-1).view(len(concepts), len(TEMPLATES), -1).mean(1)
    return F.normalize(feats, dim=-1)


def associate(image_features: torch.Tensor, concept_emb: torch.Tensor, top_k: int) -> torch.Tensor:
    """Indices [N, k] of the top-k concepts per image by cosine similarity, best first."""
    sims = F.normalize(image_features.float(), dim=-1) @ concept_emb.T.to(image_features.device)
    return sims.topk(min(top_k, concept_emb.shape[0]), dim=-1).indices.cpu()


class PhraseBank:
    """Per usable concept: K phrases, their plain text features, and their '$' versions tokenised
    (first occurrence replaced for OTI, all occurrences for phi training)."""

    def __init__(self, backbone, vocabulary: list[str], phrases: dict[str, list[str]], per_concept: int):
        ok = usable_concepts(phrases)
        self.concepts = [c for c in vocabulary if c in ok]
        if not self.concepts:
            raise CirlabError("no concept of the vocabulary has usable phrases (each phrase must contain its "
                              "concept verbatim): check method.phrases")
        self.index = {c: i for i, c in enumerate(self.concepts)}
        # every concept gets exactly K phrases (cycled), so sampling a phrase is uniform per concept
        lists = [[phrases[c][i % len(phrases[c])] for i in range(per_concept)] for c in self.concepts]
        flat = [p for ps in lists for p in ps]
        self.k = per_concept
        with torch.no_grad():
            self.features = torch.cat([backbone.encode_texts(flat[i:i + 512]).float()
                                       for i in range(0, len(flat), 512)]).cpu()  # [C*K, D]
        self.tokens_first = backbone.tokenize([p.replace(c, PLACEHOLDER, 1) for c, ps in zip(self.concepts, lists)
                                               for p in ps])
        self.tokens_all = backbone.tokenize([p.replace(c, PLACEHOLDER) for c, ps in zip(self.concepts, lists)
                                             for p in ps])


def build_phrases(cfg: dict, vocabulary: list[str]) -> dict[str, list[str]]:
    kind = cfg.get("generator", "template")
    if cfg.get("file"):
        return load_phrases(cfg["file"])
    if kind == "template":
        return template_phrases(vocabulary, int(cfg.get("per_concept", 32)))
    if kind == "lm":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name = cfg.get("lm") or "EleutherAI/gpt-neo-2.7B"
        try:
            tok = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name)
        except OSError as err:
            raise CirlabError(f"cannot load the phrase LM {name!r} ({err}); use method.phrases.generator=template "
                              "or a pregenerated method.phrases.file=PATH") from err
        return lm_phrases(model, tok, vocabulary, num_return_sequences=int(cfg.get("per_concept", 256)))
    raise CirlabError(f"unknown method.phrases.generator={kind!r}; choose template or lm")
