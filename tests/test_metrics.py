"""Hand-computed values for the retrieval metrics and the search."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from torchmetrics.functional.retrieval import retrieval_recall

from cirlab.data.records import CIRQuery, EvalSet, Protocol
from cirlab.errors import CirlabError
from cirlab.retrieval.metrics import (
    SetResult,
    derived_metrics,
    map_at_k,
    recall_at_k,
    score_eval_set,
    split_metrics,
)
from cirlab.retrieval.search import exact_search, faiss_search


def test_recall_at_k_hand_computed():
    topk = torch.tensor([[3, 1, 2], [0, 2, 1], [1, 0, 3]])
    target = torch.tensor([1, 1, 2])
    r = recall_at_k(topk, target, (1, 2, 3))
    assert r == {
        "recall_at_1": pytest.approx(0.0),
        "recall_at_2": pytest.approx(100 / 3),
        "recall_at_3": pytest.approx(200 / 3),
    }


def test_recall_matches_torchmetrics_for_single_target():
    torch.manual_seed(0)
    scores = torch.randn(20, 30)
    target = torch.randint(0, 30, (20,))
    _, topk = exact_search(scores, torch.eye(30), 30)  # identity gallery: the search ranks the score rows
    ours = recall_at_k(topk, target, (5,))["recall_at_5"]
    ref = (
        torch.stack(
            [retrieval_recall(scores[q], torch.arange(30) == target[q], top_k=5) for q in range(20)]
        ).mean()
        * 100
    )
    assert ours == pytest.approx(ref.item())


def test_map_at_k_one_and_several_ground_truths():
    # query 0: one GT retrieved at rank 2 -> AP@5 = (1/2) / min(5, 1) = 0.5
    # query 1: GTs {0, 1, 9}; retrieved [0, 5, 1, 6, 7]: P@1=1, P@3=2/3 -> AP@5 = (1 + 2/3) / 3
    topk = torch.tensor([[4, 7, 1, 2, 3], [0, 5, 1, 6, 7]])
    m = map_at_k(topk, [[7], [0, 1, 9]], (1, 5))
    assert m["map_at_5"] == pytest.approx(100 * (0.5 + (1 + 2 / 3) / 3) / 2)
    # AP@1: q0 misses; q1 hits, denominator min(1, 3) = 1
    assert m["map_at_1"] == pytest.approx(50.0)


def test_exact_search_equals_full_matrix_with_ties():
    torch.manual_seed(0)
    q = torch.randint(-2, 3, (17, 4)).float()  # small integers: many exact ties
    g = torch.randint(-2, 3, (101, 4)).float()
    s_full = q @ g.T
    # reference order: score descending, gallery index ascending
    ref = torch.tensor([sorted(range(101), key=lambda j: (-s_full[i, j].item(), j))[:10] for i in range(17)])
    for chunk in (7, 50, 1000):
        _, idx = exact_search(q, g, 10, chunk=chunk)
        assert torch.equal(idx, ref)


def test_exact_search_on_memmap_and_exclusion(tmp_path):
    g = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    mm = np.lib.format.open_memmap(tmp_path / "g.npy", mode="w+", dtype=np.float32, shape=g.shape)
    mm[:] = g
    q = torch.from_numpy(g[:5])  # each query's nearest neighbour is itself
    _, idx = exact_search(q, mm, 3, exclude=torch.arange(5), chunk=16)
    assert not (idx == torch.arange(5)[:, None]).any()
    _, idx_in = exact_search(q, mm, 1)
    assert torch.equal(idx_in[:, 0], torch.arange(5))


def test_faiss_flat_equals_exact():
    pytest.importorskip("faiss")
    torch.manual_seed(1)
    q, g = torch.randn(30, 16), torch.randn(500, 16)
    ex = torch.randint(0, 500, (30,))
    s1, i1 = exact_search(q, g, 20, exclude=ex)
    s2, i2 = faiss_search(q, g, 20, exclude=ex)
    assert torch.equal(i1, i2)
    assert torch.allclose(s1, s2, atol=1e-5)


def test_empty_gallery_is_a_clear_error():
    with pytest.raises(CirlabError, match="gallery is empty"):
        exact_search(torch.randn(2, 3), torch.zeros(0, 3), 5)


def _rigged(names, vectors):
    return torch.nn.functional.normalize(torch.tensor(vectors, dtype=torch.float), dim=-1)


def test_cirr_reference_excluded_and_subset_recall():
    names = ["ref", "tgt", "a", "b", "c", "d", "e"]
    gallery = _rigged(
        names, [[1, 0, 0], [0.8, 0.6, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0.7], [-1, 0, 0]]
    )
    query = _rigged(None, [[1, 0.05, 0]])  # nearest: ref, then a, then tgt
    q = CIRQuery("7", "ref", ("cap",), ("tgt",), subset=("ref", "tgt", "b", "c", "d", "e"))
    proto = Protocol(recall_ks=(1, 2), subset_ks=(1, 2, 3), exclude_reference=True)
    res = score_eval_set(proto, EvalSet([q], names), query, gallery)
    assert res.predictions["7"][:2] == ["a", "tgt"]  # reference removed, "a" is not in the subset
    assert res.metrics["recall_at_1"] == 0 and res.metrics["recall_at_2"] == 100
    assert res.subset_predictions["7"][0] == "tgt"  # within the subset the target comes first
    assert res.metrics["recall_subset_at_1"] == 100
    # without exclusion (FashionIQ protocol) the reference itself is ranked first
    res2 = score_eval_set(Protocol(recall_ks=(1,)), EvalSet([q], names), query, gallery)
    assert res2.predictions["7"][0] == "ref"


def test_eval_set_result_keeps_the_scores_of_its_ranking():
    """Prediction rows and their scores come from one search: what the visualisation and the API read."""
    names = ["ref", "tgt", "a", "b"]
    gallery = _rigged(names, [[1, 0, 0], [0.8, 0.6, 0], [0.9, 0.1, 0], [0, 1, 0]])
    query = _rigged(None, [[1, 0.05, 0]])
    q = CIRQuery("7", "ref", ("cap",), ("tgt",))
    res = score_eval_set(
        Protocol(recall_ks=(1,), exclude_reference=True), EvalSet([q], names), query, gallery
    )
    assert res.predictions["7"] == ["a", "tgt", "b"]
    expected = (query @ gallery.T)[0, [2, 1, 3]].tolist()
    assert res.scores["7"] == pytest.approx(expected, abs=1e-6)
    assert res.scores["7"] == sorted(res.scores["7"], reverse=True)


def test_fashioniq_group_average():
    proto = Protocol(recall_ks=(10, 50), group_average=True)

    class R:  # the per-category results as score_eval_set returns them
        def __init__(self, r10, r50):
            self.metrics = {"recall_at_10": r10, "recall_at_50": r50, "mean_recall": (r10 + r50) / 2}

    m = split_metrics("val", {"dress": R(20, 40), "shirt": R(30, 50), "toptee": R(40, 60)}, proto)
    assert m["val/dress/recall_at_10"] == 20
    assert m["val/average/recall_at_10"] == pytest.approx(30)
    assert m["val/average/recall_at_50"] == pytest.approx(50)
    assert m["val/average_recall"] == pytest.approx(40)


def test_target_missing_from_gallery_is_reported():
    q = CIRQuery("1", "a", ("x",), ("zzz",))
    with pytest.raises(CirlabError, match="not in the gallery"):
        score_eval_set(Protocol(), EvalSet([q], ["a", "b"]), torch.randn(1, 3), torch.randn(2, 3))


def test_no_metrics_without_answers():
    q = CIRQuery("1", "a", ("x",))
    res = score_eval_set(
        Protocol(recall_ks=(1,)),
        EvalSet([q], ["a", "b"]),
        torch.randn(1, 3),
        torch.randn(2, 3),
        has_answers=False,
    )
    assert res.metrics == {} and len(res.predictions["1"]) == 2


def test_embedding_file_round_trip_and_chunked_search(tmp_path):
    from cirlab.retrieval.embedding_file import EmbeddingFile

    g = torch.nn.functional.normalize(torch.randn(1000, 16), dim=-1)
    chunks = (g[i : i + 300].numpy() for i in range(0, 1000, 300))
    ef = EmbeddingFile.write(tmp_path / "g.npy", chunks, 1000, 16)
    assert len(ef) == 1000 and np.array_equal(ef[250:260], g[250:260].numpy())
    assert np.array_equal(np.load(tmp_path / "g.npy"), g.numpy())  # a standard .npy file
    q = torch.randn(7, 16)
    assert torch.equal(exact_search(q, ef, 20, chunk=128)[1], exact_search(q, g, 20)[1])


def test_excluded_item_never_fills_a_slot_in_small_galleries():
    g = torch.eye(4)
    _, idx = exact_search(torch.ones(2, 4), g, 50, exclude=torch.tensor([0, 3]))
    assert idx.shape == (2, 3) and 0 not in idx[0] and 3 not in idx[1]


def test_recall_is_exact_from_counts():
    """141 of 400 is 35.25 exactly (float32 gave 35.2499991): runs compare in queries, not float noise."""
    topk = torch.zeros(400, 10, dtype=torch.long)
    target = torch.ones(400, dtype=torch.long)
    topk[:141, 3] = 1
    r = recall_at_k(topk, target, (1, 10))
    assert r == {"recall_at_1": 0.0, "recall_at_10": 35.25}
    assert type(r["recall_at_10"]) is float
    third = recall_at_k(torch.tensor([[1], [0], [0]]), torch.ones(3, dtype=torch.long), (1,))["recall_at_1"]
    assert third == 100 / 3  # the float64 nearest to 33.333..., not float32's 33.33333206


def test_map_is_exact_from_counts():
    # q0: GT {7} at rank 2 -> AP@5 = 1/2; q1: GTs {0, 1, 9} at ranks 1, 3 -> (1 + 2/3) / 3 = 5/9
    topk = torch.tensor([[4, 7, 1, 2, 3], [0, 5, 1, 6, 7]])
    m = map_at_k(topk, [[7], [0, 1, 9]], (1, 2, 5))
    assert m["map_at_5"] == float(Fraction(100, 2) * (Fraction(1, 2) + Fraction(5, 9)))  # 52.777...
    assert m["map_at_1"] == 50.0  # q1: 1 / min(1, 3)
    assert m["map_at_2"] == 50.0  # q0: (1/2) / min(2, 1) = 1/2; q1: 1 / min(2, 3) = 1/2
    # 400 queries, 141 with their single GT first: 35.25 exactly, as for recall
    topk = torch.zeros(400, 5, dtype=torch.long)
    topk[:141, 0] = 1
    assert map_at_k(topk, [[1]] * 400, (5,))["map_at_5"] == 35.25


def test_averages_are_exact():
    """FashionIQ's averages and mean_recall: the exact mean of the per-category values, rounded once."""
    proto = Protocol(recall_ks=(10, 50), group_average=True)
    sets = {
        c: SetResult({"recall_at_10": v, "recall_at_50": 2 * v}, {}, {})
        for c, v in (("dress", 0.1), ("shirt", 0.2), ("toptee", 0.3))
    }
    for res in sets.values():
        res.metrics.update(derived_metrics(res.metrics, proto))
    m = split_metrics("val", sets, proto)
    assert m["val/average/recall_at_10"] == 0.2  # (0.1 + 0.2 + 0.3) / 3 in floats is 0.20000000000000004
    assert m["val/average/recall_at_50"] == 0.4 and m["val/average_recall"] == 0.3


def test_fashioniq_map_is_reciprocal_rank_within_k():
    """One target per query: AP@K = 1/rank when the target is in the top K, else 0. Hand-checked: targets at
    ranks 1, 3 and 12 give mAP@10 = (1 + 1/3 + 0) / 3 = 44.44 and mAP@50 = (1 + 1/3 + 1/12) / 3 = 47.22."""
    gallery = [f"g{i}" for i in range(20)]
    queries = [CIRQuery(str(i), "r", ("c",), (gallery[t],)) for i, t in enumerate((0, 2, 11))]
    g = torch.eye(20)
    q = torch.stack([1 - torch.arange(20) / 20.0] * 3)  # every query ranks g0, g1, g2, ... in order
    proto = Protocol(recall_ks=(10, 50), map_ks=(10, 50), group_average=True)
    metrics = score_eval_set(proto, EvalSet(queries, gallery), q, g).metrics
    assert metrics["map_at_10"] == pytest.approx(100 * (1 + 1 / 3) / 3)
    assert metrics["map_at_50"] == pytest.approx(100 * (1 + 1 / 3 + 1 / 12) / 3)
    assert metrics["recall_at_10"] == pytest.approx(200 / 3)


def test_per_category_csv_rows_hand_checked(tmp_path):
    from cirlab.retrieval.category_csv import write_category_csv

    metrics = {
        "val/dress/recall_at_10": 17.5,
        "val/dress/recall_at_50": 35.94,
        "val/dress/map_at_10": 7.34,
        "val/dress/map_at_50": 8.1549,
        "val/shirt/recall_at_10": 22.77,
        "val/shirt/recall_at_50": 40.19,
        "val/shirt/map_at_10": 12.25,
        "val/shirt/map_at_50": 13.05,
        "val/average/recall_at_10": 20.1349,
        "val/average/recall_at_50": 38.0651,
        "val/average/map_at_10": 9.7949,
        "val/average/map_at_50": 10.6025,
        "val/average_recall": 29.1,
        "test/dress/recall_at_10": 99.0,  # another split: not in val's table
    }
    path = write_category_csv(tmp_path / "t.csv", metrics, "val")
    assert path.read_text().splitlines() == [
        "category,Recall@10,Recall@50,mAP@10,mAP@50",
        "dress,17.50,35.94,7.34,8.15",
        "shirt,22.77,40.19,12.25,13.05",
        "average,20.13,38.07,9.79,10.60",
    ]
    assert write_category_csv(tmp_path / "none.csv", {"val/recall_at_10": 1.0}, "val") is None
    assert not (tmp_path / "none.csv").exists()
