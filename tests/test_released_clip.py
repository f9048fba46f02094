"""OpenAI CLIP as trained (QuickGELU) and CLIP4Cir's / MLCL's released files in the reference layouts.

The files are built from the reference code's key names written out below (OpenAI clip/model.py,
CLIP4Cir's combiner.py and its `torch.save({'epoch': e, 'CLIP' | 'Combiner': state_dict})`), never
from cirlab's own state dicts alone.
"""

import pytest
import torch
from conftest import ROOT, SMALL, results, run_cli
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from cirlab.backbones.openclip import OpenCLIPBackbone, load_backbone_weights, uses_quick_gelu
from cirlab.errors import CirlabError
from cirlab.methods.clip4cir import CLIP4CirCombiner
from cirlab.methods.combiner import Combiner
from cirlab.methods.mlcl import MLCLCombiner
from cirlab.schema import validate
from cirlab.weights import load_weights

SMALL_VIT = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
)


def openai_vit_keys(layers: int = 1) -> list[str]:
    """State-dict names of OpenAI's clip.model.CLIP with a VisionTransformer tower (clip/model.py)."""
    block = [
        "ln_1.weight",
        "ln_1.bias",
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    ]
    keys = [
        "positional_embedding",
        "text_projection",
        "logit_scale",
        "token_embedding.weight",
        "ln_final.weight",
        "ln_final.bias",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.proj",
        "visual.conv1.weight",
        "visual.ln_pre.weight",
        "visual.ln_pre.bias",
        "visual.ln_post.weight",
        "visual.ln_post.bias",
    ]
    for i in range(layers):
        keys += [f"visual.transformer.resblocks.{i}.{b}" for b in block]
        keys += [f"transformer.resblocks.{i}.{b}" for b in block]
    return keys


REFERENCE_COMBINER_KEYS = [  # CLIP4Cir src/combiner.py
    "text_projection_layer.weight",
    "text_projection_layer.bias",
    "image_projection_layer.weight",
    "image_projection_layer.bias",
    "combiner_layer.weight",
    "combiner_layer.bias",
    "output_layer.weight",
    "output_layer.bias",
    "dynamic_scalar.0.weight",
    "dynamic_scalar.0.bias",
    "dynamic_scalar.3.weight",
    "dynamic_scalar.3.bias",
]


def compose_config(*overrides: str):
    """The config `cirlab OVERRIDES...` composes, checked by the schema as the CLI checks it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    validate(cfg)
    return cfg


def backbone_from_config(*overrides: str):
    """The backbone the pipeline builds from that config (instantiate(cfg.backbone.model)), in eval mode."""
    return instantiate(compose_config(*overrides).backbone.model).eval()


def small_clip(seed: int) -> OpenCLIPBackbone:
    torch.manual_seed(seed)
    return OpenCLIPBackbone(model_cfg=SMALL_VIT, name="small").eval()


def reference_clip_state(source: OpenCLIPBackbone) -> dict:
    """The OpenAI-named state dict of `source`'s weights (a KeyError here = names differ from OpenAI's)."""
    own = source.model.state_dict()
    return {k: own[k].clone() for k in openai_vit_keys()}


def test_openai_clip_configs_are_built_with_quick_gelu():
    from open_clip.transformer import QuickGELU

    for path in sorted((ROOT / "conf" / "backbone").glob("clip_*.yaml")):
        weights = (  # clip_openai_file takes its size from the file: a small one in OpenAI's layout
            f"backbone.checkpoint={ROOT / 'tests/golden/openai_clip/rn.pt'}"
            if path.stem == "clip_openai_file"
            else "backbone.pretrained=null"
        )
        backbone = backbone_from_config(f"backbone={path.stem}", weights)
        acts = [type(m) for m in backbone.model.modules() if type(m).__name__ in ("GELU", "QuickGELU")]
        assert acts and all(a is QuickGELU for a in acts), (path.stem, set(acts))
        del backbone


def test_quick_gelu_rule_keeps_other_tags_on_gelu(tmp_path):
    (tmp_path / "RN50x4.pt").write_bytes(b"x")
    assert (
        uses_quick_gelu("openai") and uses_quick_gelu(None) and uses_quick_gelu(str(tmp_path / "RN50x4.pt"))
    )
    assert not uses_quick_gelu("laion2b_s34b_b79k") and not uses_quick_gelu("datacomp_xl_s13b_b90k")


@pytest.mark.parametrize("wrap", ["clip4cir", "openai", "openai_jit_extras", "open_clip_training"])
def test_clip_files_in_reference_layouts_give_the_source_features(tmp_path, wrap):
    source = small_clip(0)
    state = reference_clip_state(source)
    obj = {
        "clip4cir": lambda: {"epoch": 7, "CLIP": state},
        "openai": lambda: state,
        "openai_jit_extras": lambda: {
            **state,
            "input_resolution": torch.tensor(32),
            "context_length": torch.tensor(16),
            "vocab_size": torch.tensor(49408),
        },
        "open_clip_training": lambda: {
            "epoch": 3,
            "name": "x",
            "state_dict": {f"module.{k}": v for k, v in state.items()},
        },
    }[wrap]()
    torch.save(obj, tmp_path / "w.pt")
    loaded = small_clip(1)
    load_backbone_weights(loaded, tmp_path / "w.pt")
    x, tokens = torch.randn(3, 3, 32, 32), loaded.tokenize(["a red circle", "a blue square", "x"])
    assert torch.equal(loaded.encode_image(x), source.encode_image(x))
    assert torch.equal(loaded.encode_text(tokens), source.encode_text(tokens))


def test_clip_file_of_another_size_is_an_error_listing_shapes(tmp_path):
    torch.manual_seed(0)
    bigger = OpenCLIPBackbone(model_cfg={**SMALL_VIT, "embed_dim": 32}, name="small")
    torch.save({"epoch": 1, "CLIP": dict(bigger.model.state_dict())}, tmp_path / "tuned_clip.pt")
    with pytest.raises(CirlabError, match=r"(?s)CLIP4Cir fine-tuned CLIP.*another shape.*text_projection"):
        load_backbone_weights(small_clip(1), tmp_path / "tuned_clip.pt")


def test_reference_combiner_file_gives_the_source_outputs(tmp_path):
    torch.manual_seed(0)
    source = Combiner(16, 24, 40).eval()
    # the reference's module: our Combiner must carry exactly its names, so the file is written from them
    state = {k: v.clone() for k, v in source.state_dict().items()}
    assert sorted(state) == sorted(REFERENCE_COMBINER_KEYS)
    torch.save({"epoch": 12, "Combiner": state}, tmp_path / "combiner.pt")
    torch.manual_seed(1)
    stage = CLIP4CirCombiner(small_clip(1), projection_dim=24, hidden_dim=40).eval()
    layout = load_weights(
        stage.stage_weights(),
        tmp_path / "combiner.pt",
        stage.checkpoint_layouts(),
        "method.combiner.checkpoint",
    )
    assert layout.startswith("CLIP4Cir / BLIP4CIR+Bi combiner")
    img, txt = torch.randn(4, 16), torch.randn(4, 16)
    assert torch.equal(stage.combiner.combine(img, txt), source.combine(img, txt))
    # a Combiner of another width is refused, naming the mismatching tensors
    torch.save({"epoch": 1, "Combiner": Combiner(16, 32, 40).state_dict()}, tmp_path / "other.pt")
    with pytest.raises(CirlabError, match="text_projection_layer.weight: file"):
        load_weights(stage.stage_weights(), tmp_path / "other.pt", stage.checkpoint_layouts(), "x")


def test_mlcl_reference_combiner_file_gives_the_source_queries(tmp_path):
    """MLCL's combiner.pt: the CLIP4Cir names plus combiner_proj.*, and loss_weight / logit_scale /
    logit_scale_sl as tensors of shape [1] (JWargrave/MLCL src/combiner.py)."""
    torch.manual_seed(0)
    source = MLCLCombiner(small_clip(0), projection_dim=24, hidden_dim=40).eval()
    with torch.no_grad():
        source.mlc.loss_weight.fill_(0.3), source.logit_scale.fill_(4.0), source.logit_scale_sl.fill_(3.0)
    c = source.mlc.combiner
    ref = {k: v.clone() for k, v in c.state_dict().items()}
    assert sorted(ref) == sorted(REFERENCE_COMBINER_KEYS)
    ref.update(
        {
            "combiner_proj.weight": source.mlc.combiner_proj.weight.detach().clone(),
            "combiner_proj.bias": source.mlc.combiner_proj.bias.detach().clone(),
            "loss_weight": torch.tensor([0.3]),
            "logit_scale": torch.tensor([4.0]),
            "logit_scale_sl": torch.tensor([3.0]),
        }
    )
    torch.save({"epoch": 5, "Combiner": ref}, tmp_path / "combiner.pt")
    torch.manual_seed(1)
    loaded = MLCLCombiner(small_clip(0), projection_dim=24, hidden_dim=40).eval()
    layout = load_weights(loaded.stage_weights(), tmp_path / "combiner.pt", loaded.checkpoint_layouts(), "x")
    assert layout.startswith("MLCL combiner file")
    img, texts = torch.randn(3, 16), ["a red circle", "has a blue square", "x"]
    assert torch.equal(loaded.query_embedding(img, texts), source.query_embedding(img, texts))
    assert loaded.logit_scale.item() == 4.0 and loaded.logit_scale_sl.item() == 3.0
    exported = MLCLCombiner.reference_files(source.state_dict(), 5)["combiner.pt"]
    assert exported["epoch"] == 5 and sorted(exported["Combiner"]) == sorted(ref)
    assert all(torch.equal(exported["Combiner"][k], ref[k]) for k in ref)
    # trained with --learn_t 0: no temperatures in the file, cirlab keeps its constant 100
    del ref["logit_scale"], ref["logit_scale_sl"]
    torch.save({"epoch": 5, "Combiner": ref}, tmp_path / "fixed_t.pt")
    load_weights(loaded.stage_weights(), tmp_path / "fixed_t.pt", loaded.checkpoint_layouts(), "x")
    assert loaded.logit_scale.exp().item() == pytest.approx(100.0)


@pytest.mark.slow
def test_exported_reference_files_reproduce_the_run(tmp_path):
    """A CLIP4Cir run -> its weights in CLIP4Cir's layouts -> evaluated alone: the same test metrics."""
    trained = tmp_path / "trained"
    run_cli(
        tmp_path,
        "+method=clip4cir",
        "method.finetune.max_epochs=1",
        "method.combiner.max_epochs=2",
        "eval.visualize=false",
        *SMALL,
        run_dir=trained,
    )
    out = tmp_path / "released"
    proc = run_cli(tmp_path, "+task=export", f"+run={trained}", f"+out={out}", run_dir=tmp_path / "export")
    assert "tuned_clip.pt" in proc.stdout and "combiner.pt" in proc.stdout
    files = {p.name: torch.load(p, weights_only=True) for p in out.iterdir()}
    assert set(files) == {"tuned_clip.pt", "combiner.pt"}
    assert set(files["tuned_clip.pt"]) == {"epoch", "CLIP"} and set(files["combiner.pt"]) == {
        "epoch",
        "Combiner",
    }
    assert sorted(files["combiner.pt"]["Combiner"]) == sorted(REFERENCE_COMBINER_KEYS)
    assert "visual.conv1.weight" in files["tuned_clip.pt"]["CLIP"]

    again = tmp_path / "again"
    proc = run_cli(
        tmp_path,
        "+method=clip4cir",
        f"backbone.checkpoint={out / 'tuned_clip.pt'}",
        "method.finetune.max_epochs=0",
        f"method.combiner.checkpoint={out / 'combiner.pt'}",
        "method.combiner.max_epochs=0",
        "eval.visualize=false",
        *SMALL,
        run_dir=again,
    )
    first, second = results(trained), results(again)
    assert second["metrics"] == first["metrics"]
    assert first["selection"] == {"finetune": "best val/recall_at_10", "combiner": "best val/recall_at_10"}
    assert second["selection"] == {"finetune": "no training", "combiner": "given checkpoint (no training)"}
    assert not list((again / "stages" / "combiner").glob("checkpoints/*.ckpt"))
    assert "weights = given checkpoint" in proc.stdout
