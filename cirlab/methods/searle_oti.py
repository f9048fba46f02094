"""SEARLE's optimisation-based textual inversion (OTI, docs/methods/searle.md#oti): one pseudo token per image."""

from __future__ import annotations

import torch

from cirlab.methods.searle_phi import cosine_loss
from cirlab.methods.searle_text import SearleText


def oti(
    backbone, text: SearleText, features: torch.Tensor, cfg: dict, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Optimisation-based textual inversion of a batch of images (each its own token; the batch is only
    parallelism): AdamW, per step a random PALAVRA template (L_cos to the image) and a random phrase of
    one of the image's top-k concepts with '$' for its first occurrence (L_gpt to the plain phrase),
    loss (l_cos*L_cos + l_gpt*L_gpt)/(l_cos+l_gpt), EMA of the tokens. The phrase is drawn uniformly from
    all phrases of the image's usable top-k concepts, as the reference's pool. `cfg`: the settings of
    conf/method/searle_oti.yaml's `oti`. Returns (tokens, ema, losses)."""
    gen = generator or torch.Generator().manual_seed(int(cfg["seed"]))
    device = backbone.device
    feats = features.float().to(device)
    n = len(feats)
    concepts = text.concepts_of(feats, int(cfg["top_k"]))  # [n, k] bank rows, -1 = dropped
    bank = text.bank
    token = (
        (torch.randn(n, backbone.token_dim, generator=gen) * cfg["init_std"]).to(device).requires_grad_(True)
    )
    ema = token.detach().clone()
    opt = torch.optim.AdamW([token], lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    lc, lg = float(cfg["lambda_cos"]), float(cfg["lambda_gpt"])
    losses = []
    for _ in range(int(cfg["steps"])):
        t_idx = torch.randint(len(text.templates), (n,), generator=gen)
        p_idx = bank.sample(concepts, gen, pooled=True)
        f_a = backbone.encode_text_with_pseudo_tokens(text.templates[t_idx].to(device), token)
        loss = lc * cosine_loss(f_a, feats)
        if lg > 0:
            f_p = backbone.encode_text_with_pseudo_tokens(bank.tokens_first[p_idx].to(device), token)
            loss = loss + lg * cosine_loss(f_p, bank.features[p_idx].to(device))
        loss = loss / (lc + lg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            ema.mul_(cfg["ema_decay"]).add_(token.detach(), alpha=1 - cfg["ema_decay"])
        losses.append(loss.item())
    return token.detach().cpu(), ema.cpu(), losses
