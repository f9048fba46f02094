"""The on-disk cache: whatever cirlab computes once and reuses (image features, pretrained backbones,
OTI tokens, augmented views) is one `CacheEntry`, a torch file named by a digest of what it was
computed from.

An entry is written atomically with its key and a checksum of its tensors recorded beside the payload,
and used only after a verified load: a file that is unreadable, records another key, fails its
checksum or holds something else is rebuilt, never misread. `get` builds a missing entry under a file
lock, so concurrent runs build a shared entry once and the others wait, then read it:

    entry = CacheEntry(cache_dir / "features" / f"aug_{digest(settings)}.pt", what="augmentation cache")
    blob = entry.get(lambda: {"names": names, "features": encode()}, valid=lambda b: b["names"] == names)
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from cirlab.errors import CirlabError
from cirlab.io import build_lock, load_torch, save_torch

log = logging.getLogger("cirlab")

RECORDED = ("key", "checksum")


def digest(*parts: Any, length: int = 20) -> str:
    """Hex sha1 of plain config values (as sorted-key JSON): the key of what was computed from them."""
    return hashlib.sha1(json.dumps(list(parts), sort_keys=True).encode()).hexdigest()[:length]


def versions(**producers: int) -> list[dict[str, int]]:
    """Key parts naming the code that produced an entry: `{name: version}` of every producer past its
    first version, as one more part for `digest` (none while all are at 1). Each producer's constant (e.g.
    `synthetic.GENERATOR_VERSION`) says when to bump it; a bump changes every key that includes it, so the
    entry is rebuilt, never served from the old code. Version 1 adds nothing: the entries cached before
    versions were recorded are version 1's and keep their keys."""
    bumped = {name: v for name, v in sorted(producers.items()) if v != 1}
    return [bumped] if bumped else []


def stable_repr(obj: Any) -> str:
    """repr without memory addresses ("<function f at 0x7f..>" -> "<function f>"), for keys: a plain
    function inside a transform would otherwise change the key in every process."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def checksum(value: Any) -> str:
    """sha1 of the bytes of every tensor in `value` (a tensor, or dicts/lists holding them), in order."""
    h = hashlib.sha1()
    for t in _tensors(value):
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class CacheEntry:
    """One cached dict at `path`, under `key` (default: the file name without suffix). On load the file's
    recorded key and checksum are verified (a file recording neither, as cirlab wrote pretrained
    backbones before, is known by its name, itself the key's digest), then `valid(blob)` of the
    caller (e.g. the image names match)."""

    def __init__(self, path: str | Path, key: str | None = None, what: str = "cache entry"):
        self.path = Path(path)
        self.key = key or self.path.stem
        self.what = what
        self.hit: bool | None = None  # whether the last `get` found the entry already built

    def read(self, valid: Callable[[dict], bool] | None = None) -> tuple[dict | None, str | None]:
        """(the stored dict, None) when it verifies; (None, None) when absent; (None, why) otherwise."""
        if not self.path.is_file():
            return None, None
        try:
            blob = load_torch(self.path)
        except CirlabError as err:
            return None, f"is unreadable ({err.__cause__ or err})"
        if not isinstance(blob, dict):
            return None, "is not a cirlab cache entry"
        if blob.get("key", self.key) != self.key:
            return None, "was made with other settings"
        payload = {k: v for k, v in blob.items() if k not in RECORDED}
        if "checksum" in blob and blob["checksum"] != checksum(payload):
            return None, "fails its checksum (damaged)"
        try:
            ok = valid is None or valid(blob)
        except (KeyError, TypeError, AttributeError, ValueError):
            ok = False
        return (blob, None) if ok else (None, "holds something else")

    def save(self, payload: dict) -> dict:
        """Write `payload` atomically with the key and checksum recorded; returns what was written."""
        blob = {**payload, "key": self.key, "checksum": checksum(payload)}
        save_torch(self.path, blob)
        return blob

    def get(self, build: Callable[[], dict], valid: Callable[[dict], bool] | None = None) -> dict:
        """The verified entry, or `build()` saved as the entry (a corrupt or foreign file is replaced)."""
        self.hit = True
        blob, _ = self.read(valid)
        if blob is None:
            with build_lock(self.path):  # another run may have built it while this one waited
                blob, why = self.read(valid)
                if why:
                    log.warning("%s %s is corrupt or foreign (%s): rebuilding it", self.what, self.path, why)
                if blob is None:
                    self.hit = False
                    blob = self.save(build())
        return blob
