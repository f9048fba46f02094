"""cirlab: config-driven Composed Image Retrieval experiments.

`cirlab.load(run_dir_or_ckpt)` returns a Retriever over a finished run (see cirlab/api.py); it is
imported lazily so that `import cirlab` stays cheap (no torch / open_clip at import time).
"""

from __future__ import annotations

from typing import Any

__all__ = ["load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from cirlab.api import load

        return load
    raise AttributeError(f"module 'cirlab' has no attribute {name!r}")
