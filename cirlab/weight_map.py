"""One foreign format's tensor names beside cirlab's, declared once and read both ways.

A `WeightMap` is a list of `Rule`s, as open_clip's convert.py and timm's checkpoint_filter_fn write
theirs: a name in the file, the same tensor's name in the module it loads into, and where the two differ
in shape, both shapes. Import (`to_model`) and export (`to_file`) read the same rules, so export is the
inverse of import by construction; `to_file` checks it name by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Rule:
    """A tensor's name in the file and in the module (each `*` stands for the same text on both sides).
    `model=None`: a file-only entry, dropped on import for the reason `why`, rebuilt on export by `make`
    (from the file's other tensors) or not written. `shapes`: (in the file, in the model) where they differ."""

    file: str
    model: str | None
    shapes: tuple[Shape, Shape] | None = None
    make: Callable[[dict], torch.Tensor] | None = None
    why: str = ""

    def __post_init__(self):
        if self.model is not None and self.file.count("*") != self.model.count("*"):
            raise ValueError(f"rule {self.file!r} <-> {self.model!r}: another number of '*' on each side")

    @cached_property
    def patterns(self) -> dict[str, re.Pattern]:
        sides = {"file": self.file, "model": self.model}
        return {s: re.compile("(.*?)".join(map(re.escape, n.split("*")))) for s, n in sides.items() if n}

    def covers(self, name: str, side: str) -> re.Match | None:
        """Whether `name` (on `side`: "file" or "model") is this rule's; the match holds what `*` stood for."""
        pattern = self.patterns.get(side)
        return pattern.fullmatch(name) if pattern else None

    def translate(self, found: re.Match, side: str) -> str | None:
        """The name on the other side of a name `covers` found on `side` (None: not in the model)."""
        other = self.model if side == "file" else self.file
        if other is None:
            return None
        parts = other.split("*")
        return parts[0] + "".join(g + p for g, p in zip(found.groups(), parts[1:]))

    def reshaped(self, value, side: str):
        """`value` in the other side's shape (left as it is when its size differs: the strict load names it)."""
        if self.shapes is None or not isinstance(value, torch.Tensor):
            return value
        shape = self.shapes[1] if side == "file" else self.shapes[0]
        return value.reshape(shape) if value.numel() == torch.Size(shape).numel() else value


@dataclass(frozen=True)
class WeightMap:
    """The rules of one format, first match wins. A file name no rule covers passes through unchanged (so
    the strict load names it); a module name no rule covers is not part of the format and is not written."""

    rules: tuple[Rule, ...]

    def _find(self, name: str, side: str) -> tuple[Rule | None, str | None]:
        for rule in self.rules:
            found = rule.covers(name, side)
            if found:
                return rule, rule.translate(found, side)
        return None, None

    def to_model(self, file_state: dict, defaults: dict | None = None) -> dict:
        """A file's state dict in the module's names (import); `defaults`: module names a file may lack
        (e.g. constants a run did not train) and their values."""
        out = {}
        for key, value in file_state.items():
            rule, name = self._find(key, "file")
            if rule is None:
                out[key] = value
            elif rule.model is not None:
                out[name] = rule.reshaped(value, "file")
        for name, value in (defaults or {}).items():
            out.setdefault(name, value)
        return out

    def dropped(self, file_state: dict) -> dict[str, list[str]]:
        """The file's keys that import drops, grouped by the reason their rule gives."""
        out: dict[str, list[str]] = {}
        for key in file_state:
            rule, _ = self._find(key, "file")
            if rule is not None and rule.model is None:
                out.setdefault(rule.why, []).append(key)
        return out

    def to_file(self, model_state: dict) -> dict:
        """The module's state dict in the file's names (export): the tensors the rules cover, then the
        file-only ones they rebuild."""
        out = {}
        for key, value in model_state.items():
            rule, name = self._find(key, "model")
            if rule is None:
                continue
            back, again = self._find(name, "file")
            if back is not rule or again != key:
                raise RuntimeError(f"internal: the weight map does not read {name!r} back as {key!r}")
            out[name] = rule.reshaped(value, "model")
        for rule in self.rules:
            if rule.make is not None:
                out[rule.file] = rule.make(out)
        return out


SAME_NAMES = WeightMap((Rule("*", "*"),))  # a format whose names are the module's own
