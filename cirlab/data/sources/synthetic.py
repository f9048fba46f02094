"""`dataset=synthetic`: the bundled benchmark, generated on first use, read as jsonl."""

from __future__ import annotations

from cirlab.data.records import Protocol
from cirlab.data.sources.jsonl import JsonlSource
from cirlab.data.synthetic import Generator, SyntheticSpec, ensure
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
    root = ensure(SyntheticSpec(**spec), cache_dir)
    # the target never equals the reference, so the reference is removed from its ranking (as CIRR does)
    return SyntheticSource(
        root, protocol=Protocol(recall_ks=(1, 5, 10, 50), exclude_reference=True), name="synthetic"
    )
