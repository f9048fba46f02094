"""The CLIP4Cir Combiner (ABaldrati/CLIP4Cir:src/combiner.py), also used by BLIP4CIR+Bi and MLCL.

Parameter names are the reference's (`text_projection_layer`, `image_projection_layer`, `combiner_layer`,
`output_layer`, `dynamic_scalar.{0,3}`), so the authors' `combiner*.pt` files load as they are."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.weight_map import SAME_NAMES
from cirlab.weights import Layout, SavedFile, cirlab_stage, strip_prefix


class Combiner(nn.Module):
    """out = normalize(v + lambda * x_t + (1 - lambda) * x_i) with a learned per-sample scalar lambda.

    Inputs are the raw (un-normalised) backbone features; dropout 0.5 at four places; six Linear
    layers; defaults P = 4 * D, H = 8 * D as the reference writes 640*4 and 640*8 for RN50x4.
    """

    def __init__(
        self,
        feature_dim: int,
        projection_dim: int | None = None,
        hidden_dim: int | None = None,
        dropout: float = 0.5,
    ):
        super().__init__()
        p = projection_dim or 4 * feature_dim
        h = hidden_dim or 8 * feature_dim
        self.text_projection_layer = nn.Linear(feature_dim, p)
        self.image_projection_layer = nn.Linear(feature_dim, p)
        self.combiner_layer = nn.Linear(2 * p, h)
        self.output_layer = nn.Linear(h, feature_dim)
        self.dynamic_scalar = nn.Sequential(
            nn.Linear(2 * p, h), nn.ReLU(), nn.Dropout(dropout), nn.Linear(h, 1), nn.Sigmoid()
        )
        self.dropout1, self.dropout2, self.dropout3 = (
            nn.Dropout(dropout),
            nn.Dropout(dropout),
            nn.Dropout(dropout),
        )

    # The steps, in the order their dropout masks are drawn; MLCL reuses them for its levels.
    def project_text(self, text: torch.Tensor) -> torch.Tensor:
        return self.dropout1(F.relu(self.text_projection_layer(text)))

    def project_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.dropout2(F.relu(self.image_projection_layer(image)))

    def hidden(self, projected: torch.Tensor) -> torch.Tensor:
        """The hidden layer on concat(text projection, image projection)."""
        return self.dropout3(F.relu(self.combiner_layer(projected)))

    def mix(self, hidden, lam, image, text) -> torch.Tensor:
        """Un-normalised v + lambda * x_t + (1 - lambda) * x_i; lam = dynamic_scalar(projected)."""
        return self.output_layer(hidden) + lam * text + (1 - lam) * image

    def combine(self, image: torch.Tensor, text: torch.Tensor, return_lambda: bool = False):
        projected = torch.cat([self.project_text(text), self.project_image(image)], dim=-1)
        hidden = self.hidden(projected)
        lam = self.dynamic_scalar(projected)
        out = F.normalize(self.mix(hidden, lam, image, text), dim=-1)
        return (out, lam) if return_lambda else out

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.combine(image, text)


# The reference's `combiner.pt`: its names are the Combiner's own.
COMBINER_FILE = SavedFile(
    "Combiner",
    SAME_NAMES,
    "CLIP4Cir / BLIP4CIR+Bi combiner file {'epoch': int, 'Combiner': state_dict}",
)


def combiner_layouts() -> list[Layout]:
    """What `method.combiner.checkpoint` accepts."""
    return [COMBINER_FILE.layout(), cirlab_stage("combiner.", "its combiner.* weights")]


class CombinerStage:
    """Mixin of the stage-II modules whose own weights are one `Combiner` in `self.combiner`."""

    def stage_weights(self) -> nn.Module:
        return self.combiner

    def checkpoint_layouts(self) -> list[Layout]:
        return combiner_layouts()

    @classmethod
    def reference_files(cls, state: dict, epoch: int) -> dict:
        return {"combiner.pt": COMBINER_FILE.write(strip_prefix(state, "combiner."), epoch)}
