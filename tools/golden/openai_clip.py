"""Golden files for OpenAI CLIP (tests/golden/openai_clip/), made by OpenAI's own code.

Never imported by cirlab or its tests. Run once, in a scratch venv outside the project, with a checkout of
github.com/openai/CLIP (see tests/golden/openai_clip/README.md):

    python tools/golden/openai_clip.py --clip CLIP_CHECKOUT --out tests/golden/openai_clip

Two small `clip.model.CLIP`s, every parameter and buffer randomised: a ModifiedResNet image tower (the
RN50x4 layout: stem, bottlenecks with avgpool downsampling, attention pool with positional embedding,
q/k/v/c_proj, 2 heads) and a ViT. Written as OpenAI's files carry them:

- rn.pt: the plain state dict (fp32), `model.state_dict()`;
- vit_fp16_extras.pt: the state dict of OpenAI's release archives: fp16 where `clip.model.convert_weights`
  converts, plus the JIT extras input_resolution / context_length / vocab_size;
- vit_jit.pt (with --jit only): the TorchScript archive `clip.load` caches (ViT-B-32.pt) of the same
  weights, traced with encode_image / encode_text; its state dict is vit_fp16_extras.pt exactly.

outputs.pt holds what their code computes: `clip.tokenize` of CAPTIONS, `encode_text`, `encode_image` of a
fixed tensor and of two fixed PIL images through the preprocess `clip.load` returns (`_transform(n_px)`).
rn.pt is read back by `CLIP.load_state_dict` into an fp32 model (clip.load would round an fp32 file to fp16:
build_model converts the model to fp16 before loading); the others by `clip.load(FILE, device="cpu",
jit=False)`, which turns fp16 into fp32 on CPU.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

VOCAB, CONTEXT, TEXT_WIDTH = 49408, 77, 64  # OpenAI's tokenizer and context; 64 = one head (width // 64)
RN = dict(  # ModifiedResNet: heads = width * 32 // 64 = 2, attention pool over a 2x2 grid (64 px / 32)
    embed_dim=32,
    image_resolution=64,
    vision_layers=(1, 1, 1, 1),
    vision_width=4,
    vision_patch_size=None,
)
VIT = dict(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=8)
TEXT = dict(
    context_length=CONTEXT,
    vocab_size=VOCAB,
    transformer_width=TEXT_WIDTH,
    transformer_heads=TEXT_WIDTH // 64,
    transformer_layers=1,
)
CAPTIONS = [
    "a photo of a cat",
    "is red and has long sleeves",
    "Has a SHORTER hem, and is Blue!! (not green)",
    "Café-style top: 100% cotton &amp; 2x longer",
]
PIL_SIZES = [(70, 40), (80, 100)]  # (w, h): one upscaled, one downscaled to 64 px; both down to 32 px


def randomise(module, gen, scale: float = 0.1) -> None:
    """Default init plus noise on every parameter and buffer (LayerNorm / BatchNorm weights, biases,
    running statistics, ...), so swapping any two same-shaped tensors changes the outputs."""
    import torch

    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen) * scale)
                if name.endswith("running_var"):
                    t.abs_()
            elif name.endswith("num_batches_tracked"):
                t.fill_(int(torch.randint(1, 1000, (), generator=gen)))


def small_token_embedding(model, gen):
    """The 49408 x 64 token embedding as an overlapping view of one random vector (row i = v[i:i+64]):
    every element random, every row distinct, and torch.save stores 49471 floats instead of 3.2 M."""
    import torch

    base = torch.randn(VOCAB + TEXT_WIDTH - 1, generator=gen) * 0.1
    model.token_embedding.weight = torch.nn.Parameter(base.as_strided((VOCAB, TEXT_WIDTH), (1, 1)))


def calibrate_batchnorm(model, gen) -> None:
    """BatchNorm statistics of random images (drawn as the fixed inputs are), then perturbed: with default-init statistics the image signal
    fades through the ResNet and every image gets the same features; here each layer keeps it. The
    attention pool's q/k projections are then scaled so that its logits have standard deviation 1: larger
    ones saturate the softmax, whose result then hangs on the last bits of the logits (fp32 kernels
    differ there, not the maths); and the pooled values are centred on those images."""
    import torch

    visual = model.visual
    norms = [m for m in visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative: the statistics of this one batch
    images = coarse(16, visual.input_resolution, visual.input_resolution, gen)  # like the test images
    with torch.no_grad():
        visual.train()(images)
    visual.eval()
    with torch.no_grad():
        for m in norms:
            m.momentum = 0.1
            m.running_mean.add_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.mul_(torch.rand(m.running_var.shape, generator=gen) * 0.4 + 0.8)
            m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=gen)))
        pool = visual.attnpool
        seen = []
        hook = visual.layer4.register_forward_hook(lambda mod, args, out: seen.append(out))
        visual(images)
        hook.remove()
        x = seen[0].flatten(2).permute(2, 0, 1)  # as AttentionPool2d.forward: (HW+1) N C
        x = torch.cat([x.mean(dim=0, keepdim=True), x]) + pool.positional_embedding[:, None]
        heads, width = pool.num_heads, x.shape[-1] // pool.num_heads
        q = pool.q_proj(x[:1]).reshape(1, -1, heads, width)
        k = pool.k_proj(x).reshape(len(x), -1, heads, width)
        scale = float((q * k).sum(-1).div(width**0.5).std()) ** -0.5
        for proj in (pool.q_proj, pool.k_proj):
            proj.weight.mul_(scale)
            proj.bias.mul_(scale)
        # ReLU features share a large positive mean; centring the values keeps it from drowning the image
        pool.v_proj.bias.sub_(pool.v_proj(x).mean(dim=(0, 1)))


def build(cfg: dict, gen):
    from clip.model import CLIP, ModifiedResNet

    model = CLIP(**cfg, **TEXT)
    randomise(model, gen)
    if isinstance(model.visual, ModifiedResNet):
        calibrate_batchnorm(model, gen)
    small_token_embedding(model, gen)
    return model.eval()


def with_jit_extras(model, resolution: int):
    """fp16 as `convert_weights` leaves OpenAI's weights, with the archives' three extra buffers."""
    import torch
    from clip.model import convert_weights

    embedding = model.token_embedding
    model = copy.deepcopy(model)
    model.token_embedding = embedding  # deepcopy would store the 49408 rows in full
    convert_weights(model)
    extras = {"input_resolution": resolution, "context_length": CONTEXT, "vocab_size": VOCAB}
    for key, value in extras.items():
        model.__dict__.pop(key, None)  # plain ints on clip.model.CLIP; tensors in the archives
        model.register_buffer(key, torch.tensor(value))
    return model


def coarse(n: int, h: int, w: int, gen):
    """[n, 3, h, w]: a random 4x4 colour layout, smoothly upsampled, plus fine noise. I.i.d. noise images
    all look alike to a network that pools globally; these differ as photos do."""
    import torch
    import torch.nn.functional as F

    layout = F.interpolate(torch.randn(n, 3, 4, 4, generator=gen), size=(h, w), mode="bilinear")
    return layout + 0.3 * torch.randn(n, 3, h, w, generator=gen)


def fixed_pixels(n: int, res: int, gen):
    """Normalised model inputs, stored in fp16 (exact in fp32) to keep outputs.pt small."""
    return coarse(n, res, res, gen).half()


def pil_images(gen):
    """Two RGB PIL images (and their uint8 arrays) of PIL_SIZES."""
    import numpy as np
    import torch
    from PIL import Image

    arrays = [
        (coarse(1, h, w, gen)[0].permute(1, 2, 0) * 60 + 128).clamp(0, 255).to(torch.uint8)
        for w, h in PIL_SIZES
    ]
    return arrays, [Image.fromarray(np.asarray(a)) for a in arrays]


def rewind_failed_jit_load(torch) -> None:
    """clip.load tries torch.jit.load on the open file first and, on failure, torch.load on the same file
    object; torch 2.x leaves the position where the failed attempt stopped (EOFError), so rewind it."""
    jit_load = torch.jit.load

    def load(f, *args, **kwargs):
        start = f.tell() if hasattr(f, "tell") else None
        try:
            return jit_load(f, *args, **kwargs)
        except RuntimeError:
            if start is not None:
                f.seek(start)
            raise

    torch.jit.load = load


def features(model, preprocess, pixels, pil, tokens) -> dict:
    import torch

    with torch.no_grad():
        pil_pixels = torch.stack([preprocess(im) for im in pil])
        return {
            "image": model.encode_image(pixels).float(),
            "text": model.encode_text(tokens).float(),
            "pil_pixels": pil_pixels,
            "pil_image": model.encode_image(pil_pixels).float(),
        }


def save_outputs(outputs: dict, out) -> None:
    """outputs.pt, and a summary to eyeball: every float output finite, its size and spread."""
    import torch

    torch.save(outputs, out / "outputs.pt")
    for key, value in outputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert torch.isfinite(value).all(), key
            print(
                f"{key:22s} {tuple(value.shape)} |x| max {value.abs().max():.3g} std {value.float().std():.3g}"
            )
    print(
        "wrote",
        ", ".join(f"{p.name} ({p.stat().st_size // 1024} KiB)" for p in sorted(out.iterdir()) if p.is_file()),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clip", required=True, help="checkout of github.com/openai/CLIP")
    ap.add_argument("--out", default="tests/golden/openai_clip")
    ap.add_argument("--jit", action="store_true", help="also keep the TorchScript archive vit_jit.pt")
    args = ap.parse_args()
    sys.path.insert(0, args.clip)

    import clip
    import torch
    from clip.clip import _transform
    from clip.model import CLIP

    torch.set_num_threads(1)
    rewind_failed_jit_load(torch)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(31)
    torch.manual_seed(31)  # the constructors' default init

    rn, vit = build(RN, gen), build(VIT, gen)
    torch.save(rn.state_dict(), out / "rn.pt")
    vit16 = with_jit_extras(vit, VIT["image_resolution"])
    torch.save(vit16.state_dict(), out / "vit_fp16_extras.pt")

    tokens = clip.tokenize(CAPTIONS)
    arrays, pil = pil_images(gen)
    pixels = {r: fixed_pixels(2, r, gen) for r in (64, 32)}

    outputs = {"captions": CAPTIONS, "tokens": tokens, "pil0": arrays[0], "pil1": arrays[1]}
    outputs.update({f"pixels{r}": p for r, p in pixels.items()})

    ref = CLIP(**RN, **TEXT)
    ref.load_state_dict(torch.load(out / "rn.pt", weights_only=True))
    ref.eval()
    runs = {
        "rn": (ref, _transform(RN["image_resolution"])),
        "vit_fp16": clip.load(str(out / "vit_fp16_extras.pt"), device="cpu", jit=False),
    }
    for name, (model, preprocess) in runs.items():
        res = model.visual.input_resolution
        for key, value in features(model, preprocess, pixels[res].float(), pil, tokens).items():
            outputs[f"{name}.{key}"] = value

    # OpenAI's release archive of the same weights: the TorchScript module clip.load caches (ViT-B-32.pt).
    # Not committed (another 540 KiB of the same tensors); its state dict is vit_fp16_extras.pt exactly
    # and clip.load reads it to the same outputs. --jit keeps it, for checking cirlab's reader by hand.
    jit_file = out / "vit_jit.pt" if args.jit else Path(tempfile.mkdtemp()) / "vit_jit.pt"
    example = pixels[32].half(), tokens
    traced = torch.jit.trace_module(
        vit16,
        {"forward": example, "encode_image": example[:1], "encode_text": example[1:]},
        check_trace=False,  # fp16 on CPU: the checker's second run differs in the last bits
    )
    torch.jit.save(traced, jit_file)
    archive = torch.jit.load(jit_file, map_location="cpu").state_dict()
    plain = torch.load(out / "vit_fp16_extras.pt", weights_only=True)
    assert list(archive) == list(plain) and all(torch.equal(archive[k], plain[k]) for k in plain)
    model, preprocess = clip.load(str(jit_file), device="cpu", jit=False)
    again = features(model, preprocess, pixels[32].float(), pil, tokens)
    assert all(torch.equal(v, outputs[f"vit_fp16.{k}"]) for k, v in again.items())
    if not args.jit:
        jit_file.unlink()
    save_outputs(outputs, out)


if __name__ == "__main__":
    main()
