"""open_clip models behind the Backbone interface: a named model + pretrained tag, a local
checkpoint file, or a small config given inline (the tiny backbone)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from cirlab.backbones.base import Backbone
from cirlab.data.transforms import build_transform
from cirlab.errors import CirlabError
from cirlab.io import load_torch


class OpenCLIPBackbone(Backbone):
    def __init__(self, model_name: str | None = None, pretrained: str | None = None,
                 model_cfg: dict[str, Any] | None = None, checkpoint: str | None = None,
                 preprocess: str = "clip", target_ratio: float = 1.25, name: str | None = None):
        super().__init__()
        if model_cfg is not None:
            self.model = open_clip.model.CLIP(**model_cfg)
            self.tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
            mean, std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        else:
            if model_name not in open_clip.list_models():
                raise CirlabError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
            try:
                self.model = open_clip.create_model(model_name, pretrained=pretrained)
            except RuntimeError as err:
                raise CirlabError(
                    f"could not load pretrained weights {model_name}/{pretrained}: {err}\n"
                    "Weights download on first use (needs network) or give a local file with "
                    "backbone.pretrained=/path/to/weights.pt (or backbone.pretrained=null for random init).") from err
            self.tokenizer = open_clip.get_tokenizer(model_name)
            mean = getattr(self.model.visual, "image_mean", None) or OPENAI_DATASET_MEAN
            std = getattr(self.model.visual, "image_std", None) or OPENAI_DATASET_STD
        size = self.model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.embed_dim = int(self.model.text_projection.shape[-1]
                             if isinstance(self.model.text_projection, torch.Tensor)
                             else self.model.text_projection.out_features)
        self.preprocess_mode = preprocess
        self.preprocess = build_transform(preprocess, self.image_size, mean, std, target_ratio)
        self.name = name or model_name or "openclip"
        if checkpoint:
            load_backbone_weights(self, checkpoint)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def image_parameters(self):
        return list(self.model.visual.parameters())

    def text_parameters(self):
        visual = {id(p) for p in self.model.visual.parameters()}
        return [p for p in self.model.parameters() if id(p) not in visual]


def load_backbone_weights(backbone: Backbone, path: str | Path) -> None:
    """Load a cirlab backbone checkpoint ({'backbone': name, 'state_dict': ...}) or a raw state dict."""
    path = Path(path)
    if not path.is_file():
        raise CirlabError(f"backbone.checkpoint={path} does not exist")
    obj = load_torch(path)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if isinstance(obj, dict) and "backbone" in obj and obj["backbone"] != backbone.name:
        raise CirlabError(f"{path} holds weights of backbone {obj['backbone']!r}, but the config builds "
                          f"{backbone.name!r}. Pick the matching backbone=... or another checkpoint.")
    try:
        backbone.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise CirlabError(f"{path} does not fit backbone {backbone.name!r} (wrong shapes or keys): "
                          f"{detail[:300]}{'...' if len(detail) > 300 else ''}") from err


def backbone_checkpoint(backbone: Backbone) -> dict:
    return {"backbone": backbone.name, "state_dict": backbone.state_dict()}
