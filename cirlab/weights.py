"""Weights entering and leaving cirlab in their authors' layouts.

Released checkpoints come as the reference code writes them: `{'CLIP': sd}`, `{'Combiner': sd}`,
`{'Phi': sd}`, `{'BLIPTextEncoder': sd}`, plain state dicts, or cirlab's own checkpoints. Each seam where
weights enter (`backbone.checkpoint`, `method.<stage>.checkpoint`) lists the `Layout`s it accepts; a
file's layout is recognised from its keys, converted to cirlab's parameter names (a foreign format by its
one `WeightMap`, which also writes it back: `SavedFile`) and loaded strictly:
every tensor of the file is used and every parameter filled, so a wrong model size is an error, never
a silent partial load. Files are read with `weights_only=True` (no pickled code runs), a whole pickled
module (FTI4CIR's release) by its layout's own restricted unpickler (`Layout.sniff`); OpenAI's
TorchScript archives only behind `backbone.allow_torchscript` (cirlab/backbones/openclip.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cirlab.errors import CirlabError
from cirlab.io import load_torch
from cirlab.weight_map import WeightMap


@dataclass(frozen=True)
class Layout:
    """One file layout a seam accepts: `name` is shown in errors, `match` recognises the loaded object,
    `to_state` turns it into a state dict in the target module's own parameter names."""

    name: str
    match: Callable[[Any], bool]
    to_state: Callable[[Any], dict[str, torch.Tensor]]
    # a format torch.load(weights_only=True) cannot read (a whole pickled module): its own safe reader,
    # returning the file's object when the file is of this format (recognised by content), None otherwise
    sniff: Callable[[Path], Any] | None = None


@dataclass(frozen=True)
class SavedFile:
    """A reference script's `torch.save({'epoch': n, key: model.state_dict(), ...})` file: read through
    `layout()`, written by `write`, both through the one `map` of its format. `marks`: file names that tell
    this format from another saved under the same key."""

    key: str
    map: WeightMap
    name: str  # shown in errors and in the log
    marks: tuple[str, ...] = ()

    def holds(self, obj: Any) -> bool:
        state = obj.get(self.key) if isinstance(obj, dict) else None
        return isinstance(state, dict) and all(m in state for m in self.marks)

    def layout(self, defaults: dict | None = None) -> Layout:
        """`defaults`: module names the file may lack, and their values (WeightMap.to_model)."""
        return Layout(self.name, self.holds, lambda obj: self.map.to_model(obj[self.key], defaults))

    def write(self, state: dict, epoch: int) -> dict:
        """The file of the module state `state` (in the map's model names), as the reference saves it."""
        return {"epoch": epoch, self.key: self.map.to_file(state)}


def cirlab_stage(prefix: str, what: str, without: str | None = None) -> Layout:
    """A cirlab stage checkpoint (`stages/<stage>/checkpoints/best.ckpt`): the tensors under `prefix`,
    less those under `without` (e.g. the frozen backbone beside a stage's own weights)."""

    def own(obj):
        return {
            k: v
            for k, v in strip_prefix(obj["state_dict"], prefix).items()
            if not (without and k.startswith(without))
        }

    return Layout(
        f"cirlab stage checkpoint (stages/<stage>/checkpoints/*.ckpt; {what})",
        lambda obj: (
            isinstance(obj, dict)
            and isinstance(obj.get("state_dict"), dict)
            and "epoch" in obj
            and any(k.startswith(prefix) for k in obj["state_dict"])
        ),
        own,
    )


def strip_prefix(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def read_weights(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CirlabError(f"{what}={path}: no such file")
    return load_torch(path)


def _describe(obj: Any) -> str:
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    keys = list(obj)
    return (
        "top-level keys "
        + ", ".join(map(repr, keys[:6]))
        + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
    )


def recognise(obj: Any, layouts: list[Layout], what: str) -> Layout:
    for layout in layouts:
        if layout.match(obj):
            return layout
    accepted = "\n".join(f"  - {layout.name}" for layout in layouts)
    raise CirlabError(
        f"{what} is in none of the layouts it accepts ({_describe(obj)}). Accepted:\n{accepted}"
    )


def load_weights(module: nn.Module, path: str | Path, layouts: list[Layout], what: str) -> str:
    """Recognise the file's layout among `layouts`, load it into `module` strictly; returns the layout name."""
    sniffed = (layout.sniff(Path(path)) for layout in layouts if layout.sniff and Path(path).is_file())
    obj = next((o for o in sniffed if o is not None), None)
    obj = read_weights(path, what) if obj is None else obj
    layout = recognise(obj, layouts, f"{what}={path}")
    load_strict(module, layout.to_state(obj), f"{what}={path} ({layout.name})")
    return layout.name


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True) with a message that lists what does not fit (names and shapes)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unused = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    for label, items in (
        ("missing in the file", missing),
        ("not used by the model", unused),
        ("of another shape (another model size?)", shapes),
    ):
        if items:
            problems.append(
                f"{len(items)} {label}: {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}"
            )
    if problems:
        raise CirlabError(f"{what} does not fit {type(module).__name__}:\n  " + "\n  ".join(problems))
    module.load_state_dict(state, strict=True)
