"""Golden pixels of the references' image preprocessing, for tests/test_image_modes.py.

Writes small image files in the modes benchmark files come in (palette with and without transparency,
RGBA and LA with transparent regions, CMYK JPEG, 16-bit grey PNG, an EXIF-rotated JPEG, RGB and L
controls), runs each through the reference transforms exactly as the reference datasets call them
(`preprocess(PIL.Image.open(path))`), and saves the tensors: {"<file>/<mode>": tensor [3, S, S]}.

    python tools/golden/image_modes.py --clip CLIP --clip4cir CLIP4Cir --searle SEARLE \
        --bi-blip4cir Bi-Blip4CIR --mlcl MLCL --out tests/golden/image_modes

Each option is a checkout of the public repository (see tests/golden/image_modes/README.md); the
transforms are imported from it, never copied. Not imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZE = 32  # output side: small files, and 30x60 / 60x30 inputs are padded by squarepad and targetpad
RATIO = 1.25


def module_from(path: Path, name: str):
    """A reference file imported as a module of its own (the repos all call theirs `data_utils`)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pattern(rng: np.random.RandomState, w: int, h: int) -> np.ndarray:
    """[h, w, 3] uint8: gradients plus noise, so that every resampling filter leaves a trace."""
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    base = np.stack([x, y, 1 - (x + y) / 2], -1) * 200 + rng.randint(0, 56, (h, w, 3))
    return base.astype(np.uint8)


def palette_image(rng: np.random.RandomState, w: int, h: int) -> Image.Image:
    """16 random colours in 5x5 blocks; index 0 is not black, so a pad fill of 0 shows its colour."""
    blocks = rng.randint(0, 16, ((h + 4) // 5, (w + 4) // 5))
    index = np.kron(blocks, np.ones((5, 5), dtype=int))[:h, :w].astype(np.uint8)
    img = Image.fromarray(index, mode="L").convert("P")
    colours = rng.randint(0, 256, (256, 3)).astype(np.uint8)
    colours[0] = (200, 40, 90)
    img.putpalette(colours.reshape(-1).tolist())
    return img


def write_fixtures(out: Path) -> list[Path]:
    rng = np.random.RandomState(0)
    out.mkdir(parents=True, exist_ok=True)
    files = []

    def save(name: str, img: Image.Image, **kw) -> None:
        img.save(out / name, **kw)
        files.append(out / name)

    save("rgb.png", Image.fromarray(pattern(rng, 30, 60), "RGB"))
    save("gray.png", Image.fromarray(pattern(rng, 60, 30)[..., 0], "L"))
    save("palette.png", palette_image(rng, 60, 30))
    save("palette_transparent.png", palette_image(rng, 30, 60), transparency=3)
    rgba = np.concatenate([pattern(rng, 30, 60), np.full((60, 30, 1), 255, np.uint8)], -1)
    rgba[:, :10, 3] = 0  # transparent left third, its colours kept in the file
    rgba[:, 10:20, 3] = np.linspace(0, 255, 10).astype(np.uint8)
    save("rgba.png", Image.fromarray(rgba, "RGBA"))
    la = np.stack([pattern(rng, 60, 30)[..., 1], np.full((30, 60), 255, np.uint8)], -1)
    la[:10, :, 1] = 0  # transparent top third
    save("la.png", Image.fromarray(la, "LA"))
    cmyk = np.concatenate([pattern(rng, 30, 60), rng.randint(0, 60, (60, 30, 1)).astype(np.uint8)], -1)
    save("cmyk.jpg", Image.fromarray(cmyk, "CMYK"), quality=95)
    grey16 = np.linspace(0, 700, 30 * 60).reshape(60, 30) + rng.randint(0, 60, (60, 30))
    save("gray16.png", Image.fromarray(grey16.astype(np.uint16)))  # mode I;16
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display; the references never apply it
    save("exif_rotated.jpg", Image.fromarray(pattern(rng, 60, 30), "RGB"), quality=95, exif=exif.tobytes())
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", type=Path, required=True, help="openai/CLIP checkout")
    ap.add_argument("--clip4cir", type=Path, required=True, help="ABaldrati/CLIP4Cir checkout")
    ap.add_argument("--searle", type=Path, help="miccunifi/SEARLE checkout (cross-check)")
    ap.add_argument("--bi-blip4cir", type=Path, help="Cuberick-Orion/Bi-Blip4CIR checkout (cross-check)")
    ap.add_argument("--mlcl", type=Path, help="JWargrave/MLCL checkout (cross-check)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    sys.path.insert(0, str(args.clip))
    from clip.clip import _transform

    c4c = module_from(args.clip4cir / "src" / "data_utils.py", "clip4cir_data_utils")
    reference = {
        "clip": _transform(SIZE),
        "squarepad": c4c.squarepad_transform(SIZE),
        "targetpad": c4c.targetpad_transform(RATIO, SIZE),
    }
    # the other repositories' own copies must give the same pixels (else the tests would need their own)
    same = []
    for label, root in (("searle", args.searle), ("bi_blip4cir", args.bi_blip4cir), ("mlcl", args.mlcl)):
        if root is None:
            continue
        mod = module_from(root / "src" / "data_utils.py", f"{label}_data_utils")
        same.append((label, "targetpad", mod.targetpad_transform(RATIO, SIZE)))
        if hasattr(mod, "squarepad_transform"):
            same.append((label, "squarepad", mod.squarepad_transform(SIZE)))

    expected = {}
    for path in write_fixtures(args.out):
        with Image.open(path) as img:
            print(f"{path.name}: {img.mode} {img.size}")
        for mode, transform in reference.items():
            expected[f"{path.name}/{mode}"] = transform(Image.open(path))
        for label, mode, transform in same:
            if not torch.equal(transform(Image.open(path)), expected[f"{path.name}/{mode}"]):
                raise SystemExit(f"{label} {mode} differs from CLIP4Cir's on {path.name}")
    torch.save(expected, args.out / "expected.pt")
    checked = ", ".join(f"{label} {mode}" for label, mode, _ in same) or "none"
    print(f"{len(expected)} tensors -> {args.out / 'expected.pt'}; equal to CLIP4Cir's: {checked}")


if __name__ == "__main__":
    main()
