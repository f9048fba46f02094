"""Every checked-in experiment (experiments/*.yaml, the `experiment` config group) composes, resolves
and builds: dataset source target and arguments, backbone architecture, trainer arguments, and every
stage's module class (instantiated around a tiny random backbone). No data, no weights, no GPU.
New experiment files are picked up automatically."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))


def compose_experiment(name: str, overrides: tuple[str, ...] = ()):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"+experiment={name}", *overrides])


def check_arguments(target: str, kwargs: dict) -> None:
    """The target exists and accepts these keyword arguments (without calling it)."""
    fn = get_object(target)
    inspect.signature(fn).bind(**{k: v for k, v in kwargs.items() if not k.startswith("_")})


@pytest.fixture(scope="module")
def tiny_backbone():
    from cirlab.backbones.openclip import OpenCLIPBackbone

    model_cfg = yaml.safe_load((ROOT / "conf/backbone/tiny.yaml").read_text())["model"]["model_cfg"]
    return OpenCLIPBackbone(model_cfg=model_cfg, name="tiny-random")


def test_experiments_are_discovered():
    assert {
        "clip4cir_fashioniq_rn50x4",
        "clip4cir_cirr_rn50x4",
        "clip4cir_synthetic",
        "zeroshot_synthetic",
    } <= set(EXPERIMENTS)
    for name in EXPERIMENTS:
        assert (ROOT / "experiments" / f"{name}.yaml").read_text().startswith("# @package _global_"), name


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds(name, tiny_backbone, small_blip, monkeypatch, tmp_path):
    import open_clip

    monkeypatch.setenv("CIRLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CIRLAB_DATA", str(tmp_path / "data"))
    cfg = compose_experiment(name)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves

    # dataset: the source's target exists and takes the configured arguments
    check_arguments(resolved["dataset"]["source"]["_target_"], resolved["dataset"]["source"])
    assert resolved["dataset"]["val_split"] and resolved["dataset"]["test_split"]

    # backbone: the target takes its arguments; a named open_clip model exists (not built: RN50x4 is 180M params)
    model = resolved["backbone"]["model"]
    check_arguments(model["_target_"], model)
    if model.get("model_name"):
        assert open_clip.get_model_config(model["model_name"]) is not None, model["model_name"]
    elif model.get("hf_id"):  # BLIP from the HF hub: its architecture builds as +task=convert_blip builds it
        from transformers import BlipConfig

        from cirlab.backbones.blip_convert import infer_architecture

        architecture = infer_architecture({}, resolved["backbone"]["architecture"])
        assert BlipConfig(**architecture).vision_config.image_size > 0
    else:
        assert model.get("model_cfg"), "a backbone needs model_name or model_cfg"

    # trainer: lightning accepts its arguments
    check_arguments(resolved["trainer"]["_target_"], resolved["trainer"])

    # method: every stage is defined, sized sensibly, and its module instantiates around a tiny backbone
    stages = resolved["method"]["stages"]
    assert stages, "method.stages is empty"
    for stage in stages:
        scfg = resolved["method"][stage]
        assert isinstance(scfg["max_epochs"], int) and scfg["max_epochs"] >= 0
        assert isinstance(scfg["batch_size"], int) and scfg["batch_size"] > 0
        backbone = small_blip if resolved["backbone"]["name"].startswith("blip") else tiny_backbone
        module = instantiate(
            cfg.method[stage].module,
            backbone=backbone,
            search=cfg.retrieval.search,
            search_options=OmegaConf.to_container(cfg.retrieval.options),
        )
        from cirlab.methods.retrieval_module import RetrievalModule

        assert isinstance(module, RetrievalModule)
        if scfg["max_epochs"] > 0:  # a training stage has something to optimise
            assert module.configure_optimizers() is not None


@pytest.mark.parametrize(
    "name,dataset", [("clip4cir_fashioniq_rn50x4", "fashioniq"), ("clip4cir_cirr_rn50x4", "cirr")]
)
def test_paper_experiments_pin_the_reference_setup(name, dataset):
    """The reference README's hyperparameters (docs/methods/clip4cir.md#hyperparameters), not the tiny defaults."""
    cfg = compose_experiment(name)
    assert cfg.dataset.name == dataset
    assert cfg.backbone.name == "clip_rn50x4" and cfg.backbone.model.model_name == "RN50x4"
    assert cfg.backbone.pretrained == "openai"
    assert cfg.dataset.preprocess == "targetpad" and cfg.backbone.model.target_ratio == 1.25
    assert cfg.trainer.accelerator == "gpu"
    ft, cb = cfg.method.finetune, cfg.method.combiner
    assert (ft.module.encoders, ft.module.optimizer.lr, ft.batch_size, ft.max_epochs) == (
        "both",
        2e-6,
        128,
        100,
    )
    assert (ft.module.optimizer.eps, ft.module.optimizer.weight_decay) == (1e-7, 0.01)
    assert (ft.module.optimizer._target_, cb.module.optimizer._target_) == (
        "torch.optim.AdamW",
        "torch.optim.Adam",
    )
    assert (cb.module.optimizer.lr, cb.batch_size, cb.max_epochs) == (2e-5, 4096, 300)
    assert (cb.module.projection_dim, cb.module.hidden_dim) == (2560, 5120)
    assert list(cfg.method.stages) == ["finetune", "combiner"]


RELEASED = [n for n in EXPERIMENTS if n.startswith("eval_released_")]


@pytest.mark.parametrize("name", RELEASED)
def test_released_model_experiments_evaluate_given_weights_only(name):
    """Nothing trains; the final stage's weights and the backbone come from files; the paper's number is
    written down for comparison."""
    cfg = compose_experiment(name)
    for stage in cfg.method.stages:
        assert cfg.method[stage].max_epochs == 0, stage
    assert cfg.method[cfg.method.stages[-1]].get("checkpoint") or cfg.backbone.get("checkpoint")
    text = (ROOT / "experiments" / f"{name}.yaml").read_text()
    assert re.search(r"(?im)^#.*paper.*\n?.*\d+\.\d\d", text), "the paper's number, as a comment"
    if (
        cfg.backbone.get("checkpoint") and "quick_gelu" in cfg.backbone
    ):  # all of CLIP from the file: no download
        assert cfg.backbone.pretrained is None and cfg.backbone.quick_gelu is True
    if "quick_gelu" in cfg.backbone:  # OpenAI's CLIP, as the authors trained on it
        assert cfg.backbone.quick_gelu in (None, True)
    # every reference evaluates in fp32 (CLIP4Cir's validate.py: clip_model.float(), Combiner without autocast;
    # SEARLE's and Bi-Blip4CIR's validation likewise): under bf16 one of seven rankings changed in a check
    assert cfg.trainer.precision == "32-true", "released weights are evaluated at the reference's precision"


def test_clip4cir_released_experiments_exist():
    assert {"eval_released_clip4cir_fashioniq_rn50x4", "eval_released_clip4cir_cirr_rn50x4"} <= set(RELEASED)


@pytest.mark.parametrize("name", [n for n in RELEASED if n.startswith("eval_released_clip4cir_")])
def test_clip4cir_released_experiments_round_as_the_reference_on_a_gpu(name):
    """CLIP4Cir's validate.py on a GPU reads the tuned file into clip.load's fp16 model before .float():
    the backbone gets those roundings (backbone.openai_fp16_rounding, tests/test_golden_clip.py)."""
    cfg = compose_experiment(name)
    assert cfg.backbone.openai_fp16_rounding is True and cfg.backbone.model.openai_fp16_rounding is True
