"""SEARLE's OTI token files: resumable, atomically written, sharded across the ranks of a process group."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from cirlab.cache import CacheEntry
from cirlab.distributed import all_gather, rank_and_world
from cirlab.errors import CirlabError
from cirlab.methods.searle_text import SearleText

log = logging.getLogger("cirlab")


class OTIStore:
    """Tokens of named images in one cache entry ({names, tokens, ema} under `key`), written atomically
    every `save_every` images: a killed run continues with the images not yet done. A file of other
    settings or a damaged one is an error, not rebuilt: the token folder may be the user's own."""

    def __init__(self, path: str | Path, key: str):
        self.entry = CacheEntry(path, key, what="OTI token file")
        self.names: list[str] = []
        self.tokens: list[torch.Tensor] = []
        self.ema: list[torch.Tensor] = []
        blob, why = self.entry.read()
        if why:
            raise CirlabError(
                f"OTI token file {self.entry.path} {why}; delete it or choose another method.token_dir"
            )
        if blob is not None:
            self.names = list(blob["names"])
            self.tokens = list(blob["tokens"])
            self.ema = list(blob["ema"])
        self.row = {n: i for i, n in enumerate(self.names)}

    def save(self) -> None:
        self.entry.save(
            {
                "names": self.names,
                "tokens": torch.stack(self.tokens) if self.tokens else torch.empty(0),
                "ema": torch.stack(self.ema) if self.ema else torch.empty(0),
            }
        )

    def compute(
        self, names: list[str], features: torch.Tensor, invert, chunk: int, save_every: int
    ) -> torch.Tensor:
        """EMA tokens [len(names), d] in the order of `names`; only the missing ones are optimised,
        by `invert(features) -> (tokens, ema)` in chunks. In a process group (DDP) rank r of W optimises
        chunks r, r+W, ... (saved in its own file) and the store merges them: the chunks of one process,
        so its tokens (a chunk's OTI depends on that chunk alone)."""
        pos = {n: i for i, n in enumerate(names)}
        todo = [n for n in dict.fromkeys(names) if n not in self.row]
        rank, world = rank_and_world()
        if world > 1:  # the same list on every rank, whatever each one's file held
            todo = list(dict.fromkeys(n for part in all_gather(todo) for n in part))
        chunks = [todo[c : c + chunk] for c in range(0, len(todo), chunk)]
        if world == 1:
            self._optimise(chunks, features, pos, invert, save_every)
        else:
            path = self.entry.path
            shard = OTIStore(path.with_name(f"{path.stem}.rank{rank}of{world}.pt"), self.entry.key)
            mine = [[n for n in c if n not in shard.row] for c in chunks[rank::world]]
            shard._optimise(mine, features, pos, invert, save_every)
            merged = {
                n: (t, e)
                for part in all_gather((shard.names, shard.tokens, shard.ema))
                for n, t, e in zip(*part)
            }
            for n in todo:
                if n not in self.row:
                    self._add(n, *merged[n])
            if rank == 0 and todo:
                self.save()
            shard.entry.path.unlink(missing_ok=True)
        return torch.stack([self.ema[self.row[n]] for n in names])

    def _optimise(self, chunks: list[list[str]], features, pos: dict, invert, save_every: int) -> None:
        chunks = [c for c in chunks if c]
        total, done, since_save, start = sum(map(len, chunks)), 0, 0, time.time()
        for names in chunks:
            tok, ema = invert(features[[pos[n] for n in names]])
            for j, n in enumerate(names):
                self._add(n, tok[j], ema[j])
            done += len(names)
            since_save += len(names)
            if since_save >= save_every:
                self.save()
                since_save = 0
            log.info("OTI: %d/%d images (%.0f s)", done, total, time.time() - start)
        if since_save:
            self.save()

    def _add(self, name: str, token: torch.Tensor, ema: torch.Tensor) -> None:
        self.row[name] = len(self.names)
        self.names.append(name)
        self.tokens.append(token)
        self.ema.append(ema)


def settings_key(backbone, text: SearleText, oti_cfg: dict) -> str:
    """A token file's key: the backbone, the text side and the OTI settings its tokens were made with
    (save_every aside: it does not change them)."""
    h = hashlib.sha1(backbone.fingerprint().encode())
    h.update(text.digest.encode())
    h.update(json.dumps({k: oti_cfg[k] for k in sorted(oti_cfg) if k != "save_every"}).encode())
    return h.hexdigest()[:16]
