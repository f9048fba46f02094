"""`backbone=tiny`: a small open_clip CLIP pretrained on the synthetic captions on first use.

No pretrained weights can be downloaded in CI or here, so the default backbone is trained by
cirlab itself (CLIP InfoNCE on the synthetic benchmark's image captions) and cached by a hash of
(model config, pretraining config): later runs load it in a second.
"""

from __future__ import annotations

import torch

from cirlab.backbones.openclip import OpenCLIPBackbone, load_backbone_weights
from cirlab.backbones.pretrain import load_or_pretrain, plain


def pretrained_tiny(
    cache_dir: str,
    model_cfg: dict,
    pretrain: dict,
    preprocess: str = "clip",
    checkpoint: str | None = None,
    name: str = "tiny",
) -> OpenCLIPBackbone:
    model_cfg = plain(model_cfg)  # plain dict, also from an OmegaConf node
    pretrain = plain(pretrain)
    torch.manual_seed(pretrain["seed"])  # the same initial weights whatever ran before
    backbone = OpenCLIPBackbone(model_cfg=model_cfg, preprocess=preprocess, name=name)
    if checkpoint:
        load_backbone_weights(backbone, checkpoint)
        return backbone
    return load_or_pretrain(backbone, cache_dir, model_cfg, pretrain, name)
