"""Losses shared across methods (docs/methods/clip4cir.md#stage-i, docs/methods/crossmodal.md#losses)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn.functional as F


def batch_contrastive(
    query: torch.Tensor, target: torch.Tensor, scale: float | torch.Tensor = 100.0, gather: bool = False
) -> torch.Tensor:
    """CLIP4Cir's loss: cross-entropy of scale * normalize(q) @ normalize(t)^T against arange(B),
    one direction only (query -> target), scale fixed at 100 in the reference.

    gather=True (DDP): targets of every rank become negatives, gathered with gradients as open_clip
    does; the reference (one process) uses the local batch only, hence off by default."""
    labels = torch.arange(len(query), device=query.device)
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        target = torch.cat(dist_nn.all_gather(target.contiguous()))
        labels = labels + dist.get_rank() * len(query)
    logits = scale * F.normalize(query, dim=-1) @ F.normalize(target, dim=-1).T
    return F.cross_entropy(logits, labels)


def symmetric_infonce(image: torch.Tensor, text: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """CLIP's loss: mean of image->text and text->image cross-entropies."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    labels = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def cosine_margin(image: torch.Tensor, text: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """hxhhxx/Clip_crossmodal_retrieval's pairwise cosine loss ("CosineEmbeddingLoss"): on the full
    B x B cosine matrix S, matched pairs (diagonal) cost 0.5 * (1 - S), the others 0.5 * max(0, S - m);
    mean over all B*B entries (positives are not weighted separately); m = 0.1 in the reference."""
    sim = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    pos = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
    return torch.where(pos, 0.5 * (1 - sim), 0.5 * (sim - margin).clamp(min=0)).mean()
