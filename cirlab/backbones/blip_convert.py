"""BLIP's own checkpoints (salesforce/BLIP) -> a `save_pretrained` folder of HF `BlipForImageTextRetrieval`.

BLIP4CIR+Bi starts from BLIP's pretraining checkpoint `model_base.pth` (state under 'model'), which HF
does not host as a retrieval model; `cirlab +task=convert_blip` turns it into a folder that
`backbone=blip_base backbone.hf_id=DIR` (or `backbone.checkpoint=DIR`) loads. Key names follow BLIP's
vit.py / med.py and transformers' convert_blip_original_pytorch_to_hf.py; every HF tensor must be
filled and every checkpoint tensor is either used or dropped by an explicit rule below (pretraining-only
parts), so a checkpoint of another kind or size is an error, never a partial model.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import BertTokenizerFast, BlipConfig, BlipForImageTextRetrieval

from cirlab.backbones.base import plain
from cirlab.backbones.blip import POSITION_IDS
from cirlab.errors import CirlabError
from cirlab.io import load_torch
from cirlab.weights import load_strict

# Parts of BLIP's checkpoints that a retrieval encoder does not have, by prefix or exact key.
UNUSED = {
    "visual_encoder_m.": "momentum ViT (ITC pretraining)",
    "vision_proj_m.": "momentum image projection",
    "text_encoder_m.": "momentum text encoder",
    "text_proj_m.": "momentum text projection",
    "text_decoder.": "captioning decoder (LM pretraining)",
    "image_queue": "ITC feature queue",
    "text_queue": "ITC feature queue",
    "queue_ptr": "ITC queue pointer",
    "idx_queue": "retrieval fine-tuning id queue",
    "ptr_queue": "retrieval fine-tuning queue pointer",
    "temp": "ITC temperature",
    POSITION_IDS: "constant position-id buffer (HF rebuilds it)",
}

# BLIP vit.py -> HF BlipVisionModel (transformers' convert_blip_original_pytorch_to_hf.py rename_key)
VISION_RENAMES = [
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.norm\.", "vision_model.post_layernorm."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
    (
        r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.",
        r"vision_model.encoder.layers.\1.self_attn.projection.",
    ),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
]
# text_encoder.* (med.py BertModel), vision_proj, text_proj and itm_head keep their names in HF.
SAME_NAME = ("text_encoder.", "vision_proj.", "text_proj.", "itm_head.")


def unused_reason(key: str) -> str | None:
    for rule, why in UNUSED.items():
        if key == rule or (rule.endswith(".") and key.startswith(rule)):
            return why
    return None


def hf_name(key: str) -> str:
    for pattern, repl in VISION_RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return key  # SAME_NAME keys, or a foreign key the strict load then names


def interpolate_pos_embed(pos_embed: torch.Tensor, num_positions: int) -> torch.Tensor:
    """BLIP's vit.interpolate_pos_embed: the patch grid resized bicubically (CLS row kept), as BLIP and
    Bi-BLIP4CIR do when the 224-px pretraining checkpoint is used at 384 px."""
    orig = int((pos_embed.shape[-2] - 1) ** 0.5)
    new = int((num_positions - 1) ** 0.5)
    if orig == new:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(-1, orig, orig, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat((pos_embed[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


def blip_tokenizer(source: str) -> BertTokenizerFast:
    """BLIP's init_tokenizer: bert-base-uncased + bos '[DEC]' + additional '[ENC]' (ids 30522, 30523)."""
    try:
        tokenizer = BertTokenizerFast.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise CirlabError(
            f"cannot load the BERT tokenizer {source!r} ({' '.join(str(err).split())[:160]}). BLIP uses "
            "bert-base-uncased: download it once where there is network (`hf download bert-base-uncased`), or "
            "give a tokenizer folder with +tokenizer=DIR."
        ) from err
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def convert_blip_checkpoint(
    src: str | Path, out: str | Path, architecture: dict, tokenizer: str = "bert-base-uncased"
) -> dict[str, list[str]]:
    """Write `out` (save_pretrained: model + tokenizer) from a BLIP checkpoint; returns the dropped
    keys grouped by reason. `architecture` = BlipConfig kwargs (backbone.architecture of blip_base)."""
    src, out = Path(src), Path(out)
    if out.exists():
        raise CirlabError(f"+out={out} already exists; delete it or choose another folder")
    if not src.is_file():
        raise CirlabError(f"+src={src}: no such file")
    obj = load_torch(src)
    if not (isinstance(obj, dict) and isinstance(obj.get("model"), dict)):
        keys = list(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise CirlabError(
            f"+src={src} is not a BLIP checkpoint (expected the state dict under 'model', as "
            f"salesforce/BLIP saves model_base.pth; found {keys})"
        )
    model = BlipForImageTextRetrieval(BlipConfig(**plain(architecture))).eval()
    dropped: dict[str, list[str]] = {}
    state = {}
    for key, value in obj["model"].items():
        why = unused_reason(key)
        if why:
            dropped.setdefault(why, []).append(key)
        else:
            state[hf_name(key)] = value
    pos = "vision_model.embeddings.position_embedding"
    if pos in state:
        state[pos] = interpolate_pos_embed(
            state[pos], model.vision_model.embeddings.position_embedding.shape[1]
        )
    load_strict(model, state, f"+src={src} (converted to HF BLIP names)")

    tok = blip_tokenizer(tokenizer)
    rows = model.text_encoder.get_input_embeddings().weight.shape[0]
    if len(tok) != rows:
        raise CirlabError(
            f"tokenizer {tokenizer!r} has {len(tok)} tokens with [DEC]/[ENC], but the checkpoint's "
            f"word embedding has {rows} rows: give BLIP's tokenizer (bert-base-uncased)"
        )
    text = model.config.text_config
    text.pad_token_id, text.sep_token_id = tok.pad_token_id, tok.sep_token_id
    text.bos_token_id, text.eos_token_id = tok.bos_token_id, tok.sep_token_id

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)  # the folder appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dropped
