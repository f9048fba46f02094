"""LinCIR golden files (tests/golden/lincir; how they were made: its README.md) read through cirlab's seams
and compared with what the authors' code computed: their phi file through `method.phi.checkpoint`'s loader
and cirlab's export, their caption masking (cleaning, keyword runs, substring replace, random-word
fallback) against cirlab's loader, and their HF text encoder with every `$` filled against cirlab's
open_clip one.

Tolerance: atol = rtol = 1e-5 in fp32 on CPU (test_golden_searle_mlcl's); a swapped or misread tensor moves
the outputs by 1e-2 or more."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT
from test_golden_searle_mlcl import close  # atol = rtol = 1e-5

from cirlab.backbones.openclip import OpenCLIPBackbone
from cirlab.data.pos_tags import synthetic_tagger
from cirlab.methods.lincir import LinCIR, MaskedCaptions
from cirlab.weights import load_weights

GOLDEN = ROOT / "tests/golden/lincir"
VISION = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 32}


def backbone(embed: int, width: int, context: int = 16, heads: int = 2, layers: int = 1) -> OpenCLIPBackbone:
    text = {"context_length": context, "vocab_size": 49408, "width": width, "heads": heads, "layers": layers}
    return OpenCLIPBackbone(
        model_cfg={"embed_dim": embed, "vision_cfg": VISION, "text_cfg": text}, name="golden"
    ).eval()


@pytest.fixture(scope="module")
def lincir() -> LinCIR:
    """method.phi.checkpoint=phi_best.pt (their save) on a backbone of Phi's dims (in 32, token width 16)."""
    module = LinCIR(backbone(32, 16)).eval()
    layout = load_weights(
        module.stage_weights(), GOLDEN / "phi_best.pt", module.checkpoint_layouts(), "method.phi.checkpoint"
    )
    assert layout.startswith("SEARLE phi file")
    return module


def test_phi_tokens_from_their_file(lincir):
    golden = torch.load(GOLDEN / "outputs.pt", weights_only=True)
    with torch.no_grad():
        close(lincir.token_of(golden["phi_input"]), golden["phi_output"], "Phi(x)")


def test_export_writes_their_layout_back(lincir):
    theirs = torch.load(GOLDEN / "phi_best.pt", weights_only=True)
    state = {f"phi.{k}": v for k, v in lincir.phi.state_dict().items()}
    (name, obj), *rest = LinCIR.reference_files(state, epoch=theirs["epoch"]).items()
    assert not rest and name == "phi_best.pt" and obj["epoch"] == 1000
    assert list(obj) == list(theirs) and list(obj["Phi"]) == list(theirs["Phi"])
    for key, value in theirs["Phi"].items():
        assert torch.equal(obj["Phi"][key], value), key


def test_masking_equals_theirs():
    """Their `[$]` is one added token; cirlab writes ` $ ` (one token between spaces): the same ids. So
    theirs with `[$]` -> ` $ ` and whitespace collapsed must equal cirlab's text."""
    golden = json.loads((GOLDEN / "masking.json").read_text())
    items = golden["items"]
    ds = MaskedCaptions([i["caption"] for i in items], synthetic_tagger(), seed=golden["seed"])
    ds.epoch = golden["epoch"]
    assert all(i["indicator"] == 1 for i in items)  # every caption kept a placeholder
    for i, item in enumerate(items):
        got = ds[i]
        assert got["text"] == item["cleaned"], item["caption"]
        assert got["masked"] == " ".join(item["masked"].replace("[$]", " $ ").split()), item["caption"]
    # the random-word fallback was taken, and drew the same word
    assert {"has [$]", "also [$] nothing and nothing", "[$] of [$] circle on the left"} <= {
        i["masked"] for i in items
    }


def test_their_hf_encoder_fills_every_placeholder_as_cirlab():
    golden = torch.load(GOLDEN / "hf_text.pt", weights_only=True)
    b = backbone(24, 16, layers=2)
    missing, unexpected = b.model.load_state_dict(golden["open_clip_text"], strict=False)
    assert not unexpected and all(k.startswith("visual.") for k in missing)
    tokens = b.tokenize(golden["texts"])
    assert torch.equal(tokens, golden["token_ids"].to(tokens.dtype))
    assert [int((row == 259).sum()) for row in tokens] == [1, 4, 3]
    with torch.no_grad():
        close(b.encode_text(tokens), golden["plain_features"], "plain text features (the copied weights)")
        filled = b.encode_text_with_pseudo_tokens(tokens, golden["pseudo"], "$", fill="all")
        close(filled, golden["features"], "every $ filled")
        first = b.encode_text_with_pseudo_tokens(tokens, golden["pseudo"], "$", fill="first")
    assert torch.allclose(first[0], golden["features"][0], atol=1e-5)  # one `$`: the same
    assert not torch.allclose(first[1:], golden["features"][1:], atol=1e-3)  # SEARLE's rule differs
