"""The Gradio page: widgets wired to `DemoBackend`; every image handed to Gradio is a copy (`ShownImages`)."""

from __future__ import annotations

import html
import shutil
import tempfile
import threading
import time
from pathlib import Path

from cirlab.demo.backend import GRID_MAX, DemoBackend
from cirlab.demo.page import header_markdown, render_answer
from cirlab.errors import CirlabError

K_MAX = 50


class ShownImages:
    """Copies of the images the page shows, made when first shown, in a folder of their own: the only
    folder Gradio is allowed to serve (`launch`). Allowing the images' folder, or the common parent of
    the gallery and the references, would serve every file under it, not only the images; allowing
    each image file instead costs Gradio a path resolution per allowed file per request, seconds for a
    grid of thumbnails (docs/demo.md#served-images)."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="cirlab-demo-")).resolve()
        self.copies: dict[str, str] = {}
        self.lock = threading.Lock()  # Gradio runs the callbacks in threads

    def __call__(self, path: str | Path) -> str:
        """The copy of `path` that the page hands to Gradio."""
        with self.lock:
            if str(path) not in self.copies:
                copy = self.folder / f"{len(self.copies)}-{Path(path).name}"
                shutil.copyfile(path, copy)
                self.copies[str(path)] = str(copy)
            return self.copies[str(path)]

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def build_app(backend: DemoBackend, run: Path, shown: ShownImages, k: int = 10):
    """The Gradio page; every image it hands to Gradio goes through `shown` (launch serves its folder)."""
    import gradio as gr

    theme = gr.themes.Default(font=["Helvetica", "Arial", "sans-serif"], font_mono=["monospace"])
    with gr.Blocks(title=f"cirlab demo: {run.name}", analytics_enabled=False) as app:
        gr.Markdown(header_markdown(backend, run), elem_id="header")
        if backend.captions_mode:
            _captions_page(gr, backend, k, shown)
        else:
            _cir_page(gr, backend, k, shown)
    return app, theme


def _picker(gr, backend: DemoBackend, label: str, shown: ShownImages):
    """Reference image (upload or picked) + a searchable grid of the gallery; returns (image, state)."""
    ref_name = gr.State(None)
    ref_image = gr.Image(label=label, type="filepath", sources=["upload"], height=220, elem_id="reference")
    grid_names = gr.State(backend.matching(""))
    find = gr.Textbox(label="Find a reference in the gallery (part of its name)", elem_id="find")
    grid = gr.Gallery(
        value=[(shown(backend.gallery.paths[backend.index_of[n]]), n) for n in grid_names.value],
        label=f"Gallery (first {GRID_MAX} matches; click one)",
        columns=8,
        height=260,
        fit_columns=False,
        allow_preview=False,
        object_fit="contain",
        elem_id="grid",
    )

    def filter_grid(pattern):
        names = backend.matching(pattern)
        return names, [(shown(backend.gallery.paths[backend.index_of[n]]), n) for n in names]

    def pick(names, evt: gr.SelectData):
        name = names[evt.index]
        return name, shown(backend.gallery.paths[backend.index_of[name]])

    pick.__annotations__["evt"] = gr.SelectData  # the class itself: Gradio does not resolve postponed names

    find.change(filter_grid, find, [grid_names, grid])
    grid.select(pick, grid_names, [ref_name, ref_image])
    ref_image.upload(lambda: None, None, ref_name)
    ref_image.clear(lambda: None, None, ref_name)
    return ref_image, ref_name


def _reference(name, image) -> str | None:
    return name or image or None


def cir_search(backend: DemoBackend, name: str | None, image: str | None, text: str, k) -> tuple[str, str]:
    """The Search button: (status markdown, results HTML). Bad input is a visible message, not an error."""
    reference = _reference(name, image)
    if reference is None:
        return "⚠️ **Pick a reference image first** (a dataset query, a gallery image or an upload).", ""
    if not text or not text.strip():
        return "⚠️ **Type a modification text** (an empty text is not a query).", ""
    start = time.perf_counter()
    try:
        answer = backend.search(reference, text, int(k))
    except CirlabError as err:
        return f"⚠️ **{html.escape(str(err))}**", ""
    seconds = time.perf_counter() - start
    what = f"`{name}`" if name else "the uploaded image"
    return f"Top {len(answer.hits)} for {what} + “{html.escape(text.strip())}”", render_answer(
        answer, seconds
    )


def _cir_page(gr, backend: DemoBackend, k: int, shown: ShownImages) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            queries = backend.gallery.queries
            if queries:
                query = gr.Dropdown(
                    choices=[(f"{q.qid}: {q.text}", i) for i, q in enumerate(queries)],
                    value=None,
                    label=f"A query of the dataset ({len(queries):,}; type to filter)",
                    filterable=True,
                    elem_id="query",
                )
            ref_image, ref_name = _picker(gr, backend, "Reference image (pick one below, or upload)", shown)
        with gr.Column(scale=3):
            text = gr.Textbox(
                label="Modification text", placeholder="e.g. has a red circle on the left", elem_id="text"
            )
            if backend.gallery.examples:
                gr.Examples(
                    [[t] for t in backend.gallery.examples],
                    inputs=[text],
                    label="Modification texts from the dataset",
                )
            top_k = gr.Slider(1, max(K_MAX, k), value=k, step=1, label="k (results shown)", elem_id="k")
            button = gr.Button("Search", variant="primary", elem_id="search")
            status = gr.Markdown("", elem_id="status")
            results = gr.HTML("", elem_id="results")
    if queries:

        def pick_query(i):
            if i is None:
                return gr.update(), gr.update(), gr.update()
            q = queries[int(i)]
            return q.reference, shown(q.reference_path), q.text

        query.change(pick_query, query, [ref_name, ref_image, text])

    run_search = lambda *a: cir_search(backend, *a)  # noqa: E731
    button.click(run_search, [ref_name, ref_image, text, top_k], [status, results])
    text.submit(run_search, [ref_name, ref_image, text, top_k], [status, results])


def _captions_page(gr, backend: DemoBackend, k: int, shown: ShownImages) -> None:
    top_k = gr.Slider(1, max(K_MAX, k), value=k, step=1, label="k (results shown)", elem_id="k")
    status = gr.Markdown("", elem_id="status")
    with gr.Tabs():
        with gr.Tab("Text → image"):
            text = gr.Textbox(
                label="Caption", placeholder="e.g. a photo of a red circle on the left", elem_id="text"
            )
            if backend.gallery.examples:
                gr.Examples(
                    [[t] for t in backend.gallery.examples], inputs=[text], label="Captions from the dataset"
                )
            t2i = gr.Button("Search images", variant="primary", elem_id="search")
        with gr.Tab("Image → caption"):
            ref_image, ref_name = _picker(gr, backend, "Image (pick one below, or upload)", shown)
            i2t = gr.Button("Search captions", variant="primary", elem_id="search-captions")
    results = gr.HTML("", elem_id="results")

    def by_text(text_, k_):
        if not text_ or not text_.strip():
            return "⚠️ **Type a caption** (an empty text is not a query).", ""
        start = time.perf_counter()
        answer = backend.text_to_image(text_, int(k_))
        return f"Top {len(answer.hits)} images for “{html.escape(text_.strip())}”", render_answer(
            answer, time.perf_counter() - start
        )

    def by_image(name, image, k_):
        reference = _reference(name, image)
        if reference is None:
            return "⚠️ **Pick an image first** (from the gallery or an upload).", ""
        start = time.perf_counter()
        try:
            answer = backend.image_to_caption(reference, int(k_))
        except CirlabError as err:
            return f"⚠️ **{html.escape(str(err))}**", ""
        return (
            f"Top {len(answer.hits)} captions for {f'`{name}`' if name else 'the uploaded image'}",
            render_answer(answer, time.perf_counter() - start),
        )

    t2i.click(by_text, [text, top_k], [status, results])
    text.submit(by_text, [text, top_k], [status, results])
    i2t.click(by_image, [ref_name, ref_image, top_k], [status, results])
