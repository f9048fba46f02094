"""Golden files written by the authors' own code (tests/golden/searle, tests/golden/mlcl; how they were
made: their README.md) loaded through cirlab's seams and compared with what the authors' code computed.

Tolerance: atol = rtol = 1e-5 in fp32 on CPU. The two sides run the same maths in another order (open_clip's
attention and padding cut vs OpenAI's, cirlab's losses vs MLCL's forward), so they differ by float rounding
(at most 7.5e-7 relative, measured); a swapped or misread tensor moves the outputs by 1e-2 or more."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from test_mlcl import FakeBackbone

from cirlab.backbones.openclip import OpenCLIPBackbone
from cirlab.data.records import CIRQuery
from cirlab.data.sources.cirr import CIRRSource
from cirlab.data.sources.fashioniq import FashionIQSource
from cirlab.methods.mlcl import MLCLCombiner
from cirlab.methods.searle import Searle
from cirlab.weights import load_weights

GOLDEN = ROOT / "tests/golden"
TOL = {"atol": 1e-5, "rtol": 1e-5}
# the small OpenAI CLIP of tools/golden/searle.py as an inline open_clip config (OpenAI's QuickGELU)
SEARLE_CLIP = {
    "embed_dim": 8,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 4, "heads": 2, "layers": 1},
}


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), **TOL, msg=lambda m: f"{what}: {m}")


# ---- SEARLE: phi files in both layouts, the CLIP as an OpenAI state dict --------------------------
@pytest.fixture(scope="module")
def searle_golden():
    return torch.load(GOLDEN / "searle/outputs.pt", weights_only=True), json.loads(
        (GOLDEN / "searle/captions.json").read_text()
    )


@pytest.fixture(scope="module")
def searle_clip():
    """backbone.checkpoint=clip_vit.pt on a backbone whose inline model config has the file's sizes."""
    return OpenCLIPBackbone(
        model_cfg=SEARLE_CLIP, checkpoint=str(GOLDEN / "searle/clip_vit.pt"), name="golden-vit"
    ).eval()


def test_searle_clip_image_features(searle_clip, searle_golden):
    out, _ = searle_golden
    with torch.no_grad():
        close(searle_clip.encode_image(out["pixels"]), out["image_features"], "image features")


@pytest.mark.parametrize("file", ["SEARLE_ViT-golden.pt", "phi_20.pt"])  # release / train_phi.py layout
def test_searle_phi_tokens_and_queries(searle_clip, searle_golden, file):
    out, captions = searle_golden
    module = Searle(searle_clip).eval()  # default prompt "a photo of $ that {}", as validate.py
    layout = load_weights(
        module.stage_weights(), GOLDEN / "searle" / file, module.checkpoint_layouts(), "method.phi.checkpoint"
    )
    assert layout.startswith("SEARLE phi file")
    fiq, cirr = object.__new__(FashionIQSource), object.__new__(CIRRSource)  # their caption rules only
    with torch.no_grad():
        tokens = module.tokens(out["image_features"])
        close(tokens, out["pseudo_tokens"], "pseudo tokens phi(image features)")
        for name, source in (("fiq", fiq), ("cirr", cirr)):
            texts = [
                source.query_texts(CIRQuery(str(i), f"ref{r}", tuple([c] if isinstance(c, str) else c)))
                for i, (r, c) in enumerate(captions["fashioniq" if name == "fiq" else "cirr"])
            ]
            refs = tokens[out[f"{name}_reference"]]
            orders = ["", "_reversed"] if name == "fiq" else [""]
            assert {len(t) for t in texts} == {len(orders)}
            for k, suffix in enumerate(orders):  # FashionIQ: both caption orders, as validate.py
                prompt = module.prompt_tokens([t[k] for t in texts])
                assert torch.equal(prompt, out[f"{name}_tokens{suffix}"].long()), f"{name}{suffix} tokens"
                close(
                    searle_clip.encode_text_with_pseudo_tokens(prompt, refs),
                    out[f"{name}_text_features{suffix}"],
                    f"{name}{suffix} text features",
                )
            close(module.encode_queries(refs, texts), out[f"{name}_query_features"], f"{name} query features")


# ---- MLCL: the combiner with (--learn_t 1) and without (--learn_t 0) learnt scales ------------------
class GoldenTexts(FakeBackbone):
    """The stored text features, text "i" being row i (embed_dim 8, as the golden combiner)."""

    def __init__(self, text: torch.Tensor):
        super().__init__()
        self.text = text

    def encode_texts(self, texts):
        return self.text[[int(t) for t in texts]]


@pytest.mark.parametrize("learn_t", [1, 0])
def test_mlcl_combiner_query_logits_and_losses(learn_t):
    out = torch.load(GOLDEN / "mlcl/outputs.pt", weights_only=True)
    module = MLCLCombiner(
        GoldenTexts(out["text"]), projection_dim=16, hidden_dim=24, learn_t=bool(learn_t), loss_weight_lr=1e-3
    )
    layout = load_weights(
        module.stage_weights(),
        GOLDEN / f"mlcl/combiner_learn_t{learn_t}.pt",
        module.checkpoint_layouts(),
        "method.combiner.checkpoint",
    )
    assert layout.startswith("MLCL combiner file")
    module.eval()  # dropout off, as the golden outputs
    image, target, aug = out["image"], out["target"], out["image_aug"]
    texts = [str(i) for i in range(len(image))]
    tag = f"learn_t{learn_t}/"
    with torch.no_grad():
        close(module.query_embedding(image, texts), out[tag + "query_features"], "query features")
        # what each loaded scale and level means: the five logits of MLCL's Combiner.forward
        levels = module.mlc.fuse(image, out["text"])
        aug_levels = module.mlc.fuse(aug, out["text"], t=levels["t"])
        s, s_sl = module.logit_scale.exp(), module.logit_scale_sl.exp()
        tgt = F.normalize(target, dim=-1)
        for i, (scale, a, b) in enumerate(
            [
                (s, levels["high"], tgt),
                (s, levels["mid"], tgt),
                (s, levels["low"], tgt),
                (s_sl, levels["raw"], aug_levels["raw"]),
                (s_sl, levels["high"], aug_levels["high"]),
            ]
        ):
            close(
                scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T,
                out[f"{tag}logits{i + 1}"],
                f"logits{i + 1}",
            )
        loss = module.compute_loss(image, aug, texts, target)
    for i, key in enumerate(["high", "mid", "low", "sscl_raw", "sscl_high"]):
        close(loss[key], out[f"{tag}ce{i + 1}"], f"{key} loss (their CE of logits{i + 1})")
    close(loss["loss"], out[tag + "loss"], "mCCL + SSCL")
