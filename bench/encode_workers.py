"""Tiny-backbone image encoding throughput, measured in one run (interleaved, best of 2): 0 vs 2 dataloader workers, each
under OpenMP's default waiting and under OMP_WAIT_POLICY=PASSIVE (threads sleep at barriers
instead of spinning; the runtime reads it only at load, so each policy runs in a fresh process).
Also checks that both policies give bit-identical features."""

from __future__ import annotations

import hashlib
import json
import os
import sys

from _procs import run_group


def measure() -> None:
    import time

    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from cirlab.cli import CONF
    from cirlab.data.features import encode_images

    torch.set_num_threads(2)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["method=zeroshot", "logger=none"])
    source = instantiate(cfg.dataset.source)
    backbone = instantiate(cfg.backbone.model)
    names = source.eval_sets("test")[0].gallery
    paths = [source.image_path(n) for n in names]
    rates, digest = {}, None
    for workers in (0, 2):
        start = time.perf_counter()
        feats = encode_images(backbone, paths, batch_size=256, num_workers=workers)
        rates[workers] = len(paths) / (time.perf_counter() - start)
        digest = hashlib.sha1(feats.numpy().tobytes()).hexdigest()
    print(json.dumps({"images": len(paths), "rates": rates, "sha1": digest}))


def main() -> None:
    out, r = {}, {}
    for _ in range(2):  # interleaved, best of 2 per policy (the CPU is shared)
        for policy in ("default", "PASSIVE"):
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy != "default":
                env["OMP_WAIT_POLICY"] = policy
            run = run_group(
                [sys.executable, __file__, "--child"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                timeout=1800,  # the whole group stopped: the child's DataLoader workers too
            )
            out[policy] = json.loads(run.stdout.strip().splitlines()[-1])
            for w in (0, 2):
                r[policy, w] = max(r.get((policy, w), 0.0), out[policy]["rates"][str(w)])
    d, p = out["default"], out["PASSIVE"]
    print(
        f"encoding {d['images']} images (tiny backbone, 32 px, batch 256, 2 threads): "
        f"default OpenMP waiting: 0 workers {r['default', 0]:,.0f} img/s, 2 workers {r['default', 2]:,.0f} img/s "
        f"({r['default', 2] / r['default', 0]:.2f}x); OMP_WAIT_POLICY=PASSIVE: 0 workers {r['PASSIVE', 0]:,.0f} img/s, "
        f"2 workers {r['PASSIVE', 2]:,.0f} img/s ({r['PASSIVE', 2] / r['PASSIVE', 0]:.2f}x); "
        f"PASSIVE/default at 0 workers {r['PASSIVE', 0] / r['default', 0]:.2f}x; "
        f"features bit-identical: {d['sha1'] == p['sha1']}"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        measure()
    else:
        main()
