"""Every `method x dataset` pair (conf/method x conf/dataset): the pairs meant to work compose, build the
datamodule and every stage's module, and find the images and training data their stages read; the others
stop with the clear CirlabError written in the table below. No training: a random tiny backbone, the
official-layout fixtures (tests/fixtures) and the synthetic benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cirlab import stage as stage_factory
from cirlab.errors import CirlabError
from cirlab.methods.lincir import LinCIR
from cirlab.methods.searle import UnlabeledImages

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (ROOT / "conf" / "dataset").glob("*.yaml"))
CIR = {"synthetic", "jsonl", "fashioniq", "cirr", "circo", "shoes"}
CAPTIONS = {"synthetic_captions", "synthetic_captions_shifted", "coco", "flickr30k", "captions_jsonl"}
UNLABELED = {"imagenet"}  # SEARLE's phi images only: +dataset@method.unlabeled=imagenet
TRAINED_ON_TRIPLETS = {"clip4cir", "clip4cir_finetune", "clip4cir_combiner", "mlcl", "blip4cir_bi"}
CIR_METHODS = TRAINED_ON_TRIPLETS | {"zeroshot", "searle", "searle_oti", "pic2word", "lincir", "fti4cir"}
CAPTION_METHODS = {"crossmodal"}


def expected_error(method: str, dataset: str) -> str | None:
    """None: the pair works; else a fragment of its CirlabError."""
    if method in CAPTION_METHODS:
        return None if dataset in CAPTIONS else "needs a captions dataset"
    if dataset in CAPTIONS:
        return "needs a cir dataset"
    if dataset in UNLABELED:
        return "folder of unlabeled images without CIR queries"
    if method == "lincir" and dataset in {"fashioniq", "cirr", "circo", "shoes"}:  # text only: no captions
        return "method.corpus=PATH"
    if method == "fti4cir" and dataset in {"fashioniq", "cirr", "shoes"}:  # no image captions
        return "module.pairs_file"
    if dataset == "circo" and method in TRAINED_ON_TRIPLETS | {"searle", "pic2word", "fti4cir"}:
        return "CIRCO has no training split"
    return None


PAIRS = [(m, d, ()) for m in METHODS for d in DATASETS] + [
    ("searle", "circo", ("+dataset@method.unlabeled=imagenet",)),  # the reference's SEARLE on CIRCO
]


def test_the_table_covers_every_config():
    assert set(METHODS) == CIR_METHODS | CAPTION_METHODS
    assert set(DATASETS) == CIR | CAPTIONS | UNLABELED


@pytest.fixture(scope="module")
def roots(tmp_path_factory, synthetic_root) -> dict[str, Path]:
    """A folder in each dataset's layout (the annotations are what the sources read here)."""
    from fixtures.make_images import FIXTURES, materialize

    tmp = tmp_path_factory.mktemp("data")
    out = {name: materialize(name, tmp / name) for name in ("fashioniq", "cirr", "circo", "shoes")}
    out["jsonl"] = out["captions_jsonl"] = synthetic_root  # written in the jsonl layouts
    out["coco"] = FIXTURES / "karpathy"
    flickr = tmp / "flickr30k"
    flickr.mkdir()
    image = {"filename": "1.jpg", "sentences": [{"raw": "a dog"}]}
    (flickr / "dataset_flickr30k.json").write_text(
        json.dumps({"images": [{**image, "split": s} for s in ("train", "val", "test")]})
    )
    out["flickr30k"] = flickr
    (tmp / "imagenet" / "test").mkdir(parents=True)
    (tmp / "imagenet" / "test" / "a.JPEG").touch()
    out["imagenet"] = tmp / "imagenet"
    return out


@pytest.fixture(scope="module")
def tiny_backbone():
    import yaml

    from cirlab.backbones.openclip import OpenCLIPBackbone

    model_cfg = yaml.safe_load((ROOT / "conf/backbone/tiny.yaml").read_text())["model"]["model_cfg"]
    return OpenCLIPBackbone(model_cfg=model_cfg, name="tiny-random")


def compose_pair(method: str, dataset: str, roots: dict[str, Path], extra: tuple[str, ...]):
    overrides = [f"method={method}", f"dataset={dataset}", *extra]
    if dataset in roots:
        key = "path" if dataset.endswith("jsonl") else "root"
        overrides.append(f"dataset.{key}={roots[dataset]}")
    if extra:
        overrides.append(f"method.unlabeled.root={roots['imagenet']}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


SOURCES: dict[str, object] = {}


def prepare(cfg, backbone) -> None:
    """What a run asks of the method and the data before it trains: the pipeline's own checks, the
    images each stage reads, its training data (SEARLE's phi: its unlabeled images)."""
    key = OmegaConf.to_yaml(cfg.dataset.source)  # a source reads its annotations once for all methods
    if key not in SOURCES:
        SOURCES[key] = instantiate(cfg.dataset.source)
    dm = stage_factory.build_datamodule(cfg, SOURCES[key])
    for stage in cfg.method.stages:
        module = instantiate(
            cfg.method[stage].module,
            backbone=backbone,
            search=cfg.retrieval.search,
            search_options=OmegaConf.to_container(cfg.retrieval.options),
        )
        stage_factory.check_data_kind(cfg, module, dm)
        train = cfg.method[stage].max_epochs > 0
        assert dm.all_images(stage_factory.image_splits(module, dm, train))
        if not train:
            continue
        if isinstance(module, UnlabeledImages):
            assert module.unlabeled_images(module.unlabeled_source or dm.source)
        elif isinstance(module, LinCIR):  # its training captions
            assert module.captions(dm.source)
        else:
            served = dm.for_stage(1, transform=backbone.preprocess, text_views=module.text_views)
            assert len(served.train_dataset()) > 0


@pytest.mark.parametrize(
    "method,dataset,extra", PAIRS, ids=[f"{m}-{d}{'-'.join(('',) + e)}" for m, d, e in PAIRS]
)
def test_method_on_dataset(method, dataset, extra, roots, tiny_backbone, request, monkeypatch):
    from conftest import CACHE

    monkeypatch.setenv("CIRLAB_CACHE", str(CACHE))  # the synthetic benchmark is generated there
    cfg = compose_pair(method, dataset, roots, extra)
    blip = cfg.backbone.name.startswith("blip")
    backbone = request.getfixturevalue("small_blip") if blip else tiny_backbone
    error = expected_error(method, dataset) if not extra else None
    if error is None:
        prepare(cfg, backbone)
    else:
        with pytest.raises(CirlabError, match=error):
            prepare(cfg, backbone)
