"""Combiner formula, the contrastive loss on a hand-computed case, and the CLIP4Cir pads."""

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cirlab.data.transforms import SquarePad, TargetPad, build_transform
from cirlab.methods.combiner import Combiner
from cirlab.methods.losses import batch_contrastive


def test_combiner_shapes_lambda_and_formula():
    torch.manual_seed(0)
    comb = Combiner(8).eval()
    assert comb.text_projection_layer.out_features == 32 and comb.combiner_layer.out_features == 64
    img, txt = torch.randn(5, 8), torch.randn(5, 8)
    out, lam = comb.combine(img, txt, return_lambda=True)
    assert out.shape == (5, 8) and lam.shape == (5, 1)
    assert ((lam > 0) & (lam < 1)).all()
    assert torch.allclose(out.norm(dim=-1), torch.ones(5))
    # the formula, recomputed by hand from the layers
    t = F.relu(comb.text_projection_layer(txt))
    i = F.relu(comb.image_projection_layer(img))
    c = torch.cat([t, i], -1)
    v = comb.output_layer(F.relu(comb.combiner_layer(c)))
    lam2 = torch.sigmoid(comb.dynamic_scalar[3](F.relu(comb.dynamic_scalar[0](c))))
    assert torch.allclose(out, F.normalize(v + lam2 * txt + (1 - lam2) * img, dim=-1), atol=1e-6)
    # 2 projections + combiner layer + output layer + 2 in the scalar branch (as the reference's combiner.py)
    assert sum(isinstance(m, torch.nn.Linear) for m in comb.modules()) == 6


def test_batch_contrastive_3x3_hand_computed():
    q = torch.eye(3)
    t = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 0, 0]])
    # logits = 100 * cos: row0 [100, 0, 100], row1 [0, 100, 0], row2 [0, 0, 0]
    expected = (-math.log(1 / 2) + -math.log(math.exp(100) / (math.exp(100) + 2)) + -math.log(1 / 3)) / 3
    assert batch_contrastive(q, t, 100.0).item() == pytest.approx(expected, rel=1e-5)


def test_squarepad_pixels():
    img = Image.new("RGB", (10, 4), (255, 255, 255))
    out = SquarePad()(img)
    assert out.size == (10, 10)  # vp = int((10 - 4) / 2) = 3 on top and bottom
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((0, 3)) == (255, 255, 255)
    assert out.getpixel((0, 6)) == (255, 255, 255) and out.getpixel((0, 7)) == (0, 0, 0)


def test_targetpad_ratio_and_untouched_images():
    wide = Image.new("RGB", (400, 200), (255, 255, 255))
    out = TargetPad(1.25)(wide)
    assert out.size == (400, 320)  # docs/methods/clip4cir.md#preprocessing example: s = 320, vp = 60
    assert out.getpixel((0, 59)) == (0, 0, 0) and out.getpixel((0, 60)) == (255, 255, 255)
    near_square = Image.new("RGB", (110, 100))
    assert TargetPad(1.25)(near_square).size == (110, 100)


@pytest.mark.parametrize("mode", ["clip", "squarepad", "targetpad"])
def test_transform_output_size(mode):
    t = build_transform(mode, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert t(Image.new("RGB", (90, 30))).shape == (3, 32, 32)


def test_gather_is_a_no_op_without_ddp():
    q, t = torch.randn(4, 8), torch.randn(4, 8)
    assert batch_contrastive(q, t, 100.0, gather=True) == batch_contrastive(q, t, 100.0)
