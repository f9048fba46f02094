"""Lightning checkpoints of cirlab's stages: written atomically beside their final name, read as data
(weights_only=True), and loaded back into a stage's module with a check of who wrote them. Shared by
training (cirlab.pipeline) and inference (cirlab.load), so the inference side never imports the
training orchestrator."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cirlab.errors import CirlabError
from cirlab.io import save_torch
from cirlab.weights import load_strict


class SafeCheckpointIO(TorchCheckpointIO):
    """Checkpoints load with weights_only=True: a checkpoint file can never run code.
    An unreadable one (truncated by a full disk, copied half-way) stops with what to delete: the
    run folder's other stages are kept.
    Saved like every cirlab file (cirlab.io.atomic_path): a temp file beside the checkpoint, fsync,
    rename, fsync of the folder. Lightning's own atomic save stages the file in $TMPDIR and moves it:
    with a node-local /tmp and the run on NFS/Lustre that is a copy a kill can leave half-written, and a
    full /tmp stops checkpointing although the run folder has room."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:  # Lightning's refusal (a TypeError)
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_torch(path, checkpoint)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        try:
            return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CirlabError(f"cannot load checkpoint {path}: {first}{restart_hint(Path(path))}") from err


def restart_hint(ckpt: Path) -> str:
    """How to go on past an unreadable checkpoint of stage folder `stages/<stage>/checkpoints/`."""
    if ckpt.parent.name != "checkpoints":
        return ""
    stage = ckpt.parent.parent
    if ckpt.name == "last.ckpt":
        return (
            f"\nThe file is damaged: delete {ckpt} and resume again to restart stage {stage.name} "
            "from its first epoch (finished stages are kept)."
        )
    return (
        f"\nThe file is damaged: delete {stage / 'done.json'} and {ckpt.parent} and resume again to "
        f"train stage {stage.name} anew (the other stages are kept)."
    )


def load_module_weights(module: torch.nn.Module, path: Path) -> None:
    ckpt = SafeCheckpointIO().load_checkpoint(path)
    stamp = ckpt.get("cirlab", {})
    mine = {"method": type(module).__name__, "backbone": module.backbone.name}
    if stamp and stamp != mine:
        raise CirlabError(
            f"checkpoint {path} was written by method {stamp['method']} with backbone "
            f"{stamp['backbone']!r}, but this run is {mine['method']} with backbone {mine['backbone']!r}"
        )
    if not isinstance(ckpt.get("state_dict"), dict):
        raise CirlabError(f"checkpoint {path} holds no state_dict: is it a Lightning checkpoint of cirlab?")
    load_strict(module, ckpt["state_dict"], f"checkpoint {path}")  # names the keys that do not fit


def load_backbone_weights(backbone: torch.nn.Module, path: Path, stage: str) -> None:
    """The backbone as stage `stage` left it: the `backbone.*` tensors of its checkpoint."""
    state = SafeCheckpointIO().load_checkpoint(path).get("state_dict")
    if not isinstance(state, dict):
        raise CirlabError(
            f"checkpoint {path} (stage {stage}) holds no state_dict: is it a cirlab checkpoint?"
        )
    load_strict(
        backbone,
        {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")},
        f"checkpoint {path} (the backbone stage {stage} trained)",
    )
