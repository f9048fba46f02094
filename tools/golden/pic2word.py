"""Golden files for Pic2Word (tests/golden/pic2word/), made by the authors' own code.

Never imported by cirlab or its tests. Run once, outside the project, with a checkout of
github.com/google-research/composed_image_retrieval (see tests/golden/pic2word/README.md):

    python tools/golden/pic2word.py --pic2word CHECKOUT --out tests/golden/pic2word

A small CLIP of Pic2Word's own copy (model/model.py; OpenAI's state-dict layout, built with the ViT recipe
of tools/golden/openai_clip.py) and a small `IM2TEXT`, every parameter randomised, written as their
scripts write them:

- clip_vit.pt: the CLIP state dict (fp32);
- epoch_2.pt: src/main.py's checkpoint {'epoch', 'name', 'state_dict', 'state_dict_img2text', 'optimizer'},
  from a one-process DistributedDataParallel-style wrapper (`module.` keys, as their DDP runs save), the
  optimiser their main.py builds (AdamW, betas (0.9, 0.98), eps 1e-6) after one step;
- pic2word_hf.pt: the re-hosted release's layout, {'state_dict_img2text'} alone, `module.` keys.

outputs.pt holds what their code computes on fixed pixels: `encode_image`, IM2TEXT's tokens (eval mode),
the training text feature (`encode_text_img` of `tokenize("a photo of")`: the token inserted before EOT),
and the evaluation queries (`encode_text_img_retrieval` at the `*` of `tokenize(["*"])[0][1]`) of the CIRR
prompt `a photo of * , {caption}` and the FashionIQ prompt `a photo of * , {c2} and {c1}`, with the
token ids of each prompt.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

EMBED, MIDDLE, EPOCH = 32, 24, 2
CIRR_CAPTIONS = ["has two dogs instead of one", "Is red, with LONG sleeves!"]
FASHIONIQ_CAPTIONS = [("is darker", "has a v-neck"), ("is shorter and blue", "Has no print.")]


def pkg_resources_shim() -> None:
    """Their tokenizer module imports `packaging` through `pkg_resources`, which recent setuptools dropped."""
    import packaging.version

    shim = types.ModuleType("pkg_resources")
    shim.packaging = types.SimpleNamespace(version=packaging.version)
    sys.modules["pkg_resources"] = shim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--pic2word", required=True, help="checkout of github.com/google-research/composed_image_retrieval"
    )
    ap.add_argument("--out", default="tests/golden/pic2word")
    args = ap.parse_args()
    pkg_resources_shim()
    sys.path[:0] = [args.pic2word, str(Path(__file__).parent)]

    import torch
    from model.model import CLIP, IM2TEXT
    from openai_clip import TEXT, VIT, fixed_pixels, randomise, small_token_embedding
    from third_party.open_clip.clip import tokenize

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(41)
    torch.manual_seed(41)
    model = CLIP(**VIT, **TEXT)
    randomise(model, gen)
    small_token_embedding(model, gen)
    model.eval()
    img2text = IM2TEXT(embed_dim=VIT["embed_dim"], middle_dim=MIDDLE, output_dim=TEXT["transformer_width"])
    randomise(img2text, gen)
    torch.save(model.state_dict(), out / "clip_vit.pt")

    wrapped = torch.nn.Module()  # what DistributedDataParallel's state dict looks like: `module.` keys
    wrapped.module = img2text
    optimizer = torch.optim.AdamW(
        img2text.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1
    )
    img2text.train()  # one step, so that the optimizer state is a real one; the saved weights are the moved ones
    img2text(torch.randn(2, VIT["embed_dim"], generator=gen)).pow(2).mean().backward()
    optimizer.step()
    torch.save(
        {
            "epoch": EPOCH,
            "name": "golden",
            "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
            "state_dict_img2text": wrapped.state_dict(),
            "optimizer": optimizer.state_dict(),
        },
        out / f"epoch_{EPOCH}.pt",
    )
    torch.save({"state_dict_img2text": wrapped.state_dict()}, out / "pic2word_hf.pt")

    img2text.eval()
    pixels = fixed_pixels(len(CIRR_CAPTIONS), VIT["image_resolution"], gen)
    id_split = tokenize(["*"])[0][1]
    outputs = {"pixels": pixels, "id_split": id_split}
    with torch.no_grad():
        image = model.encode_image(pixels)
        tokens = img2text(image)
        train_text = tokenize(["a photo of"] * len(tokens))
        outputs.update(
            image_features=image,
            pseudo_tokens=tokens,
            train_text_features=model.encode_text_img(train_text, tokens),
        )
        for name, prompts in (
            ("cirr", [f"a photo of * , {c}" for c in CIRR_CAPTIONS]),
            ("fashioniq", [f"a photo of * , {c2} and {c1}" for c1, c2 in FASHIONIQ_CAPTIONS]),
        ):
            ids = tokenize(prompts)
            outputs[f"{name}/prompt_tokens"] = ids
            outputs[f"{name}/query_features"] = model.encode_text_img_retrieval(
                ids, tokens, split_ind=id_split, repeat=False
            )
    torch.save({k: v.detach().contiguous() for k, v in outputs.items()}, out / "outputs.pt")
    print(
        ", ".join(f"{p.name} ({p.stat().st_size // 1024} KiB)" for p in sorted(out.iterdir()) if p.is_file())
    )


if __name__ == "__main__":
    main()
