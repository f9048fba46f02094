"""Pic2Word golden files (tests/golden/pic2word; how they were made: its README.md) loaded through cirlab's
seams and compared with what the authors' code computed: their CLIP copy read as an OpenAI state dict, the
prompts' tokens, the token written at `*`, their training text feature (the token inserted before EOT, the
same sequence as `a photo of *` with the token at `*`), IM2TEXT from both checkpoint layouts.

Tolerance: test_golden_searle_mlcl's, atol = rtol = 1e-5 in fp32 on CPU (the same maths in another order:
open_clip's attention vs OpenAI's); a swapped or misread tensor moves the outputs by 1e-2 or more."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from test_golden_searle_mlcl import close  # atol = rtol = 1e-5

from cirlab.backbones.openclip import OpenCLIPBackbone
from cirlab.data.records import CIRQuery
from cirlab.data.sources.cirr import CIRRSource
from cirlab.data.sources.fashioniq import FashionIQSource
from cirlab.methods.pic2word import Pic2Word
from cirlab.weights import load_weights

GOLDEN = ROOT / "tests/golden/pic2word"
CIRR_CAPTIONS = ["has two dogs instead of one", "Is red, with LONG sleeves!"]
FASHIONIQ_CAPTIONS = [("is darker", "has a v-neck"), ("is shorter and blue", "Has no print.")]
# the small CLIP of tools/golden/pic2word.py as an inline open_clip config (OpenAI's QuickGELU)
PIC2WORD_CLIP = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN / "outputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def clip() -> OpenCLIPBackbone:
    return OpenCLIPBackbone(
        model_cfg=PIC2WORD_CLIP, checkpoint=str(GOLDEN / "clip_vit.pt"), name="golden"
    ).eval()


def test_their_clip_and_the_star_placeholder(clip, golden):
    assert clip.token_id("*") == int(golden["id_split"]) == 265
    with torch.no_grad():
        close(clip.encode_image(golden["pixels"].float()), golden["image_features"], "image features")


@pytest.fixture(scope="module", params=["epoch_2.pt", "pic2word_hf.pt"])  # main.py's / the re-hosted layout
def pic2word(request, clip):
    """method.img2text.checkpoint=<their file> on the golden CLIP, in eval mode as evaluation runs."""
    module = Pic2Word(clip, middle_dim=24).eval()
    layout = load_weights(
        module.stage_weights(),
        GOLDEN / request.param,
        module.checkpoint_layouts(),
        "method.img2text.checkpoint",
    )
    assert layout.startswith("Pic2Word")
    return module


def test_img2text_tokens_from_their_files(pic2word, golden):
    with torch.no_grad():
        close(pic2word.token_of(golden["image_features"]), golden["pseudo_tokens"], "IM2TEXT(image features)")


@pytest.mark.parametrize("benchmark", ["cirr", "fashioniq"])
def test_query_prompt_tokens_and_features(pic2word, golden, benchmark):
    """The source's prompt text (FashionIQ: `{c2} and {c1}`, unstripped) in `a photo of * , {}`: their
    tokens, and their features (normalised, as both evaluations rank) of their tokens at `*`."""
    source = object.__new__(
        CIRRSource if benchmark == "cirr" else FashionIQSource
    )  # their caption rules only
    captions = [(c,) for c in CIRR_CAPTIONS] if benchmark == "cirr" else FASHIONIQ_CAPTIONS
    texts = [source.prompt_text(CIRQuery(str(i), "ref", tuple(c))) for i, c in enumerate(captions)]
    assert torch.equal(pic2word.prompt_tokens(texts).int(), golden[f"{benchmark}/prompt_tokens"])
    with torch.no_grad():
        tokens = pic2word.token_of(golden["image_features"])
        queries = pic2word.encode_queries(tokens, [[t] for t in texts])
    close(queries, F.normalize(golden[f"{benchmark}/query_features"], dim=-1), f"{benchmark} queries")


def test_export_writes_the_rehosted_layout_back(pic2word):
    state = {f"img2text.{k}": v for k, v in pic2word.img2text.state_dict().items()}
    (name, obj), *rest = Pic2Word.reference_files(state, epoch=2).items()
    theirs = torch.load(GOLDEN / "pic2word_hf.pt", weights_only=True)["state_dict_img2text"]
    assert not rest and list(obj["state_dict_img2text"]) == list(theirs)
    for key, value in theirs.items():
        assert torch.equal(obj["state_dict_img2text"][key], value), key


def test_training_prompt_equals_their_inserted_token(clip, golden):
    tokens = clip.tokenize(["a photo of *"] * len(golden["pseudo_tokens"]))
    with torch.no_grad():
        features = clip.encode_text_with_pseudo_tokens(tokens, golden["pseudo_tokens"], placeholder="*")
    close(features, golden["train_text_features"], "training text features")
