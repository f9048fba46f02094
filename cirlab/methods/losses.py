"""Losses shared across methods (facts in ../shared/spec)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_contrastive(query: torch.Tensor, target: torch.Tensor, scale: float | torch.Tensor = 100.0) -> torch.Tensor:
    """CLIP4Cir's loss: cross-entropy of scale * normalize(q) @ normalize(t)^T against arange(B),
    one direction only (query -> target), scale fixed at 100 in the reference."""
    logits = scale * F.normalize(query, dim=-1) @ F.normalize(target, dim=-1).T
    return F.cross_entropy(logits, torch.arange(len(query), device=query.device))


def symmetric_infonce(image: torch.Tensor, text: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """CLIP's loss: mean of image->text and text->image cross-entropies."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    labels = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
