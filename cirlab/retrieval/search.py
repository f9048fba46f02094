"""Top-k search of queries against a gallery: exact chunked matmul (default) or faiss.

`search` is the one ranking of cirlab: evaluation (metrics, prediction and submission files, the
visualisation) and `cirlab.load(run).search` / `cirlab-demo` all read its `Ranking`, none re-ranks.

Exact search keeps a running top-k over gallery chunks, so memory is bounded by the chunk,
not the gallery (galleries may be memory-mapped arrays larger than RAM). Order is by score
descending, ties by gallery index ascending, which equals a stable sort of the full matrix.
Per chunk, group maxima rule out most items without sorting them (`_chunk_candidates`); only the
few candidates left are ordered, with exact tie handling at the k-th score (`_select`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from cirlab.errors import CirlabError

_GROUP = 32  # columns per group in the chunk pre-selection (see _chunk_candidates)
_PAD = 2**62  # gallery index of padding candidates (score -inf): loses every tie, never kept


class Ranking(NamedTuple):
    """The top-k of each query, best first: scores [Q, k] (inner products) and gallery indices [Q, k].
    Unpacks as (scores, indices)."""

    scores: torch.Tensor
    indices: torch.Tensor


def _order(scores: torch.Tensor, index: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First `keep` of each row by (score desc, index asc): a stable sort by index, then by score.
    Sorts every column: for narrow rows (the kept candidates) and the rare rows tied at the border."""
    order = torch.argsort(index, dim=1, stable=True)
    scores, index = scores.gather(1, order), index.gather(1, order)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :keep]
    return scores.gather(1, order), index.gather(1, order)


def _select(scores: torch.Tensor, index: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top `keep` of each row by (score desc, index asc), whatever the column order.

    torch.topk breaks ties arbitrarily, but the SET of its top `keep` is exact whenever the
    (keep+1)-th score is strictly below the keep-th: then only those `keep` candidates are sorted.
    Rows tied at the border (or with NaN there) are sorted in full, which keeps the lowest
    gallery indices among the tied scores."""
    if scores.shape[1] <= 4 * keep + 16:
        return _order(scores, index, keep)
    top, pos = torch.topk(scores, keep + 1, dim=1)
    tied = ~(top[:, keep] < top[:, keep - 1])  # NaN ranks first, as in a sort: count it as a tie
    out_s, out_i = _order(top[:, :keep], index.gather(1, pos[:, :keep]), keep)
    if tied.any():
        rows = tied.nonzero().squeeze(1)
        out_s[rows], out_i[rows] = _order(scores[rows], index[rows], keep)
    return out_s, out_i


def _chunk_candidates(
    s: torch.Tensor, start: int, k: int, bound: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The items of the score chunk `s` that may enter the top-k, as (scores, gallery indices), one
    row per query, padded with (-inf, _PAD) to the longest row.

    With `bound` (the running k-th best score) only items scoring above it can enter: k kept items
    score at least as much and have lower gallery indices. Without it (the first chunk) only items
    at or above the chunk's k-th largest group maximum can: k other items (the group maxima) score
    more than any item below it. Groups (group j: columns j, j + g, j + 2g, ...; their maxima are an
    elementwise max over contiguous rows) whose maximum fails the bound are skipped whole, so
    scores are compared one by one only in the few groups that pass. Comparisons are written
    "not below" so that NaN, which sorts first, is always a candidate."""
    q, c = s.shape
    g = c // _GROUP
    if g < 4 * (k + 1):  # small chunk: every column is a candidate
        return s, torch.arange(start, start + c, device=s.device).expand(q, c)
    maxima = s[:, : g * _GROUP].unflatten(1, (_GROUP, g)).amax(1)  # [q, g]
    if bound is None:
        lo = torch.topk(maxima, k, dim=1).values[:, -1]
        rows, group = (~(maxima < lo[:, None])).nonzero().unbind(1)  # row-major
    else:
        lo = bound
        rows, group = (~(maxima <= lo[:, None])).nonzero().unbind(1)
    if len(rows) > q * g // 8:  # little to prune (ties, adversarial order): keep every column,
        return s, torch.arange(start, start + c, device=s.device).expand(q, c)  # bounded memory
    cols = group[:, None] + g * torch.arange(_GROUP, device=s.device)  # [pairs, _GROUP]
    cols = cols.flatten()
    vals = s.view(-1).index_select(0, (rows * c).repeat_interleave(_GROUP) + cols)
    lo = lo.index_select(0, rows).repeat_interleave(_GROUP)
    hit = (~(vals < lo) if bound is None else ~(vals <= lo)).nonzero().squeeze(1)  # still row-major
    rows = rows.index_select(0, hit // _GROUP)
    cols, vals = cols.index_select(0, hit), vals.index_select(0, hit)
    counts = torch.bincount(rows, minlength=q)
    slot = torch.arange(len(rows), device=s.device) - (counts.cumsum(0) - counts)[rows]
    width = int(counts.max())
    cand_s = torch.full((q, width), float("-inf"), device=s.device)
    cand_i = torch.full((q, width), _PAD, dtype=torch.long, device=s.device)
    cand_s[rows, slot] = vals
    cand_i[rows, slot] = cols + start
    if g * _GROUP < c:  # the last few columns of a ragged chunk: all candidates
        rest = torch.arange(start + g * _GROUP, start + c, device=s.device)
        cand_s = torch.cat([cand_s, s[:, g * _GROUP :]], 1)
        cand_i = torch.cat([cand_i, rest.expand(q, -1)], 1)
    return cand_s, cand_i


def exact_search(
    queries: torch.Tensor, gallery, k: int, exclude: torch.Tensor | None = None, chunk: int = 16384
) -> Ranking:
    """Top-k inner products. `gallery` is a tensor or a (memory-mapped) numpy array [N, D].

    `exclude[q]` is a gallery index removed from query q's ranking (-1 for none): CIRR and Shoes
    remove the reference image from the candidates.
    """
    n = len(gallery)
    if n == 0:
        raise CirlabError("the gallery is empty: nothing to retrieve from")
    queries = queries.float()
    device = queries.device
    k = min(k, n - 1 if exclude is not None else n)  # an excluded item must never fill a slot
    best_s = torch.full((len(queries), 0), float("-inf"), device=device)
    best_i = torch.zeros((len(queries), 0), dtype=torch.long, device=device)
    if k <= 0:
        return Ranking(best_s.cpu(), best_i.cpu())
    if exclude is not None:
        exclude = exclude.to(device)
    for start in range(0, n, chunk):
        block = gallery[start : start + chunk]
        block = torch.from_numpy(np.asarray(block)) if not isinstance(block, torch.Tensor) else block
        s = queries @ block.to(device).float().T
        if exclude is not None:
            local = exclude - start
            rows = ((local >= 0) & (local < s.shape[1])).nonzero().squeeze(1)
            s[rows, local[rows]] = float("-inf")
        full = best_s.shape[1] == k
        cand_s, cand_i = _chunk_candidates(s, start, k, best_s[:, -1] if full else None)
        best_s, best_i = _select(
            torch.cat([best_s, cand_s], 1), torch.cat([best_i, cand_i], 1), min(k, start + s.shape[1])
        )
    return Ranking(best_s.cpu(), best_i.cpu())


def faiss_search(
    queries: torch.Tensor,
    gallery,
    k: int,
    exclude: torch.Tensor | None = None,
    index_type: str = "flat",
    nlist: int = 1024,
    nprobe: int = 16,
) -> Ranking:
    """faiss inner-product search. `flat` is exact; `ivf` and `hnsw` trade recall for speed."""
    try:
        import faiss
    except ImportError as err:
        raise CirlabError("retrieval.search=faiss needs faiss: pip install 'cirlab[faiss]'") from err
    xb = np.ascontiguousarray(np.asarray(gallery, dtype=np.float32))
    xq = np.ascontiguousarray(queries.float().cpu().numpy())
    d = xb.shape[1]
    if index_type == "flat":
        index = faiss.IndexFlatIP(d)
    elif index_type == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, min(nlist, len(xb)), faiss.METRIC_INNER_PRODUCT)
        index.train(xb)
        index.nprobe = nprobe
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    else:
        raise CirlabError(f"unknown faiss index {index_type!r}; choose flat, ivf or hnsw")
    index.add(xb)
    extra = 1 if exclude is not None else 0
    kk = min(k + extra, len(xb))
    s, i = index.search(xq, kk)
    s, i = torch.from_numpy(s), torch.from_numpy(i).long()
    if exclude is not None:
        s = s.masked_fill(i == exclude[:, None], float("-inf"))
    # faiss orders ties arbitrarily: restore (score desc, index asc) as exact search does
    return Ranking(*_order(s, i, min(k, len(xb) - extra)))


def search(
    queries: torch.Tensor,
    gallery,
    k: int,
    exclude: torch.Tensor | None = None,
    backend: str = "exact",
    **options,
) -> Ranking:
    """Top-k of `queries` in `gallery` with `retrieval.search` (`backend`) and its `retrieval.options`."""
    if backend == "exact":
        return exact_search(queries, gallery, k, exclude, chunk=options.get("chunk", 16384))
    if backend == "faiss":
        return faiss_search(
            queries, gallery, k, exclude, **{k_: v for k_, v in options.items() if k_ != "chunk"}
        )
    raise CirlabError(f"unknown retrieval.search={backend!r}; choose exact or faiss")
