"""`cirlab-demo` start-up and per-query latency on the synthetic test gallery (1,824 images).

    python bench/demo.py [RUN]      # default: a fresh zero-shot run (no training) in a temporary folder

Prints, measured in one run:
- start-up: process start -> the page answers HTTP 200, twice: the first start may embed the gallery
  (cold feature cache), the second reads it from the cache (warm; the issue asks < 15 s);
- per query: the Search button's work in-process (query embedding + ranking + results HTML) over 20
  dataset queries, and, where Playwright and Chromium exist, click -> results shown in the browser.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _procs import free_port, process_group, run_group

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
START_TIMEOUT = 900  # seconds for a run to be made or a demo to answer (a cold start embeds the gallery)


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("CIRLAB_CACHE", str(ROOT / ".cache" / "cirlab"))
    e.update({"WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"})
    return e


def make_run(folder: Path) -> Path:
    run = folder / "run"
    run_group(
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
        timeout=START_TIMEOUT,
    )
    return run


def children_cpu() -> float:
    """CPU seconds (user + sys) of the reaped children, which other jobs on the machine do not inflate."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def serving(run: Path, log: Path):
    """(process, url, seconds from process start to the page answering) while the block runs; the demo
    (its whole process group) is stopped when the block ends, however it ends. Its output goes to `log`
    (a pipe nobody reads would fill up and stall it)."""
    port = free_port()
    t0 = time.perf_counter()
    with (
        log.open("w") as out,
        process_group(
            [sys.executable, "-m", "cirlab.demo", str(run), "--port", str(port)],
            grace=30,  # SIGTERM: the demo removes its image copies
            cwd=ROOT,
            env={
                **env(),
                "GRADIO_TEMP_DIR": str(log.parent / "gradio"),
            },  # its copies go with the bench's folder
            stdout=out,
            stderr=subprocess.STDOUT,
        ) as proc,
    ):
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > START_TIMEOUT:
                    why = f"exited ({proc.returncode})" if proc.poll() is not None else "does not answer"
                    raise SystemExit(
                        f"the demo {why} after {time.perf_counter() - t0:.0f} s:\n{log.read_text()[-3000:]}"
                    ) from None
                time.sleep(0.1)
        yield proc, url, time.perf_counter() - t0


def start_up(run: Path, log: Path) -> tuple[float, float]:
    """(seconds to a served page, the demo's CPU seconds) of one start, the demo stopped again."""
    cpu = children_cpu()
    with serving(run, log) as (_, _, seconds):
        pass
    return seconds, children_cpu() - cpu


def browser_latency(url: str, queries, n: int = 5) -> list[float] | None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if exe is None:
        return None
    times = []
    with (
        sync_playwright() as pw,
        contextlib.closing(pw.chromium.launch(executable_path=exe, headless=True)) as browser,
    ):
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
    return times


def main() -> None:
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="cirlab-bench-demo-") as tmp:  # removed however main ends
        tmp = Path(tmp)
        if len(sys.argv) > 1:
            run = Path(sys.argv[1])
        else:
            t0 = time.perf_counter()
            run = make_run(tmp)
            print(f"zero-shot run made in {time.perf_counter() - t0:.1f} s: {run}")
        measure(run, tmp / "demo.log")


def measure(run: Path, log: Path) -> None:
    first, first_cpu = start_up(run, log)
    warm, warm_cpu = start_up(run, log)
    print(
        f"start-up to a served page (synthetic test gallery, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}): 1st start {first:.1f} s (CPU {first_cpu:.1f} s; embeds the gallery unless an earlier start cached it), warm {warm:.1f} s "
        f"(CPU {warm_cpu:.1f} s); target < 15 s warm"
    )

    from cirlab.demo.backend import load_backend, set_query_threads
    from cirlab.demo.ui import cir_search

    with serving(run, log) as (_, url, _):
        backend = load_backend(run, log=lambda *_: None)
        set_query_threads(1)  # as cirlab-demo does after start-up (--query-threads)
        queries = backend.gallery.queries[:20]
        cir_search(
            backend, queries[0].reference, None, queries[0].text, 10
        )  # first call: text encoder warm-up
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


if __name__ == "__main__":
    main()
