"""Golden files for LinCIR (tests/golden/lincir/), made by the authors' own code.

Never imported by cirlab or its tests. Run once, outside the project, with a checkout of
github.com/navervision/lincir (see tests/golden/lincir/README.md):

    python tools/golden/lincir.py --lincir CHECKOUT --out tests/golden/lincir

Their modules are imported from CHECKOUT; the packages they import but these checks never run (webdataset,
datasets, the OpenAI `clip` package; spaCy when absent) are stand-ins, and `spacy.load` returns a tagger
that tags with cirlab's word list of the bundled benchmark (cirlab.data.pos_tags.synthetic_tagger): the
keyword logic under test is theirs, the tags are the same on both sides.

- phi_best.pt: their `models.Phi` (small dims, every parameter randomised) saved as train_phi.py saves it,
  {'epoch': step, 'Phi': state_dict};
- outputs.pt: fixed inputs and their Phi's outputs in eval mode;
- masking.json: their `loader.CaptionDataset.__getitem__` on CAPTIONS (bundled-benchmark captions plus a few
  edge cases), `random` seeded before each item with the string cirlab's loader seeds its draw with
  (`{seed}-{epoch}-{index}`): the cleaned caption and the masked caption their tokenizer was given.
- with --hf: hf_text.pt, a small HF `CLIPTextModelWithProjection` whose weights are those of a small
  open_clip text tower (given in open_clip's names), and their `encode_with_pseudo_tokens_HF` on
  placeholder rows: every `$` gets the row's token.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

IN, HIDDEN, OUT, STEP = 32, 128, 16, 1000
SEED, EPOCH = 0, 3
CAPTIONS = [
    "a photo of a red circle on the left that has a blue square on the right",
    "a photo of a blue circle on the left and a purple circle in the middle",
    "a green cross in the middle",
    "a photo of a cyan triangle on the right that has a yellow square on the left and has nothing in the middle",
    "a white square on the far left and a orange circle on the far right",
    "a photo of a purple triangle in the middle that has a blue circle on the left and has nothing on the right",
    "a red square on the left and a red square on the right",
    "a photo of a yellow cross on the left that has a green cross in the middle and has a cyan circle on the right",
    "has nothing on the left",
    "also has a blue circle on the right",
    "a photo of a orange triangle in the middle",
    "a blue circle on the left and a blue circles on the right",  # substring: 'a blue circle' hits 'circles'
    "A Photo of a RED circle $ on the left",  # cleaning: lower case, `$` deleted, stripped
    "  a cyan cross in the middle  ",
    "has nothing",  # no keyword run: one random word
    "also has nothing and nothing",
    "on the left",
    "photo",
    "<PERSON> has nothing",
    "a photo of a white circle on the far left that has a red triangle on the left",
    "a photo of a\tred circle on the left",  # a run not in the caption (tab): one random word, then stop
]


def stand_ins() -> None:
    """Modules their loader.py / encode_with_pseudo_tokens.py import at the top, unused here."""
    sys.modules.setdefault("webdataset", types.ModuleType("webdataset"))
    sys.modules.setdefault("datasets", types.ModuleType("datasets"))
    clip, clip_model = types.ModuleType("clip"), types.ModuleType("clip.model")
    clip_model.CLIP = object
    clip.model = clip_model
    sys.modules.setdefault("clip", clip)
    sys.modules.setdefault("clip.model", clip_model)
    try:
        import spacy  # noqa: F401
    except ImportError:
        sys.modules["spacy"] = types.ModuleType("spacy")


def word_list_nlp():
    """`spacy.load(...)`'s stand-in: a callable giving tokens with .text and .pos_ (cirlab's word list)."""
    from cirlab.data.pos_tags import synthetic_tagger

    tag = synthetic_tagger()
    return lambda text: [types.SimpleNamespace(text=w, pos_=p) for w, p in tag(text)]


class RecordingTokenizer:
    """Their tokenizer's two uses in CaptionDataset: `encode` (the >77-token check) and `__call__`; it
    records each text and returns open_clip's ids of it, `[$]` -> 49408 as their added token."""

    def __init__(self):
        import open_clip

        self.tok, self.texts = open_clip.get_tokenizer("ViT-B-32"), []

    def encode(self, text, **kwargs):
        return self.tok([text])

    def __call__(self, text, **kwargs):
        import torch

        self.texts.append(text)
        ids = self.tok([text.replace("[$]", " $ ")])
        ids = torch.where(ids == 259, torch.full_like(ids, 49408), ids)
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def masking(lincir: str) -> list[dict]:
    import random

    import spacy

    spacy.load = lambda *a, **k: word_list_nlp()
    from loader import CaptionDataset

    tokenizer = RecordingTokenizer()
    ds = CaptionDataset(CAPTIONS, tokenizer, spacy.load("en_core_web_sm"))
    out = []
    for i, caption in enumerate(CAPTIONS):
        tokenizer.texts.clear()
        random.seed(f"{SEED}-{EPOCH}-{i}")
        _, replaced, indicator = ds[i]
        cleaned, masked = tokenizer.texts[0], tokenizer.texts[1]
        if indicator == 0:
            masked = tokenizer.texts[-1]  # their fallback `a photo of [$]`
        out.append({"caption": caption, "cleaned": cleaned, "masked": masked, "indicator": int(indicator)})
    return out


def phi_files(out: Path) -> None:
    import torch
    from models import Phi

    gen = torch.Generator().manual_seed(7)
    phi = Phi(IN, HIDDEN, OUT, dropout=0.5)
    with torch.no_grad():
        for p in phi.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    torch.save({"epoch": STEP, "Phi": phi.state_dict()}, out / "phi_best.pt")  # train_phi.py's save_phi
    x = torch.randn(4, IN, generator=gen) * 3
    with torch.no_grad():
        tokens = phi.eval()(x)
    torch.save({"phi_input": x, "phi_output": tokens}, out / "outputs.pt")


OPEN_CLIP_TEXT = {"embed_dim": 24, "context_length": 16, "width": 16, "heads": 2, "layers": 2}


def transformers_4_encoder_call(hf) -> None:
    """Their function calls `text_model.encoder(inputs_embeds=, attention_mask=None, causal_attention_mask=,
    output_attentions=, output_hidden_states=, return_dict=)`, the transformers 4.3x API; transformers 5
    dropped `causal_attention_mask` (it would be ignored: no causal mask). This adapter passes their
    causal mask (their attention_mask is None) as the additive attention mask, which is what 4.3x did with
    it; a call without it (HF's own forward, for `plain_features`) passes through."""
    encoder = hf.text_model.encoder
    forward = encoder.forward

    def call(inputs_embeds, attention_mask=None, causal_attention_mask=None, **kwargs):
        for k in ("output_attentions", "output_hidden_states", "return_dict"):
            kwargs.pop(k, None)
        if causal_attention_mask is not None:  # their call (HF's own forward passes its mask alone)
            attention_mask = causal_attention_mask
        return forward(inputs_embeds, attention_mask=attention_mask, **kwargs)

    encoder.forward = call


def hf_text(out: Path) -> None:
    """A small open_clip text tower (random) copied into HF CLIPTextModelWithProjection; their
    encode_with_pseudo_tokens_HF on rows with one, two and three `$`."""
    import open_clip
    import torch
    from encode_with_pseudo_tokens import encode_with_pseudo_tokens_HF
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    c = OPEN_CLIP_TEXT
    torch.manual_seed(3)
    oc = open_clip.CLIP(
        embed_dim=c["embed_dim"],
        vision_cfg={"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 32},
        text_cfg={k: c[k] for k in ("context_length", "width", "heads", "layers")} | {"vocab_size": 49408},
    )
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in oc.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        # the 49408-row token embedding as overlapping rows of one random vector: torch.save stores 49439
        # floats instead of 1.6 M (as tools/golden/openai_clip.py's small_token_embedding)
        base = torch.randn(49408 + c["width"] - 1, generator=gen) * 0.1
        oc.token_embedding.weight = torch.nn.Parameter(base.as_strided((49408, c["width"]), (1, 1)))
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=c["width"],
        intermediate_size=4 * c["width"],
        num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"],
        max_position_embeddings=c["context_length"],
        projection_dim=c["embed_dim"],
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        eos_token_id=49407,
    )
    cfg._attn_implementation = "eager"  # an additive float mask, as 4.3x applied it
    hf = CLIPTextModelWithProjection(cfg).eval()
    s = {k: v for k, v in oc.state_dict().items() if not k.startswith("visual.")}
    m = {
        "text_model.embeddings.token_embedding.weight": s["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": s["positional_embedding"],
        "text_model.final_layer_norm.weight": s["ln_final.weight"],
        "text_model.final_layer_norm.bias": s["ln_final.bias"],
        "text_projection.weight": s["text_projection"].T,
    }
    for i in range(c["layers"]):
        o, h = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for part, w in zip(("q", "k", "v"), s[o + "attn.in_proj_weight"].chunk(3)):
            m[h + f"self_attn.{part}_proj.weight"] = w
        for part, b in zip(("q", "k", "v"), s[o + "attn.in_proj_bias"].chunk(3)):
            m[h + f"self_attn.{part}_proj.bias"] = b
        for theirs, ours in (
            ("self_attn.out_proj", "attn.out_proj"),
            ("layer_norm1", "ln_1"),
            ("layer_norm2", "ln_2"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ):
            m[h + theirs + ".weight"], m[h + theirs + ".bias"] = (
                s[o + ours + ".weight"],
                s[o + ours + ".bias"],
            )
    missing, unexpected = hf.load_state_dict(m, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise SystemExit(f"HF copy: missing {missing}, unexpected {unexpected}")
    transformers_4_encoder_call(hf)
    texts = ["a photo of $", "$ of $ on $ that has $", "has $ on the left and $ on $"]
    ids = open_clip.tokenize(texts, context_length=c["context_length"])
    pseudo = torch.randn(len(texts), c["width"], generator=gen)
    with torch.no_grad():
        features = encode_with_pseudo_tokens_HF(hf, ids, pseudo)
        plain = hf(input_ids=ids).text_embeds  # no substitution: checks the copy against open_clip
        literal = hf.text_model.embeddings.token_embedding.weight[259].expand(len(texts), -1)
        if not torch.allclose(encode_with_pseudo_tokens_HF(hf, ids, literal), plain, atol=1e-5):
            raise SystemExit(
                "their encoder with `$`'s own embedding differs from HF's forward: the shim is wrong"
            )
    torch.save(
        {
            "open_clip_text": s,
            "texts": texts,
            "token_ids": ids,
            "pseudo": pseudo,
            "features": features,
            "plain_features": plain,
        },
        out / "hf_text.pt",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lincir", required=True, help="checkout of github.com/navervision/lincir")
    ap.add_argument("--out", default="tests/golden/lincir")
    ap.add_argument("--hf", action="store_true", help="also their encode_with_pseudo_tokens_HF (hf_text.pt)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stand_ins()
    sys.path.insert(0, args.lincir)
    phi_files(out)
    (out / "masking.json").write_text(
        json.dumps({"seed": SEED, "epoch": EPOCH, "items": masking(args.lincir)}, indent=1) + "\n"
    )
    if args.hf:
        hf_text(out)


if __name__ == "__main__":
    main()
