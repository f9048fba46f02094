"""FTI4CIR's IMG2TEXT: the authors' names and shapes, the per-image choice of attribute slots (threshold,
clipping to [1, topk], order), and the losses, on hand-checked values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cirlab.errors import CirlabError
from cirlab.methods.fti4cir_net import IMG2TEXT, orthogonality_loss, regularisation_loss, select_salient
from cirlab.methods.searle_phi import distillation_loss


def test_vit_l14_names_shapes_and_count():
    with torch.device("meta"):
        net = IMG2TEXT(768, 1024, 768)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert sum(v.numel() for v in net.parameters()) == 54_327_552  # the spec's count for the release
    assert list(shapes)[:2] == ["templates", "phi_s.layers.0.weight"]  # the reference's order
    assert shapes["templates"] == (1, 24, 1024)
    layer = "transformer.layers.2."
    assert shapes[layer + "attn.to_queries.weight"] == (1024, 1024)
    assert shapes[layer + "attn.to_keys_values.weight"] == (2048, 1024)
    assert shapes[layer + "attn.project.bias"] == (1024,)
    assert shapes[layer + "mlp.fc1.weight"] == (2048, 1024) and shapes[layer + "mlp.fc2.weight"] == (
        1024,
        2048,
    )
    assert shapes[layer + "norm1.weight"] == shapes[layer + "norm2.bias"] == (1024,)
    assert "transformer.layers.3.norm1.weight" not in shapes
    assert not any(k.endswith(("to_queries.bias", "to_keys_values.bias")) for k in shapes)
    assert shapes["local_atte_fc.0.weight"] == (768, 1024)
    assert shapes["phi_s.layers.3.weight"] == shapes["phi_a.layers.3.weight"] == (3072, 3072)
    assert shapes["phi_a.layers.6.weight"] == (768, 3072)
    assert isinstance(net.local_atte_fc[1], torch.nn.Sigmoid)
    assert net.phi_s.layers[2].p == net.phi_a.layers[5].p == 0.5


def test_templates_start_at_std_one():
    torch.manual_seed(0)
    assert IMG2TEXT(8, 64, 8, num_k=24).templates.std().item() == pytest.approx(1.0, abs=0.06)


def test_bad_sizes_are_refused():
    with pytest.raises(CirlabError, match="global_dim=8 must equal token_dim=6"):
        IMG2TEXT(8, 16, 6)
    with pytest.raises(CirlabError, match="topk=5 must be in 1..num_k=4"):
        IMG2TEXT(8, 16, 8, num_k=4, topk=5)


def latent_of(*weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent features whose relevance to g = e0 is exactly `weights` (softmax of their logs), and whose
    other coordinates name the slot (one-hot), so the chosen slots can be read back."""
    k = len(weights[0])
    latent = torch.cat([torch.tensor(weights).log()[..., None], torch.eye(k).expand(len(weights), k, k)], -1)
    g = torch.zeros(len(weights), k + 1)
    g[:, 0] = 1
    return latent, g


def slots(local: torch.Tensor) -> list[list[int]]:
    return local[..., 1:].argmax(-1).tolist()


def test_selection_threshold_and_order_per_row():
    # row 0: 3 slots over 0.08 (1, 3, 0) -> in slot order 0, 1, 3, then the next by weight (4);
    # row 1: only slot 2 -> r = 1, then 4, 3, 0 by descending weight
    latent, g = latent_of([0.1, 0.5, 0.04, 0.3, 0.06], [0.02, 0.01, 0.9, 0.03, 0.04])
    local, r = select_salient(latent, g, topk=4, epsilon=0.08)
    assert r.tolist() == [3, 1] and r.dtype == torch.long
    assert slots(local) == [[0, 1, 3, 4], [2, 4, 3, 0]]
    assert torch.allclose(local.norm(dim=-1), torch.ones(2, 4))
    assert torch.allclose(local[0, 2], F.normalize(latent[0, 3], dim=-1))


def test_selection_clips_r_to_one_and_topk():
    latent, g = latent_of([0.1, 0.5, 0.04, 0.3, 0.06])
    local, r = select_salient(latent, g, topk=2, epsilon=0.05)  # 4 slots over 0.05, topk 2
    assert r.tolist() == [2] and slots(local) == [[1, 3]]
    latent, g = latent_of([0.22, 0.2, 0.19, 0.21, 0.18])
    local, r = select_salient(latent, g, topk=3, epsilon=0.25)  # none over 0.25: still one token
    assert r.tolist() == [1] and slots(local) == [[0, 3, 1]]


def test_forward_maps_raw_global_and_normalised_local():
    torch.manual_seed(0)
    net = IMG2TEXT(8, 12, 8, num_k=5, topk=3, n_layers=2).eval()
    g, patches = torch.randn(4, 8) * torch.tensor([[0.1], [1], [5], [50]]), torch.randn(4, 7, 12)
    out = net(g, patches)
    local, r = select_salient(net.latent(patches), g, 3, 0.05)
    assert torch.equal(out.r, r) and torch.allclose(out.local, local)
    assert out.r.tolist()[0] == 3 and out.r.tolist()[-1] == 1  # flat relevance: all; peaked: one
    assert torch.allclose(out.subject, net.phi_s(g)) and torch.allclose(out.attributes, net.phi_a(local))
    assert out.attributes.shape == (4, 3, 8)
    latent = net.latent(patches)
    assert ((latent > 0) & (latent < 1)).all() and latent.shape == (4, 5, 8)
    patches[0, 3] = torch.randn(12)  # self-attention over [templates; patches]: every slot sees every patch
    moved = (net.latent(patches) - latent).abs().amax(dim=(1, 2))
    assert (moved[0] > 1e-3).item() and (moved[1:] == 0).all()


def test_orthogonality_loss():
    assert orthogonality_loss(torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])).item() == 0  # normalised first
    same = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert orthogonality_loss(same).item() == pytest.approx(0.5)  # the off-diagonal 1s: 2 of 4 entries
    pair = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [1.0, 0.0]]])
    assert orthogonality_loss(pair).item() == pytest.approx(2 * 0.6**2 / 8)


def test_regularisation_loss_sums_three_cosine_terms_to_a_fixed_target():
    both = torch.tensor([[1.0, 0.0]], requires_grad=True)
    subj, attr, pw = (
        torch.tensor([[x, y]], requires_grad=True) for x, y in ((2.0, 0.0), (0.0, 1.0), (-1.0, 0.0))
    )
    loss = regularisation_loss(subj, attr, pw, both)
    assert loss.item() == pytest.approx(0 + 1 + 2)
    loss.backward()
    assert both.grad is None and attr.grad is not None


def test_contrastive_term_is_searle_distillation_at_0_2():
    eye = torch.eye(2)  # each row's positive at cos 1, two others at cos 0: log(1 + 2 e^{-1/0.2})
    assert distillation_loss(eye, 3 * eye, 0.2).item() == pytest.approx(
        math.log(1 + 2 * math.exp(-5)), rel=1e-5
    )
