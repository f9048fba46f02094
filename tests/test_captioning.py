"""`+task=caption`: an image folder -> BLIP captions -> FTI4CIR's {"img_id", "subject", "attribute"} file."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_in_process
from PIL import Image

from cirlab.captioning import GENERATION, caption_batch, load_captioner
from cirlab.errors import CirlabError

WORDS = "a picture of photo red blue circle square on the left right that has and".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]


@pytest.fixture
def captioner(tmp_path):
    """A random BLIP captioning model (HF BlipForConditionalGeneration) saved with its tokenizer."""
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration

    folder = tmp_path / "captioner"
    tokenizer = BertTokenizerFast(
        vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True, bos_token="[DEC]"
    )
    config = BlipConfig(
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 16, "patch_size": 8, "initializer_range": 0.5},
        text_config={"vocab_size": len(VOCAB), "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "encoder_hidden_size": 16,
                     "max_position_embeddings": 32, "pad_token_id": 0, "bos_token_id": 5,
                     "sep_token_id": 3, "eos_token_id": 3, "initializer_range": 0.5},
    )  # fmt: skip
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_captions_start_after_the_prompt_with_the_reference_beam_settings(captioner):
    model, tokenizer = load_captioner(str(captioner))
    seen = {}
    generate = model.generate

    def spy(**kwargs):
        seen.update(kwargs, prompt=kwargs["input_ids"].clone())  # HF's generate writes [DEC] into it
        return generate(**kwargs)

    model.generate = spy
    torch.manual_seed(1)
    captions = caption_batch(model, tokenizer, torch.randn(3, 3, 16, 16))
    assert len(captions) == 3
    # [CLS] a picture of [SEP]: HF's generate swaps [CLS] for [DEC] and drops [SEP] (BLIP's own prompt handling)
    assert tokenizer.convert_ids_to_tokens(seen["prompt"][0]) == ["[CLS]", "a", "picture", "of", "[SEP]"]
    assert {k: seen[k] for k in GENERATION} == {"num_beams": 3, "max_length": 25, "min_length": 10}
    # beam search is deterministic; the prompt itself is removed from each caption
    decoded = tokenizer.batch_decode(generate(pixel_values=seen["pixel_values"], input_ids=seen["prompt"],
                                              **GENERATION), skip_special_tokens=True)  # fmt: skip
    for caption, full in zip(captions, decoded, strict=True):
        assert full.startswith("a picture of") and caption == full[len("a picture of") :].strip()


def test_caption_task_writes_the_reference_pairs_file(captioner, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(["red", "blue", "green", "white", "black"]):
        Image.new("RGB", (20 + 4 * i, 16), colour).save(images / f"ILSVRC2012_test_{i:08d}.png")
    out = tmp_path / "pairs.json"
    args = [f"+images={images}", f"+out={out}", f"+captioner={captioner}", "+tagger=synthetic"]
    proc = run_in_process(tmp_path, ["+task=caption", *args])
    assert proc.returncode == 0, proc.stderr
    pairs = json.loads(out.read_text())
    kept = int(proc.stdout.split("wrote ")[1].split(": ")[1].split(" images")[0])
    assert len(pairs) == kept and kept + int(proc.stdout.split("(")[-1].split(" captions")[0]) == 5
    assert all(
        list(p) == ["img_id", "subject", "attribute"] and p["subject"] != p["attribute"] for p in pairs
    )
    assert {p["img_id"] for p in pairs} <= {f"ILSVRC2012_test_{i:08d}" for i in range(5)}


def test_caption_task_errors_name_what_to_give(tmp_path):
    proc = run_in_process(tmp_path, ["+task=caption"])
    assert proc.returncode == 2 and "+images=DIR +out=pairs.json" in proc.stderr
    with pytest.raises(CirlabError, match="no config.json"):
        load_captioner(str(tmp_path))
