"""The records every dataset source produces, so that every method runs on every dataset unchanged."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CIRQuery:
    """One composed query: reference image + modification text(s) -> target image(s).

    Images are referred to by name (a key of the source's image index).
    `captions` holds the raw texts (FashionIQ has two; the source's caption rule joins them).
    `targets` is empty on test splits without public answers; CIRCO has several.
    `subset` is CIRR's img_set members (for Recall_subset).
    """

    qid: str
    reference: str
    captions: tuple[str, ...]
    targets: tuple[str, ...] = ()
    subset: tuple[str, ...] = ()


@dataclass
class EvalSet:
    """Queries ranked against one gallery. FashionIQ has one per category (`group`), others one."""

    queries: list[CIRQuery]
    gallery: list[str]
    group: str = ""


@dataclass(frozen=True)
class Protocol:
    """How a benchmark scores rankings (facts from the reference code, see docs/benchmarks.md#common-protocol)."""

    recall_ks: tuple[int, ...] = (1, 5, 10, 50)
    subset_ks: tuple[int, ...] = ()
    map_ks: tuple[int, ...] = ()
    exclude_reference: bool = False
    main_metric: str = "recall_at_10"
    group_average: bool = False  # FashionIQ: average per-category metrics
