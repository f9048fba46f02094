"""Top-k search of queries against a gallery: exact chunked matmul (default) or faiss.

Exact search keeps a running top-k over gallery chunks, so memory is bounded by the chunk,
not the gallery (galleries may be memory-mapped arrays larger than RAM). Order is by score
descending, ties by gallery index ascending, which equals a stable sort of the full matrix.
"""
from __future__ import annotations

import numpy as np
import torch

from cirlab.errors import CirlabError


def _topk_stable(scores: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row by (score desc, index asc). torch.topk breaks ties arbitrarily, hence this."""
    order = torch.argsort(index, dim=1, stable=True)
    scores, index = scores.gather(1, order), index.gather(1, order)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), index.gather(1, order)


def exact_search(queries: torch.Tensor, gallery, k: int, exclude: torch.Tensor | None = None,
                 chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k inner products. `gallery` is a tensor or a (memory-mapped) numpy array [N, D].

    `exclude[q]` is a gallery index removed from query q's ranking (-1 for none): CIRR and Shoes
    remove the reference image from the candidates.
    """
    n = len(gallery)
    if n == 0:
        raise CirlabError("the gallery is empty: nothing to retrieve from")
    queries = queries.float()
    k = min(k, n - 1 if exclude is not None else n)  # an excluded item must never fill a slot
    best_s = torch.full((len(queries), 0), float("-inf"))
    best_i = torch.zeros((len(queries), 0), dtype=torch.long)
    for start in range(0, n, chunk):
        block = gallery[start:start + chunk]
        block = torch.from_numpy(np.asarray(block)) if not isinstance(block, torch.Tensor) else block
        s = queries @ block.to(queries.device).float().T
        idx = torch.arange(start, start + len(block)).expand_as(s)
        if exclude is not None:
            s = s.masked_fill(idx == exclude[:, None].to(s.device), float("-inf"))
        best_s, best_i = _topk_stable(torch.cat([best_s, s.cpu()], 1), torch.cat([best_i, idx.cpu()], 1), k)
    return best_s, best_i


def faiss_search(queries: torch.Tensor, gallery, k: int, exclude: torch.Tensor | None = None,
                 index_type: str = "flat", nlist: int = 1024, nprobe: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
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
    return _topk_stable(s, i, min(k, len(xb) - extra))


def search(queries: torch.Tensor, gallery, k: int, exclude: torch.Tensor | None = None,
           backend: str = "exact", **options) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "exact":
        return exact_search(queries, gallery, k, exclude, chunk=options.get("chunk", 16384))
    if backend == "faiss":
        return faiss_search(queries, gallery, k, exclude, **{k_: v for k_, v in options.items() if k_ != "chunk"})
    raise CirlabError(f"unknown retrieval.search={backend!r}; choose exact or faiss")
