"""The demo's search, without any UI: a loaded run and an embedded gallery answer what the page asks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cirlab.demo.gallery import Gallery, folder_gallery, run_gallery
from cirlab.errors import CirlabError

GRID_MAX = 60  # thumbnails shown at once in the reference picker


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
    """Intra-op threads for the queries (the gallery was embedded with torch's default): one small query
    gains nothing from more, and on busy cores they wait on each other (docs/demo.md#query-threads)."""
    import torch

    if n >= 1:
        torch.set_num_threads(n)
