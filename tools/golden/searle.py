"""Golden files for SEARLE (tests/golden/searle/), made by the authors' own code.

Never imported by cirlab or its tests. Run once, in a scratch venv outside the project, with checkouts of
github.com/miccunifi/SEARLE and github.com/openai/CLIP (see tests/golden/searle/README.md):

    python tools/golden/searle.py --searle SEARLE_CHECKOUT --clip CLIP_CHECKOUT --out tests/golden/searle

It builds a small openai `clip.model.CLIP` (ViT image tower) and a small SEARLE `Phi`, every parameter
randomised, saves phi as the release file (`{'Phi': state_dict}`, what hubconf.py reads) and as
train_phi.py's `save_phi` writes it (`phi_20.pt`: {'epoch', 'Phi'}), the CLIP as an OpenAI state dict,
and records what SEARLE's code computes: pseudo tokens by utils.extract_pseudo_tokens_with_phi, and the
FashionIQ / CIRR query features by validate.py's fiq_/cirr_generate_val_predictions, with the prompt
tokens and raw text features of every call of encode_with_pseudo_tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import types
from pathlib import Path

# sizes: text width = phi's output (the token embedding); hidden = 4 * input as SEARLE builds phi
EMBED, TEXT_WIDTH, VISION_WIDTH, IMAGE, PATCH = 8, 4, 64, 32, 8
EPOCH = 20

FIQ_CAPTIONS = [  # (reference index, [caption 1, caption 2]) as FashionIQ's relative_captions
    (2, ["is red and longer.", "Has short sleeves?"]),
    (0, ["Is a darker shade of blue, ", "has no logo"]),
    (1, ["is shiny", "is more formal."]),
]
CIRR_CAPTIONS = [  # (reference index, relative_caption); the second has a literal `$` after the placeholder
    (1, "shows two dogs instead of one"),
    (2, "is cheaper than $5 and has a red tag"),
    (0, "Remove the background; make it night."),
]


def randomise(module, gen, scale: float = 0.1) -> None:
    """Default init plus noise on every parameter and buffer: LayerNorm weights and biases, Linear
    biases and the rest all differ, so swapping any two same-shaped tensors changes the outputs."""
    import torch

    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen) * scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--searle", required=True, help="checkout of github.com/miccunifi/SEARLE")
    ap.add_argument("--clip", required=True, help="checkout of github.com/openai/CLIP")
    ap.add_argument("--out", default="tests/golden/searle")
    args = ap.parse_args()
    sys.path[:0] = [args.clip, str(Path(args.searle) / "src")]
    # train_phi.py imports comet_ml at module level for its logging; save_phi does not use it
    sys.modules.setdefault("comet_ml", types.SimpleNamespace(Experiment=None))

    import clip
    import torch
    import train_phi
    import validate
    from clip.model import CLIP
    from encode_with_pseudo_tokens import encode_with_pseudo_tokens
    from phi import Phi
    from utils import extract_pseudo_tokens_with_phi

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(31)
    torch.manual_seed(31)

    def small_clip():
        return CLIP(
            embed_dim=EMBED,
            image_resolution=IMAGE,
            vision_layers=1,
            vision_width=VISION_WIDTH,  # heads = width // 64 in OpenAI's ViT
            vision_patch_size=PATCH,
            context_length=77,
            vocab_size=49408,
            transformer_width=TEXT_WIDTH,
            transformer_heads=2,
            transformer_layers=1,
        )

    model = small_clip()
    randomise(model, gen)
    # fp16 as OpenAI's released weights (and 2 bytes a value for the 49408-row token embedding)
    torch.save(model.half().state_dict(), out / "clip_vit.pt")
    clip_model = small_clip()
    clip_model.load_state_dict(torch.load(out / "clip_vit.pt"))
    clip_model = clip_model.float().eval().requires_grad_(False)  # as validate.py: clip_model.float()

    phi = Phi(input_dim=EMBED, hidden_dim=4 * EMBED, output_dim=TEXT_WIDTH, dropout=0.5)
    randomise(phi, gen)
    torch.save({"Phi": phi.state_dict()}, out / "SEARLE_ViT-golden.pt")  # hubconf.py reads ['Phi']
    with tempfile.TemporaryDirectory() as tmp:
        train_phi.save_phi(f"phi_{EPOCH}", EPOCH, phi, Path(tmp))
        shutil.copy(Path(tmp) / "checkpoints" / f"phi_{EPOCH}.pt", out / f"phi_{EPOCH}.pt")

    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=gen)
    names = [f"ref{i}" for i in range(len(pixels))]
    tokens_of = {}
    for file in ("SEARLE_ViT-golden.pt", f"phi_{EPOCH}.pt"):  # loaded as hubconf.py / validate.py do
        loaded = Phi(input_dim=EMBED, hidden_dim=4 * EMBED, output_dim=TEXT_WIDTH, dropout=0.5).eval()
        loaded.load_state_dict(torch.load(out / file)[loaded.__class__.__name__])
        images = [{"image": p, "image_name": n} for p, n in zip(pixels, names)]
        tokens_of[file], ref_names = extract_pseudo_tokens_with_phi(clip_model, loaded, images)
    pseudo_tokens = tokens_of["SEARLE_ViT-golden.pt"]
    assert torch.equal(pseudo_tokens, tokens_of[f"phi_{EPOCH}.pt"]) and ref_names == names

    calls = []  # every encode_with_pseudo_tokens call of validate.py: (prompt tokens, raw text features)

    def recorded(clip_model, text, pseudo_tokens, num_tokens=1):
        feats = encode_with_pseudo_tokens(clip_model, text, pseudo_tokens, num_tokens)
        calls.append((text.clone(), feats.clone()))
        return feats

    validate.encode_with_pseudo_tokens = recorded
    fiq = [
        {"reference_name": names[r], "target_name": "t", "relative_captions": caps}
        for r, caps in FIQ_CAPTIONS
    ]
    fiq_query, _ = validate.fiq_generate_val_predictions(clip_model, fiq, ref_names, pseudo_tokens)
    (fiq_tokens, fiq_text), (fiq_tokens_rev, fiq_text_rev) = calls
    calls.clear()
    cirr = [
        {"reference_name": names[r], "target_name": "t", "relative_caption": cap, "group_members": ["a", "b"]}
        for r, cap in CIRR_CAPTIONS
    ]
    cirr_query, *_ = validate.cirr_generate_val_predictions(clip_model, cirr, ref_names, pseudo_tokens)
    ((cirr_tokens, cirr_text),) = calls

    outputs = {
        "pixels": pixels,
        "image_features": clip_model.encode_image(pixels),
        "pseudo_tokens": pseudo_tokens,
        "fiq_reference": torch.tensor([r for r, _ in FIQ_CAPTIONS]),
        "fiq_tokens": fiq_tokens,
        "fiq_tokens_reversed": fiq_tokens_rev,
        "fiq_text_features": fiq_text,
        "fiq_text_features_reversed": fiq_text_rev,
        "fiq_query_features": fiq_query,
        "cirr_reference": torch.tensor([r for r, _ in CIRR_CAPTIONS]),
        "cirr_tokens": cirr_tokens,
        "cirr_text_features": cirr_text,
        "cirr_query_features": cirr_query,
    }
    torch.save({k: v.detach().contiguous() for k, v in outputs.items()}, out / "outputs.pt")
    (out / "captions.json").write_text(
        json.dumps({"fashioniq": FIQ_CAPTIONS, "cirr": CIRR_CAPTIONS}, indent=1) + "\n"
    )
    assert clip.tokenize(["$"])[0, 1].item() == 259  # the placeholder id encode_with_pseudo_tokens looks for
    print(
        "wrote",
        ", ".join(f"{p.name} ({p.stat().st_size // 1024} KiB)" for p in sorted(out.iterdir()) if p.is_file()),
    )


if __name__ == "__main__":
    main()
