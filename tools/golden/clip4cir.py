"""Golden files for CLIP4Cir (tests/golden/clip4cir/), made by the authors' own code.

Never imported by cirlab or its tests. Run once, in a scratch venv outside the project, with checkouts of
github.com/ABaldrati/CLIP4Cir and github.com/openai/CLIP (see tests/golden/clip4cir/README.md):

    python tools/golden/clip4cir.py --clip4cir CLIP4CIR_CHECKOUT --clip CLIP_CHECKOUT --out tests/golden/clip4cir

A small openai `clip.model.CLIP` (ModifiedResNet, as RN50x4) and a small CLIP4Cir `Combiner`, every
parameter and buffer randomised, saved by CLIP4Cir's `utils.save_model` as clip_fine_tune.py and
combiner_train.py call it (tuned_clip_best.pt = {'epoch', 'CLIP'}, combiner.pt = {'epoch', 'Combiner'}),
read back as validate.py reads them (CLIP `load_state_dict(...['CLIP'])` then `.float().eval()`, Combiner
`load_state_dict(...['Combiner'])`), and what their code computes: `targetpad_transform` pixels, the
CLIP features, stage I's query (`element_wise_sum`) with clip_fine_tune.py's logits and loss, and stage
II's query (`combine_features`), logits (`Combiner.forward`, logit_scale 100) and loss (CrossEntropyLoss
against arange(B)), all in eval mode (no dropout), fp32 on CPU.

The same again as the scripts run on a GPU (keys `gpu_*`): `clip.load(FILE, device=DEVICE, jit=False)` with
DEVICE = torch.device("cpu:0"), whose str() is not "cpu", so clip.load skips its CPU-only `model.float()`
exactly as for "cuda": build_model's fp16 model (convert_weights) of an OpenAI-style base (a second random
model as clip.load reads RN50x4.pt: fp16 + JIT extras), `load_state_dict(tuned['CLIP'])` casting the fp32 file
into it, then `.float().eval()`; `gpu_fp16_keys` names the tensors it held in fp16.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

RN = dict(  # heads = width * 32 // 64 = 1, a 1 x 1 grid: small files (openai_clip/ has 2 heads, 2 x 2)
    embed_dim=32,
    image_resolution=32,
    vision_layers=(1, 1, 1, 1),
    vision_width=2,
    vision_patch_size=None,
)
PROJECTION, HIDDEN = 24, 40
TARGET_RATIO = 1.25
EPOCHS = {"tuned_clip_best": 7, "combiner": 12}
CAPTIONS = [  # FashionIQ style: combiner_train.py joins a pair with " and "
    "is shorter and is red",
    "has long sleeves and is more colorful",
    "Is Blue; has a V-neck! and is not see-through",
    "is the same but with stripes and a belt",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clip4cir", required=True, help="checkout of github.com/ABaldrati/CLIP4Cir")
    ap.add_argument("--clip", required=True, help="checkout of github.com/openai/CLIP")
    ap.add_argument("--out", default="tests/golden/clip4cir")
    args = ap.parse_args()
    sys.path[:0] = [str(Path(__file__).resolve().parent), args.clip, str(Path(args.clip4cir) / "src")]

    import clip
    import openai_clip  # tools/golden/openai_clip.py: the randomisation and the small text tower
    import torch
    import torch.nn.functional as F
    from clip.model import CLIP
    from combiner import Combiner
    from data_utils import targetpad_transform
    from utils import element_wise_sum, save_model

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)  # the constructors' default init

    tuned = openai_clip.build({**RN}, gen)
    combiner = Combiner(RN["embed_dim"], PROJECTION, HIDDEN)
    openai_clip.randomise(combiner, gen)
    with tempfile.TemporaryDirectory() as tmp:
        save_model("tuned_clip_best", EPOCHS["tuned_clip_best"], tuned, Path(tmp))
        save_model("combiner", EPOCHS["combiner"], combiner, Path(tmp))
        for name in EPOCHS:
            shutil.copy(Path(tmp) / "saved_models" / f"{name}.pt", out / f"{name}.pt")

    # as validate.py: the CLIP clip.load builds (fp32 on CPU), the tuned weights on top, then the Combiner
    clip_model = CLIP(**RN, **openai_clip.TEXT)
    clip_model.load_state_dict(torch.load(out / "tuned_clip_best.pt", weights_only=True)["CLIP"])
    clip_model = clip_model.float().eval()
    combiner = Combiner(RN["embed_dim"], PROJECTION, HIDDEN)
    combiner.load_state_dict(torch.load(out / "combiner.pt", weights_only=True)["Combiner"])
    combiner.eval()

    res = RN["image_resolution"]
    reference = openai_clip.fixed_pixels(4, res, gen)
    target = openai_clip.fixed_pixels(4, res, gen)
    arrays, pil = openai_clip.pil_images(gen)
    features = {k: torch.randn(4, RN["embed_dim"], generator=gen) for k in ("image", "text", "target")}
    tokens = clip.tokenize(CAPTIONS, truncate=True)  # combiner_train.py's call
    labels = torch.arange(len(CAPTIONS))
    pad = torch.stack([targetpad_transform(TARGET_RATIO, res)(im) for im in pil])

    def computed(model) -> dict:
        """What the scripts compute with this CLIP (and the Combiner)."""
        with torch.no_grad():
            ref_f = model.encode_image(reference.float()).float()
            tgt_f = model.encode_image(target.float()).float()
            txt_f = model.encode_text(tokens).float()
            # stage I (clip_fine_tune.py): logits = 100 * predicted_features @ target_features.T
            sum_query = element_wise_sum(ref_f, txt_f)
            sum_logits = 100 * sum_query @ F.normalize(tgt_f, dim=-1).T
            # stage II (combiner_train.py): logits = combiner(reference, text, target)
            logits = combiner(ref_f, txt_f, tgt_f)
            return {
                "reference_features": ref_f,
                "target_features": tgt_f,
                "text_features": txt_f,
                "targetpad_features": model.encode_image(pad).float(),
                "finetune_query": sum_query,
                "finetune_logits": sum_logits,
                "finetune_loss": torch.nn.CrossEntropyLoss()(sum_logits, labels),
                "combiner_query": combiner.combine_features(ref_f, txt_f),
                "combiner_logits": logits,
                "combiner_loss": torch.nn.CrossEntropyLoss()(logits, labels),
            }

    with torch.no_grad():
        f = features
        fixed_query = combiner.combine_features(f["image"], f["text"])
        fixed_logits = combiner(f["image"], f["text"], f["target"])
    outputs = {
        "captions": CAPTIONS,
        "tokens": tokens,
        "reference_pixels": reference,
        "target_pixels": target,
        "pil0": arrays[0],
        "pil1": arrays[1],
        "targetpad_pixels": pad,
        **computed(clip_model),
        "fixed_image_features": f["image"],
        "fixed_text_features": f["text"],
        "fixed_target_features": f["target"],
        "fixed_query": fixed_query,
        "fixed_logits": fixed_logits,
        "fixed_loss": torch.nn.CrossEntropyLoss()(fixed_logits, labels),
    }

    # as validate.py / combiner_train.py on a GPU: clip.load keeps build_model's fp16 model, load_state_dict
    # casts the tuned fp32 file into it, then .float(). "cpu:0" takes that branch of clip.load on CPU.
    openai_clip.rewind_failed_jit_load(torch)
    base = openai_clip.with_jit_extras(openai_clip.build({**RN}, torch.Generator().manual_seed(5)), res)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(base.state_dict(), Path(tmp) / "RN.pt")
        gpu_model, _ = clip.load(str(Path(tmp) / "RN.pt"), device=torch.device("cpu:0"), jit=False)
    fp16_keys = [k for k, v in gpu_model.state_dict().items() if v.dtype == torch.float16]
    gpu_model.load_state_dict(torch.load(out / "tuned_clip_best.pt", weights_only=True)["CLIP"])
    gpu_model = gpu_model.float().eval()
    gpu = computed(gpu_model)
    outputs.update({"gpu_fp16_keys": fp16_keys, **{f"gpu_{k}": v for k, v in gpu.items()}})
    for key, value in gpu.items():
        print(f"{key:22s} GPU path vs CPU path: max |diff| {(value - outputs[key]).abs().max():.3g}")
    openai_clip.save_outputs(outputs, out)


if __name__ == "__main__":
    main()
