"""BLIP and BLIP4CIR+Bi files written by the authors' own code (tests/golden/blip, tests/golden/blip4cir_bi:
small random instances of salesforce/BLIP's BLIP_Pretrain / BLIP_Retrieval and Bi-Blip4CIR's encoders and
Combiner, made by tools/golden/), loaded through cirlab's public seams: `+task=convert_blip` ->
`backbone.hf_id=DIR`, then `backbone.checkpoint=tuned_blip_best.pt` and `method.combiner.checkpoint=combiner.pt`,
compared with what the authors' code computed on the same inputs. Tolerances (fp32, CPU): features atol
1e-5; logits, scaled by 100, atol 1e-4."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cirlab.backbones.blip import BlipBackbone
from cirlab.methods.blip4cir import Blip4CirCombiner, Blip4CirFinetune, mark_text
from cirlab.weights import load_weights

GOLDEN = Path(__file__).parent / "golden"
BLIP, BI = GOLDEN / "blip", GOLDEN / "blip4cir_bi"
FILES = {"pretrain": "model_base.pth", "retrieval": "model_base_retrieval_coco.pth"}
# what a file does not tell: the heads (2 of 12 / 16 wide, not BLIP's 64) and the image size to convert to
SMALL_HEADS = [
    "backbone=blip_base",
    "backbone.architecture.vision_config.hidden_size=24",
    "backbone.architecture.vision_config.num_attention_heads=2",
    "backbone.architecture.text_config.hidden_size=32",
    "backbone.architecture.text_config.num_attention_heads=2",
]
ATOL, LOGIT_ATOL = 1e-5, 1e-4


def small_architecture(image_size: int) -> dict:
    """blip_base's architecture with SMALL_HEADS and `image_size`, as the CLI overrides compose it."""
    from omegaconf import OmegaConf

    architecture = OmegaConf.to_container(OmegaConf.load("conf/backbone/blip_base.yaml").architecture)
    for override in SMALL_HEADS[1:]:
        key, value = override.split("=")
        side, field = key.split(".")[-2:]
        architecture[side][field] = int(value)
    architecture["vision_config"]["image_size"] = image_size
    return architecture


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    """convert_blip_checkpoint of each golden BLIP file (pretraining also at 48 px, Bi-Blip4CIR's size):
    {(kind, image_size): (folder, dropped keys)}."""
    from cirlab.backbones.blip_convert import convert_blip_checkpoint

    root = tmp_path_factory.mktemp("converted")
    done = {}
    for kind, size in (("retrieval", 32), ("pretrain", 48)):
        out = root / f"{kind}-{size}"
        dropped = convert_blip_checkpoint(
            BLIP / FILES[kind], out, small_architecture(size), tokenizer=str(BLIP / "tokenizer")
        )
        done[kind, size] = out, {k for keys in dropped.values() for k in keys}
    return done


def convert_cli(cli, tmp_path, file: Path, image_size: int) -> Path:
    """+task=convert_blip, as a user runs it."""
    out = tmp_path / "converted"
    code, stdout, err = cli(
        "+task=convert_blip",
        f"+src={file}",
        f"+out={out}",
        f"+tokenizer={BLIP / 'tokenizer'}",
        *SMALL_HEADS,
        f"backbone.architecture.vision_config.image_size={image_size}",
    )
    assert code == 0, err
    assert f"backbone.hf_id={out}" in stdout and "not used (momentum ViT" in stdout
    return out


def close(ours: torch.Tensor, theirs: torch.Tensor, atol: float = ATOL) -> None:
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, rtol=0, atol=atol), (ours - theirs).abs().max().item()


@pytest.mark.parametrize("kind", list(FILES))
def test_blip_checkpoint_converts_to_the_reference_features(kind, cli, tmp_path, converted):
    """BLIP's own pretraining (momentum encoders, decoder, queues; through the CLI) and retrieval checkpoints
    -> the tokens and features of train_retrieval.py's evaluation, and its image-grounded ITM pass."""
    ref = torch.load(BLIP / "outputs.pt", weights_only=True)
    expected = ref[kind]
    folder = (
        convert_cli(cli, tmp_path, BLIP / FILES[kind], 32) if kind == "pretrain" else converted[kind, 32][0]
    )
    backbone = BlipBackbone(hf_id=str(folder), max_length=35)
    tokens = backbone.tokenize(ref["captions"])  # padded to the longest caption, BLIP's to 35
    n = tokens["input_ids"].shape[1]
    assert torch.equal(tokens["input_ids"], expected["input_ids"][:, :n])
    assert torch.equal(tokens["attention_mask"], expected["attention_mask"][:, :n])
    assert not expected["attention_mask"][:, n:].any()
    assert backbone.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [
        len(backbone.tokenizer) - 2,
        len(backbone.tokenizer) - 1,
    ]
    with torch.no_grad():
        image, text = backbone.encode_image(ref["images"]), backbone.encode_texts(ref["captions"])
        close(image, expected["image_embed"])
        close(text, expected["text_embed"])
        close(F.normalize(image, dim=-1), expected["image_feat"])
        close(F.normalize(text, dim=-1), expected["text_feat"])
        itm = {**tokens, "input_ids": expected["itm_input_ids"][:, :n]}  # [ENC] first, as BLIP's ITM
        paired = ref["images"][torch.arange(len(ref["captions"])) % len(ref["images"])]
        close(backbone.encode_grounded_text(paired, itm), expected["grounded_embed"])
        scores = backbone.model(**itm, pixel_values=paired, use_itm_head=True).itm_score
        close(scores, expected["itm_logits"])


def test_every_tensor_of_the_blip_file_is_used_or_dropped_by_a_rule(converted):
    folder, dropped = converted["pretrain", 48]
    model = torch.load(BLIP / FILES["pretrain"], weights_only=True)["model"]
    used = [k for k in model if k not in dropped]
    assert len(used) == len(BlipBackbone(hf_id=str(folder)).model.state_dict())
    assert {"temp", "queue_ptr", "image_queue", "text_queue", "visual_encoder_m.cls_token"} <= dropped
    assert {"text_decoder.cls.predictions.bias", "text_encoder.embeddings.position_ids"} <= dropped
    assert not any(
        k.startswith(("visual_encoder.", "vision_proj.", "text_proj.", "itm_head.")) for k in dropped
    )


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_blip4cir_bi_files_give_the_reference_queries_and_logits(converted):
    """Bi-Blip4CIR's tuned_blip_best.pt over BLIP's model_base.pth (its ViT interpolated from 32 to 48 px as its
    BLIPImgEncoder does) and its combiner.pt: marked captions, features, both stages' queries and logits, forward
    and reversed, and the losses with the FashionIQ weights."""
    ref = torch.load(BI / "outputs.pt", weights_only=True)
    assert [mark_text(c, "forward") for c in ref["captions"]] == ref["forward_captions"]
    assert [mark_text(c, "backward") for c in ref["captions"]] == ref["backward_captions"]
    folder = converted["pretrain", 48][0]
    backbone = BlipBackbone(hf_id=str(folder), checkpoint=str(BI / "tuned_blip_best.pt"), max_length=77)
    assert torch.equal(backbone.tokenize(ref["forward_captions"])["input_ids"], ref["input_ids"])
    batch = {
        "reference": ref["reference_pixels"],
        "target": ref["target_pixels"],
        "text": ref["forward_captions"],
        "text_reverse": ref["backward_captions"],
    }
    finetune = Blip4CirFinetune(backbone, reverse_weight=0.4).eval()
    combiner = Blip4CirCombiner(backbone, projection_dim=32, hidden_dim=48, reverse_weight=0.5)
    load_weights(
        combiner.stage_weights(),
        BI / "combiner.pt",
        combiner.checkpoint_layouts(),
        "method.combiner.checkpoint",
    )
    combiner.eval()
    with torch.no_grad():
        close(finetune.image_features(batch["reference"]), ref["reference_features"])
        close(finetune.image_features(batch["target"]), ref["target_features"])
        close(finetune.text_features(batch["text"]), ref["text_forward"])
        close(finetune.text_features(batch["text_reverse"]), ref["text_backward"])
        targets = F.normalize(ref["target_features"], dim=-1)
        for stage, module in (("finetune", finetune), ("combiner", combiner)):
            query = module.query_embedding(batch["reference"], batch["text"])
            close(query, ref[f"{stage}_query"])
            close(100 * query @ targets.T, ref[f"{stage}_logits"], LOGIT_ATOL)
            close(module.reverse_logits(batch), ref[f"{stage}_reverse_logits"], LOGIT_ATOL)
            close(module.loss(batch), ref[f"{stage}_loss"], LOGIT_ATOL)
