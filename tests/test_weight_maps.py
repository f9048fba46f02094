"""Each foreign format is one WeightMap read both ways: export is the inverse of import, shown on the
authors' own files (tests/golden/), and a map that would not read its export back is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT

from cirlab.backbones.blip import TUNED_BLIP
from cirlab.backbones.openclip import TUNED_CLIP
from cirlab.methods.combiner import COMBINER_FILE
from cirlab.methods.mlcl import MLCL_FILE
from cirlab.methods.searle import Searle
from cirlab.weight_map import Rule, WeightMap

GOLDEN = ROOT / "tests" / "golden"


@pytest.mark.parametrize(
    "saved,file",
    [
        (TUNED_CLIP, "clip4cir/tuned_clip_best.pt"),
        (COMBINER_FILE, "clip4cir/combiner.pt"),
        (TUNED_BLIP, "blip4cir_bi/tuned_blip_best.pt"),  # with med.py's position_ids, rebuilt on export
        (COMBINER_FILE, "blip4cir_bi/combiner.pt"),
        (MLCL_FILE, "mlcl/combiner_learn_t1.pt"),  # scalars of shape [1]
        (MLCL_FILE, "mlcl/combiner_learn_t0.pt"),  # without the temperatures
        (Searle.PHI_FILE, "searle/phi_20.pt"),
    ],
)
def test_export_writes_back_the_file_import_read(saved, file):
    obj = torch.load(GOLDEN / file, weights_only=True)
    assert saved.layout().match(obj)
    again = saved.write(saved.layout().to_state(obj), obj["epoch"])
    assert list(again) == ["epoch", saved.key] and again["epoch"] == obj["epoch"]
    theirs, ours = obj[saved.key], again[saved.key]
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k


def test_renames_with_several_stars_and_shapes_go_both_ways():
    m = WeightMap(
        (
            Rule("drop.*", None, why="not in the model"),
            Rule("blocks.*.norm*.w", "layers.*.ln*.weight"),
            Rule("scale", "scale", ((1,), ())),
            Rule("*", "inner.*"),
        )
    )
    file = {"blocks.3.norm1.w": torch.ones(2), "scale": torch.tensor([2.0]), "x": torch.zeros(1), "drop.q": 1}
    model = m.to_model(file)
    assert list(model) == ["layers.3.ln1.weight", "scale", "inner.x"] and model["scale"].shape == ()
    assert m.dropped(file) == {"not in the model": ["drop.q"]}
    assert list(m.to_file({**model, "other": torch.ones(1)})) == ["blocks.3.norm1.w", "scale", "x"]
    assert m.to_file(model)["scale"].shape == (1,)


def test_a_map_that_would_not_read_its_export_back_is_an_error():
    m = WeightMap((Rule("a", "inner.x"), Rule("*", "inner.*")))
    with pytest.raises(RuntimeError, match="does not read 'a' back as 'inner.a'"):
        m.to_file({"inner.a": torch.ones(1)})
    with pytest.raises(ValueError, match="another number of"):
        Rule("*.w", "weight")
