"""FTI4CIR's image-to-text network `IMG2TEXT` (Lin et al., SIGIR 2024; docs/methods/fti4cir.md): one
subject pseudo-word token from the global image feature and up to `topk` attribute tokens from the patch
tokens, with the two losses that need no text tower.

The names and shapes of the parameters are the authors' (src/i2t_model.py, src/MHTransformer.py), so their
released model loads strictly (cirlab.methods.fti4cir_release). The image-text contrastive term L_con is
SEARLE's distillation loss (cirlab.methods.searle_phi.distillation_loss) at temperature 0.2: the same
symmetric NT-Xent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.errors import CirlabError
from cirlab.methods.searle_phi import Phi, cosine_loss


@dataclass
class Selection:
    """What one forward gives for a batch of B images."""

    subject: torch.Tensor  # [B, token_dim]: phi_s of the raw global feature
    attributes: torch.Tensor  # [B, topk, token_dim]: phi_a of `local`; only the first r[b] go into prompts
    r: torch.Tensor  # [B] long, 1..topk: how many attribute tokens image b has
    local: torch.Tensor  # [B, topk, token_dim]: the L2-normalised salient local features (for L_orth)


class Attention(nn.Module):
    """Multi-head attention without masks; K and V come from one projection, stacked (K first)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.scale = (dim // n_heads) ** -0.5
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, 2 * dim, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.n_heads
        q = self.to_queries(x).reshape(b, n, h, c // h).transpose(1, 2)
        k, v = self.to_keys_values(x).reshape(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.project(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class Layer(nn.Module):
    """Pre-norm self-attention block (the reference's dropouts are all 0, so there are none here)."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim: int, n_layers: int, n_heads: int, mlp_ratio: float):
        super().__init__()
        self.layers = nn.ModuleList(Layer(dim, n_heads, mlp_ratio) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def select_salient(
    latent: torch.Tensor, global_features: torch.Tensor, topk: int, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, r) from the latent local features [B, K, E] and the raw global features [B, E].

    Relevance w = softmax over the K slots of <latent, g>; r = #(w > epsilon) clipped to [1, topk]. The
    slots kept: the r most relevant in ascending slot order (a stable attribute order in the prompt), then
    the next topk - r by descending w. Rows are L2-normalised."""
    w = torch.softmax(torch.einsum("bke,be->bk", latent, global_features), dim=1)
    order = torch.argsort(w, dim=1, descending=True)[:, :topk]
    r = (w > epsilon).sum(dim=1).clamp(1, topk)
    position = torch.arange(topk, device=w.device).expand_as(order)
    # the first r positions sort by slot index (< K), the rest keep their place (keys K + position)
    key = torch.where(position < r[:, None], order, latent.shape[1] + position)
    order = order.gather(1, key.argsort(dim=1))
    chosen = latent.gather(1, order[..., None].expand(-1, -1, latent.shape[2]))
    return F.normalize(chosen, dim=-1), r


class IMG2TEXT(nn.Module):
    """Global feature -> subject token; patch tokens -> `num_k` latent attribute slots (learned queries
    through a self-attention transformer over [queries; patches], then Linear + Sigmoid) -> the `topk`
    most relevant -> attribute tokens. State-dict keys as the authors' IMG2TEXT."""

    def __init__(
        self,
        global_dim: int,
        patch_dim: int,
        token_dim: int,
        num_k: int = 24,
        topk: int = 12,
        epsilon: float = 0.05,
        n_layers: int = 3,
        n_heads: int = 1,
        mlp_ratio: float = 2.0,
        dropout: float = 0.5,
    ):
        super().__init__()
        if not 1 <= topk <= num_k:
            raise CirlabError(f"topk={topk} must be in 1..num_k={num_k}")
        if global_dim != token_dim:  # relevance is <latent slot, global feature>: one width
            raise CirlabError(f"global_dim={global_dim} must equal token_dim={token_dim}")
        if patch_dim % n_heads:
            raise CirlabError(f"patch_dim={patch_dim} is not a multiple of n_heads={n_heads}")
        self.num_k, self.topk, self.epsilon = num_k, topk, epsilon
        # created in the reference's order (same seed, same initial weights)
        self.phi_s = Phi(global_dim, 4 * global_dim, token_dim, dropout)
        self.phi_a = Phi(token_dim, 4 * token_dim, token_dim, dropout)
        self.local_atte_fc = nn.Sequential(nn.Linear(patch_dim, token_dim), nn.Sigmoid())
        self.transformer = Transformer(patch_dim, n_layers, n_heads, mlp_ratio)
        self.templates = nn.Parameter(torch.randn(1, num_k, patch_dim))  # std 1, as the reference

    def latent(self, patch_features: torch.Tensor) -> torch.Tensor:
        """[B, P, patch_dim] -> the latent local features [B, num_k, token_dim], in (0, 1)."""
        queries = self.templates.expand(len(patch_features), -1, -1).to(patch_features.dtype)
        out = self.transformer(torch.cat([queries, patch_features], dim=1))[:, : self.num_k]
        return self.local_atte_fc(out)

    def forward(self, global_features: torch.Tensor, patch_features: torch.Tensor) -> Selection:
        local, r = select_salient(self.latent(patch_features), global_features, self.topk, self.epsilon)
        return Selection(self.phi_s(global_features), self.phi_a(local), r, local)


def orthogonality_loss(local: torch.Tensor) -> torch.Tensor:
    """L_orth: MSE between each image's cosine matrix of its `topk` local features (all of them, not only
    the r used) and the identity."""
    local = F.normalize(local, dim=-1)
    gram = local @ local.transpose(1, 2)
    return F.mse_loss(gram, torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype).expand_as(gram))


def regularisation_loss(
    f_subj: torch.Tensor, f_attr: torch.Tensor, f_pw: torch.Tensor, f_both: torch.Tensor
) -> torch.Tensor:
    """L_reg: the three prompt features (pseudo subject, pseudo attributes, both pseudo) each pulled to the
    all-words caption feature `f_both`, a fixed target: sum of the three mean(1 - cos)."""
    target = f_both.detach()
    return cosine_loss(f_subj, target) + cosine_loss(f_attr, target) + cosine_loss(f_pw, target)
