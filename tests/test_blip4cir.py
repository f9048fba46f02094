"""BLIP backbone and BLIP4CIR+Bi: marker rule, reversed queries, loss weights, cached stage II, CLI."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import results, run_cli

from cirlab.backbones.blip import BlipBackbone
from cirlab.backbones.blip_convert import infer_architecture
from cirlab.data.datamodule import with_view
from cirlab.data.records import CIRQuery
from cirlab.data.sources.fashioniq import FashionIQSource
from cirlab.errors import CirlabError
from cirlab.methods.blip4cir import (
    Blip4CirCombiner,
    Blip4CirFinetune,
    encoder_cosine,
    mark_learned,
    mark_text,
    stage1_reverse_logits,
)


def tokens(backbone, text):
    return backbone.tokenizer.convert_ids_to_tokens(backbone.tokenize([text])["input_ids"][0])


# ---- the direction marker -------------------------------------------------------------------------
def test_text_marker_follows_the_reference_rule(small_blip):
    assert mark_text("is red and longer", "forward") == " [FORWARD] is red and [FORWARD]  longer"
    assert tokens(small_blip, mark_text("is red and longer", "forward")) == [
        "[CLS]",
        "[",
        "forward",
        "]",
        "is",
        "red",
        "and",
        "[",
        "forward",
        "]",
        "longer",
        "[SEP]",
    ]
    # str.split("and") also splits inside words, as the reference does
    assert mark_text("has sandals", "backward") == " [BACKWARD] has sand [BACKWARD] als"
    assert tokens(small_blip, mark_text("has sandals", "backward")) == [
        "[CLS]",
        "[",
        "backward",
        "]",
        "has",
        "sand",
        "[",
        "backward",
        "]",
        "als",
        "[SEP]",
    ]


def test_learned_marker_is_one_new_trainable_token(small_blip):
    rows = small_blip.model.text_encoder.get_input_embeddings().weight.shape[0]
    Blip4CirFinetune(small_blip, direction="learned")
    Blip4CirCombiner(small_blip, direction="learned")  # idempotent: no second set of rows
    assert small_blip.model.text_encoder.get_input_embeddings().weight.shape[0] == rows + 2
    assert tokens(small_blip, mark_learned("is red", "backward")) == ["[CLS]", "[bwd]", "is", "red", "[SEP]"]


def test_fashioniq_markers_go_on_each_caption_before_the_caption_rule():
    q = CIRQuery(qid="q", reference="r", captions=["is red and long", "has sandals."], targets=["t"])
    marked = with_view(q, lambda c: mark_text(c, "forward"))
    assert (
        FashionIQSource.eval_text(None, marked)
        == "[forward] is red and [forward]  long and [FORWARD] has sand [FORWARD] als"
    )


def test_unknown_direction_and_non_blip_backbone_are_clear_errors(small_blip):
    with pytest.raises(CirlabError, match="text, learned"):
        Blip4CirFinetune(small_blip, direction="token")

    class NotBlip(torch.nn.Module):
        name = "tiny"

    with pytest.raises(CirlabError, match="blip_tiny"):
        Blip4CirCombiner.__new__(Blip4CirCombiner)._setup_directions(NotBlip(), "text", True, 0.1)


# ---- reversed queries and loss weights -----------------------------------------------------------
def test_stage1_reverse_logits_hand_computed():
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[0.0, 2.0], [3.0, 0.0]])  # normalised inside: [0,1], [1,0]
    text = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # t_i = r_i - normalize(T_i)
    logits = stage1_reverse_logits(reference, text, target, 100.0)
    # [0,0]: normalize([0,1]+[1,-1]) = [1,0] . r_0 = 1;  [0,1]: normalize([1,0]+[1,-1]) = [2,-1]/sqrt5 . [1,0]
    expected = torch.tensor([[100.0, 200 / math.sqrt(5)], [200 / math.sqrt(5), 100.0]])
    assert torch.allclose(logits, expected, atol=1e-4)


def _batch(n=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "reference": torch.randn(n, d, generator=g),
        "target": torch.randn(n, d, generator=g),
        "text": ["is red"] * n,
        "text_reverse": ["has sandals"] * n,
    }


def test_stage2_reverse_query_swaps_reference_and_target(small_blip):
    module = Blip4CirCombiner(small_blip).eval()
    batch = _batch()
    reverse = module.reverse_logits(batch)
    text = module.text_features(batch["text_reverse"])
    # the reversed query of triplet i = combine(target_i, backward text_i), scored against reference_i
    swapped = module.combiner.combine(batch["target"], text) @ F.normalize(batch["reference"], dim=-1).T
    assert torch.allclose(reverse.diagonal(), 100 * swapped.diagonal(), atol=1e-4)


@pytest.mark.parametrize("cls", [Blip4CirFinetune, Blip4CirCombiner])
def test_reverse_weight_scales_the_reverse_loss(small_blip, cls):
    batch = _batch()
    losses = {}
    for name, kwargs in {
        "fwd": {"bidirectional": False},
        "w0": {"reverse_weight": 0.0},
        "w04": {"reverse_weight": 0.4},
        "w1": {"reverse_weight": 1.0},
    }.items():
        torch.manual_seed(0)
        module = cls(small_blip, **kwargs).eval()  # eval: dropout off, the same numbers every call
        losses[name] = module.training_step(batch, 0).item()
    reverse = losses["w1"] - losses["fwd"]
    assert reverse > 0
    assert losses["w0"] == pytest.approx(losses["fwd"], abs=1e-5)
    assert losses["w04"] == pytest.approx(losses["fwd"] + 0.4 * reverse, abs=1e-4)


def test_stage2_forward_term_is_clip4cir_stage2_with_gather_negatives(small_blip, monkeypatch):
    """The forward term is CLIP4Cir's stage II loss, so gather_negatives reaches batch_contrastive."""
    import cirlab.methods.clip4cir as clip4cir

    seen = []
    real = clip4cir.batch_contrastive
    monkeypatch.setattr(
        clip4cir, "batch_contrastive", lambda *a, gather=False: seen.append(gather) or real(*a, gather=gather)
    )
    torch.manual_seed(0)
    plain = Blip4CirCombiner(small_blip, bidirectional=False).eval().training_step(_batch(), 0)
    torch.manual_seed(0)
    gathered = Blip4CirCombiner(small_blip, bidirectional=False, gather_negatives=True).eval()
    assert seen == [False] and torch.equal(gathered.training_step(_batch(), 0), plain)  # one process: no-op
    assert seen == [False, True]


def test_stage2_trains_on_cached_features_only(small_blip, monkeypatch):
    module = Blip4CirCombiner(small_blip)
    assert module.frozen_image_encoder and module.frozen_text_encoder
    assert not any(p.requires_grad for p in small_blip.parameters())
    monkeypatch.setattr(small_blip, "encode_image", lambda x: pytest.fail("stage II encoded pixels"))
    loss = module.training_step(_batch(), 0)
    loss.backward()
    assert all(p.grad is not None for p in module.combiner.parameters() if p.requires_grad)


def test_stage1_optimiser_groups_and_unclamped_cosine(small_blip):
    module = Blip4CirFinetune(
        small_blip,
        proj_lr_scale=100.0,
        optimizer=partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.05),
        scheduler=partial(encoder_cosine, epochs=10),
    )
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    encoder, proj = opt.param_groups
    assert encoder["lr"] == pytest.approx(1e-4) and proj["lr"] == pytest.approx(1e-2)
    assert encoder["weight_decay"] == proj["weight_decay"] == 0.05
    assert not any(p.requires_grad for p in small_blip.image_parameters())
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[5] == pytest.approx(0.5e-4) and lrs[10] == pytest.approx(0.0, abs=1e-12)
    assert lrs[15] == pytest.approx(0.5e-4)  # rises again after cosine_epochs, as the reference
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-2)


# ---- backbone loading ----------------------------------------------------------------------------
def test_blip_base_config_is_the_reference_architecture():
    from omegaconf import OmegaConf
    from transformers import BlipConfig

    # as +task=convert_blip builds it (a file without tensors keeps every size of the architecture)
    cfg = BlipConfig(**infer_architecture({}, OmegaConf.load("conf/backbone/blip_base.yaml").architecture))
    assert cfg.image_text_hidden_size == 256
    assert (
        cfg.vision_config.image_size,
        cfg.vision_config.patch_size,
        cfg.vision_config.num_hidden_layers,
    ) == (384, 16, 12)
    assert (cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers, cfg.text_config.vocab_size) == (
        768,
        12,
        30524,
    )


def test_saved_blip_folder_loads_with_the_same_features(small_blip, tmp_path):
    small_blip.save_pretrained(tmp_path / "blip")
    loaded = BlipBackbone(checkpoint=str(tmp_path / "blip"), max_length=32)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(x), small_blip.eval().encode_image(x), atol=1e-6)
        assert torch.allclose(loaded.encode_texts(["is red"]), small_blip.encode_texts(["is red"]), atol=1e-6)
    with pytest.raises(CirlabError, match="save_pretrained"):
        BlipBackbone(checkpoint=str(tmp_path))


# ---- end to end ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_blip4cir_bi_beats_zeroshot_on_held_out_test(tmp_path):
    zs_dir = tmp_path / "zs"
    run_cli(
        tmp_path,
        "+method=zeroshot",
        "backbone=blip_tiny",
        "method.fusion=sum",
        "eval.visualize=false",
        run_dir=zs_dir,
    )
    zero_shot = results(zs_dir)["metrics"]["test/recall_at_10"]
    run_dir = tmp_path / "bi"
    # stage II shortened for CI time (BLIP4CIR+Bi's Combiner scores all B x B reversed pairs: the whole
    # stage is about 7 minutes of one core, this one about one); README rows use the defaults
    run_cli(
        tmp_path,
        "+method=blip4cir_bi",
        "method.combiner.max_epochs=2",
        "method.combiner.batch_size=32",
        "eval.visualize=false",
        run_dir=run_dir,
    )
    stage1, stage2 = (results(run_dir)["stages"][s] for s in ("finetune", "combiner"))
    r10, r50 = "test/recall_at_10", "test/recall_at_50"
    print(
        f"blip_tiny test R@10 / R@50: zero-shot sum {zero_shot:.2f}, stage I {stage1[r10]:.2f} / "
        f"{stage1[r50]:.2f}, stage II {stage2[r10]:.2f} / {stage2[r50]:.2f}"
    )
    # measured 2026-12-07, one thread, seed 0: zero-shot sum 22.75, stage I 46.0 / 81.0. This shortened
    # stage II run alone on that stage I, seeds 0-2: 49.0 / 83.0, 47.5 / 82.75, 48.5 / 82.25 (stage II -
    # stage I: R@10 +1.5..+3.0, sd 0.8; R@50 +1.25..+2.0, sd 0.4); earlier (README, other weights) R@10
    # -1.25 for this run and -0.75..+4.0 for the whole stage: stage II does not reliably beat stage I here.
    # An untrained Combiner (what an optimiser that changes nothing leaves: max_epochs=0) on the same stage
    # I, seeds 0-2: 35.25 / 76.25, 25.75 / 63.5, 41.5 / 70.25, i.e. R@10 -4.5..-20.25 and R@50 -4.75..-17.5
    # below stage I, seed 2 still above zero-shot + 15. On another CPU (2026-12-08, AMD EPYC: blip_tiny
    # pretrains to other floats) seed 0 gave stage I 47.0 / 74.75, stage II 44.75 / 78.0: R@10 -2.25 but
    # R@50 +3.25. So the bar is on R@10 + R@50 together: stage II within 2 points of stage I. Trained runs
    # clear it by 3.0 or more (+1.0 on that CPU, +3.25..+5.0 on the first), an untrained Combiner misses it
    # by 13.25 or more (sum -15.25..-37.75).
    assert stage1[r10] >= zero_shot + 15, "stage I does not beat zero-shot"
    both1, both2 = stage1[r10] + stage1[r50], stage2[r10] + stage2[r50]
    assert both2 >= both1 - 2, f"stage II R@10 + R@50 {both2} below stage I's {both1}"


def test_image_grounded_text_encoding_depends_on_the_image(small_blip):
    small_blip.eval()
    tok = small_blip.tokenize(["is red", "is red"])
    with torch.no_grad():
        grounded = small_blip.encode_grounded_text(torch.randn(2, 3, 16, 16), tok)
        unimodal = small_blip.encode_text(tok)
    assert grounded.shape == unimodal.shape == (2, 16)
    assert not torch.allclose(grounded[0], grounded[1])  # same text, other image
    assert torch.allclose(unimodal[0], unimodal[1], atol=1e-6)  # unimodal ignores images
