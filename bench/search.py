"""Search benchmarks, ratios measured in one run:
1. exact chunked search vs faiss flat, 100k x 512 gallery: queries/s ratio (interleaved, best of 3);
2. peak memory of exact search over an on-disk gallery of 10k vs 1M rows (should stay ~flat)."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _procs import run_group

DIM = 512


def speed(n: int = 100_000, q: int = 1000, k: int = 50, repeats: int = 3) -> None:
    """Interleaved runs, best of `repeats` for each side (the CPU is shared: the best run is the
    least disturbed one). faiss is timed twice: `IndexFlatIP.search` alone on a prebuilt index
    (the strict bar), and cirlab's faiss backend (builds the index, restores the tie order)."""
    import faiss

    from cirlab.retrieval.search import exact_search, faiss_search

    rng = np.random.default_rng(0)
    g = torch.from_numpy(rng.standard_normal((n, DIM), dtype=np.float32))
    g = torch.nn.functional.normalize(g, dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(q, DIM), dim=-1)
    index = faiss.IndexFlatIP(DIM)
    index.add(g.numpy())
    xq = queries.numpy()
    runs = {
        "exact": lambda: exact_search(queries, g, k),
        "flat": lambda: index.search(xq, k),
        "backend": lambda: faiss_search(queries, g, k),
    }
    best, out = {name: float("inf") for name in runs}, {}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            out[name] = run()
            best[name] = min(best[name], time.perf_counter() - t0)
    same = (out["exact"][1] == out["backend"][1]).float().mean().item() * 100
    qps = {name: q / t for name, t in best.items()}
    print(
        f"search speed, {n}x{DIM} gallery, {q} queries, top-{k}, {torch.get_num_threads()} threads, "
        f"best of {repeats}: exact {qps['exact']:,.0f} q/s, faiss IndexFlatIP.search {qps['flat']:,.0f} q/s, "
        f"cirlab faiss backend {qps['backend']:,.0f} q/s; exact/faiss flat = {qps['exact'] / qps['flat']:.2f}x, "
        f"exact/faiss backend = {qps['exact'] / qps['backend']:.2f}x; same index at {same:.2f}% of ranks "
        f"(differences: float summation order between near-ties)"
    )


def peak_memory_child(path: str) -> None:
    """Run in a fresh process: peak RSS of a search over the on-disk gallery."""
    from cirlab.retrieval.embedding_file import EmbeddingFile
    from cirlab.retrieval.search import exact_search

    def hwm() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
        return 0

    before = hwm()
    gallery = EmbeddingFile(path)
    exact_search(torch.randn(100, DIM), gallery, 50, chunk=4096)
    print(json.dumps({"rows": len(gallery), "extra_peak_bytes": hwm() - before}))


def memory(sizes=(10_000, 1_000_000)) -> None:
    from cirlab.retrieval.embedding_file import EmbeddingFile

    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = Path(tmp) / f"g{n}.npy"
            rng = np.random.default_rng(0)
            EmbeddingFile.write(
                path,
                (
                    rng.standard_normal((min(100_000, n - s), DIM), dtype=np.float32)
                    for s in range(0, n, 100_000)
                ),
                n,
                DIM,
            )
            # warm the imports in the child before measuring, so only the search counts
            out = (
                run_group(
                    [sys.executable, __file__, "--child", str(path)],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=1800,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            peaks[n] = json.loads(out)["extra_peak_bytes"]
            path.unlink()
    a, b = sizes
    print(
        f"peak memory of exact search (100 queries, chunk 4096 rows): {a:,} rows {peaks[a] / 2**20:.1f} MiB, "
        f"{b:,} rows {peaks[b] / 2**20:.1f} MiB; ratio {peaks[b] / max(peaks[a], 1):.2f}x "
        f"(gallery size ratio {b // a}x)"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        peak_memory_child(sys.argv[2])
    else:
        torch.set_num_threads(2)
        speed()
        memory()
