"""Part-of-speech tags for captions: which words are nouns, adjectives, determiners.

LinCIR masks a caption's noun-phrase-like runs and FTI4CIR splits a caption at its first noun; both
references tag with spaCy's `en_core_web_sm`. spaCy is an optional extra (`cirlab[nlp]`) and its
English model is not on PyPI, so the bundled benchmark, whose captions use a closed vocabulary, is
tagged by a word list instead (`vocabulary_tagger`). A tagger maps a text to `(word, coarse POS)`
pairs with Universal POS names (NOUN, PROPN, ADJ, DET, ...), spaCy's `token.pos_`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from cirlab.errors import CirlabError

Tagger = Callable[[str], list[tuple[str, str]]]

SPACY_MODEL = "en_core_web_sm"
TAGGERS = ("spacy", "synthetic")


def spacy_tagger(model: str = SPACY_MODEL) -> Tagger:
    """spaCy's tagger (the references' choice): `token.text`, `token.pos_` of each token."""
    try:
        import spacy
    except ImportError as e:
        raise CirlabError(
            "tagging real captions needs spaCy, an optional extra: pip install 'cirlab[nlp]' "
            f"(then: python -m spacy download {model}); or give the method a pre-made file"
        ) from e
    try:
        nlp = spacy.load(model)
    except OSError as e:
        raise CirlabError(
            f"spaCy is installed but its English model {model!r} is not: python -m spacy download {model} "
            "(a pip wheel from spaCy's GitHub releases works offline once downloaded)"
        ) from e
    return lambda text: [(t.text, t.pos_) for t in nlp(text)]


def vocabulary_tagger(lexicon: dict[str, str]) -> Tagger:
    """Tags by a word list; a word not in it is `X`. Splits on whitespace, as the captions it serves
    (a closed generated grammar) have no punctuation."""
    return lambda text: [(w, lexicon.get(w.lower(), "X")) for w in text.split()]


def synthetic_tagger() -> Tagger:
    """The bundled benchmark's grammar: determiners, colour adjectives, shape and place nouns; tags as
    spaCy's English model tags these words (e.g. `a photo`, `a red circle`, `the left`)."""
    from cirlab.data.synthetic import COLORS, SHAPES

    lexicon = {w: "DET" for w in ("a", "an", "the", "this", "that's")}
    lexicon |= {c: "ADJ" for c in COLORS} | {"far": "ADJ"}
    lexicon |= {s: "NOUN" for s in SHAPES}
    lexicon |= {w: "NOUN" for w in ("photo", "left", "right", "middle")}
    lexicon |= {w: "ADP" for w in ("of", "on", "in")} | {w: "VERB" for w in ("has",)}
    lexicon |= {"and": "CCONJ", "also": "ADV", "that": "PRON", "nothing": "PRON"}
    return vocabulary_tagger(lexicon)


def make_tagger(name: str) -> Tagger:
    if name == "spacy":
        return spacy_tagger()
    if name == "synthetic":
        return synthetic_tagger()
    raise CirlabError(f"unknown tagger {name!r}; valid: {', '.join(TAGGERS)}")


def runs(tags: Iterable[tuple[str, str]], pos: Iterable[str]) -> list[str]:
    """Maximal runs of consecutive words whose tag is in `pos`, each joined by single spaces, in order,
    duplicates kept (LinCIR's keywords with pos = NOUN, PROPN, ADJ, DET)."""
    pos = set(pos)
    out: list[list[str]] = []
    previous_in = False
    for word, tag in tags:
        if tag in pos:
            if previous_in:
                out[-1].append(word)
            else:
                out.append([word])
        previous_in = tag in pos
    return [" ".join(r) for r in out]
