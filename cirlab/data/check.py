"""The image check that sources skip at construction: is every image of the chosen splits there and readable?"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from cirlab.data.sources.base import CIRSource
from cirlab.data.sources.layout import ImageNotFound

SHOWN = 20  # names/paths listed per problem kind; the counts are always complete


@dataclass
class ImageReport:
    checked: int = 0
    missing: list[str] = field(default_factory=list)  # image names
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # (path, why)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unreadable


def split_images(source: CIRSource, split: str) -> list[str]:
    """Every image a split touches: train triplets, or eval queries, subsets and galleries."""
    if split == "train":
        return source.train_images()
    seen: dict[str, None] = {}
    for es in source.eval_sets(split):
        for q in es.queries:
            seen.update(dict.fromkeys((q.reference, *q.targets, *q.subset)))
        seen.update(dict.fromkeys(es.gallery))
    return list(seen)


def image_problem(source: CIRSource, name: str) -> str | None:
    """Why image `name` cannot be used ("missing", "zero bytes", PIL's complaint), or None if it can."""
    try:
        path = source.image_path(name)
    except ImageNotFound:  # sources that know their files say so instead of returning a path
        return "missing"
    if path is None or not path.is_file():
        return "missing"
    if path.stat().st_size == 0:
        return "zero bytes"
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as err:  # PIL raises many types for broken files
        return f"{type(err).__name__}: {err}"
    return None


def check_images(source: CIRSource, splits) -> ImageReport:
    report = ImageReport()
    names = dict.fromkeys(n for split in splits for n in split_images(source, split))
    for name in names:
        report.checked += 1
        problem = image_problem(source, name)
        if problem == "missing":
            report.missing.append(name)
        elif problem:
            report.unreadable.append((source.image_path(name), problem))
    return report


def _section(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    more = [f"  ... and {len(items) - SHOWN} more"] if len(items) > SHOWN else []
    return [f"{title}:"] + [f"  {item}" for item in items[:SHOWN]] + more


def format_report(report: ImageReport) -> str:
    head = (
        f"checked {report.checked} images: {len(report.missing)} missing, {len(report.unreadable)} unreadable"
    )
    return "\n".join(
        [head]
        + _section("missing (by name)", report.missing)
        + _section("unreadable", [f"{p} ({why})" for p, why in report.unreadable])
    )
