"""MLCL: multi-level combiner shapes, the learnable loss weight, mCCL/SSCL values, SSCL positives,
and (slow) the full two-stage method against the zero-shot sum baseline on the synthetic benchmark."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import results, run_cli
from torch import nn

from cirlab.backbones.base import Backbone
from cirlab.data.augmented import AugmentedReferences
from cirlab.data.datamodule import EpochSampler, TripletDataset
from cirlab.data.records import CIRQuery
from cirlab.methods.mlcl import MLCLCombiner, MultiLevelCombiner, mccl_loss, sscl_loss


class FakeBackbone(Backbone):
    embed_dim, image_size, name = 8, 32, "fake"

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 8)

    def encode_texts(self, texts):
        g = torch.Generator().manual_seed(len(texts))
        return torch.randn(len(texts), 8, generator=g)


def test_levels_shapes_and_query_is_unit_norm():
    torch.manual_seed(0)
    mlc = MultiLevelCombiner(8).eval()
    image, text = torch.randn(5, 8), torch.randn(5, 8)
    levels = mlc.fuse(image, text)
    assert levels["high"].shape == levels["mid"].shape == levels["low"].shape == (5, 8)
    assert levels["raw"].shape == (5, 2 * 32)  # concat of the two 4*D projections
    torch.testing.assert_close(levels["low"], F.normalize(image + text, dim=-1))
    q = mlc.query(levels)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(5))
    # inference weighting: (2 - w) on the high level, w on the mid level, 1 on the low level
    w = 2 / 3
    expected = F.normalize(
        (2 - w) * F.normalize(levels["high"], dim=-1)
        + w * F.normalize(levels["mid"], dim=-1)
        + levels["low"],
        dim=-1,
    )
    torch.testing.assert_close(q, expected)
    torch.testing.assert_close(mlc.query(levels, multi_level=False), F.normalize(levels["high"], dim=-1))


def test_loss_weight_starts_at_two_thirds_with_its_own_lr():
    module = MLCLCombiner(FakeBackbone(), loss_weight_lr=1e-3, optimizer=partial(torch.optim.Adam, lr=5e-4))
    assert module.mlc.loss_weight.item() == pytest.approx(math.log(0.5))
    assert module.mlc.w.item() == pytest.approx(2 / 3)
    assert module.logit_scale.exp().item() == pytest.approx(100.0)
    assert module.logit_scale_sl.exp().item() == pytest.approx(100.0)
    groups = module.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [5e-4, 1e-3]
    assert groups[1]["params"] == [module.mlc.loss_weight]
    main = {id(p) for p in groups[0]["params"]}
    assert id(module.logit_scale) in main and id(module.logit_scale_sl) in main
    assert not any(id(p) in main for p in module.backbone.parameters())


def test_mccl_and_sscl_on_a_fixed_2x2_batch_match_hand_computation():
    s, w = 2.0, 2 / 3
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    levels = {
        "high": torch.tensor([[3.0, 0.0], [0.0, 0.5]]),  # normalised: identity
        "mid": torch.tensor([[1.0, 1.0], [0.0, 2.0]]),  # row 0 equidistant, row 1 on target
        "low": torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
    }  # swapped: both rows wrong
    out = mccl_loss(levels, target, torch.tensor(s), torch.tensor(w))
    ce_ok = math.log(1 + math.exp(-s))  # -s + log(e^s + e^0)
    ce_high = ce_ok
    ce_mid = (math.log(2) + ce_ok) / 2
    ce_low = math.log(1 + math.exp(s))  # -0 + log(e^0 + e^s)
    assert out["high"].item() == pytest.approx(ce_high, rel=1e-5)
    assert out["mid"].item() == pytest.approx(ce_mid, rel=1e-5)
    assert out["low"].item() == pytest.approx(ce_low, rel=1e-5)
    assert out["mccl"].item() == pytest.approx(w * ce_high + (2 - w) * ce_mid + ce_low, rel=1e-5)

    clean = {"raw": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "high": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    aug = {"raw": torch.tensor([[2.0, 0.0], [1.0, 1.0]]), "high": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}
    sl = sscl_loss(clean, aug, torch.tensor(s))
    c = math.sqrt(0.5)
    ce_raw = (math.log(1 + math.exp(s * c - s)) + (-s * c + math.log(1 + math.exp(s * c)))) / 2
    assert sl["raw"].item() == pytest.approx(ce_raw, rel=1e-5)
    assert sl["high"].item() == pytest.approx(ce_low, rel=1e-5)
    assert sl["sscl"].item() == pytest.approx(ce_raw + ce_low, rel=1e-5)


def test_sscl_positive_is_the_same_querys_other_view():
    torch.manual_seed(0)
    clean = {"raw": torch.randn(6, 16), "high": torch.randn(6, 8)}
    aug = {k: v + 0.05 * torch.randn_like(v) for k, v in clean.items()}
    scale = torch.tensor(10.0)
    matched = sscl_loss(clean, aug, scale)["sscl"]
    perm = torch.roll(torch.arange(6), 1)
    shuffled = sscl_loss(clean, {k: v[perm] for k, v in aug.items()}, scale)["sscl"]
    assert matched.item() < 0.1 < shuffled.item()
    # a rolled batch is right again when the rows are read with the rolled labels
    logits = scale * F.normalize(clean["high"], dim=-1) @ F.normalize(aug["high"][perm], dim=-1).T
    assert logits.argmax(dim=1).tolist() == torch.argsort(perm).tolist()


def test_augmented_reference_view_draws_a_view_of_the_same_reference():
    class Source:
        def train_text(self, query, rng):
            return query.captions[0]

    queries = [CIRQuery(str(i), ref, ("t",), (f"tgt{i}",)) for i, ref in enumerate("aba")]
    view = AugmentedReferences(FakeBackbone(), views=2, seed=0, cache_dir=None)
    view.features = {
        "a": torch.tensor([[1.0, 1.0], [2.0, 2.0]]),
        "b": torch.tensor([[-1.0, -1.0], [-2.0, -2.0]]),
    }
    ds = TripletDataset(
        queries, Source(), lambda name: torch.zeros(2), 0, reference_views={"reference_aug": view}
    )
    sampler = EpochSampler(ds, seed=0)
    drawn = set()
    for e in range(8):
        sampler.set_epoch(e)  # as Lightning does at every epoch start
        assert ds.epoch == e and sorted(sampler) == [0, 1, 2]
        for i in range(3):
            item = ds[i]
            ref = queries[i].reference
            assert any(torch.equal(item["reference_aug"], v) for v in view.features[ref])
            drawn.add((ref, float(item["reference_aug"][0])))
            assert ds[i]["reference_aug"].tolist() == item["reference_aug"].tolist()  # deterministic
    assert drawn == {("a", 1.0), ("a", 2.0), ("b", -1.0), ("b", -2.0)}  # both views get sampled


def test_sscl_without_augmented_views_says_what_to_do():
    from cirlab.errors import CirlabError

    module = MLCLCombiner(FakeBackbone())
    with pytest.raises(CirlabError, match="sscl=false"):
        module.compute_loss(torch.randn(2, 8), None, ["a", "b"], torch.randn(2, 8))
    off = MLCLCombiner(FakeBackbone(), sscl=False)
    assert off.reference_views == {} and "reference_aug" in module.reference_views
    assert torch.isfinite(off.compute_loss(torch.randn(2, 8), None, ["a", "b"], torch.randn(2, 8))["loss"])


@pytest.mark.slow
def test_mlcl_beats_zeroshot_sum_on_synthetic(tmp_path, shared_run):
    zs_dir, mlcl_dir = shared_run("+method=zeroshot", "method.fusion=sum"), tmp_path / "mlcl"
    run_cli(
        tmp_path,
        "+method=mlcl",
        "method.finetune.max_epochs=0",
        "method.combiner.max_epochs=4",
        run_dir=mlcl_dir,
    )
    zs = results(zs_dir)["metrics"]["test/recall_at_10"]
    res = results(mlcl_dir)
    mlcl = res["metrics"]["test/recall_at_10"]
    print(f"test R@10: zero-shot sum {zs:.2f}, MLCL {mlcl:.2f}")
    assert res["method"] == "mlcl" and list(res["stages"]) == ["finetune", "combiner"]
    assert mlcl > zs
