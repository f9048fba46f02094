"""One interface over image/text encoders, so methods never touch a model family directly."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import torch
from torch import nn


def as_json_data(config):
    """A config as JSON data (dicts, lists, strings, numbers): a copy that hashes and serialises the same
    whether Hydra passed an OmegaConf node or a dict, and that BlipConfig(**...) takes."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=True)
    return json.loads(json.dumps(config))


class Backbone(nn.Module):
    """Image and text towers into one embedding space (outputs are NOT normalised).

    Subclasses set `embed_dim`, `image_size`, `preprocess` (PIL -> tensor, the model's own
    normalisation), and implement the encoders and `tokenize`.
    """

    embed_dim: int
    image_size: int
    preprocess: Callable
    name: str = "backbone"

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode_text_with_pseudo_tokens(
        self, tokens: torch.Tensor, pseudo: torch.Tensor, placeholder: str = "$", fill: str = "first"
    ) -> torch.Tensor:
        """`encode_text` with token embeddings at `placeholder` positions replaced by pseudo tokens:
        `pseudo` [B, D] at each row's first (`fill="first"`: SEARLE, Pic2Word) or every (`"all"`:
        LinCIR) placeholder; [B, K, D] at the row's first K placeholders in order (FTI4CIR). Not
        normalised."""
        raise NotImplementedError(f"backbone {self.name!r} does not support pseudo-token text encoding")

    @property
    def patch_dim(self) -> int:
        """Width of `encode_image_with_patches`' local features."""
        raise NotImplementedError(f"backbone {self.name!r} gives no patch features")

    def encode_image_with_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(`encode_image(images)` [B, E], the image tower's local features [B, T, W]) from one forward:
        what FTI4CIR's attribute tokens are read from. Not normalised."""
        raise NotImplementedError(f"backbone {self.name!r} gives no patch features")

    def image_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def text_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.encode_text(self.tokenize(texts).to(self.device))

    def fingerprint(self) -> str:
        """Hash of the weights: keys the feature cache, so changed weights never reuse stale features."""
        h = hashlib.sha1(self.name.encode())
        for key, tensor in sorted(self.state_dict().items()):
            h.update(key.encode())
            t = tensor.detach().cpu().contiguous()
            h.update(str(tuple(t.shape)).encode())
            h.update(t.float().numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
        return h.hexdigest()[:16]
