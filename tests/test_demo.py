"""`cirlab-demo`: the interactive retrieval page.

Fast tests cover the bad inputs (not a run, unreadable gallery images, empty text, a run that
cannot embed queries without its dataset) without a browser. The slow test starts the real demo on
127.0.0.1 for a small finished synthetic run and drives it in headless Chromium (Playwright with Debian's
`/usr/bin/chromium`): pick a reference in the gallery grid, type a modification, click Search, and
compare the page with `cirlab.load(run).search(...)`; it saves the screenshot the README shows.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, free_port, kill_group, run_cli, run_group
from PIL import Image

from cirlab.demo import main
from cirlab.demo.backend import Answer, DemoBackend, Hit
from cirlab.demo.gallery import Gallery, folder_gallery
from cirlab.demo.page import header_markdown, render_answer
from cirlab.demo.ui import cir_search
from cirlab.errors import CirlabError

# The README's screenshot: the test writes it only when asked (CIRLAB_UPDATE_DOCS=1), so a test run
# leaves the checkout clean; otherwise it goes to the test's temporary folder.
SCREENSHOT = ROOT / "docs" / "demo.png"


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


# ---- fast: bad input ---------------------------------------------------------------------------------
def test_not_a_run_exits_2_with_the_reason(tmp_path, capsys):
    for argv, reason in (
        ([str(tmp_path)], "not a cirlab run folder"),
        ([str(tmp_path / "missing")], "does not exist"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and reason in err and "Traceback" not in err
        assert err.startswith("cirlab-demo error: ")


def test_not_a_run_exits_2_from_the_console(tmp_path):
    """The real process: one line on stderr, no traceback."""
    proc = run_group(
        [sys.executable, "-m", "cirlab.demo", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "not a cirlab run folder" in proc.stderr and "Traceback" not in proc.stderr


def make_images(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"img{i}.png")
        Image.new("RGB", (32, 32), (40 * i, 100, 200)).save(paths[-1])
    return paths


def test_folder_gallery_lists_unreadable_images_and_keeps_the_rest(tmp_path):
    good = make_images(tmp_path / "g")
    (tmp_path / "g" / "sub").mkdir()
    good.append(tmp_path / "g" / "sub" / "deep.jpg")
    Image.new("RGB", (20, 20), (1, 2, 3)).save(good[-1])
    (tmp_path / "g" / "broken.png").write_bytes(b"not an image at all")
    full = tmp_path / "g" / "cut.jpg"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(full)
    full.write_bytes(full.read_bytes()[:40])  # truncated JPEG
    (tmp_path / "g" / "notes.txt").write_text("ignored: not an image extension")

    g = folder_gallery(tmp_path / "g")
    assert g.names == ["img0.png", "img1.png", "img2.png", "sub/deep.jpg"]
    assert [p.name for p, _ in g.unreadable] == ["broken.png", "cut.jpg"]
    backend = DemoBackend(StubRetriever(), g)
    page = header_markdown(backend, tmp_path / "run")
    assert "2 unreadable image(s) left out" in page and "broken.png" in page and "cut.jpg" in page

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    with pytest.raises(CirlabError, match="none readable"):
        folder_gallery(tmp_path / "bad")
    with pytest.raises(CirlabError, match="not a folder"):
        folder_gallery(tmp_path / "missing")


class StubRetriever:
    """What DemoBackend needs of cirlab's Retriever; records searches."""

    cfg = None
    stage = "eval"

    def __init__(self, error: str | None = None):
        self.error, self.calls = error, []
        self.module = type("SearleOTI" if error else "ZeroShot", (), {})()

    def index(self, paths):
        self.paths = list(paths)
        return self

    def search(self, path, text, k=10, exclude_reference=True):
        if self.error:
            raise CirlabError(self.error)
        self.calls.append((path, text, k, exclude_reference))
        return [(p, 1.0 - i / 10) for i, p in enumerate(p for p in self.paths if p != path)][:k]


def test_empty_text_and_missing_reference_are_visible_messages(tmp_path):
    paths = make_images(tmp_path)
    retriever = StubRetriever()
    backend = DemoBackend(retriever, Gallery([p.name for p in paths], paths, "three images")).index()
    retriever.calls.clear()
    for text in ("", "   "):
        status, results = cir_search(backend, "img0.png", None, text, 5)
        assert "Type a modification text" in status and results == ""
    status, results = cir_search(backend, None, None, "make it red", 5)
    assert "Pick a reference image first" in status and results == ""
    assert retriever.calls == []  # nothing was searched
    status, results = cir_search(backend, "img0.png", None, "make it red", 5)
    assert "Top 2" in status and results.count("<figure") == 2 and "img0.png" not in results
    assert retriever.calls == [(paths[0], "make it red", 5, True)]


def test_a_run_that_cannot_embed_queries_here_stops_with_the_reason(tmp_path):
    paths = make_images(tmp_path)
    backend = DemoBackend(
        StubRetriever("SEARLE-OTI needs its run's dataset to embed a query"),
        Gallery([p.name for p in paths], paths, "three images"),
    )
    with pytest.raises(
        CirlabError, match=r"\(SearleOTI\) cannot search new queries in the demo: .*needs its run's dataset"
    ):
        backend.index()


def test_answer_html_marks_the_target_with_rank_and_score(tmp_path):
    paths = make_images(tmp_path)
    hits = [Hit(1, "img1.png", 0.91234, False, paths[1]), Hit(2, "img2.png", 0.5, True, paths[2])]
    page = render_answer(Answer(hits, ("img2.png",)))
    assert "target at rank 2" in page
    assert re.search(r'<figure class="hit" data-rank="2" data-score="0.500000" data-name="img2.png"', page)
    assert "#1 · 0.9123" in page and page.count('class="res"') == 1
    assert "not in the top 1" in render_answer(Answer(hits[:1], ("img9.png",)))


# ---- slow: the real page in headless Chromium -----------------------------------------------------------
class DemoProcess:
    """`python -m cirlab.demo ...` in the background; waits for its 'serving' line."""

    def __init__(self, args: list[str], env: dict, timeout: float = 300):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cirlab.demo", *args],
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stop() stops its whole group
        )
        self.lines: list[str] = []
        self.url: str | None = None
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.search(r"serving (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or self.url is None:
            self.stop()
            raise AssertionError("the demo did not start:\n" + "".join(self.lines[-40:]))
        deadline = time.time() + 60
        while True:  # the line comes just before Gradio binds the port
            try:
                urllib.request.urlopen(self.url, timeout=5).read()
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise AssertionError("the demo does not answer:\n" + "".join(self.lines[-40:])) from None
                time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM (the demo then removes its image copies), SIGKILL to what is left after 20 s."""
        kill_group(self.proc, grace=20)


@pytest.fixture(scope="module")
def zeroshot_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("demo")
    run_dir = tmp / "run"
    run_cli(tmp, "+method=zeroshot", "eval.visualize=false", run_dir=run_dir)
    return run_dir


def on_ci() -> bool:
    """CI sets CI=true (.ci/run too): there a missing browser is a failure, not a skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def chromium_exe() -> str:
    """Skips (before any run is made) where gradio, playwright or a Chromium browser is missing; fails
    instead under CI=true, where .ci/run installs them: a CI that lost its browser must not pass green."""
    missing = pytest.fail if on_ci() else pytest.skip
    for module, reason in (
        ("gradio", "the demo needs gradio: pip install 'cirlab[demo]'"),
        ("playwright.sync_api", "the browser test needs playwright: pip install 'cirlab[demo]'"),
    ):
        try:
            importlib.import_module(module)
        except ImportError:
            missing(reason)
    exe = chromium()
    if exe is None:
        missing("no Chromium browser on this machine (apt-get install chromium; .ci/run does)")
    return exe


@pytest.mark.slow
def test_demo_in_headless_chromium_matches_the_python_api(chromium_exe, zeroshot_run, tmp_path):
    exe = chromium_exe
    from playwright.sync_api import sync_playwright

    import cirlab
    from cirlab.demo.gallery import run_gallery

    # the expected answers, from the Python API on the run's own test gallery
    retriever = cirlab.load(zeroshot_run)
    gallery = run_gallery(retriever.cfg)
    assert len(gallery.names) == 1824 and gallery.queries
    retriever.index(gallery.paths)
    name_of = {p: n for n, p in zip(gallery.names, gallery.paths)}
    k = 10
    # two dataset queries whose true target the model ranks in its top-5 (zero-shot sum: R@5 about 20%)
    chosen = []
    for q in gallery.queries:
        expected = retriever.search(q.reference_path, q.text, k=k)
        if q.targets[0] in [name_of[p] for p, _ in expected[:5]]:
            chosen.append((q, expected))
            if len(chosen) == 2:
                break
    assert len(chosen) == 2, "fewer than two test queries with their target in the top 5"
    (q, expected), (q2, expected2) = chosen
    assert q.reference not in [name_of[p] for p, _ in expected]  # the reference is left out

    port = free_port()
    demo = DemoProcess([str(zeroshot_run), "--port", str(port), "-k", str(k)], cli_env(tmp_path))
    try:
        assert demo.url == f"http://127.0.0.1:{port}"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(demo.url)
            # pick the reference in the searchable grid
            page.locator("#find textarea, #find input").first.fill(q.reference)
            thumbs = page.locator("#grid button.thumbnail-item")
            page.wait_for_function(
                "document.querySelectorAll('#grid button.thumbnail-item').length === 1", timeout=30_000
            )
            thumbs.first.click()
            page.wait_for_function("document.querySelector('#reference img') !== null", timeout=30_000)
            # an empty text is a visible message
            page.locator("#search").click()
            page.wait_for_selector("#status:has-text('Type a modification text')", timeout=30_000)
            # type the modification and search
            page.locator("#text textarea, #text input").first.fill(q.text)
            page.locator("#search").click()
            page.wait_for_selector("#results figure[data-rank]", timeout=30_000)
            figures = page.locator("#results figure[data-rank]")
            shown = [
                (figures.nth(i).get_attribute("data-name"), float(figures.nth(i).get_attribute("data-score")))
                for i in range(figures.count())
            ]
            outlined = [
                page.locator("#results figure.hit").nth(i).get_attribute("data-name")
                for i in range(page.locator("#results figure.hit").count())
            ]
            border = page.locator("#results figure.hit").first.evaluate(
                "e => getComputedStyle(e).borderTopColor"
            )
            status = page.locator("#status").inner_text()
            shot = SCREENSHOT if os.environ.get("CIRLAB_UPDATE_DOCS") == "1" else tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            # the other way in: a query of the dataset from the dropdown fills reference and text
            box = page.locator("#query input").first
            box.click()
            box.press_sequentially(f"{q2.qid}:")
            page.locator("li[data-testid=dropdown-option]").first.click()
            page.wait_for_function(
                f"document.querySelector('#text textarea').value === {q2.text!r}", timeout=30_000
            )
            page.locator("#search").click()
            page.wait_for_selector(f"#status:has-text('{q2.reference}')", timeout=30_000)
            top1_2 = page.locator('#results figure[data-rank="1"]').get_attribute("data-name")
            outlined2 = page.locator("#results figure.hit").first.get_attribute("data-name")
            browser.close()
    finally:
        demo.stop()
    assert shown[0][0] == name_of[expected[0][0]]  # top-1 equals cirlab.load(run).search
    assert [n for n, _ in shown] == [name_of[p] for p, _ in expected]  # ... and so does the whole top-k
    assert all(abs(s - e) < 1e-5 for (_, s), (_, e) in zip(shown, expected))
    assert outlined == [q.targets[0]] and border == "rgb(0, 170, 0)"  # the true target outlined green
    assert q.reference in status and q.text in status
    assert top1_2 == name_of[expected2[0][0]] and outlined2 == q2.targets[0]
    assert "Traceback" not in "".join(demo.lines)


@pytest.mark.slow
def test_demo_answers_equal_the_runs_predictions(zeroshot_run):
    """The demo searches with evaluation's query embedding: its top-k for dataset queries is the run's
    predictions.test.json row."""
    import json

    from cirlab.demo import load_backend

    backend = load_backend(zeroshot_run, log=lambda *_: None)
    predictions = json.loads((zeroshot_run / "stages" / "eval" / "predictions.test.json").read_text())
    queries = backend.gallery.queries[:20]
    same = 0
    for q in queries:
        shown = [h.name for h in backend.search(q.reference, q.text, k=10).hits]
        assert shown[0] == predictions[q.qid][0], q.qid
        same += shown == predictions[q.qid][:10]
    assert same == len(queries)


@pytest.mark.slow
def test_demo_on_a_gallery_folder_with_unreadable_images(zeroshot_run, tmp_path):
    """--gallery: every image under the folder; an unreadable one is listed (console and page), the rest served."""
    import cirlab
    from cirlab.demo import load_backend
    from cirlab.demo.gallery import run_gallery

    source_gallery = run_gallery(cirlab.load(zeroshot_run).cfg)
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in source_gallery.paths[:30]:
        (folder / p.name).symlink_to(p)
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    printed: list[str] = []
    backend = load_backend(zeroshot_run, folder, log=printed.append)
    assert len(backend.gallery.names) == 30 and [p.name for p, _ in backend.gallery.unreadable] == [
        "broken.png"
    ]
    assert any("unreadable image left out" in line and "broken.png" in line for line in printed)
    assert backend.gallery.examples  # modification texts of the run's dataset
    ref = backend.gallery.names[0]
    answer = backend.search(ref, backend.gallery.examples[0], k=5)
    assert len(answer.hits) == 5 and ref not in [h.name for h in answer.hits]
    assert "broken.png" in header_markdown(backend, zeroshot_run)


@pytest.mark.slow
def test_captions_run_searches_text_to_image_and_image_to_caption(tmp_path):
    """A captions run (+method=crossmodal): the demo's embeddings are evaluation's (same recalls as the
    run's results.json), text -> image outlines the captioned image, image -> caption the image's captions."""
    import torch
    from conftest import results

    from cirlab.demo import load_backend
    from cirlab.demo.ui import cir_search
    from cirlab.methods.crossmodal import crossmodal_recalls

    run_dir = tmp_path / "run"
    run_cli(
        tmp_path,
        "+method=crossmodal",
        "dataset=synthetic_captions",
        "method.stages=[zeroshot]",
        run_dir=run_dir,
    )
    backend = load_backend(run_dir, log=lambda *_: None)
    g = backend.gallery
    assert backend.captions_mode and len(g.names) == 1824 and len(g.captions) > len(g.names)
    owner = torch.tensor([backend.index_of[n] for _, n in g.captions])
    recalls = crossmodal_recalls(backend.image_emb, backend.caption_emb, owner)
    metrics = results(run_dir)["metrics"]
    for key in ("t2i_recall_at_1", "i2t_recall_at_1", "t2i_recall_at_10"):
        assert recalls[key] == pytest.approx(metrics[f"test/{key}"], abs=1e-6), key

    caption, image = g.captions[0]
    answer = backend.text_to_image(caption, k=10)
    assert [h.rank for h in answer.hits] == list(range(1, 11)) and image in answer.targets
    assert all(a.score >= b.score for a, b in zip(answer.hits, answer.hits[1:]))
    assert [h.target for h in answer.hits] == [h.name in answer.targets for h in answer.hits]
    by_image = backend.image_to_caption(image, k=5)
    assert len(by_image.hits) == 5 and all(h.target == (h.image == image) for h in by_image.hits)
    # the uploaded copy of a gallery image finds the same captions
    upload = tmp_path / "upload.png"
    upload.write_bytes(g.paths[0].read_bytes())
    assert [h.name for h in backend.image_to_caption(upload, k=5).hits] == [h.name for h in by_image.hits]
    status, _ = cir_search(backend, image, None, "x", 5)  # the CIR button does not exist here: a message
    assert "a captions run searches text" in status
