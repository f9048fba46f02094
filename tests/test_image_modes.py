"""Every image mode decoded and preprocessed as the references do it, pixel for pixel.

tests/golden/image_modes/ holds small files in the modes benchmark files come in and the tensors that
openai/CLIP's `_transform` (`clip`) and CLIP4Cir's `squarepad_transform` / `targetpad_transform` computed
from them (tools/golden/image_modes.py; SEARLE's, Bi-Blip4CIR's and MLCL's copies gave the same). They
go through cirlab's own path: `load_image` + the backbone's `preprocess`, as the feature cache, the
datamodule and `cirlab.load().search` (via `encode_images`) call them. Compared with torch.equal: the
same Pillow and torch operations on the same pixels give the same floats.
"""

import functools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image, ImageOps

from cirlab.backbones.openclip import OpenCLIPBackbone
from cirlab.data.datamodule import ImageLookup
from cirlab.data.features import FeatureCache, ImageFiles
from cirlab.data.images import load_image
from cirlab.data.transforms import PREPROCESS_MODES, build_transform
from cirlab.errors import CirlabError

GOLDEN = Path(__file__).parent / "golden" / "image_modes"
FILES = sorted(p.name for p in GOLDEN.iterdir() if p.suffix in (".png", ".jpg"))
MODES = {  # file -> the mode PIL opens it in: the fixture really is what its name says
    "cmyk.jpg": "CMYK",
    "exif_rotated.jpg": "RGB",
    "gray.png": "L",
    "gray16.png": "I;16",
    "la.png": "LA",
    "palette.png": "P",
    "palette_transparent.png": "P",
    "rgb.png": "RGB",
    "rgba.png": "RGBA",
}
CFG = dict(  # a tiny open_clip model at the golden files' 32 px
    embed_dim=16,
    vision_cfg=dict(image_size=32, layers=(1, 1, 1, 1), width=8, head_width=8),
    text_cfg=dict(context_length=8, vocab_size=49408, width=16, heads=2, layers=1),
)


@pytest.fixture(scope="module")
def expected():
    return torch.load(GOLDEN / "expected.pt", weights_only=True)


@functools.cache
def openclip(mode: str) -> OpenCLIPBackbone:
    return OpenCLIPBackbone(model_cfg=CFG, preprocess=mode, name="t")


def blip(mode: str, tmp_path: Path):
    """A small random BLIP at 32 px (BLIP4CIR+Bi preprocesses with Bi-Blip4CIR's copy of CLIP4Cir's
    transforms, and BLIP's normalisation equals CLIP's)."""
    from conftest import BLIP_VOCAB, SMALL_BLIP

    from cirlab.backbones.blip import BlipBackbone

    (tmp_path / "vocab.txt").write_text("\n".join(BLIP_VOCAB))
    config = {**SMALL_BLIP, "vision_config": {**SMALL_BLIP["vision_config"], "image_size": 32}}
    return BlipBackbone(config=config, vocab_file=str(tmp_path / "vocab.txt"), preprocess=mode, max_length=32)


@pytest.mark.parametrize("family", ["openclip", "blip"])
@pytest.mark.parametrize("mode", PREPROCESS_MODES)
def test_every_mode_matches_the_reference_pixels(family, mode, expected, tmp_path):
    bb = openclip(mode) if family == "openclip" else blip(mode, tmp_path)
    files = ImageFiles([GOLDEN / f for f in FILES], bb.preprocess)  # feature cache, api, demo uploads
    lookup = ImageLookup(SimpleNamespace(image_path=lambda n: GOLDEN / n), bb.preprocess, None)  # datamodule
    for i, name in enumerate(FILES):
        want = expected[f"{name}/{mode}"]
        assert torch.equal(files[i], want), f"{name} {mode}: max diff {(files[i] - want).abs().max():.4f}"
        assert torch.equal(lookup(name), want), f"{name} {mode} (datamodule)"


def test_fixtures_are_the_modes_they_name(expected):
    assert sorted(MODES) == FILES and len(expected) == len(FILES) * len(PREPROCESS_MODES)
    for name, mode in MODES.items():
        with Image.open(GOLDEN / name) as img:
            assert img.mode == mode, name
            assert sorted(img.size) == [30, 60], name  # squarepad and targetpad both pad
    with Image.open(GOLDEN / "palette_transparent.png") as img:
        assert img.info["transparency"] == 3 and img.getpalette()[:3] != [0, 0, 0]
    with Image.open(GOLDEN / "exif_rotated.jpg") as img:
        assert img.getexif()[0x0112] == 6


def test_decoding_keeps_the_file_mode_and_ignores_exif():
    assert load_image(GOLDEN / "palette.png").mode == "P"
    assert load_image(GOLDEN / "cmyk.jpg").mode == "CMYK"
    img = load_image(GOLDEN / "exif_rotated.jpg")
    assert img.size == (60, 30) and ImageOps.exif_transpose(img).size == (30, 60)


def test_the_fixtures_catch_rgb_at_decoding(expected):
    """Converting to RGB before the transform (cirlab before issue 31) moves the pixels of every
    non-RGB fixture in some mode, and applying EXIF moves the rotated one: the fixtures can fail."""
    for name in FILES:
        worst = 0.0
        for mode in PREPROCESS_MODES:
            t = build_transform(mode, 32, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
            with Image.open(GOLDEN / name) as img:
                early = img.convert("RGB") if MODES[name] != "RGB" else ImageOps.exif_transpose(img)
                worst = max(worst, (t(early) - expected[f"{name}/{mode}"]).abs().max().item())
        assert (worst > 0.1) == (name not in ("rgb.png", "gray.png")), f"{name}: {worst}"


def test_missing_and_corrupt_files_name_the_path(tmp_path):
    with pytest.raises(CirlabError, match="image not found: .*nope.png"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes((GOLDEN / "rgb.png").read_bytes()[:200])
    with pytest.raises(CirlabError, match="corrupt or unreadable image: .*bad.png"):
        load_image(bad)


def test_feature_cache_key_names_the_decoding(monkeypatch, tmp_path):
    """Features cached from RGB-at-decoding pixels are never reused: the decoding version is in the key."""
    bb = openclip("clip")
    cache = FeatureCache(tmp_path)
    key = cache.key(bb, ["a"], [GOLDEN / "rgb.png"])
    monkeypatch.setattr("cirlab.data.features.DECODE_VERSION", "rgb-at-decoding")
    assert cache.key(bb, ["a"], [GOLDEN / "rgb.png"]) != key
