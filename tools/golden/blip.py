"""Golden files for BLIP (tests/golden/blip/), made by the authors' own code.

Never imported by cirlab or its tests. Run once, in a scratch venv outside the project (transformers 4.25.1,
timm 0.4.12, fairscale 0.4.4; see tests/golden/blip/README.md), with a checkout of github.com/salesforce/BLIP:

    python tools/golden/blip.py --blip BLIP_CHECKOUT --out tests/golden/blip

Small instances of BLIP's `BLIP_Pretrain` (models/blip_pretrain.py: momentum encoders, captioning decoder,
ITC queues) and `BLIP_Retrieval` (models/blip_retrieval.py: momentum encoders, id queue), every parameter
and buffer randomised, saved as pretrain.py / train_retrieval.py save their checkpoints ({'model',
'optimizer', 'config', 'epoch'}), and what BLIP's code computes on fixed inputs, as train_retrieval.py's
`evaluation` does it: the tokens (padding 'max_length', 35), the image features (vision_proj of the ViT
CLS, normalised) and the text features (text_proj of the text encoder's CLS in 'text' mode, normalised),
plus the image-grounded text features and ITM logits (captions starting with [ENC], cross-attention to
the ViT tokens). Offline stand-ins for what BLIP downloads (the only changes to its code, all below):
- `create_vit` (fixed to 'base' / 'large' widths) returns BLIP's own `VisionTransformer`, small (VIT);
- `BertTokenizer.from_pretrained('bert-base-uncased')` in `init_tokenizer` reads the small WordPiece
  vocab this script writes (tokenizer/vocab.txt); BLIP's init_tokenizer then adds [DEC] and [ENC] itself;
- `BertModel.from_pretrained` / `BertLMHeadModel.from_pretrained('bert-base-uncased', config=...)` build
  the model from that config (its weights are randomised anyway);
- the med configs (configs/bert_config.json, configs/med_config.json) are small copies (TEXT).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

VIT = dict(patch_size=8, embed_dim=24, depth=2, num_heads=2)  # mlp_ratio 4 (BLIP's), LayerNorm eps 1e-6
IMAGE_SIZE = 32  # the "224 px" of the pretraining checkpoint: 4 x 4 patches
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
MAX_POSITIONS = 40
EMBED_DIM, QUEUE = 16, 8
SEEDS = {"pretrain": 0, "retrieval": 1}
MATRIX_SCALE = 0.3  # noise on weight matrices: at 0.1 every caption's CLS feature is alike (cosine > 0.98)
CAPTIONS = [
    "a red dress with long sleeves",
    "Two dogs play on the grass.",
    "is shorter and has no sleeves, costs 5€",
    "a zebra-striped umbrella",
]
WORDS = """a an and are as at be black blue but by dog dogs dress for from grass green has in is it its
    long longer more no not of on one play red same shirt short shorter sleeve sleeves the to two umbrella
    white with yellow forward backward darker formal lighter sandals striped colorful pattern less""".split()


def vocab() -> list[str]:
    """BERT's special tokens first ([PAD] = 0, as bert-base-uncased), then single characters (any word
    still tokenises, as ##-pieces), punctuation, and whole words."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    punct = list("[].,-!?'\"():;/")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *punct, *chars, *(f"##{c}" for c in chars)]
    return list(dict.fromkeys(words + WORDS))


def med_config(vocab_size: int, encoder_width: int) -> dict:
    """configs/med_config.json with the small sizes (BLIP's own keys and the rest of its values)."""
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": MAX_POSITIONS,
        "model_type": "bert",
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
        "encoder_width": encoder_width,
        "add_cross_attention": True,
        **TEXT,
    }


def randomise(module, gen, scale: float = 0.1, matrix_scale: float = MATRIX_SCALE) -> None:
    """Default init plus noise on every float parameter and buffer (LayerNorm weights and biases, Linear
    biases, the queues and the temperature too), so swapping two same-shaped tensors changes the outputs;
    integer buffers get random values, except med.py's `position_ids`: a constant 0..n-1 index table, not
    state (a random one would make BLIP index positions at random)."""
    import torch

    seen = set()
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if id(t) in seen:  # tied (the decoder shares the encoder's layers but self-attention)
                continue
            seen.add(id(t))
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen) * (matrix_scale if t.dim() == 2 else scale))
            elif not name.endswith("position_ids"):
                t.copy_(torch.randint(0, QUEUE, t.shape, generator=gen))
        for queue in ("image_queue", "text_queue"):  # BLIP keeps them normalised
            if hasattr(module, queue):
                getattr(module, queue).copy_(torch.nn.functional.normalize(getattr(module, queue), dim=0))


def patch_offline(vocab_file: Path) -> None:
    """The stand-ins listed in the module docstring."""
    import models.blip as blip
    import models.blip_pretrain as blip_pretrain
    import models.blip_retrieval as blip_retrieval
    import models.med as med
    from models.vit import VisionTransformer
    from transformers import BertTokenizer

    class LocalBertTokenizer(BertTokenizer):
        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):
            assert name == "bert-base-uncased", name
            return BertTokenizer(vocab_file=str(vocab_file))

    def small_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        encoder = VisionTransformer(
            img_size=image_size,
            use_grad_checkpointing=use_grad_checkpointing,
            ckpt_layer=ckpt_layer,
            drop_path_rate=drop_path_rate,
            **VIT,
        )
        return encoder, VIT["embed_dim"]

    def from_config(cls, name, config=None, **kwargs):
        assert name == "bert-base-uncased", name
        return cls(config=config, **kwargs)

    blip.BertTokenizer = LocalBertTokenizer
    blip.create_vit = blip_pretrain.create_vit = blip_retrieval.create_vit = small_vit
    med.BertModel.from_pretrained = classmethod(from_config)
    med.BertLMHeadModel.from_pretrained = classmethod(from_config)


def reference_outputs(model, images):
    """train_retrieval.py's `evaluation`: tokens, normalised text_proj / vision_proj features; and the ITM
    pass of its re-ranking (ids[:, 0] = [ENC], cross-attention to the ViT tokens of the paired image)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad():
        text = model.tokenizer(
            CAPTIONS, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
        )
        text_output = model.text_encoder(text.input_ids, attention_mask=text.attention_mask, mode="text")
        text_embed = model.text_proj(text_output.last_hidden_state[:, 0, :])
        image_feat = model.visual_encoder(images)
        image_embed = model.vision_proj(image_feat[:, 0, :])
        ids = text.input_ids.clone()
        ids[:, 0] = model.tokenizer.enc_token_id
        paired = image_feat[torch.arange(len(CAPTIONS)) % len(images)]
        output = model.text_encoder(
            ids,
            attention_mask=text.attention_mask,
            encoder_hidden_states=paired,
            encoder_attention_mask=torch.ones(paired.shape[:-1], dtype=torch.long),
            return_dict=True,
        )
        cls = output.last_hidden_state[:, 0, :]
        return {
            "input_ids": text.input_ids,
            "attention_mask": text.attention_mask,
            "text_embed": text_embed,
            "text_feat": F.normalize(text_embed, dim=-1),
            "image_embed": image_embed,
            "image_feat": F.normalize(image_embed, dim=-1),
            "itm_input_ids": ids,
            "grounded_embed": model.text_proj(cls),
            "itm_logits": model.itm_head(cls),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blip", required=True, help="checkout of github.com/salesforce/BLIP")
    ap.add_argument("--out", default="tests/golden/blip")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.blip).resolve()))

    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    words = vocab()
    (out / "tokenizer" / "vocab.txt").write_text("\n".join(words) + "\n")
    patch_offline(out / "tokenizer" / "vocab.txt")
    from models.blip_pretrain import BLIP_Pretrain
    from models.blip_retrieval import BLIP_Retrieval

    gen = torch.Generator().manual_seed(31)
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    outputs = {"captions": CAPTIONS, "images": images}
    with tempfile.TemporaryDirectory() as tmp:
        bert_config, med = Path(tmp) / "bert_config.json", Path(tmp) / "med_config.json"
        # as configs/: bert_config.json has BERT's vocab (pretraining resizes it to the tokenizer), med_config
        # the tokenizer's (+ [DEC], [ENC])
        bert_config.write_text(json.dumps(med_config(len(words), VIT["embed_dim"])))
        med.write_text(json.dumps(med_config(len(words) + 2, VIT["embed_dim"])))
        common = dict(image_size=IMAGE_SIZE, vit="small", embed_dim=EMBED_DIM, queue_size=QUEUE)
        models = {
            "pretrain": (BLIP_Pretrain, dict(med_config=str(bert_config), **common), "model_base.pth", 19),
            "retrieval": (
                BLIP_Retrieval,
                dict(med_config=str(med), negative_all_rank=False, **common),
                "model_base_retrieval_coco.pth",
                5,
            ),
        }
        for kind, (cls, kwargs, file, epoch) in models.items():
            torch.manual_seed(SEEDS[kind])
            model = cls(**kwargs)
            randomise(model, torch.Generator().manual_seed(100 + SEEDS[kind]))
            optimizer = torch.optim.AdamW(params=model.parameters(), lr=1e-5, weight_decay=0.05)
            config = {"vit": "small", "image_size": IMAGE_SIZE, "queue_size": QUEUE, "embed_dim": EMBED_DIM}
            # pretrain.py / train_retrieval.py: save_obj = {'model', 'optimizer', 'config', 'epoch'}
            save_obj = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "config": config,
                "epoch": epoch,
            }
            torch.save(save_obj, out / file)
            outputs[kind] = reference_outputs(model, images)
    torch.save(outputs, out / "outputs.pt")
    for kind in SEEDS:
        for key, value in outputs[kind].items():
            if value.is_floating_point():
                assert torch.isfinite(value).all(), key
                print(f"{kind:9s} {key:15s} {tuple(value.shape)} std {value.std():.3g}")
    print(
        "wrote",
        ", ".join(f"{p.name} ({p.stat().st_size // 1024} KiB)" for p in sorted(out.iterdir()) if p.is_file()),
    )


if __name__ == "__main__":
    main()
