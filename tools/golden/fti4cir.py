"""Golden files for FTI4CIR (tests/golden/fti4cir/), made by the authors' own code.

Never imported by cirlab or its tests. Run once, outside the project, with the `src/` folder of
github.com/ZiChao111/FTI4CIR (see tests/golden/fti4cir/README.md):

    python tools/golden/fti4cir.py --fti4cir CHECKOUT/src --out tests/golden/fti4cir

A small `IMG2TEXT` of their src/i2t_model.py (with their `Phi` and MHTransformer.py's `Transformer`),
every parameter randomised, written as their train.py writes it: `torch.save(img2text)`, the whole pickled
module -> model.pth. outputs.pt holds what their code computes in eval mode on fixed inputs: the global
features (rows scaled so that the number r of attribute tokens differs between rows) and patch tokens,
`get_img_local_attr_feats` (the salient local features and r), `phi_s` / `phi_a` of them, their
`orthogonal_loss`, `utils.contrastive_loss` at their temperature on fixed second views, and the sum of the
three cosine-embedding losses of `semantic_regularization_loss` (their `cosine_criterion`, target 1) on
fixed text features (the CLIP text features themselves need CLIP and are not part of these files).
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

GLOBAL, PATCH, N_PATCHES = 16, 24, 9  # global feature = token width (the reference needs them equal)
NUM_K, TOPK, EPSILON, TF_LAYER, TF_HEAD = 6, 4, 0.05, 2, 2
TEMPERATURE, HY_REG = 0.2, 1.4
SCALES = (0.05, 3.0, 5.0, 8.0, 12.0, 20.0, 30.0, 100.0)  # |g| per row: flat to peaked relevance


def shims() -> None:
    """Their modules import OpenAI's `clip` package and dataset.py (for a type check in utils.py); neither
    is used by what runs here."""
    sys.modules["clip"] = types.ModuleType("clip")
    dataset = types.ModuleType("dataset")
    dataset.FashionIQDataset = type("FashionIQDataset", (), {})
    sys.modules["dataset"] = dataset


def randomise(module, gen, scale: float = 0.1) -> None:
    """Default init plus noise on every parameter, so swapping any two same-shaped tensors changes outputs."""
    import torch

    with torch.no_grad():
        for t in module.parameters():
            t.add_(torch.randn(t.shape, generator=gen) * scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fti4cir", required=True, help="the src/ folder of github.com/ZiChao111/FTI4CIR")
    ap.add_argument("--out", default="tests/golden/fti4cir")
    args = ap.parse_args()
    shims()
    sys.path.insert(0, args.fti4cir)

    import torch
    from i2t_model import IMG2TEXT, Phi
    from utils import contrastive_loss

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    # as their train.py: Phi(output_dim, 4 * output_dim, token width, 0.5) twice, then IMG2TEXT
    phi_s = Phi(input_dim=GLOBAL, hidden_dim=GLOBAL * 4, output_dim=GLOBAL, dropout=0.5)
    phi_a = Phi(input_dim=GLOBAL, hidden_dim=GLOBAL * 4, output_dim=GLOBAL, dropout=0.5)
    img2text = IMG2TEXT(
        img_patch_dim=PATCH,
        token_feat=GLOBAL,
        phi_s=phi_s,
        phi_a=phi_a,
        num_k=NUM_K,
        hy_regLoss=HY_REG,
        temperature=TEMPERATURE,
        tf_layer=TF_LAYER,
        tf_head=TF_HEAD,
        topk=TOPK,
        epsilon=EPSILON,
    ).float()
    randomise(img2text, gen)
    torch.save(img2text, out / "model.pth")

    img2text.eval()
    scales = torch.tensor(SCALES)[:, None]
    g = torch.nn.functional.normalize(torch.randn(len(SCALES), GLOBAL, generator=gen), dim=-1) * scales
    patches = torch.randn(len(SCALES), N_PATCHES, PATCH, generator=gen)
    second_view = torch.randn(len(SCALES), GLOBAL, generator=gen)
    texts = torch.randn(4, len(SCALES), 8, generator=gen)  # f_subj, f_attr, f_pw, f_both
    with torch.no_grad():
        local, r = img2text.get_img_local_attr_feats(g, patches)
        target = img2text.criterion_target
        reg = sum(img2text.cosine_criterion(f, texts[3], target) for f in (texts[1], texts[0], texts[2]))
        outputs = {
            "global_features": g,
            "patch_features": patches,
            "latent": img2text.get_latent_local_attributes_feats(patches),
            "local": local,
            "r": torch.tensor(r),
            "subject": img2text.phi_s(g),
            "attributes": img2text.phi_a(local),
            "orthogonal_loss": img2text.orthogonal_loss(local),
            "orthogonal_loss_raw": img2text.orthogonal_loss(patches[:, :5]),  # their function renormalises
            "second_view": second_view,
            "contrastive_loss": contrastive_loss(g, second_view, TEMPERATURE),
            "texts": texts,
            "regularisation_loss": reg,
        }
    if len(set(r)) < 3:
        raise SystemExit(f"r = {r}: choose other SCALES so that r differs between rows")
    torch.save({k: v.detach().contiguous() for k, v in outputs.items()}, out / "outputs.pt")
    print("r =", r)
    print(
        ", ".join(f"{p.name} ({p.stat().st_size // 1024} KiB)" for p in sorted(out.iterdir()) if p.is_file())
    )


if __name__ == "__main__":
    main()
