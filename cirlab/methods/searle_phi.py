"""SEARLE's phi network and the losses that train it (docs/methods/searle.md#phi-training); OTI uses
`cosine_loss` too."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Phi(nn.Module):
    """The reference textual-inversion MLP (state-dict keys layers.0/3/6, as SEARLE's phi.py)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, dropout: float = 0.5):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def distillation_loss(v1: torch.Tensor, v2: torch.Tensor, temperature: float = 0.25) -> torch.Tensor:
    """Symmetric NT-Xent between OTI tokens v1 and predicted tokens v2 (docs/methods/searle.md#phi-training): numerator
    exp(cos(v1_i, v2_i)/t) for both rows of pair i, denominator the row sum over the other 2B-1."""
    z = F.normalize(torch.cat([v1, v2]), dim=-1)
    sim = z @ z.T / temperature
    n = len(v1)
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    pos = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, pos)


def cosine_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """CosineEmbeddingLoss(target=1) = mean(1 - cos)."""
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()
