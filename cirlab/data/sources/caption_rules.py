"""How a query's caption(s) become the text a method encodes, in training, in evaluation and in a zero-shot
prompt: the benchmarks' reference code joins FashionIQ's two captions differently in each."""

from __future__ import annotations

import random

from cirlab.data.records import CIRQuery


class CaptionRules:
    """The first caption, everywhere (a `CIRSource` part; FashionIQ overrides it)."""

    def train_text(self, query: CIRQuery, rng: random.Random) -> str:
        """The caption rule at training time (FashionIQ randomises the order of its two captions)."""
        return self.eval_text(query)

    def train_text_choices(self, query: CIRQuery) -> list[str]:
        """Every text `train_text` can return for `query` (a frozen text encoder encodes them all once)."""
        return [self.train_text(query, random.Random(0))]

    def eval_text(self, query: CIRQuery) -> str:
        return query.captions[0]

    def query_texts(self, query: CIRQuery) -> list[str]:
        """The texts a prompt-based zero-shot method (SEARLE) fills into its prompt, their features
        averaged: by default just the caption rule's."""
        return [self.eval_text(query)]

    def prompt_text(self, query: CIRQuery) -> str:
        """The one text a single-text prompt method (Pic2Word) fills into its prompt: by default the
        caption rule's."""
        return self.eval_text(query)
