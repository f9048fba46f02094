"""Backbone configs build the right architectures; local checkpoints round-trip exactly."""

import open_clip
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cirlab.backbones.openclip import OpenCLIPBackbone, load_backbone_weights
from cirlab.cli import CONF
from cirlab.errors import CirlabError

NAMED = {
    "clip_vit_b32": ("ViT-B-32", 512, 224),
    "clip_vit_b16": ("ViT-B-16", 512, 224),
    "clip_vit_l14": ("ViT-L-14", 768, 224),
    "clip_rn50x4": ("RN50x4", 640, 288),
}


def backbone_cfg(name: str, *overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"backbone={name}", *overrides]).backbone


@pytest.mark.parametrize("name", list(NAMED))
def test_named_configs_pin_the_open_clip_architecture(name):
    model_name, dim, size = NAMED[name]
    cfg = backbone_cfg(name)
    assert cfg.model.model_name == model_name and cfg.pretrained == "openai"
    arch = open_clip.get_model_config(model_name)
    assert arch["embed_dim"] == dim and arch["vision_cfg"]["image_size"] == size


def test_vit_b32_builds_with_random_weights():
    cfg = backbone_cfg("clip_vit_b32", "backbone.pretrained=null", "dataset.preprocess=targetpad")
    bb = instantiate(cfg.model)
    assert bb.embed_dim == 512 and bb.image_size == 224
    from PIL import Image

    assert bb.preprocess(Image.new("RGB", (300, 100))).shape == (3, 224, 224)
    assert bb.encode_texts(["a red dress"]).shape == (1, 512)


def _tiny():
    cfg = backbone_cfg("tiny")
    return OpenCLIPBackbone(model_cfg=OmegaConf.to_container(cfg.model.model_cfg), name="tiny")


def test_local_checkpoint_round_trips_exactly(tmp_path, monkeypatch):
    """The cached pretrained backbone file ({'backbone', 'state_dict', ...}) as backbone.checkpoint."""
    from cirlab import pretrain

    monkeypatch.setattr(pretrain, "pretrain_on_captions", lambda *args: {})  # the initial weights, cached
    torch.manual_seed(0)
    a = _tiny()
    pretrain.load_or_pretrain(a, str(tmp_path), {}, {}, "tiny")
    (cached,) = (tmp_path / "backbones").glob("tiny-*.pt")
    torch.manual_seed(1)
    b = _tiny()
    load_backbone_weights(b, cached)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k
    assert a.fingerprint() == b.fingerprint()
    x = torch.randn(2, 3, 32, 32)
    a.eval(), b.eval()
    assert torch.equal(a.encode_image(x), b.encode_image(x))


def test_checkpoint_of_another_backbone_is_named(tmp_path):
    torch.save({"backbone": "clip_vit_b32", "state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CirlabError, match="'clip_vit_b32'.*'tiny'"):
        load_backbone_weights(_tiny(), tmp_path / "other.pt")


def test_pretrained_weights_are_cached_and_a_foreign_file_is_rebuilt(tmp_path, monkeypatch):
    """The tiny backbones' pretraining (minutes) runs once per (model, pretraining) config; a cached file
    of other weights is pretrained again, from the seeded initial weights, never partly loaded."""
    from cirlab import pretrain

    cfg = dict(
        embed_dim=16,
        vision_cfg=dict(image_size=32, layers=[1, 1, 1, 1], width=8, head_width=8),
        text_cfg=dict(context_length=8, vocab_size=49408, width=16, heads=2, layers=1),
    )
    runs = []

    def fake_pretraining(backbone, cache_dir, settings, path):
        runs.append(next(iter(backbone.state_dict().values())).clone())  # the weights it starts from
        with torch.no_grad():
            for p in backbone.parameters():
                p.add_(1.0)
        return {"t2i_recall_at_1": 0.0}

    monkeypatch.setattr(pretrain, "pretrain_on_captions", fake_pretraining)
    build = lambda: pretrain.pretrained_tiny(str(tmp_path), cfg, {"seed": 0}, name="t")  # noqa: E731
    first = build()
    again = build()
    assert len(runs) == 1 and all(
        torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items()
    )

    (path,) = (tmp_path / "backbones").glob("t-*.pt")
    torch.save({"state_dict": {"other": torch.zeros(1)}}, path)  # another model's weights under that name
    rebuilt = build()
    assert len(runs) == 2 and torch.equal(runs[0], runs[1])
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in first.state_dict().items())
