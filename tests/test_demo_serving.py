"""What `cirlab-demo` lets Gradio serve: copies of the images the page shows, nothing beside them.

The page is served for real (in this process, on 127.0.0.1) over a gallery folder that holds a text
file and an image symlinked from another tree, with a query whose reference lies outside the gallery:
the common folder of those images is `/`, which the demo once handed to Gradio. The model is a stub
(tests/test_demo.py's), so no run is built.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, free_port
from test_demo import StubRetriever, make_images

from cirlab.demo import app as demo
from cirlab.demo.app import launch
from cirlab.demo.backend import DemoBackend
from cirlab.demo.gallery import DatasetQuery, folder_gallery
from cirlab.demo.ui import ShownImages, build_app


def need_gradio() -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:  # CI installs it: there a missing Gradio fails
        missing = pytest.fail if os.environ.get("CI", "").lower() in ("1", "true", "yes") else pytest.skip
        missing("the demo needs gradio: pip install 'cirlab[demo]'")


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def gallery_with_neighbours(tmp_path: Path) -> tuple[DemoBackend, dict[str, Path]]:
    """A gallery folder in a 'home' with a text file inside, a file beside it, an image symlinked from
    another tree, and a dataset query whose reference is outside the gallery."""
    photos = tmp_path / "home" / "photos"
    make_images(photos)
    (photos / "notes.txt").write_text("secret notes inside the gallery folder")
    (tmp_path / "home" / "beside.txt").write_text("secret file beside the gallery folder")
    (photos / "linked.png").symlink_to(ROOT / "docs" / "demo.png")  # another tree: common folder '/'
    outside = make_images(tmp_path / "elsewhere", 1)[0]
    gallery = folder_gallery(photos)
    assert "linked.png" in gallery.names
    gallery.queries = [DatasetQuery("q0", "ref", outside, "make it red", ())]
    secrets = {
        "inside": photos / "notes.txt",
        "beside": tmp_path / "home" / "beside.txt",
        "system": Path("/etc/hostname"),
        "original image": photos / "img0.png",  # served as a copy only
    }
    return DemoBackend(StubRetriever(), gallery).index(), secrets


def test_the_running_page_serves_the_images_it_shows_and_nothing_else(tmp_path, monkeypatch):
    need_gradio()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # Gradio's copies: not left in /tmp
    backend, secrets = gallery_with_neighbours(tmp_path)
    photos = secrets["inside"].parent
    shown = ShownImages()
    app, theme = build_app(backend, tmp_path / "run", shown, k=5)
    port = free_port()
    launch(app, theme, shown, "127.0.0.1", port, block=False)
    try:
        url = f"http://127.0.0.1:{port}"
        for what, path in secrets.items():
            for route in (f"{url}/gradio_api/file={path}", f"{url}/gradio_api/file/{path}"):
                status, body = fetch(route)
                assert status != 200 and body != path.read_bytes(), f"the {what} file {path} was served"
        # what the page shows is served: the grid's thumbnails ...
        config = json.loads(fetch(f"{url}/config")[1])
        grid = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "grid")
        tiles = grid["props"]["value"]
        assert [t["caption"] for t in tiles] == backend.gallery.names
        for tile, path in zip(tiles, backend.gallery.paths):
            status, body = fetch(tile["image"]["url"])
            assert status == 200 and body == path.read_bytes(), tile
        # ... what the page shows once asked (as the browser asks): a search in the grid, a dataset
        # query whose reference is outside the gallery
        from gradio_client import Client

        client = Client(url, verbose=False, download_files=False)
        (found,) = client.predict("linked", api_name="/filter_grid")
        image, text = client.predict(0, api_name="/pick_query")
        assert text == "make it red"
        reference = backend.gallery.queries[0].reference_path
        for tile, path in ((found["image"], photos / "linked.png"), (image, reference)):
            status, body = fetch(tile["url"])
            assert status == 200 and body == path.read_bytes(), tile
        assert sorted(p.name for p in shown.folder.iterdir()) == sorted(
            f"{i}-{n}" for i, n in enumerate([*backend.gallery.names, reference.name])
        )  # the served folder holds the copies only
    finally:
        app.close()
        shown.close()
    assert not shown.folder.exists()


class FakeApp:
    def launch(self, **options):
        self.options = options
        assert Path(options["allowed_paths"][0]).is_dir()  # the copies exist while the page is served


def run_main(monkeypatch, tmp_path, *argv: str) -> tuple[FakeApp, ShownImages]:
    """`cirlab-demo RUN *argv` up to Gradio's launch (recorded), on a stub backend."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    (run / ".hydra" / "config.yaml").write_text("{}\n")
    paths = make_images(tmp_path / "photos")
    backend = DemoBackend(StubRetriever(), folder_gallery(tmp_path / "photos")).index()
    app, made = FakeApp(), {}

    def fake_build(backend_, run_, shown, k):
        made["shown"] = shown
        shown(paths[0])
        return app, None

    monkeypatch.setattr(demo, "load_backend", lambda *a, **kw: backend)
    monkeypatch.setattr(demo, "build_app", fake_build)
    demo.main([str(run), *argv])
    return app, made["shown"]


def test_main_serves_the_copies_only_warns_off_loopback_and_offers_a_login(monkeypatch, tmp_path, capsys):
    need_gradio()
    monkeypatch.delenv("CIRLAB_DEMO_AUTH", raising=False)
    app, shown = run_main(monkeypatch, tmp_path)
    assert app.options["allowed_paths"] == [str(shown.folder)] and app.options["auth"] is None
    assert app.options["server_name"] == "127.0.0.1" and "warning" not in capsys.readouterr().err
    assert not shown.folder.exists()  # the copies are removed when the server stops

    app, _ = run_main(monkeypatch, tmp_path, "--host", "0.0.0.0")
    err = capsys.readouterr().err
    assert app.options["server_name"] == "0.0.0.0" and app.options["auth"] is None
    assert "warning: --host 0.0.0.0" in err and "no authentication" in err and "--auth" in err

    app, _ = run_main(monkeypatch, tmp_path, "--host", "0.0.0.0", "--auth", "alice:pa:ss")
    assert app.options["auth"] == ("alice", "pa:ss") and "warning" not in capsys.readouterr().err
    monkeypatch.setenv("CIRLAB_DEMO_AUTH", "bob:secret")  # keeps the password off the command line
    app, _ = run_main(monkeypatch, tmp_path, "--host", "::")
    assert app.options["auth"] == ("bob", "secret") and "warning" not in capsys.readouterr().err

    monkeypatch.setenv("CIRLAB_DEMO_AUTH", "bob")
    with pytest.raises(SystemExit) as exc:
        run_main(monkeypatch, tmp_path)
    assert exc.value.code == 2 and "needs USER:PASSWORD" in capsys.readouterr().err


def test_loopback_hosts():
    assert all(demo.is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(demo.is_loopback(h) for h in ("0.0.0.0", "::", "", "192.168.1.5", "example.org"))
