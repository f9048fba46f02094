"""Zero-shot baselines every CIR paper reports: no training, rank with the frozen backbone."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cirlab.errors import CirlabError
from cirlab.methods.retrieval_module import RetrievalModule

FUSIONS = ("image", "text", "sum")


class ZeroShot(RetrievalModule):
    """fusion=image: the reference image alone; text: the modification text alone;
    sum: normalize(f_img + f_txt) of raw features, CLIP4Cir's element_wise_sum."""

    frozen_image_encoder = True
    frozen_text_encoder = True

    def __init__(self, backbone, fusion: str = "sum", **kwargs):
        super().__init__(backbone, **kwargs)
        if fusion not in FUSIONS:
            raise CirlabError(f"unknown method.fusion={fusion!r}; choose one of {', '.join(FUSIONS)}")
        self.fusion = fusion

    def query_embedding(self, reference: torch.Tensor, texts: list[str]) -> torch.Tensor:
        if self.fusion == "image":
            return F.normalize(self.image_features(reference), dim=-1)
        if self.fusion == "text":
            return F.normalize(self.text_features(texts), dim=-1)
        return F.normalize(self.image_features(reference) + self.text_features(texts), dim=-1)
