"""Time per query image of SEARLE's two ways to get a pseudo token, measured in one run:
phi (one MLP forward) vs OTI (`steps` optimisation steps), on the tiny backbone and synthetic test
reference images (cached features). Both include encoding the query prompt once.

    PYTHONPATH=. python bench/searle_inference.py [--images 64] [--steps 350]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cirlab.data.features import encode_images
from cirlab.data.sources.synthetic import synthetic_source
from cirlab.methods.searle_oti import oti
from cirlab.methods.searle_phi import Phi
from cirlab.methods.searle_text import SearleText
from cirlab.pretrain import pretrained_tiny

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=350, help="OTI steps (reference: 350)")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "cirlab"))
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = OmegaConf.load(ROOT / "conf/backbone/tiny.yaml").model
    backbone = pretrained_tiny(
        args.cache, OmegaConf.to_container(cfg.model_cfg), OmegaConf.to_container(cfg.pretrain)
    ).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    ds = OmegaConf.load(ROOT / "conf/dataset/synthetic.yaml").source
    source = synthetic_source(
        args.cache,
        **{k: v for k, v in OmegaConf.to_container(ds).items() if k not in ("_target_", "cache_dir")},
    )
    queries = source.eval_sets("test")[0].queries[: args.images]
    feats = encode_images(backbone, [source.image_path(q.reference) for q in queries])
    texts = [f"a photo of $ that {q.captions[0]}" for q in queries]
    tokens = backbone.tokenize(texts)
    text = SearleText(backbone, source, {}, {"generator": "template", "per_concept": 32})
    phi = Phi(backbone.embed_dim, 4 * backbone.embed_dim, backbone.token_dim).eval()

    with torch.no_grad():
        backbone.encode_text_with_pseudo_tokens(tokens, phi(feats))  # warm-up, not timed
        t0 = time.perf_counter()
        backbone.encode_text_with_pseudo_tokens(tokens, phi(feats))
        t_phi = (time.perf_counter() - t0) / len(queries)
    t0 = time.perf_counter()
    settings = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/method/searle_oti.yaml").oti)
    _, ema, _ = oti(backbone, text, feats, {**settings, "steps": args.steps, "batch_size": len(queries)})
    with torch.no_grad():
        backbone.encode_text_with_pseudo_tokens(tokens, ema)
    t_oti = (time.perf_counter() - t0) / len(queries)
    print(
        f"{len(queries)} query images, tiny backbone, {torch.get_num_threads()} CPU threads, "
        f"OTI {args.steps} steps (batched over all images)"
    )
    print(
        f"phi: {t_phi * 1e3:.3f} ms/image   OTI: {t_oti * 1e3:.1f} ms/image   OTI/phi = {t_oti / t_phi:.0f}x"
    )


if __name__ == "__main__":
    main()
