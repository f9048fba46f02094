"""BLIP (HF transformers `BlipForImageTextRetrieval`) behind the Backbone interface.

As Bi-BLIP4CIR encodes (../shared/spec/blip4cir.md §1): image = vision_proj(ViT CLS of the last
layer), text = text_proj(BERT [CLS]) in unimodal 'text' mode (no cross-attention), both raw
(un-normalised). Three ways to build one:
- `backbone=blip_base`: the HF hub model (`hf_id`), only from the local HF cache (no download here);
- `backbone.checkpoint=DIR`: a folder written by `BlipBackbone.save_pretrained` (model + tokenizer);
- `backbone=blip_tiny`: a small `BlipConfig` with a WordPiece vocab built offline from the
  synthetic captions, pretrained by cirlab on first use and cached by config hash (as `tiny`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from transformers import BertTokenizerFast, BlipConfig, BlipForImageTextRetrieval

from cirlab.backbones.base import Backbone
from cirlab.backbones.pretrain import load_or_pretrain, plain
from cirlab.data.transforms import build_transform
from cirlab.errors import CirlabError
from cirlab.io import write_text

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DIRECTION_WORDS = ["[", "]", "forward", "backward"]


class BlipBackbone(Backbone):
    def __init__(self, hf_id: str | None = None, checkpoint: str | None = None, config: dict | None = None,
                 vocab_file: str | None = None, preprocess: str = "clip", target_ratio: float = 1.25,
                 max_length: int = 77, name: str = "blip", local_files_only: bool = True):
        super().__init__()
        if checkpoint:
            folder = Path(checkpoint)
            if not (folder / "config.json").is_file():
                raise CirlabError(f"backbone.checkpoint={folder} is not a BLIP folder saved with save_pretrained "
                                  "(no config.json in it)")
            self.model = BlipForImageTextRetrieval.from_pretrained(folder)
            self.tokenizer = BertTokenizerFast.from_pretrained(folder)
        elif config is not None:
            if not vocab_file:
                raise CirlabError("a BLIP built from backbone config needs a WordPiece vocab_file for its tokenizer")
            self.model = BlipForImageTextRetrieval(BlipConfig(**plain(config)))
            words = Path(vocab_file).read_text().split("\n")  # transformers 5 takes the vocab itself, not its file
            self.tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
        else:
            try:
                self.model = BlipForImageTextRetrieval.from_pretrained(hf_id, local_files_only=local_files_only)
                self.tokenizer = BertTokenizerFast.from_pretrained(hf_id, local_files_only=local_files_only)
            except (OSError, ValueError) as err:
                raise CirlabError(
                    f"cannot load BLIP weights {hf_id!r}: {' '.join(str(err).split())[:200]}\n"
                    "They are not in the local Hugging Face cache and cannot be downloaded here. On a machine with "
                    f"network run `huggingface-cli download {hf_id}` (or pass backbone.local_files_only=false), "
                    "or give a folder saved with save_pretrained: backbone.checkpoint=/path/to/dir.") from err
        self.model.eval()
        cfg = self.model.config
        self.image_size = int(cfg.vision_config.image_size)
        self.embed_dim = int(cfg.image_text_hidden_size)
        self.max_length = max_length
        self.preprocess_mode = preprocess
        self.preprocess = build_transform(preprocess, self.image_size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD,
                                          target_ratio)
        self.name = name

    # ---- encoders -------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        hidden = self.model.vision_model(pixel_values=images).last_hidden_state
        return self.model.vision_proj(hidden[:, 0])

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """text_proj([CLS]) of the BERT text encoder in unimodal mode (no cross-attention)."""
        out = self.model.text_encoder(input_ids=tokens["input_ids"].to(self.device),
                                      attention_mask=tokens["attention_mask"].to(self.device), return_dict=True)
        return self.model.text_proj(out.last_hidden_state[:, 0])

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.encode_text(self.tokenize(texts))

    def encode_grounded_text(self, images: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """text_proj([CLS]) of the text encoder cross-attending to the image's ViT tokens (BLIP's
        image-grounded mode). BLIP4CIR+Bi's reference does NOT use it (it sums unimodal features);
        offered for methods that compose inside the encoder."""
        image_tokens = self.model.vision_model(pixel_values=images).last_hidden_state
        out = self.model.text_encoder(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device),
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long, device=self.device),
            return_dict=True)
        return self.model.text_proj(out.last_hidden_state[:, 0])

    def add_tokens(self, tokens: list[str]) -> None:
        """New special tokens with their own (trainable) word-embedding rows; idempotent, so every
        stage of a method may ask for them and a resumed stage's checkpoint shapes still match."""
        missing = [t for t in tokens if t not in self.tokenizer.get_vocab()]
        if missing:
            self.tokenizer.add_special_tokens({"additional_special_tokens": missing})
            self.model.text_encoder.resize_token_embeddings(len(self.tokenizer))

    def image_parameters(self):
        return list(self.model.vision_model.parameters()) + list(self.model.vision_proj.parameters())

    def text_parameters(self):
        return list(self.model.text_encoder.parameters()) + list(self.model.text_proj.parameters())

    def text_proj_parameters(self):
        return list(self.model.text_proj.parameters())

    def save_pretrained(self, folder: str | Path) -> None:
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


# ---- blip_tiny ------------------------------------------------------------------------------------
def caption_vocab(cache_dir: str, dataset: dict | None = None) -> list[str]:
    """WordPiece vocab: BERT's specials, the direction-marker pieces, single characters (so any
    word still tokenises, as ##-pieces) and every word of the synthetic captions and modification texts."""
    from cirlab.data.sources.synthetic import synthetic_source

    source = synthetic_source(cache_dir, **(dataset or {}))
    texts = [c for _, caps in source.image_captions("train") for c in caps]
    texts += [c for q in source.train_queries() for c in q.captions]
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = SPECIAL_TOKENS + DIRECTION_WORDS + chars + [f"##{c}" for c in chars] + words
    seen: dict[str, None] = {}
    for token in vocab:
        seen.setdefault(token, None)
    return list(seen)


def pretrained_blip_tiny(cache_dir: str, model_cfg: dict, pretrain: dict, preprocess: str = "clip",
                         checkpoint: str | None = None, name: str = "blip_tiny", max_length: int = 32) -> BlipBackbone:
    if checkpoint:
        return BlipBackbone(checkpoint=checkpoint, preprocess=preprocess, name=name, max_length=max_length)
    model_cfg, pretrain = plain(model_cfg), plain(pretrain)
    vocab = caption_vocab(cache_dir, pretrain.get("dataset"))
    vocab_path = Path(cache_dir) / "backbones" / f"{name}-vocab-{len(vocab)}.txt"
    if not vocab_path.is_file() or vocab_path.read_text().split("\n") != vocab:
        write_text(vocab_path, "\n".join(vocab))
    config = json.loads(json.dumps(model_cfg))
    config["text_config"] = {**config["text_config"], "vocab_size": len(vocab), "pad_token_id": 0,
                             "bos_token_id": vocab.index("[CLS]"), "sep_token_id": vocab.index("[SEP]"),
                             "eos_token_id": vocab.index("[SEP]")}
    torch.manual_seed(pretrain["seed"])  # the same initial weights whatever ran before
    backbone = BlipBackbone(config=config, vocab_file=str(vocab_path), preprocess=preprocess, name=name,
                            max_length=max_length)
    return load_or_pretrain(backbone, cache_dir, {"blip": config, "vocab": vocab}, pretrain, name)


def blip_config(cfg: dict[str, Any]) -> BlipConfig:
    """The BlipConfig a backbone config describes (no weights, no network)."""
    return BlipConfig(**plain(cfg))
