"""FTI4CIR's released model, read as data.

The authors' train.py saves the whole module, `torch.save(img2text)`: a pickle of their `IMG2TEXT` object
(classes of their `i2t_model` and `MHTransformer` modules, torch.nn layers, tensors), which plain
`torch.load` would rebuild by importing and calling those classes, and `weights_only=True` refuses. Here
the pickle is read by an unpickler that knows exactly the globals such a file holds: the authors' classes
and torch.nn's become inert stand-ins that only keep their attribute dict, tensors are rebuilt from the
archive's storages by cirlab's own functions, and any other global is refused (named) before it is
resolved, so no code of the file runs. The parameters are then collected by walking
`_parameters` / `_buffers` / `_modules`, giving the state dict of cirlab.methods.fti4cir_net.IMG2TEXT.

`released_layout` plugs this into `method.<stage>.checkpoint` (the file is recognised by its content);
`IMG2TEXT_FILE` is the plain `{'IMG2TEXT': state_dict}` file cirlab exports.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cirlab.errors import CirlabError
from cirlab.weight_map import SAME_NAMES
from cirlab.weights import Layout, SavedFile

MODULES = {
    "i2t_model": ("IMG2TEXT", "Phi"),
    "MHTransformer": ("Transformer", "TransformerLayer", "MultiHeadAttention", "MlpTransformer"),
    "torch.nn.modules.linear": ("Linear",),
    "torch.nn.modules.normalization": ("LayerNorm",),
    "torch.nn.modules.container": ("Sequential", "ModuleList"),
    "torch.nn.modules.activation": ("Sigmoid", "GELU", "ReLU"),
    "torch.nn.modules.dropout": ("Dropout",),
    "torch.nn.modules.loss": ("CosineEmbeddingLoss", "MSELoss"),
}
FUNCTIONS = {"torch.nn.functional": ("relu", "gelu")}  # kept as attributes (MlpTransformer.act): never called
STORAGES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
SETTINGS = ("num_k", "topk", "epsilon", "temperature", "hy_regLoss")  # IMG2TEXT's attributes
WHAT = "FTI4CIR's released model (their train.py's torch.save(img2text): a pickled i2t_model.IMG2TEXT)"


class _Refused(pickle.UnpicklingError):
    pass


class _Module:
    """Stand-in for a pickled nn.Module: keeps its attribute dict, runs nothing."""

    origin = ""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise _Refused(f"{self.origin} has a state of type {type(state).__name__}, not an attribute dict")
        self.state = state


@dataclass(frozen=True)
class _Function:
    """Stand-in for a function kept as a module attribute."""

    origin: str


_STAND_INS = {
    f"{module}.{name}": type(name, (_Module,), {"origin": f"{module}.{name}"})
    for module, names in MODULES.items()
    for name in names
}
_FUNCTIONS = {f"{m}.{n}": _Function(f"{m}.{n}") for m, names in FUNCTIONS.items() for n in names}


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2's arguments, checked, as a view of the storage's 1-D tensor."""
    if not (
        isinstance(storage, torch.Tensor)
        and isinstance(offset, int)
        and isinstance(size, tuple | torch.Size)
        and isinstance(stride, tuple)
        and all(isinstance(n, int) and n >= 0 for n in (*size, *stride))
    ):
        raise _Refused("a tensor with malformed storage, offset, size or stride")
    return torch.as_strided(storage, tuple(size), stride, offset)  # RuntimeError past the storage's end


def _rebuild_parameter(data, requires_grad=True, hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise _Refused("a parameter that holds no tensor")
    return data


_GLOBALS = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "__builtin__.set": set,  # protocol 2 names builtins as Python 2 did
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    **{f"torch.{name}": dtype for name, dtype in STORAGES.items()},
    **_STAND_INS,
    **_FUNCTIONS,
}


class _Unpickler(pickle.Unpickler):
    """Resolves only the names in _GLOBALS; storages are read from the archive (`data/<key>`)."""

    def __init__(self, raw: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(raw))
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module: str, name: str):
        found = _GLOBALS.get(f"{module}.{name}")
        if found is None:
            raise _Refused(f"it references {module}.{name}, which such a file never holds")
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"an unknown persistent reference {str(pid)[:80]}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str) or not isinstance(numel, int):
            raise _Refused("a malformed storage reference")
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}data/{key}")
            except KeyError:
                raise _Refused(f"storage {key!r} is missing from the archive") from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) != numel * itemsize:
                raise _Refused(f"storage {key!r} holds {len(raw)} bytes, not {numel} x {itemsize}")
            self.storages[key] = (
                torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            )
        return self.storages[key]


@dataclass(frozen=True)
class ReleasedIMG2TEXT:
    """The tensors of a released model (cirlab's IMG2TEXT names) and its recorded settings."""

    state: dict[str, torch.Tensor]
    settings: dict[str, Any]
    path: Path

    def checked(self, expect: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The state dict, refused when a recorded setting differs from the run's (`expect`)."""
        differ = [
            f"{k}={self.settings[k]!r} (the run has {expect[k]!r})"
            for k in expect
            if k in self.settings and not _same(self.settings[k], expect[k])
        ]
        if differ:
            raise CirlabError(
                f"{self.path}: the released model was trained with other settings: {', '.join(differ)}. "
                "Set the method's values to the file's, or use another file."
            )
        return self.state


def _same(a: Any, b: Any) -> bool:
    return (
        abs(a - b) <= 1e-9 * max(abs(a), abs(b)) if isinstance(a, float) or isinstance(b, float) else a == b
    )


def _pickle_entry(archive: zipfile.ZipFile) -> str | None:
    names = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    return names[0] if len(names) == 1 else None


def _first_global(raw: bytes) -> str | None:
    """The first class or function the pickle names, found by parsing its opcodes (nothing resolved)."""
    try:
        for op, arg, _ in pickletools.genops(raw):
            if op.name == "GLOBAL":
                return arg.replace(" ", ".")
            if op.name == "STACK_GLOBAL":
                return None
    except Exception:  # noqa: BLE001 -- not a pickle (or cut before its first global): not this format
        return None
    return None


def sniff(path: str | Path) -> ReleasedIMG2TEXT | None:
    """The released model in `path`, or None when the file is not one (not a torch zip archive whose
    pickle starts with i2t_model.IMG2TEXT). CirlabError when it is one but holds anything else."""
    path = Path(path)
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            entry = _pickle_entry(archive)
            if entry is None:
                return None
            with archive.open(entry) as fh:
                head = fh.read(256)  # the root object's class comes first; a big checkpoint is not read
            if _first_global(head) != "i2t_model.IMG2TEXT":
                return None
            return _read(archive, entry, archive.read(entry), path)
    except (OSError, zipfile.BadZipFile) as err:
        raise CirlabError(f"{path}: cannot read {WHAT}: {err}") from err


def _read(archive: zipfile.ZipFile, entry: str, raw: bytes, path: Path) -> ReleasedIMG2TEXT:
    prefix = entry[: -len("data.pkl")]
    byteorder = prefix + "byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
        raise CirlabError(f"{path}: a big-endian archive; only little-endian files are read")
    try:
        root = _Unpickler(raw, archive, prefix).load()
    except _Refused as err:
        raise CirlabError(
            f"{path} refused: {WHAT} holds only the authors' modules, torch.nn layers and tensors, but {err}. "
            "Nothing of the file was run; use the authors' released file."
        ) from None
    except (pickle.UnpicklingError, RuntimeError, ValueError, TypeError, EOFError) as err:
        raise CirlabError(f"{path} is not a readable {WHAT} ({type(err).__name__}: {err})") from None
    if type(root) is not _STAND_INS["i2t_model.IMG2TEXT"]:
        raise CirlabError(f"{path}: the pickle does not hold an i2t_model.IMG2TEXT")
    state: dict[str, torch.Tensor] = {}
    try:
        _collect(root, "", state, path)
    except RecursionError:
        raise CirlabError(f"{path}: its modules nest without end (a module inside itself)") from None
    settings = {k: root.state[k] for k in SETTINGS if isinstance(root.state.get(k), int | float)}
    return ReleasedIMG2TEXT(state, settings, path)


def _collect(module: _Module, prefix: str, out: dict, path: Path) -> None:
    """state_dict() of a stand-in tree: parameters, persistent buffers, then the submodules, in order."""
    state = getattr(module, "state", None)
    if not isinstance(state, dict):
        raise CirlabError(f"{path}: module {prefix or '<root>'} was pickled without its attributes")
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, value in _items(state, group, path):
            if value is None or (group == "_buffers" and name in skip):
                continue
            if type(value) is not torch.Tensor:
                raise CirlabError(f"{path}: {prefix}{name} is a {type(value).__name__}, not a tensor")
            out[prefix + name] = value.detach()  # nothing a pickled BUILD may have set on it comes along
    for name, child in _items(state, "_modules", path):
        if child is None:
            continue
        if not isinstance(child, _Module):
            raise CirlabError(f"{path}: submodule {prefix}{name} is a {type(child).__name__}")
        _collect(child, f"{prefix}{name}.", out, path)


def _items(state: dict, group: str, path: Path):
    found = state.get(group) or {}
    if not isinstance(found, dict):
        raise CirlabError(f"{path}: a module's {group} is a {type(found).__name__}, not a mapping")
    return found.items()


def read_released_img2text(path: str | Path) -> dict[str, torch.Tensor]:
    """{state-dict name: tensor} of the authors' released model file (never plain torch.load)."""
    path = Path(path)
    if not path.is_file():
        raise CirlabError(f"{path}: no such file ({WHAT})")
    released = sniff(path)
    if released is None:
        raise CirlabError(
            f"{path} is not {WHAT}: expected a torch zip archive whose pickle holds i2t_model.IMG2TEXT "
            "(files from torch.save before PyTorch 1.6, not zip archives, are not read)"
        )
    return released.state


def released_layout(expect: dict[str, Any] | None = None) -> Layout:
    """The released file at `method.<stage>.checkpoint`, recognised by content; refused when its recorded
    settings (num_k, topk, epsilon, temperature, hy_regLoss) differ from `expect` (the run's)."""
    return Layout(
        WHAT,
        lambda obj: isinstance(obj, ReleasedIMG2TEXT),
        lambda obj: obj.checked(expect or {}),
        sniff=sniff,
    )


IMG2TEXT_FILE = SavedFile(
    "IMG2TEXT",
    SAME_NAMES,
    "FTI4CIR IMG2TEXT state dict {'IMG2TEXT': ...} (cirlab's export of the network, the released "
    "model's tensors under their own names)",
    marks=("templates", "local_atte_fc.0.weight"),
)
