"""Cross-modal (text<->image) retrieval: the margin loss, the i2t any-caption rule, caption
sources (Karpathy JSON, reference splits), the cached-feature datamodule, the method's trainable
parameters, and an end-to-end run of +method=crossmodal."""

import json

import pytest
import torch
from conftest import ROOT, results, run_cli
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from cirlab.backbones.openclip import OpenCLIPBackbone
from cirlab.data.caption_datamodule import CaptionDataModule
from cirlab.data.sources.captions import (
    coco_source,
    flickr30k_source,
    karpathy_source,
    read_karpathy,
)
from cirlab.errors import CirlabError
from cirlab.methods.crossmodal import (
    CrossModalRetrieval,
    ImageAdapter,
    crossmodal_recalls,
)
from cirlab.methods.losses import cosine_margin

FIXTURE = ROOT / "tests" / "fixtures" / "karpathy"


# ---- loss and metric -----------------------------------------------------------------------------
def test_cosine_margin_loss_2x2_hand_computed():
    image = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # normalised inside: [1,0], [0,1]
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # S = [[1, 0.6], [0, 0.8]]; positives 0.5(1-1)=0, 0.5(1-0.8)=0.1;
    # negatives 0.5*max(0, 0.6-0.1)=0.25, 0.5*max(0, 0-0.1)=0; mean over 4 entries
    assert cosine_margin(image, text, margin=0.1).item() == pytest.approx((0 + 0.1 + 0.25 + 0) / 4)
    # margin 0.7: the 0.6 negative no longer costs anything
    assert cosine_margin(image, text, margin=0.7).item() == pytest.approx(0.1 / 4)


def test_i2t_hit_is_any_caption_of_the_image():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.nn.functional.normalize(torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.8, 0.6]]), dim=-1)
    owner = torch.tensor([0, 0, 1])  # image 0 has captions 0 and 1, image 1 has caption 2
    r = crossmodal_recalls(images, texts, owner, ks=(1, 2))
    # image 0: top-1 caption is 1 (its SECOND caption) -> hit; image 1: top-1 is caption 0 (image 0's) -> miss
    assert r["i2t_recall_at_1"] == 50.0
    assert r["i2t_recall_at_2"] == 100.0  # image 1: top-2 = captions 0, 2
    # text->image: caption 0 -> image 1 (0.8 > 0.6) miss, caption 1 -> image 0 hit, caption 2 -> image 0 miss
    assert r["t2i_recall_at_1"] == 100 / 3  # exact from counts (float64 nearest), as rsum below
    assert r["rsum"] == 50 + 100 + 100 + 100 / 3


# ---- sources -------------------------------------------------------------------------------------
def test_karpathy_coco_json_parsing():
    splits = read_karpathy(FIXTURE / "dataset_coco.json")
    assert {k: len(v) for k, v in splits.items()} == {"train": 2, "val": 1, "test": 1}  # restval -> train
    name, caps = splits["test"][0]
    assert name == "val2014/COCO_val2014_000000391895.jpg"  # filepath/filename
    assert len(caps) == 5 and caps[0] == "A man with a red helmet on a small moped on a dirt road."
    assert "A sixth caption that must be dropped." not in caps
    assert [n for n, _ in splits["train"]] == [
        "val2014/COCO_val2014_000000522418.jpg",
        "train2014/COCO_train2014_000000318556.jpg",
    ]
    src = coco_source(FIXTURE, split_scheme="karpathy")
    assert src.image_path(name) == FIXTURE / "val2014" / "COCO_val2014_000000391895.jpg"


def test_karpathy_flickr_has_no_filepath(tmp_path):
    data = {
        "dataset": "flickr30k",
        "images": [
            {
                "filename": "1000092795.jpg",
                "imgid": 0,
                "split": "test",
                "sentids": [0],
                "sentences": [
                    {
                        "raw": "Two young guys with shaggy hair look at their hands.",
                        "tokens": [],
                        "imgid": 0,
                        "sentid": 0,
                    }
                ],
            }
        ],
    }
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(data))
    src = flickr30k_source(tmp_path)
    assert src.image_captions("test") == [
        ("1000092795.jpg", ["Two young guys with shaggy hair look at their hands."])
    ]
    assert src.image_path("1000092795.jpg") == tmp_path / "flickr30k-images" / "1000092795.jpg"


def test_karpathy_errors_say_what_to_do(tmp_path):
    with pytest.raises(CirlabError, match="dataset_coco.json"):
        coco_source(tmp_path)
    (tmp_path / "dataset_coco.json").write_text(
        json.dumps({"images": [{"filename": "a.jpg", "split": "dev", "sentences": []}]})
    )
    with pytest.raises(CirlabError, match="train/restval/val/test"):
        coco_source(tmp_path)
    with pytest.raises(CirlabError, match="karpathy or reference"):
        coco_source(tmp_path, split_scheme="random")


def test_reference_flickr_split_is_seeded(tmp_path):
    lines = ["image_name| comment_number| comment"]
    for i in range(30):
        lines += [f"{i}.jpg| {k}| A dog, running #{k}!" for k in range(5)]
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n")
    a = flickr30k_source(tmp_path, split_scheme="reference", n_val=5, n_test=5, seed=1)
    b = flickr30k_source(tmp_path, split_scheme="reference", n_val=5, n_test=5, seed=1)
    assert {k: len(v) for k, v in a.splits.items()} == {"test": 5, "val": 5, "train": 20}
    assert a.splits == b.splits
    assert a.splits["test"][0][1][0] == "A dog running 0"  # punctuation removed as the reference


def test_reference_coco_uses_val2017_as_test(tmp_path):
    ann = tmp_path / "annotations"
    ann.mkdir()
    for split, n in (("train", 40), ("val", 3)):
        images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(n)]
        anns = [
            {"image_id": i, "caption": f"{split} image {i} caption {k}"} for i in range(n) for k in range(6)
        ]
        (ann / f"captions_{split}2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    src = coco_source(tmp_path, split_scheme="reference")
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 38, "val": 2, "test": 3}
    assert src.splits["test"][0] == (
        "val2017/000000000000.jpg",
        [f"val image 0 caption {k}" for k in range(5)],
    )


# ---- datamodule: cached features, no image decoding ----------------------------------------------
def test_datamodule_serves_cached_features_without_decoding(monkeypatch):
    src = karpathy_source(FIXTURE, "dataset_coco.json", name="coco")  # the image files do not even exist
    dm = CaptionDataModule(src, batch_size=2, eval_batch_size=8)
    names = dm.all_images()
    feats = {n: torch.full((4,), float(i)) for i, n in enumerate(names)}
    dm = dm.for_stage(2, features=feats)
    loads = []
    monkeypatch.setattr("cirlab.data.datamodule.load_image", lambda path: loads.append(path))
    batch = next(iter(dm.train_dataloader()))
    for name_idx, img in zip(batch["index"], batch["image"]):
        name, caps = dm.pairs("train")[int(name_idx)]
        assert torch.equal(img, feats[name])
    assert all(t in [c for _, cs in dm.pairs("train") for c in cs] for t in batch["text"])
    images, texts = (next(iter(loader)) for loader in dm.test_dataloader())
    assert torch.equal(images["image"][0], feats["val2014/COCO_val2014_000000391895.jpg"])
    assert len(texts["text"]) == 5 and dm.text_to_image("test").tolist() == [0] * 5
    assert loads == []  # no image was decoded


# ---- the method's trainable parameters ----------------------------------------------------------
def _small_backbone(vit: bool) -> OpenCLIPBackbone:
    vision = (
        {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16}
        if vit
        else {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16}
    )
    torch.manual_seed(0)
    return OpenCLIPBackbone(
        model_cfg={
            "embed_dim": 16,
            "vision_cfg": vision,
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        },
        name="small",
    )


def test_adapter_structure_and_trainable_parameters():
    adapter = ImageAdapter(16, reduction=4, ratio=0.2)
    assert [tuple(m.weight.shape) for m in adapter.net if isinstance(m, torch.nn.Linear)] == [
        (4, 16),
        (16, 4),
    ]
    assert all(m.bias is None for m in adapter.net if isinstance(m, torch.nn.Linear))
    v = torch.randn(3, 16)
    for m in adapter.net:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.zeros_(m.weight)
    assert torch.allclose(adapter(v), 0.8 * v)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["method=crossmodal", "dataset=synthetic_captions"])
    module = instantiate(cfg.method.finetune.module, backbone=_small_backbone(vit=False))
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"logit_scale", "adapter.net.0.weight", "adapter.net.2.weight"}
    opt = module.configure_optimizers()  # conf/method/crossmodal.yaml's AdamW, the reference's settings
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["params"] == list(
        filter(lambda p: p.requires_grad, module.parameters())
    )
    assert opt.defaults["lr"] == 1e-4 and opt.defaults["betas"] == (0.9, 0.98)
    assert opt.defaults["eps"] == 1e-6 and opt.defaults["weight_decay"] == 1e-3


def test_projections_train_on_cached_pre_projection_features():
    backbone = _small_backbone(vit=True)
    module = CrossModalRetrieval(backbone, train="projections", loss="infonce")
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {
        "backbone.model.visual.proj",
        "backbone.model.text_projection",
        "backbone.model.logit_scale",
    }
    x = torch.randn(2, 3, 32, 32)
    backbone.eval()
    with torch.no_grad():
        cached = module.feature_encoder().encode_image(x)  # what the pipeline caches
        assert cached.shape == (2, 32) and backbone.model.visual.proj is not None
        expected = torch.nn.functional.normalize(backbone.encode_image(x), dim=-1)
        assert torch.allclose(module.image_embedding(cached), expected, atol=1e-5)
    loss = module.training_step({"image": cached, "text": ["a cat", "a dog"]}, 0)
    loss.backward()
    assert backbone.model.visual.proj.grad is not None and backbone.model.text_projection.grad is not None
    with pytest.raises(CirlabError, match="train=adapter"):
        CrossModalRetrieval(_small_backbone(vit=False), train="projections")


def test_unknown_options_are_rejected():
    with pytest.raises(CirlabError, match="margin, infonce"):
        CrossModalRetrieval(_small_backbone(vit=False), loss="triplet")
    with pytest.raises(CirlabError, match="adapter, projections"):
        CrossModalRetrieval(_small_backbone(vit=False), train="all")


# ---- end to end ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_crossmodal_cli_adapter_beats_zero_shot_on_a_new_image_domain(tmp_path):
    """Zero-shot stage, then the image adapter on cached features, scored on the held-out test images
    of a domain backbone=tiny never saw: the synthetic captions rendered with heavier pixel noise
    (dataset=synthetic_captions_shifted). On the plain renderings there is nothing to adapt to (the
    tiny backbone was pretrained on them). Trains on the val images (the cheap split) with InfoNCE
    at lr 1e-2 for 3 epochs: the reference's margin loss at lr 1e-4 needs far more steps."""
    run_cli(
        tmp_path,
        "+method=crossmodal",
        "dataset=synthetic_captions_shifted",
        "dataset.source.train_split=val",
        "method.loss=infonce",
        "method.finetune.module.optimizer.lr=1e-2",
        "method.finetune.max_epochs=3",
    )
    res = results(tmp_path / "run")
    zs, ad = res["stages"]["zeroshot"], res["stages"]["finetune"]
    assert set(zs) == set(ad) and "test/i2t_recall_at_10" in ad and res["main_metric"] == "test/rsum"
    print(
        {k: round(v, 2) for k, v in zs.items() if k.startswith("test/")},
        "adapter:",
        {k: round(v, 2) for k, v in ad.items() if k.startswith("test/")},
    )
    # the shift hurts zero-shot (79 R@1 on the plain images) without reaching chance (0.05% for 1,824 images)
    assert 1 < zs["test/t2i_recall_at_1"] < 40 and 1 < zs["test/i2t_recall_at_1"] < 40
    # zero-shot t2i / i2t R@1 13.5 / 3.8 on the test split (README); require +10 points each
    for direction in ("t2i", "i2t"):
        assert ad[f"test/{direction}_recall_at_1"] > zs[f"test/{direction}_recall_at_1"] + 10
        assert ad[f"test/{direction}_recall_at_10"] > zs[f"test/{direction}_recall_at_10"]


def test_crossmodal_needs_a_captions_dataset(tmp_path):
    proc = run_cli(
        tmp_path, "+method=crossmodal", "dataset=synthetic", "method.stages=[zeroshot]", check=False
    )
    assert proc.returncode == 2 and "captions dataset" in proc.stderr
