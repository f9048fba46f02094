"""`cirlab-demo` start-up and per-query latency on the synthetic test gallery (1,824 images).

    python bench/demo.py [RUN]      # default: a fresh zero-shot run (no training) in a temporary folder

Prints, measured in one run:
- start-up: process start -> the page answers HTTP 200, twice: the first start may embed the gallery
  (cold feature cache), the second reads it from the cache (warm; the issue asks < 15 s);
- per query: the Search button's work in-process (query embedding + ranking + results HTML) over 20
  dataset queries, and, where Playwright and Chromium exist, click -> results shown in the browser.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("CIRLAB_CACHE", str(ROOT / ".cache" / "cirlab"))
    e.update({"WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"})
    return e


def make_run(folder: Path) -> Path:
    run = folder / "run"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cirlab.cli",
            "+method=zeroshot",
            "eval.visualize=false",
            "logger=none",
            f"hydra.run.dir={run}",
        ],
        cwd=ROOT,
        env={**env(), "CIRLAB_OUTPUTS": str(folder)},
        check=True,
        capture_output=True,
    )
    return run


def start(run: Path) -> tuple[subprocess.Popen, str, float]:
    """(process, url, seconds from process start to the page answering)."""
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cirlab.demo", str(run), "--port", str(port)],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return proc, url, time.perf_counter() - t0
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(
                    f"the demo exited ({proc.returncode}):\n{proc.stderr.read()[-3000:]}"
                ) from None
            time.sleep(0.1)


def stop(proc: subprocess.Popen) -> float:
    """Stop the demo; returns its CPU seconds (user + sys), which other jobs on the machine do not inflate."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc.terminate()
    proc.wait(30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def browser_latency(url: str, queries, n: int = 5) -> list[float] | None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if exe is None:
        return None
    times = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True)
        page = browser.new_page()
        page.goto(url)
        for q in queries[:n]:
            page.locator("#find textarea, #find input").first.fill(q.reference)
            page.wait_for_function("document.querySelectorAll('#grid button.thumbnail-item').length === 1")
            page.locator("#grid button.thumbnail-item").first.click()
            page.locator("#text textarea, #text input").first.fill(q.text)
            page.evaluate("document.querySelector('#results').setAttribute('data-old', '1')")
            t0 = time.perf_counter()
            page.locator("#search").click()
            page.wait_for_function(
                f"(document.querySelector('#status')?.innerText || '').includes({q.reference!r})"
                " && document.querySelectorAll('#results figure[data-rank]').length > 0"
            )
            times.append(time.perf_counter() - t0)
        browser.close()
    return times


def main() -> None:
    import torch

    torch.set_num_threads(2)
    tmp = None
    if len(sys.argv) > 1:
        run = Path(sys.argv[1])
    else:
        tmp = tempfile.mkdtemp(prefix="cirlab-bench-demo-")
        t0 = time.perf_counter()
        run = make_run(Path(tmp))
        print(f"zero-shot run made in {time.perf_counter() - t0:.1f} s: {run}")

    proc, _, first = start(run)
    first_cpu = stop(proc)
    proc, _, warm = start(run)
    warm_cpu = stop(proc)
    proc, url, _ = start(run)
    print(
        f"start-up to a served page (synthetic test gallery, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}): 1st start {first:.1f} s (CPU {first_cpu:.1f} s; embeds the gallery unless an earlier start cached it), warm {warm:.1f} s "
        f"(CPU {warm_cpu:.1f} s); target < 15 s warm"
    )

    from cirlab.demo import cir_search, load_backend, set_query_threads

    backend = load_backend(run, log=lambda *_: None)
    set_query_threads(1)  # as cirlab-demo does after start-up (--query-threads)
    queries = backend.gallery.queries[:20]
    cir_search(backend, queries[0].reference, None, queries[0].text, 10)  # first call: text encoder warm-up
    times = []
    for q in queries:
        t0 = time.perf_counter()
        status, _ = cir_search(backend, q.reference, None, q.text, 10)
        times.append(time.perf_counter() - t0)
        assert status.startswith("Top 10"), status
    print(
        f"per query, in-process (embed + rank {len(backend.gallery.names)} + HTML, k=10, {len(times)} queries): "
        f"median {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms (target < 1 s)"
    )
    clicks = browser_latency(url, backend.gallery.queries)
    if clicks is None:
        print("per query in the browser: skipped (no playwright or chromium)")
    else:
        print(
            f"per query, click -> results shown in headless Chromium ({len(clicks)} queries): "
            f"median {statistics.median(clicks) * 1000:.0f} ms, max {max(clicks) * 1000:.0f} ms"
        )
    stop(proc)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
