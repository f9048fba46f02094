"""What the demo searches: the run's own test gallery and queries, or every readable image of a folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cirlab.data.image_files import IMAGE_EXTS, list_images
from cirlab.errors import CirlabError

EXAMPLES = 8  # modification texts from the dataset shown below the text box


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


def unreadable_reason(path: Path) -> str | None:
    """Why Pillow cannot decode `path`, or None when it can."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    except Image.DecompressionBombError as err:
        return f"{err} Allow it with CIRLAB_MAX_IMAGE_PIXELS=<pixels>"
    return None


def folder_gallery(folder: Path, cfg=None, source=None) -> Gallery:
    """Every image under `folder` (recursively); unreadable files are listed and left out. Example texts
    come from the run's dataset when its data is on this machine."""
    folder = Path(folder)
    paths, unreadable = [], []
    for p in list_images(folder):
        why = unreadable_reason(p)
        if why is None:
            paths.append(p)
        else:
            unreadable.append((p, why))
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
            gallery.examples = run_gallery(cfg, source).examples
        except CirlabError:  # the run's dataset is not on this machine: no example texts, nothing else lost
            pass
    return gallery
