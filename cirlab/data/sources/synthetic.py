"""`dataset=synthetic`: the bundled benchmark, generated on first use, read as jsonl."""

from __future__ import annotations

from cirlab.data.records import Protocol
from cirlab.data.sources.jsonl import JsonlSource
from cirlab.data.synthetic import SyntheticSpec, ensure


def synthetic_source(cache_dir: str, **spec) -> JsonlSource:
    root = ensure(SyntheticSpec(**spec), cache_dir)
    # the target never equals the reference, so the reference is removed from its ranking (as CIRR does)
    return JsonlSource(
        root, protocol=Protocol(recall_ks=(1, 5, 10, 50), exclude_reference=True), name="synthetic"
    )
