"""BLIP's own checkpoints (salesforce/BLIP) -> a `save_pretrained` folder of HF `BlipForImageTextRetrieval`.

BLIP4CIR+Bi starts from BLIP's pretraining checkpoint `model_base.pth` (state under 'model'), which HF
does not host as a retrieval model; `cirlab +task=convert_blip` turns it into a folder that
`backbone=blip_base backbone.hf_id=DIR` (or `backbone.checkpoint=DIR`) loads. Key names follow BLIP's
vit.py / med.py and transformers' convert_blip_original_pytorch_to_hf.py; every HF tensor must be
filled and every checkpoint tensor is either used or dropped by an explicit rule below (pretraining-only
parts), so a checkpoint of another kind is an error, never a partial model. The sizes (widths, depths,
vocabulary, patch, projection) are read from the file, so model_base.pth and model_large.pth (ViT-L)
convert alike; the rest (attention head width, image size, LayerNorm eps, dropout) is the architecture's.
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

from cirlab.backbones.base import as_json_data
from cirlab.backbones.blip import (
    POSITION_RULE,
    TOKENIZER_PATTERNS,
    add_blip_tokens,
    hub_snapshot,
    is_hub_id,
    load_tokenizer,
)
from cirlab.errors import CirlabError
from cirlab.io import current_umask, load_torch
from cirlab.weight_map import Rule, WeightMap
from cirlab.weights import load_strict

# BLIP's checkpoint (vit.py, med.py names) -> HF BlipForImageTextRetrieval, following transformers'
# convert_blip_original_pytorch_to_hf.py; the parts a retrieval encoder does not have are dropped, by name.
BLIP_CHECKPOINT = WeightMap(
    (
        Rule("visual_encoder_m.*", None, why="momentum ViT (ITC pretraining)"),
        Rule("vision_proj_m.*", None, why="momentum image projection"),
        Rule("text_encoder_m.*", None, why="momentum text encoder"),
        Rule("text_proj_m.*", None, why="momentum text projection"),
        Rule("text_decoder.*", None, why="captioning decoder (LM pretraining)"),
        Rule("image_queue", None, why="ITC feature queue"),
        Rule("text_queue", None, why="ITC feature queue"),
        Rule("queue_ptr", None, why="ITC queue pointer"),
        Rule("idx_queue", None, why="retrieval fine-tuning id queue"),
        Rule("ptr_queue", None, why="retrieval fine-tuning queue pointer"),
        Rule("temp", None, why="ITC temperature"),
        POSITION_RULE,
        Rule("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
        Rule("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
        Rule("visual_encoder.patch_embed.proj.*", "vision_model.embeddings.patch_embedding.*"),
        Rule("visual_encoder.norm.*", "vision_model.post_layernorm.*"),
        Rule("visual_encoder.blocks.*.norm1.*", "vision_model.encoder.layers.*.layer_norm1.*"),
        Rule("visual_encoder.blocks.*.norm2.*", "vision_model.encoder.layers.*.layer_norm2.*"),
        Rule("visual_encoder.blocks.*.attn.qkv.*", "vision_model.encoder.layers.*.self_attn.qkv.*"),
        Rule("visual_encoder.blocks.*.attn.proj.*", "vision_model.encoder.layers.*.self_attn.projection.*"),
        Rule("visual_encoder.blocks.*.mlp.*", "vision_model.encoder.layers.*.mlp.*"),
        # med.py's BertModel names are HF's; a key no rule names is left to the strict load to report
        *(
            Rule(f"{part}*", f"{part}*")
            for part in ("text_encoder.", "vision_proj.", "text_proj.", "itm_head.")
        ),
    )
)


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
    """BLIP's init_tokenizer: bert-base-uncased (a hub id, or a folder: any other path) + [DEC], [ENC]."""
    if is_hub_id(source):
        advice = (
            "BLIP uses bert-base-uncased: download it once where there is network (`hf download "
            "bert-base-uncased`), or give a tokenizer folder with +tokenizer=DIR."
        )
        folder = hub_snapshot(source, TOKENIZER_PATTERNS, "the BERT tokenizer", advice)
    else:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise CirlabError(
                f"+tokenizer={source}: no such folder (give bert-base-uncased or a tokenizer folder)"
            )
    tokenizer = load_tokenizer(folder, "+tokenizer")
    add_blip_tokens(tokenizer)
    return tokenizer


def layers(state: dict, pattern: str) -> int | None:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else None


def infer_architecture(state: dict, architecture: dict) -> dict:
    """BlipConfig kwargs for the BLIP state dict `state`: the sizes the tensors show, the rest from
    `architecture`. A size whose tensor is missing keeps the architecture's (the strict load then names the
    tensor). Heads keep the architecture's head width (BLIP base and large: 64), so a checkpoint whose width
    is no multiple of it needs its heads given: hidden_size and num_attention_heads in the architecture."""

    def rows(key: str, dim: int = 0) -> int | None:
        return int(state[key].shape[dim]) if key in state else None

    arch = as_json_data(architecture)
    vision, text = dict(arch.get("vision_config", {})), dict(arch.get("text_config", {}))
    t = "text_encoder."
    sizes = {
        "vision": (
            vision,
            {
                "hidden_size": rows("visual_encoder.cls_token", -1),
                "num_hidden_layers": layers(state, r"visual_encoder\.blocks\.(\d+)\."),
                "intermediate_size": rows("visual_encoder.blocks.0.mlp.fc1.weight"),
                "patch_size": rows("visual_encoder.patch_embed.proj.weight", -1),
            },
        ),
        "text": (
            text,
            {
                "hidden_size": rows(f"{t}embeddings.word_embeddings.weight", 1),
                "vocab_size": rows(f"{t}embeddings.word_embeddings.weight"),
                "max_position_embeddings": rows(f"{t}embeddings.position_embeddings.weight"),
                "num_hidden_layers": layers(state, r"text_encoder\.encoder\.layer\.(\d+)\."),
                "intermediate_size": rows(f"{t}encoder.layer.0.intermediate.dense.weight"),
                "encoder_hidden_size": rows(f"{t}encoder.layer.0.crossattention.self.key.weight", 1),
            },
        ),
    }
    for side, (config, found) in sizes.items():
        width, default = found["hidden_size"], config.get("hidden_size", 768)
        head_width = default // config.get("num_attention_heads", default // 64)
        if width is not None and width != default:
            if width % head_width:
                raise CirlabError(
                    f"the checkpoint's {side} width {width} is no multiple of the architecture's {head_width}-wide "
                    f"attention heads, and a file does not tell its heads: give them, e.g. backbone=blip_base "
                    f"backbone.architecture.{side}_config.hidden_size={width} "
                    f"backbone.architecture.{side}_config.num_attention_heads=N"
                )
            config["num_attention_heads"] = width // head_width
        config.update({k: v for k, v in found.items() if v is not None})
    arch["vision_config"], arch["text_config"] = vision, text
    if "vision_proj.weight" in state:
        arch["image_text_hidden_size"] = rows("vision_proj.weight")
    return arch


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
    tok = blip_tokenizer(tokenizer)  # before the (large) checkpoint: offline, the answer comes at once
    obj = load_torch(src)
    if not (isinstance(obj, dict) and isinstance(obj.get("model"), dict)):
        keys = list(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise CirlabError(
            f"+src={src} is not a BLIP checkpoint (expected the state dict under 'model', as "
            f"salesforce/BLIP saves model_base.pth; found {keys})"
        )
    config = infer_architecture(obj["model"], architecture)
    rows = config["text_config"].get("vocab_size", 30524)  # BlipTextConfig's default
    if len(tok) != rows:
        raise CirlabError(
            f"tokenizer {tokenizer!r} has {len(tok)} tokens with [DEC]/[ENC], but the checkpoint's "
            f"word embedding has {rows} rows: give BLIP's tokenizer (bert-base-uncased)"
        )
    config["text_config"].update(  # BLIP's special tokens ([DEC] begins captions, [SEP] ends them)
        pad_token_id=tok.pad_token_id,
        sep_token_id=tok.sep_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.sep_token_id,
    )
    model = BlipForImageTextRetrieval(BlipConfig(**config)).eval()
    state, dropped = BLIP_CHECKPOINT.to_model(obj["model"]), BLIP_CHECKPOINT.dropped(obj["model"])
    pos = "vision_model.embeddings.position_embedding"
    if pos in state:
        state[pos] = interpolate_pos_embed(
            state[pos], model.vision_model.embeddings.position_embedding.shape[1]
        )
    load_strict(model, state, f"+src={src} (converted to HF BLIP names)")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        follow_umask(tmp)
        os.replace(tmp, out)  # the folder appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dropped


def follow_umask(folder: Path) -> None:
    """mkdtemp makes the folder 0700 and transformers writes model.safetensors 0600 (through a temporary
    file): give them the modes mkdir and open would, so the folder can be shared as any other output."""
    mask = current_umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
