"""The CLIP4Cir Combiner (ABaldrati/CLIP4Cir:src/combiner.py), also used by BLIP4CIR+Bi and MLCL."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Combiner(nn.Module):
    """out = normalize(v + lambda * x_t + (1 - lambda) * x_i) with a learned per-sample scalar lambda.

    Inputs are the raw (un-normalised) backbone features; dropout 0.5 at four places; six Linear
    layers; defaults P = 4 * D, H = 8 * D as the reference writes 640*4 and 640*8 for RN50x4.
    """

    def __init__(self, feature_dim: int, projection_dim: int | None = None, hidden_dim: int | None = None,
                 dropout: float = 0.5):
        super().__init__()
        p = projection_dim or 4 * feature_dim
        h = hidden_dim or 8 * feature_dim
        self.text_projection = nn.Linear(feature_dim, p)
        self.image_projection = nn.Linear(feature_dim, p)
        self.combiner_layer = nn.Linear(2 * p, h)
        self.output_layer = nn.Linear(h, feature_dim)
        self.dynamic_scalar = nn.Sequential(nn.Linear(2 * p, h), nn.ReLU(), nn.Dropout(dropout),
                                            nn.Linear(h, 1), nn.Sigmoid())
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def combine(self, image: torch.Tensor, text: torch.Tensor, return_lambda: bool = False):
        t = self.dropout1(F.relu(self.text_projection(text)))
        i = self.dropout2(F.relu(self.image_projection(image)))
        c = torch.cat([t, i], dim=-1)
        v = self.output_layer(self.dropout3(F.relu(self.combiner_layer(c))))
        lam = self.dynamic_scalar(c)
        out = F.normalize(v + lam * text + (1 - lam) * image, dim=-1)
        return (out, lam) if return_lambda else out

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.combine(image, text)
