"""Golden files for MLCL's combiner (tests/golden/mlcl/), made by the authors' own code.

Never imported by cirlab or its tests. Run once, in a scratch venv outside the project, with checkouts of
github.com/JWargrave/MLCL and github.com/openai/CLIP (MLCL's utils.py imports `clip`; see
tests/golden/mlcl/README.md):

    python tools/golden/mlcl.py --mlcl MLCL_CHECKOUT --clip CLIP_CHECKOUT --out tests/golden/mlcl

Two small MLCL `Combiner`s, every parameter randomised, one built with `--learn_t 1` (logit_scale and
logit_scale_sl are parameters, saved) and one with `--learn_t 0` (both the constant 100, not saved),
each saved by utils.save_model ({'epoch', 'Combiner'}), and what their code computes on fixed features:
the query of validate.py (the sum of `combine_features_weighted`'s three levels, normalised), the five
logits of `Combiner.forward`, and the training loss of combiner_train.py (mCCL + SSCL), term by term.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

FEATURE, PROJECTION, HIDDEN, BATCH, EPOCH = 8, 16, 24, 4, 7


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mlcl", required=True, help="checkout of github.com/JWargrave/MLCL")
    ap.add_argument("--clip", required=True, help="checkout of github.com/openai/CLIP")
    ap.add_argument("--out", default="tests/golden/mlcl")
    args = ap.parse_args()
    sys.path[:0] = [args.clip, str(Path(args.mlcl) / "src")]

    import torch
    import torch.nn.functional as F
    from combiner import Combiner
    from searle import randomise  # tools/golden/searle.py: noise on every parameter and buffer
    from utils import save_model

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(31)
    torch.manual_seed(31)
    image, text, target, image_aug = torch.randn(4, BATCH, FEATURE, generator=gen)
    outputs = {"image": image, "text": text, "target": target, "image_aug": image_aug}

    for learn_t in (1, 0):
        combiner = Combiner(FEATURE, PROJECTION, HIDDEN, learn_t)
        randomise(combiner, gen)
        name = f"combiner_learn_t{learn_t}.pt"
        with tempfile.TemporaryDirectory() as tmp:
            save_model("combiner", EPOCH, combiner, Path(tmp))
            shutil.copy(Path(tmp) / "saved_models" / "combiner.pt", out / name)
        combiner = Combiner(FEATURE, PROJECTION, HIDDEN, learn_t)
        combiner.load_state_dict(torch.load(out / name)["Combiner"])
        combiner.eval()  # dropout off: the only randomness of their training step

        with torch.no_grad():
            # validate.py: combining_function = combiner.combine_features_weighted; the tuple is summed
            levels = combiner.combine_features_weighted(image, text)
            query = F.normalize(levels[0] + levels[1] + levels[2], dim=-1)
            # combiner_train.py's step: forward, then its five cross-entropies with labels arange(B)
            logits = combiner(image, text, target, image_aug)
            labels = torch.arange(BATCH)
            ce = [F.cross_entropy(x, labels) for x in logits]
            w = 2 * torch.sigmoid(combiner.loss_weight)
            loss = w * ce[0] + (2 - w) * ce[1] + ce[2] + ce[3] + ce[4]
        tag = f"learn_t{learn_t}"
        outputs.update({f"{tag}/query_features": query, f"{tag}/loss": loss.reshape(())})
        for i, (x, c) in enumerate(zip(logits, ce)):
            outputs[f"{tag}/logits{i + 1}"] = x
            outputs[f"{tag}/ce{i + 1}"] = c.reshape(())

    torch.save({k: v.detach().contiguous() for k, v in outputs.items()}, out / "outputs.pt")
    print(
        "wrote",
        ", ".join(f"{p.name} ({p.stat().st_size // 1024} KiB)" for p in sorted(out.iterdir()) if p.is_file()),
    )


if __name__ == "__main__":
    main()
