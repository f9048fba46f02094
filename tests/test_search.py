"""Exact search against a full-matrix stable sort: order by score descending, then gallery index
ascending; the excluded item never ranked. Data are chosen so every inner product is exact in
float32 (small integers or multiples of 2^-6 in few dimensions): the chunked matmul and the
reference matmul then give bit-identical scores, and exact ties are real ties."""

import numpy as np
import pytest
import torch

from cirlab.retrieval.embedding_file import EmbeddingFile
from cirlab.retrieval.search import _GROUP, exact_search


def reference(q: torch.Tensor, g: torch.Tensor, k: int, exclude: torch.Tensor | None = None):
    scores = q.float() @ g.float().T
    if exclude is not None:
        scores[torch.arange(len(q)), exclude] = float("-inf")
    k = min(k, len(g) - 1 if exclude is not None else len(g))
    s, order = torch.sort(-scores, dim=1, stable=True)
    return -s[:, :k], order[:, :k]


def check(q, g, k, exclude=None, **kw):
    s, i = exact_search(q, g, k, exclude, **kw)
    rs, ri = reference(
        q, torch.as_tensor(np.asarray(g[: len(g)] if isinstance(g, EmbeddingFile) else g)), k, exclude
    )
    assert torch.equal(i, ri)
    assert torch.equal(s, rs)
    return i


def dyadic(gen, *shape, levels=64):
    """Gaussian values rounded to multiples of 1/levels: products and sums stay exact."""
    return (torch.randn(*shape, generator=gen) * levels).round() / levels


# chunks: one chunk, chunks that are grouped (>= 4 (k+1) groups of _GROUP columns), ragged last chunks
CHUNKS = (100_000, 4 * 51 * _GROUP, 4 * 51 * _GROUP + 13, 7)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_random_data_equals_full_sort(chunk):
    gen = torch.Generator().manual_seed(0)
    q, g = dyadic(gen, 40, 8), dyadic(gen, 20_000, 8)
    check(q, g, 50, chunk=chunk)
    check(q, g, 1, chunk=chunk)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_many_ties_equal_full_sort(chunk):
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-1, 2, (30, 3), generator=gen).float()  # a handful of distinct scores
    g = torch.randint(-1, 2, (15_000, 3), generator=gen).float()
    for k in (1, 50, 333):
        check(q, g, k, chunk=chunk)
    ex = torch.randint(0, len(g), (len(q),), generator=gen)
    ex[0] = -1  # no exclusion for this query
    check(q, g, 50, ex, chunk=chunk)


def test_duplicated_rows_across_chunk_borders_and_at_the_kth_rank():
    gen = torch.Generator().manual_seed(2)
    q, g = dyadic(gen, 20, 6), dyadic(gen, 9_000, 6)
    chunk = 4 * 51 * _GROUP
    # the best item of each query sits on both sides of a chunk border, 60 times: ties straddle
    # chunks and fill past the k-th rank, so only the lowest indices may be kept
    top = (q @ g.T).argmax(1)
    for j, pos in enumerate([chunk - 30 + 2 * i for i in range(60)]):
        g[pos] = g[top[j % 3]]
    check(q, g, 50, chunk=chunk)
    check(q, g, 50, chunk=chunk + 1)
    # k-1 better items, then the k-th score shared by the original best item and copies of it in
    # later chunks: the k-th slot goes to the lowest index
    g2 = g.clone()
    t = int(top[0])
    assert (q[0] @ g2[t]) > 0 and not 100 <= t < 149
    g2[100:149] = 2 * g2[t]
    g2[[3000, 5000, 8000, 8999]] = g2[t].clone()
    for chunk in (1000, 4 * 51 * _GROUP, 5000):
        i = check(q[:1], g2, 50, chunk=chunk)
        assert i[0, 49] == min(t, 3000)


def test_tie_at_the_border_of_a_grouped_chunk():
    # all scores equal except a few: the k-th score is shared by thousands of columns
    g = torch.zeros(10_000, 4)
    g[[17, 4000, 9999], 0] = 1.0
    q = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]])
    i = check(q, g, 50, chunk=4 * 51 * _GROUP)
    assert i[0].tolist() == [17, 4000, 9999] + [j for j in range(50) if j != 17][:47]
    assert i[1].tolist() == [j for j in range(51) if j != 17][:50]


def test_exclusion_k_beyond_gallery_and_empty_results():
    gen = torch.Generator().manual_seed(3)
    q, g = dyadic(gen, 10, 4), dyadic(gen, 30, 4)
    ex = torch.arange(10)
    i = check(q, g, 100, ex, chunk=8)
    assert i.shape == (10, 29) and not (i == ex[:, None]).any()
    assert check(q, g, 100, chunk=8).shape == (10, 30)
    assert exact_search(q, g[:1], 5, exclude=ex)[1].shape == (10, 0)


def test_exclusion_in_grouped_chunks():
    gen = torch.Generator().manual_seed(4)
    g = dyadic(gen, 20_000, 8)
    q = g[[5, 7000, 19_999, 13_000]].clone()  # each query scores its own row highly
    ex = torch.tensor([5, 7000, 19_999, -1])
    i = check(q, g, 50, ex, chunk=4 * 51 * _GROUP)
    assert not (i[:3] == ex[:3, None]).any() and (i[3] == 13_000).any()


def test_nan_scores_rank_first_like_a_descending_sort():
    g = torch.randn(5_000, 4)
    g[[10, 3000]] = float("nan")
    s, i = exact_search(torch.randn(3, 4), g, 5, chunk=4 * 6 * _GROUP)
    assert i[:, :2].tolist() == [[10, 3000]] * 3 and not s[:, 2:].isnan().any()


def test_on_disk_gallery(tmp_path):
    gen = torch.Generator().manual_seed(5)
    q = dyadic(gen, 16, 8)
    g = dyadic(gen, 12_000, 8)
    g[6000:6200] = g[100]  # ties across the chunk reads
    ef = EmbeddingFile.write(
        tmp_path / "g.npy", (g[s : s + 5000].numpy() for s in range(0, 12_000, 5000)), 12_000, 8
    )
    for chunk in (4 * 51 * _GROUP, 5000, 999):
        check(q, ef, 50, chunk=chunk)
        check(q, ef, 50, torch.arange(16) * 700, chunk=chunk)


def test_gaussian_data_equals_full_sort_of_the_same_chunk_scores():
    # float data: the reference sorts the very scores the search computes (same chunked matmul)
    gen = torch.Generator().manual_seed(6)
    q, g = torch.randn(25, 32, generator=gen), torch.randn(30_000, 32, generator=gen)
    chunk = 4 * 51 * _GROUP + 5
    scores = torch.cat([q @ g[s : s + chunk].T for s in range(0, len(g), chunk)], 1)
    ex = torch.randint(0, len(g), (25,), generator=gen)
    scores[torch.arange(25), ex] = float("-inf")
    s_ref, i_ref = torch.sort(-scores, dim=1, stable=True)
    s, i = exact_search(q, g, 50, ex, chunk=chunk)
    assert torch.equal(i, i_ref[:, :50]) and torch.equal(s, -s_ref[:, :50])
