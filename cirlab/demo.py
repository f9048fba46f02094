"""`cirlab-demo RUN`: an interactive retrieval page over a finished run (Gradio, `pip install 'cirlab[demo]'`).

    cirlab-demo outputs/runs/<run> [--gallery DIR] [--port 7860] [--host 127.0.0.1] [-k 10] [--auth USER:PW]

Loads the run's final stage with `cirlab.load`, embeds the gallery once through the feature cache
(the run's own test gallery by default, or every image under `--gallery`), then serves a page where a
person picks a reference (a dataset query, a searchable grid of the gallery, or an upload), types the
modification text and sees the top-k with rank and cosine score. The search is `Retriever.search`
(evaluation's query embedding and ranking: a dataset query shows its row of predictions.test.json); the
reference is left out of its own ranking as the run's protocol says (always for a `--gallery` folder); a
dataset query's true target is outlined green. Every method's run works, SEARLE-OTI included (see
`SearleOTI.oti_tokens`). Captions runs (`+method=crossmodal`) get text -> image and image -> caption
search instead, ranked by `cirlab.retrieval.search` too.

Everything the page does lives in `DemoBackend` (no Gradio): the Gradio layer only wires widgets.
Gradio serves only copies of the images the page shows (`ShownImages`), never the folders they are in.
"""

from __future__ import annotations

import argparse
import errno
import html
import ipaddress
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cirlab.errors import CirlabError, user_cause

GRID_MAX = 60  # thumbnails shown at once in the reference picker
K_MAX = 50
EXAMPLES = 8  # modification texts from the dataset shown below the text box
CSS = """
#results .row { display: flex; flex-wrap: wrap; gap: 8px; }
#results figure { margin: 0; text-align: center; font-size: 12px; border: 4px solid transparent; padding: 2px; }
#results figure img { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated; display: block; }
#results figure.hit { border-color: #0a0; }
#results figure.hit figcaption { color: #0a0; font-weight: bold; }
#results ol.captions li.hit { color: #0a0; font-weight: bold; }
#results .summary { margin: 4px 0 8px 0; display: flex; align-items: center; gap: 12px; }
#results figure.tgt { border: 3px dashed #0a0; } #results figure.tgt img { width: 48px; height: 48px; }
#reference img, #grid img { image-rendering: pixelated; }
#reference img { width: 100%; height: 100%; object-fit: contain; }
#results .ok { color: #0a0; } #results .miss { color: #c00; }
"""


@dataclass(frozen=True)
class DatasetQuery:
    """A query of the run's dataset: picking it fills the reference and the text; its targets are outlined."""

    qid: str
    reference: str  # image name (gallery name when the reference is in the gallery)
    reference_path: Path
    text: str
    targets: tuple[str, ...]  # empty where the split has no public answers


@dataclass
class Gallery:
    names: list[str]
    paths: list[Path]
    description: str
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    queries: list[DatasetQuery] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)  # modification texts (or captions) of the dataset
    captions: list[tuple[str, str]] = field(default_factory=list)  # (caption, image name): captions runs
    exclude_reference: bool = True  # the dataset's protocol; always for a folder


@dataclass
class Hit:
    rank: int
    name: str  # gallery image name, or the caption (image -> caption search)
    score: float
    target: bool
    path: Path | None = None
    image: str = ""  # for a caption hit: the image it describes


@dataclass
class Answer:
    hits: list[Hit]
    targets: tuple[str, ...]  # the true answers when the query is one of the dataset's
    target_tiles: tuple[tuple[str, Path], ...] = ()  # (name, file) of the targets in the gallery


# ---- the gallery ---------------------------------------------------------------------------------
def run_gallery(cfg, source=None) -> Gallery:
    """The run's own test gallery (union of the test split's eval sets) and its queries; `source`: the
    run's dataset source when already built."""
    from cirlab.api import build_source, data_kind

    source = source or build_source(cfg)
    split = cfg.dataset.test_split
    if data_kind(cfg) == "captions":
        pairs = source.image_captions(split)
        names = [n for n, _ in pairs]
        captions = [(c, n) for n, caps in pairs for c in caps]
        return Gallery(
            names,
            [source.image_path(n) for n in names],
            f"the {split} split of {cfg.dataset.name} ({len(names):,} images, {len(captions):,} captions)",
            examples=[c for c, _ in captions[:: max(1, len(captions) // EXAMPLES)]][:EXAMPLES],
            captions=captions,
        )
    answers = source.has_answers(split)
    names: dict[str, None] = {}
    queries = []
    for es in source.eval_sets(split):
        names.update(dict.fromkeys(es.gallery))
        for q in es.queries:
            queries.append(
                DatasetQuery(
                    f"{es.group}/{q.qid}" if es.group else q.qid,
                    q.reference,
                    source.image_path(q.reference),
                    source.eval_text(q),
                    tuple(q.targets) if answers else (),
                )
            )
    names_ = list(names)
    step = max(1, len(queries) // EXAMPLES)
    return Gallery(
        names_,
        [source.image_path(n) for n in names_],
        f"the {split} split of {cfg.dataset.name} ({len(names_):,} images, {len(queries):,} queries)",
        queries=queries,
        examples=[q.text for q in queries[::step]][:EXAMPLES],
        exclude_reference=bool(source.protocol.exclude_reference),
    )


def folder_gallery(folder: Path, cfg=None, source=None) -> Gallery:
    """Every image under `folder` (recursively); unreadable files are listed and left out. Example texts
    come from the run's dataset when its data is on this machine."""
    from PIL import Image, UnidentifiedImageError

    from cirlab.api import IMAGE_EXTS

    folder = Path(folder)
    if not folder.is_dir():
        raise CirlabError(f"--gallery {folder} is not a folder")
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    paths, unreadable = [], []
    for p in found:
        try:
            with Image.open(p) as img:
                img.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            unreadable.append((p, f"{type(err).__name__}: {err}"))
            continue
        except Image.DecompressionBombError as err:
            unreadable.append((p, f"{err} Allow it with CIRLAB_MAX_IMAGE_PIXELS=<pixels>"))
            continue
        paths.append(p)
    if not paths:
        what = (
            f"{len(unreadable)} files, none readable"
            if unreadable
            else f"no images ({', '.join(IMAGE_EXTS)})"
        )
        raise CirlabError(f"--gallery {folder}: {what}")
    gallery = Gallery(
        [p.relative_to(folder).as_posix() for p in paths],
        paths,
        f"{folder} ({len(paths):,} images)",
        unreadable=unreadable,
    )
    if cfg is not None:
        try:
            dataset = run_gallery(cfg, source)
        except CirlabError:  # the run's dataset is not on this machine: no example texts, nothing else lost
            dataset = None
        if dataset is not None:
            gallery.examples = dataset.examples
    return gallery


# ---- the backend -----------------------------------------------------------------------------------
class DemoBackend:
    """A loaded run + an embedded gallery: what the page asks, answered without any UI."""

    def __init__(self, retriever, gallery: Gallery):
        self.retriever, self.gallery = retriever, gallery
        self.exclude_reference = gallery.exclude_reference
        from cirlab.api import data_kind

        self.captions_mode = retriever.cfg is not None and data_kind(retriever.cfg) == "captions"
        self.index_of = {n: i for i, n in enumerate(gallery.names)}
        self.name_of = {str(p): n for n, p in zip(gallery.names, gallery.paths)}
        self.answers = {(q.reference, q.text.strip()): q.targets for q in gallery.queries}
        self.caption_images: dict[str, set[str]] = {}
        for c, n in gallery.captions:
            self.caption_images.setdefault(c.strip(), set()).add(n)
        self.image_emb = self.caption_emb = None

    @property
    def method(self) -> str:
        return type(self.retriever.module).__name__

    @property
    def method_name(self) -> str:
        cfg = self.retriever.cfg
        name = cfg.method.get("name") if cfg is not None and "method" in cfg else None
        return f"{name} ({self.method})" if name else self.method

    # ---- start-up
    def index(self) -> DemoBackend:
        if self.captions_mode:
            self._index_captions()
        else:
            self.retriever.index(self.gallery.paths)
            self._check_queries()
        return self

    def _check_queries(self) -> None:
        """A run whose queries cannot be embedded here (SEARLE-OTI without its dataset) stops at start-up
        with the reason, not at the first click. A dataset query's reference is tried first: SEARLE-OTI
        has its token stored, any other image it optimises now."""
        reference = self.gallery.queries[0].reference_path if self.gallery.queries else self.gallery.paths[0]
        try:
            self.retriever.search(reference, "a photo", k=1)
        except CirlabError as err:
            raise CirlabError(
                f"this run's method ({self.method}) cannot search new queries in the demo: {err}"
            ) from None

    def _index_captions(self) -> None:
        """Images as the run's gallery (its image embedding), captions by its text embedding."""
        import torch

        self.image_emb = self.retriever.index(self.gallery.paths).gallery
        texts = [c for c, _ in self.gallery.captions]
        size = self.retriever.cfg.eval.batch_size  # evaluation's batches
        if texts:
            with torch.no_grad():
                self.caption_emb = torch.cat(
                    [
                        self.retriever.module.query_embedding(None, texts[i : i + size]).float().cpu()
                        for i in range(0, len(texts), size)
                    ]
                )

    # ---- queries
    def reference_path(self, reference: str | Path) -> tuple[str | None, Path]:
        """(gallery/dataset name or None for an upload, file) of a picked reference."""
        ref = str(reference)
        if ref in self.index_of:
            return ref, self.gallery.paths[self.index_of[ref]]
        for q in self.gallery.queries:  # a dataset reference outside the gallery
            if q.reference == ref:
                return ref, q.reference_path
        path = Path(ref)
        if not path.is_file():
            raise CirlabError(f"reference {ref} is neither a gallery image nor a file")
        return self.name_of.get(str(path)), path

    def search(self, reference: str | Path, text: str, k: int = 10) -> Answer:
        """Reference + modification text -> the top-k gallery images (CIR runs)."""
        if self.captions_mode:
            raise CirlabError("a captions run searches text -> image and image -> caption")
        if not text or not text.strip():
            raise CirlabError("type a modification text")
        name, path = self.reference_path(reference)
        targets = self.answers.get((name, text.strip()), ()) if name is not None else ()
        found = self.retriever.search(path, text, int(k), exclude_reference=self.exclude_reference)
        hits = []
        for rank, (p, score) in enumerate(found, 1):
            hit_name = self.name_of.get(str(p), str(p))
            hits.append(Hit(rank, hit_name, score, hit_name in targets, path=p))
        return Answer(
            hits,
            targets,
            tuple((t, self.gallery.paths[self.index_of[t]]) for t in targets if t in self.index_of),
        )

    def text_to_image(self, text: str, k: int = 10) -> Answer:
        if not text or not text.strip():
            raise CirlabError("type a caption to search images with")
        found = self.retriever.search(None, text, int(k))
        targets = tuple(sorted(self.caption_images.get(text.strip(), ())))
        hits = []
        for rank, (p, score) in enumerate(found, 1):
            name = self.name_of[str(p)]
            hits.append(Hit(rank, name, score, name in targets, path=p))
        return Answer(hits, targets, tuple((t, self.gallery.paths[self.index_of[t]]) for t in targets))

    def image_to_caption(self, reference: str | Path, k: int = 10) -> Answer:
        import torch

        from cirlab.retrieval.search import search

        if self.caption_emb is None:
            raise CirlabError("this gallery has no captions to search")
        name, path = self.reference_path(reference)
        module = self.retriever.module
        if name is not None and name in self.index_of:
            v = self.image_emb[self.index_of[name]][None]
        else:
            with torch.no_grad():
                v = module.gallery_embedding(
                    self.retriever.raw_features([path], cache=False).to(module.device)
                )
        scores, rows = search(
            v.float().cpu(), self.caption_emb, int(k), backend=module.search_backend, **module.search_options
        )
        hits = [
            Hit(
                r,
                self.gallery.captions[i][0],
                s,
                self.gallery.captions[i][1] == name,
                image=self.gallery.captions[i][1],
            )
            for r, (s, i) in enumerate(zip(scores[0].tolist(), rows[0].tolist()), 1)
        ]
        return Answer(hits, (name,) if name is not None else ())

    def matching(self, pattern: str, limit: int = GRID_MAX) -> list[str]:
        """Gallery names containing `pattern` (case-insensitive), for the reference picker's grid."""
        pattern = (pattern or "").strip().lower()
        return [n for n in self.gallery.names if pattern in n.lower()][:limit]


# ---- HTML of an answer -------------------------------------------------------------------------------
def render_answer(answer: Answer, seconds: float | None = None) -> str:
    from cirlab.retrieval.visualize import data_uri

    cells, hit_rank = [], next((h.rank for h in answer.hits if h.target), None)
    if answer.targets:
        status = (
            f'<span class="ok">target at rank {hit_rank}</span>'
            if hit_rank
            else f'<span class="miss">target {html.escape(", ".join(answer.targets))} not in the top {len(answer.hits)}</span>'
        )
        if not hit_rank:  # show what should have been found
            status += "".join(
                f'<figure class="tgt" title="{html.escape(t)}"><img src="{data_uri(p)}" alt="target"></figure>'
                for t, p in answer.target_tiles
            )
    else:
        status = "not a dataset query: no known target"
    timing = f" · {seconds * 1000:.0f} ms" if seconds is not None else ""
    if answer.hits and answer.hits[0].path is None:  # captions
        items = "".join(
            f'<li class="{"hit" if h.target else "res"}" data-rank="{h.rank}" data-score="{h.score:.6f}"'
            f' data-name="{html.escape(h.name)}">{html.escape(h.name)} <small>({h.score:.4f} · '
            f"{html.escape(h.image)})</small></li>"
            for h in answer.hits
        )
        return f'<div class="summary">{status}{timing}</div><ol class="captions">{items}</ol>'
    for h in answer.hits:
        mark = " ✓ target" if h.target else ""
        cells.append(
            f'<figure class="{"hit" if h.target else "res"}" data-rank="{h.rank}" data-score="{h.score:.6f}" '
            f'data-name="{html.escape(h.name)}" title="{html.escape(h.name)}">'
            f'<img src="{data_uri(h.path)}" alt="{html.escape(h.name)}">'
            f"<figcaption>#{h.rank} · {h.score:.4f}{mark}</figcaption></figure>"
        )
    return f'<div class="summary">{status}{timing}</div><div class="row">{"".join(cells)}</div>'


def header_markdown(backend: DemoBackend, run: Path) -> str:
    g = backend.gallery
    lines = [
        f"### cirlab demo — `{run.name}`",
        f"Method **{backend.method_name}** (stage `{backend.retriever.stage}`), gallery: {g.description}.",
    ]
    if not backend.captions_mode:
        lines.append(
            "The reference is left out of its own ranking."
            if backend.exclude_reference
            else "The reference stays in the ranking (the dataset's protocol)."
        )
    if g.unreadable:
        shown = "\n".join(f"- `{p}`: {why}" for p, why in g.unreadable[:20])
        more = f"\n- ... and {len(g.unreadable) - 20} more" if len(g.unreadable) > 20 else ""
        lines.append(f"\n**{len(g.unreadable)} unreadable image(s) left out of the gallery:**\n{shown}{more}")
    return "\n\n".join(lines)


# ---- the page ----------------------------------------------------------------------------------------
class ShownImages:
    """Copies of the images the page shows, made when first shown, in a folder of their own: the only
    folder Gradio is allowed to serve (`launch`). Allowing the images' folder, or the common parent of
    the gallery and the references, would serve every file under it, not only the images; allowing
    each image file instead costs Gradio a path resolution per allowed file per request (0.2 s per
    request for 2,000 files, measured: seconds for a grid of thumbnails)."""

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


# ---- start-up ----------------------------------------------------------------------------------------
def load_backend(
    run: str | Path, gallery: str | Path | None = None, device: str | None = None, log=print
) -> DemoBackend:
    """cirlab.load + gallery listing + embedding (feature cache; tqdm shows progress when it encodes)."""
    import cirlab

    t0 = time.perf_counter()
    retriever = cirlab.load(run, device=device)
    log(
        f"cirlab-demo: loaded {type(retriever.module).__name__} (stage {retriever.stage}) in {time.perf_counter() - t0:.1f} s"
    )
    source = retriever.data.source if retriever.data is not None else None
    if gallery is None:
        g = run_gallery(retriever.cfg, source)
    else:
        g = folder_gallery(Path(gallery), retriever.cfg, source)
    for p, why in g.unreadable:
        log(f"cirlab-demo: unreadable image left out: {p} ({why})")
    t1 = time.perf_counter()
    log(f"cirlab-demo: embedding the gallery: {g.description}")
    backend = DemoBackend(retriever, g).index()
    log(f"cirlab-demo: gallery embedded in {time.perf_counter() - t1:.1f} s")
    return backend


def set_query_threads(n: int) -> None:
    """Intra-op threads for the queries (the gallery was embedded with torch's default). Measured on 2 busy
    cores (load 5), tiny backbone: 84 ms per query with 1 thread, 742 ms with 2."""
    import torch

    if n >= 1:
        torch.set_num_threads(n)


def is_loopback(host: str) -> bool:
    """Whether `host` serves this machine only (anything else reaches the network)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """--auth / CIRLAB_DEMO_AUTH: USER:PASSWORD (the password may hold ':'), or None for no login."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not (sep and user and password):
        raise CirlabError("--auth (or CIRLAB_DEMO_AUTH) needs USER:PASSWORD, e.g. --auth alice:s3cret")
    return user, password


def exposure_warning(host: str, auth) -> str | None:
    """The line printed when the page is served to the network without a login."""
    if is_loopback(host) or auth:
        return None
    return (
        f"cirlab-demo: warning: --host {host} serves this page to the network and it has no authentication: "
        "anyone who reaches the port can search the gallery and upload images (set CIRLAB_DEMO_AUTH=USER:PASSWORD "
        "or --auth USER:PASSWORD for a login, or keep --host 127.0.0.1)"
    )


def bind_error(host: str, port: int) -> OSError | None:
    """Why the page cannot be served on host:port (a port another server holds, an address not this
    machine's), or None when it can."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as err:
        return err
    return None


def launch(app, theme, shown: ShownImages, host: str, port: int, auth=None, block: bool = True) -> None:
    """Serve the page. Gradio may serve only the copies in `shown.folder` (and its own uploads and
    cache): no folder of the user's. A port or host it cannot serve on is a CirlabError naming them (Gradio
    raises an OSError, "Cannot find empty port")."""
    unusable = bind_error(host, port)  # asked before Gradio binds: afterwards the port is its own
    try:
        app.launch(
            server_name=host,
            server_port=port,
            share=False,
            quiet=True,
            show_error=True,
            ssr_mode=False,
            css=CSS,
            theme=theme,
            allowed_paths=[str(shown.folder)],
            auth=auth,
            prevent_thread_lock=not block,
        )
    except OSError as err:
        if unusable is None:  # not the address: shown as it is
            raise
        why = unusable
        if unusable.errno == errno.EADDRINUSE:
            why = f"port {port} is taken (another cirlab-demo or server?)"
        raise CirlabError(
            f"cannot serve on {host}:{port}: {why}. Pick a free port with --port N (e.g. --port 7861), "
            "or check --host (an address of this machine; default 127.0.0.1)"
        ) from err


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cirlab-demo", description="Interactive retrieval page over a finished cirlab run."
    )
    parser.add_argument("run", help="run folder (or a stage checkpoint .ckpt)")
    parser.add_argument(
        "--gallery",
        default=None,
        help="folder of gallery images (searched recursively); default: the run's own test gallery",
    )
    parser.add_argument("--port", type=int, default=7860, help="default 7860")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="default 127.0.0.1 (this machine only); another address serves the network (see --auth)",
    )
    parser.add_argument(
        "--auth",
        default=os.environ.get("CIRLAB_DEMO_AUTH"),
        metavar="USER:PASSWORD",
        help="a login for the page (default: $CIRLAB_DEMO_AUTH, which keeps the password off the command "
        "line; none when unset)",
    )
    parser.add_argument("-k", type=int, default=10, help="results shown at first (default 10)")
    parser.add_argument("--device", default=None, help="e.g. cuda; default cpu")
    parser.add_argument(
        "--query-threads",
        type=int,
        default=1,
        help="CPU threads per query after start-up (default 1: one small query gains nothing "
        "from more, and on a busy machine they wait on each other; 0 keeps torch's default)",
    )
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> Path:
    """The run folder, once the arguments and the optional Gradio install are known to be usable."""
    if args.k < 1:
        raise CirlabError(f"-k {args.k}: need at least 1")
    parse_auth(args.auth)
    run = Path(args.run)
    if not run.exists():
        raise CirlabError(f"{run} does not exist: give a run folder (outputs/runs/<run>)")
    if run.is_dir() and not (run / ".hydra" / "config.yaml").is_file():
        raise CirlabError(
            f"{run} is not a cirlab run folder (no .hydra/config.yaml): give outputs/runs/<run>"
        )
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CirlabError("the demo needs Gradio: pip install 'cirlab[demo]'") from None
    return run


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    from hydra.errors import InstantiationException

    try:
        run = check_args(args)
        backend = load_backend(run, args.gallery, args.device)
        set_query_threads(args.query_threads)
    except (CirlabError, InstantiationException) as err:
        cause = user_cause(err)
        if cause is None:  # hydra wraps instantiate's errors: only ours are friendly
            raise
        print(f"cirlab-demo error: {cause}", file=sys.stderr)
        sys.exit(2)
    auth = parse_auth(args.auth)
    shown = ShownImages()
    # Gradio's own copies of what it serves go with ours (removed at exit), not into /tmp/gradio for good
    gradio_dir_is_ours = "GRADIO_TEMP_DIR" not in os.environ
    if gradio_dir_is_ours:
        os.environ["GRADIO_TEMP_DIR"] = str(shown.folder / "gradio")
    try:
        app, theme = build_app(backend, run, shown, args.k)
        warning = exposure_warning(args.host, auth)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        print(
            f"cirlab-demo: serving http://{args.host}:{args.port} (start-up {time.perf_counter() - start:.1f} s; "
            "Ctrl-C stops)",
            flush=True,
        )
        # a SIGTERM stops the server as Ctrl-C does, so the copies are removed below
        before = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            launch(app, theme, shown, args.host, args.port, auth)
        except CirlabError as err:
            print(f"cirlab-demo error: {err}", file=sys.stderr)
            sys.exit(2)
        finally:
            signal.signal(signal.SIGTERM, before)
    finally:
        if gradio_dir_is_ours:  # (main may run inside a longer process: a test, a notebook)
            os.environ.pop("GRADIO_TEMP_DIR", None)
        shown.close()


if __name__ == "__main__":
    main()
