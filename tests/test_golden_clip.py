"""Golden files written by the authors' own code (tests/golden/openai_clip, tests/golden/clip4cir; how they
were made: the READMEs there and tools/golden/), loaded through cirlab's seams as a run loads them and
compared with what the reference code computed on the same inputs.

Tolerance: tokens and pixels exactly; features, queries, logits and losses in fp32 to rtol 1e-5 and atol
1e-5 x max(1, max |expected|). The arithmetic is the same, the kernels are not (open_clip's attention pool
attends from every position and keeps the first, OpenAI's from the first only),
and a different summation order errs in proportion to the tensor's magnitude, not the element's:
measured at most 3.4e-7 of it (19 comparisons, 8 of them bit-identical). Swapping two same-shaped
tensors moves outputs by 1e-2 of it and more (tested below).
"""

from __future__ import annotations

import json
import re

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from open_clip.modified_resnet import ModifiedResNet
from PIL import Image
from test_released_clip import backbone_from_config, compose_config
from torch import nn
from torch.testing import assert_close

import cirlab.backbones.openclip as openclip
import cirlab.methods.combiner as combiner_mod
from cirlab.errors import CirlabError
from cirlab.methods.losses import batch_contrastive
from cirlab.stage import given_weights
from cirlab.weight_map import Rule, WeightMap

OPENAI = ROOT / "tests" / "golden" / "openai_clip"
CLIP4CIR = ROOT / "tests" / "golden" / "clip4cir"
FILES = {"rn": ("rn.pt", 64), "vit_fp16": ("vit_fp16_extras.pt", 32)}  # outputs prefix: (file, pixels)


@pytest.fixture(scope="module")
def openai_out() -> dict:
    return torch.load(OPENAI / "outputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def clip4cir_out() -> dict:
    return torch.load(CLIP4CIR / "outputs.pt", weights_only=True)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(1.0, float(expected.abs().max())))


def refusal(*overrides: str) -> str:
    """The CirlabError that the CLI prints (exit 2) for this backbone config."""
    with pytest.raises(InstantiationException) as err:
        backbone_from_config(*overrides)
    assert isinstance(err.value.__cause__, CirlabError), err.value
    return str(err.value.__cause__)


def pil(out: dict, key: str) -> Image.Image:
    return Image.fromarray(out[key].numpy())


def check_openai_outputs(backbone, out: dict, name: str) -> None:
    """Tokens, text features, image features of a tensor and of two PIL images through preprocess."""
    res = FILES[name][1]
    assert torch.equal(backbone.tokenize(out["captions"]), out["tokens"].long())
    with torch.no_grad():
        close(backbone.encode_text(out["tokens"]), out[f"{name}.text"])
        close(backbone.encode_image(out[f"pixels{res}"].float()), out[f"{name}.image"])
        pixels = torch.stack([backbone.preprocess(pil(out, k)) for k in ("pil0", "pil1")])
        assert torch.equal(pixels, out[f"{name}.pil_pixels"])
        close(backbone.encode_image(pixels), out[f"{name}.pil_image"])


def openai_file_backbone(file, *overrides: str):
    return backbone_from_config("backbone=clip_openai_file", f"backbone.checkpoint={file}", *overrides)


@pytest.mark.parametrize("name", FILES)
def test_openai_files_load_without_naming_the_architecture(openai_out, name):
    backbone = openai_file_backbone(OPENAI / FILES[name][0])
    visual = backbone.model.visual
    assert isinstance(visual, ModifiedResNet) == (name == "rn")
    assert backbone.image_size == FILES[name][1] and backbone.embed_dim == 32 and backbone.quick_gelu
    if name == "rn":  # RN50x4's attention pool: 64-wide heads over the 2 x 2 grid + the mean
        assert visual.attnpool.num_heads == 2 and visual.attnpool.positional_embedding.shape == (5, 128)
    check_openai_outputs(backbone, openai_out, name)


def swapped(a: str, b: str) -> WeightMap:
    """cirlab's OpenAI-name map with the tensors of keys `a` and `b` exchanged."""
    return WeightMap((Rule(a, f"model.{b}"), Rule(b, f"model.{a}"), *openclip.CLIP_MAP.rules))


@pytest.mark.parametrize(
    "name,a,b",
    [
        ("rn", "visual.attnpool.q_proj.weight", "visual.attnpool.k_proj.weight"),
        ("rn", "visual.layer4.0.bn1.running_var", "visual.layer4.0.bn2.running_var"),
        (
            "vit_fp16",
            "visual.transformer.resblocks.0.ln_1.weight",
            "visual.transformer.resblocks.0.ln_2.weight",
        ),
    ],
)
def test_openai_golden_fails_with_two_keys_swapped(openai_out, monkeypatch, name, a, b):
    monkeypatch.setattr(openclip, "CLIP_MAP", swapped(a, b))
    # the same loader as the config's (OpenCLIPBackbone(checkpoint=...)), without composing it again
    backbone = openclip.OpenCLIPBackbone(checkpoint=str(OPENAI / FILES[name][0]), name="clip_openai_file")
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        check_openai_outputs(backbone, openai_out, name)


def test_jit_extras_state_dict_through_backbone_pretrained(openai_out, tmp_path):
    """backbone.pretrained=FILE of a named model: the small ViT registered as an open_clip model config."""
    config = {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
    }
    (tmp_path / "cirlab-golden-vit.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "cirlab-golden-vit.json")
    file = OPENAI / "vit_fp16_extras.pt"
    assert {"input_resolution", "context_length", "vocab_size"} <= set(torch.load(file, weights_only=True))
    backbone = backbone_from_config(
        "backbone=clip_vit_b32", "backbone.model.model_name=cirlab-golden-vit", f"backbone.pretrained={file}"
    )
    check_openai_outputs(backbone, openai_out, "vit_fp16")


def torchscript_archive(state: dict, path) -> None:
    """A TorchScript archive whose state_dict() is `state`, as OpenAI's ViT-B-32.pt's is the fp16 weights +
    the JIT extras (tools/golden/openai_clip.py checks that a traced openai CLIP gives vit_fp16_extras.pt's
    tensors exactly; that archive is not committed, it repeats the same tensors)."""
    root = nn.Module()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for part in parents:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        module.register_buffer(leaf, value)
    torch.jit.save(torch.jit.script(root), str(path))


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_torchscript_archives_load_only_behind_the_switch(openai_out, tmp_path):
    archive = tmp_path / "ViT-B-32.pt"
    torchscript_archive(torch.load(OPENAI / "vit_fp16_extras.pt", weights_only=True), archive)
    message = refusal("backbone=clip_openai_file", f"backbone.checkpoint={archive}")
    assert re.search(r"checkpoint=.*TorchScript archive .* add backbone\.allow_torchscript=true", message)
    message = refusal("backbone=clip_vit_b32", f"backbone.pretrained={archive}")
    assert re.search(r"pretrained=.*TorchScript archive .* add backbone\.allow_torchscript=true", message)
    backbone = openai_file_backbone(archive, "backbone.allow_torchscript=true")
    check_openai_outputs(backbone, openai_out, "vit_fp16")


def test_openai_file_backbone_needs_its_file():
    assert "add backbone.checkpoint=FILE" in refusal("backbone=clip_openai_file")


# ---- CLIP4Cir: tuned_clip_best.pt {'epoch', 'CLIP'} + combiner.pt {'epoch', 'Combiner'} -----------------


def clip4cir_stages(**extra: str):
    """Both stages as a run builds them: backbone=clip_openai_file on the tuned CLIP, the Combiner's file
    through method.combiner.checkpoint (cirlab.stage.given_weights), in eval mode as evaluation runs."""
    overrides = {
        "method": "clip4cir",
        "backbone": "clip_openai_file",
        "backbone.checkpoint": CLIP4CIR / "tuned_clip_best.pt",
        "dataset.preprocess": "targetpad",
        "method.combiner.module.projection_dim": 24,
        "method.combiner.module.hidden_dim": 40,
        "method.combiner.checkpoint": CLIP4CIR / "combiner.pt",
        **extra,
    }
    cfg = compose_config(*(f"{k}={v}" for k, v in overrides.items()))
    backbone = instantiate(cfg.backbone.model)
    options = dict(search=cfg.retrieval.search, search_options=OmegaConf.to_container(cfg.retrieval.options))
    finetune = instantiate(cfg.method.finetune.module, backbone=backbone, **options).eval()
    combiner = instantiate(cfg.method.combiner.module, backbone=backbone, **options)
    given_weights(combiner, cfg, "combiner")
    return finetune, combiner.eval()


def check_clip4cir_outputs(finetune, stage, out: dict) -> None:
    backbone = stage.backbone
    batch = {
        "reference": out["reference_pixels"].float(),
        "text": out["captions"],
        "target": out["target_pixels"].float(),
    }
    assert torch.equal(backbone.tokenize(out["captions"]), out["tokens"].long())
    with torch.no_grad():
        target = stage.image_features(batch["target"])
        close(stage.image_features(batch["reference"]), out["reference_features"])
        close(target, out["target_features"])
        close(stage.text_features(out["captions"]), out["text_features"])
        pixels = torch.stack([backbone.preprocess(pil(out, k)) for k in ("pil0", "pil1")])
        assert torch.equal(pixels, out["targetpad_pixels"])
        close(stage.image_features(pixels), out["targetpad_features"])
        for module, prefix in ((finetune, "finetune"), (stage, "combiner")):
            query = module.query_embedding(batch["reference"], batch["text"])
            close(query, out[f"{prefix}_query"])
            logits = module.logit_scale * query @ F.normalize(target, dim=-1).T
            close(logits, out[f"{prefix}_logits"])
            close(module.loss(batch), out[f"{prefix}_loss"])
        query = stage.combiner.combine(out["fixed_image_features"], out["fixed_text_features"])
        close(query, out["fixed_query"])
        target = F.normalize(out["fixed_target_features"], dim=-1)
        close(stage.logit_scale * query @ target.T, out["fixed_logits"])
        close(batch_contrastive(query, out["fixed_target_features"]), out["fixed_loss"])


def test_clip4cir_files_give_the_reference_outputs(clip4cir_out):
    finetune, stage = clip4cir_stages()
    assert stage.logit_scale == finetune.logit_scale == 100  # Combiner.logit_scale, clip_fine_tune.py's 100
    check_clip4cir_outputs(finetune, stage, clip4cir_out)


def test_clip4cir_golden_fails_with_two_combiner_names_swapped(clip4cir_out, monkeypatch):
    layouts = combiner_mod.combiner_layouts

    def swapping():
        first, *rest = layouts()

        def to_state(obj):
            state = first.to_state(obj)
            for p in ("weight", "bias"):
                a, b = f"text_projection_layer.{p}", f"image_projection_layer.{p}"
                state[a], state[b] = state[b], state[a]
            return state

        return [first.__class__(first.name, first.match, to_state), *rest]

    monkeypatch.setattr(combiner_mod, "combiner_layouts", swapping)
    finetune, stage = clip4cir_stages()
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        check_clip4cir_outputs(finetune, stage, clip4cir_out)


# ---- the reference on a GPU: the tuned CLIP with convert_weights' tensors rounded to fp16 -----------------


def gpu_path(out: dict) -> dict:
    """outputs.pt with the GPU path's outputs (gpu_*) in place of the CPU path's."""
    return {**out, **{k.removeprefix("gpu_"): v for k, v in out.items() if k.startswith("gpu_")}}


def test_clip4cir_gpu_path_with_openai_fp16_rounding(clip4cir_out):
    """backbone.openai_fp16_rounding=true gives what validate.py / combiner_train.py compute on a GPU (clip.load's
    fp16 model, load_state_dict of the fp32 file, .float()); off, the CPU path (tested above)."""
    finetune, stage = clip4cir_stages(**{"backbone.openai_fp16_rounding": "true"})
    rounded = openclip.openai_fp16_names(stage.backbone.model)
    assert sorted(rounded) == sorted(clip4cir_out["gpu_fp16_keys"])  # what convert_weights held in fp16
    check_clip4cir_outputs(finetune, stage, gpu_path(clip4cir_out))
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):  # the two paths differ
        check_clip4cir_outputs(*clip4cir_stages(), gpu_path(clip4cir_out))


def test_openai_fp16_names_are_the_fp16_tensors_of_openai_vit_file():
    """For a ViT: the tensors OpenAI's release files (convert_weights) hold in fp16, no more, no fewer."""
    file = OPENAI / FILES["vit_fp16"][0]
    fp16 = {k for k, v in torch.load(file, weights_only=True).items() if v.dtype == torch.float16}
    backbone = openai_file_backbone(file, "backbone.openai_fp16_rounding=true")
    assert set(openclip.openai_fp16_names(backbone.model)) == fp16
    state = torch.load(file, weights_only=True)  # its fp16 values are unchanged by the rounding
    assert all(torch.equal(backbone.model.state_dict()[k], state[k].float()) for k in fp16)
