"""`dataset=synthetic`: the bundled benchmark, generated on first use, read as jsonl."""

from __future__ import annotations

import dataclasses
import difflib

from cirlab.data.records import Protocol
from cirlab.data.sources.jsonl import JsonlSource
from cirlab.data.synthetic import Generator, SyntheticSpec, ensure
from cirlab.errors import CirlabError
from cirlab.io import read_json


class SyntheticSource(JsonlSource):
    def concept_vocabulary(self) -> list[str] | None:
        """`vocabulary.txt`; in a benchmark generated before that file existed, the same names from its spec."""
        names = super().concept_vocabulary()
        if names is None:
            names = [
                f"{c} {s}" for c, s in Generator(SyntheticSpec(**read_json(self.root / "spec.json"))).objects
            ]
        return names


def synthetic_source(cache_dir: str, **spec) -> SyntheticSource:
    known = [f.name for f in dataclasses.fields(SyntheticSpec)]
    for key in spec:
        if key not in known:  # a typo is the user's, not a bug deep in the generator
            near = difflib.get_close_matches(key, known, n=3) or known
            raise CirlabError(f"unknown setting dataset.source.{key}; did you mean: {', '.join(near)}?")
    root = ensure(SyntheticSpec(**spec), cache_dir)
    # the target never equals the reference, so the reference is removed from its ranking (as CIRR does)
    return SyntheticSource(
        root, protocol=Protocol(recall_ks=(1, 5, 10, 50), exclude_reference=True), name="synthetic"
    )
