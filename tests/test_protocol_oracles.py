"""Protocol oracles: each benchmark's evaluation loop re-written plainly, as the reference code writes it,
and compared with cirlab's metrics, on random embeddings with many ties and through the CLI.

The oracles use no cirlab code: a full score matrix, Python's stable `sorted` (ties keep gallery order, the
order cirlab documents), names compared as strings, percentages as the reference computes them.
- FashionIQ (CLIP4Cir `compute_fiq_val_metrics`): per category, the reference stays in the ranking,
  R@10/R@50; averages over the three categories; average_recall = (avg R@10 + avg R@50) / 2. mAP@10/@50
  (FTI4CIR's tables; one target: AP@K = 1/rank within K) per category and averaged.
- CIRR (CLIP4Cir `compute_cirr_val_metrics`): the reference is deleted from the ranking; R@1/5/10/50;
  Rsubset@1/2/3 = the ranking kept to the img_set members.
- CIRCO (SEARLE `circo_compute_val_metrics`): top 50 with the reference kept; AP@K = sum_{i<=K} P@i * rel_i
  / min(K, |GT|); Recall@K of `target_img_id`, the first ground truth, only.
- Shoes (MLCL `compute_shoes_val_metrics`): the reference's distance set to +inf; R@1/10/50.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import results
from fixtures.make_images import materialize
from test_benchmarks_cli import KEYS

from cirlab.data.records import CIRQuery, EvalSet
from cirlab.data.sources.circo import CIRCOSource
from cirlab.data.sources.cirr import CIRRSource
from cirlab.data.sources.fashioniq import FashionIQSource
from cirlab.data.sources.shoes import ShoesSource
from cirlab.retrieval.metrics import score_eval_set, split_metrics


# ---- the oracles ---------------------------------------------------------------------------------
def rank(scores: list[float], names: list[str], drop: str | None = None) -> list[str]:
    """All gallery names, best score first; ties in gallery order (a stable sort); `drop` deleted."""
    order = sorted(range(len(names)), key=lambda j: -scores[j])
    return [names[j] for j in order if names[j] != drop]


def recall(ranked: list[list[str]], targets: list[str], k: int) -> float:
    return 100 * sum(t in r[:k] for r, t in zip(ranked, targets)) / len(targets)


def one_target_map(ranked: list[list[str]], targets: list[str], k: int) -> float:
    """FashionIQ mAP@K (FTI4CIR's tables): one ground truth, so AP@K = 1/rank when it is in the top K, else 0."""
    return (
        100 * sum(1 / (r.index(t) + 1) if t in r[:k] else 0 for r, t in zip(ranked, targets)) / len(targets)
    )


def fiq_oracle(categories: dict[str, tuple[list[list[float]], list[str], list[str]]]) -> dict[str, float]:
    """categories: name -> (score rows, gallery names, target names)."""
    out = {}
    for cat, (scores, names, targets) in categories.items():
        ranked = [rank(row, names) for row in scores]  # the reference is NOT removed
        for k in (10, 50):
            out[f"val/{cat}/recall_at_{k}"] = recall(ranked, targets, k)
            out[f"val/{cat}/map_at_{k}"] = one_target_map(ranked, targets, k)
    for k in (10, 50):
        for kind in ("recall", "map"):
            out[f"val/average/{kind}_at_{k}"] = sum(out[f"val/{c}/{kind}_at_{k}"] for c in categories) / len(
                categories
            )
    out["val/average_recall"] = (out["val/average/recall_at_10"] + out["val/average/recall_at_50"]) / 2
    return out


def cirr_oracle(scores, names, references, targets, members) -> dict[str, float]:
    ranked = [rank(row, names, drop=ref) for row, ref in zip(scores, references)]
    out = {f"val/recall_at_{k}": recall(ranked, targets, k) for k in (1, 5, 10, 50)}
    in_set = [[n for n in r if n in m] for r, m in zip(ranked, members)]
    out.update({f"val/recall_subset_at_{k}": recall(in_set, targets, k) for k in (1, 2, 3)})
    out["val/avg_recall_at_5_subset_at_1"] = (out["val/recall_at_5"] + out["val/recall_subset_at_1"]) / 2
    return out


def circo_oracle(scores, names, gt_ids: list[list[str]]) -> dict[str, float]:
    top50 = [rank(row, names)[:50] for row in scores]  # the reference is NOT removed
    out = {}
    for k in (5, 10, 25, 50):
        aps = []
        for ranked, gts in zip(top50, gt_ids):
            labels = [1 if n in gts else 0 for n in ranked]
            precisions = [sum(labels[: i + 1]) * labels[i] / (i + 1) for i in range(len(labels))]
            aps.append(sum(precisions[:k]) / min(len(gts), k))
        out[f"val/map_at_{k}"] = 100 * sum(aps) / len(aps)
        out[f"val/recall_at_{k}"] = recall(top50, [g[0] for g in gt_ids], k)  # target_img_id = gt_img_ids[0]
    return out


def shoes_oracle(scores, names, references, targets, split="test") -> dict[str, float]:
    ranked = [rank(row, names, drop=ref) for row, ref in zip(scores, references)]
    out = {f"{split}/recall_at_{k}": recall(ranked, targets, k) for k in (1, 10, 50)}
    out[f"{split}/mean_recall"] = sum(out[f"{split}/recall_at_{k}"] for k in (1, 10, 50)) / 3
    return out


def assert_same(ours: dict[str, float], oracle: dict[str, float]) -> None:
    """Recalls are 100 * hits / n on both sides: equal exactly. Averages and mAP: to float rounding."""
    for key, value in oracle.items():
        if key.split("/")[-1].startswith("recall") and "/average/" not in key:
            assert ours[key] == value, key
        else:
            assert ours[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


# ---- cirlab vs the oracles on random embeddings with ties ----------------------------------------
def tied_embeddings(n: int, seed: int) -> torch.Tensor:
    """Small integers: every score is exact in float32 (whatever the summation order) and ties abound."""
    return torch.randint(-2, 3, (n, 4), generator=torch.Generator().manual_seed(seed)).float()


def random_set(seed: int, n_gallery=90, n_queries=60, n_targets=1, members=0):
    """Queries with a reference and targets drawn from the gallery (targets never the reference)."""
    rng = random.Random(seed)
    names = [f"img{seed}_{i}" for i in range(n_gallery)]
    queries = []
    for i in range(n_queries):
        ref, *targets = rng.sample(names, 1 + rng.randint(1, n_targets))
        subset = ()
        if members:  # CIRR: 6 members, the reference and the target among them
            subset = tuple(
                rng.sample(
                    [ref, targets[0]]
                    + rng.sample([n for n in names if n not in (ref, targets[0])], members - 2),
                    members,
                )
            )
        queries.append(CIRQuery(str(i), ref, ("cap",), tuple(targets), subset))
    q, g = tied_embeddings(n_queries, seed), tied_embeddings(n_gallery, seed + 1000)
    for i in range(0, n_queries, 7):  # some queries equal their reference: it ranks first unless removed
        q[i] = g[names.index(queries[i].reference)]
    return EvalSet(queries, names), q, g, (q @ g.T).tolist()


@pytest.mark.parametrize("seed", [0, 1])
def test_fashioniq_metrics_equal_oracle(seed):
    proto = FashionIQSource.protocol
    results_, oracle_in = {}, {}
    for c, cat in enumerate(("dress", "shirt", "toptee")):
        es, q, g, scores = random_set(10 * seed + c)
        results_[cat] = score_eval_set(proto, es, q, g)
        oracle_in[cat] = (scores, es.gallery, [x.targets[0] for x in es.queries])
        assert all(
            results_[cat].predictions[x.qid] == rank(s, es.gallery)[:50] for x, s in zip(es.queries, scores)
        )
    assert_same(split_metrics("val", results_, proto), fiq_oracle(oracle_in))


@pytest.mark.parametrize("seed", [0, 1])
def test_cirr_metrics_equal_oracle(seed):
    es, q, g, scores = random_set(seed, members=6)
    res = score_eval_set(CIRRSource.protocol, es, q, g)
    refs = [x.reference for x in es.queries]
    oracle = cirr_oracle(
        scores, es.gallery, refs, [x.targets[0] for x in es.queries], [x.subset for x in es.queries]
    )
    assert_same(split_metrics("val", {"": res}, CIRRSource.protocol), oracle)
    for x, s in zip(es.queries, scores):
        ranked = rank(s, es.gallery, drop=x.reference)
        assert res.predictions[x.qid] == ranked[:50]
        assert res.subset_predictions[x.qid] == [n for n in ranked if n in x.subset][:3]


@pytest.mark.parametrize("seed", [0, 1])
def test_circo_metrics_equal_oracle(seed):
    es, q, g, scores = random_set(seed, n_targets=6)
    assert sum(len(x.targets) > 1 for x in es.queries) > 40  # several ground truths for most queries
    res = score_eval_set(CIRCOSource.protocol, es, q, g)
    oracle = circo_oracle(scores, es.gallery, [list(x.targets) for x in es.queries])
    assert_same(split_metrics("val", {"": res}, CIRCOSource.protocol), oracle)
    assert all(res.predictions[x.qid] == rank(s, es.gallery)[:50] for x, s in zip(es.queries, scores))


@pytest.mark.parametrize("seed", [0, 1])
def test_shoes_metrics_equal_oracle(seed):
    es, q, g, scores = random_set(seed)
    res = score_eval_set(ShoesSource.protocol, es, q, g)
    oracle = shoes_oracle(
        scores, es.gallery, [x.reference for x in es.queries], [x.targets[0] for x in es.queries]
    )
    assert_same(split_metrics("test", {"": res}, ShoesSource.protocol), oracle)
    assert all(
        res.predictions[x.qid] == rank(s, es.gallery, drop=x.reference)[:50]
        for x, s in zip(es.queries, scores)
    )


# ---- the CLI on the official layouts: results.json = the oracle on the run's own ranking --------------------
def ranks_from_predictions(run: Path, split: str) -> dict[str, list[str]]:
    """The fixtures' galleries hold at most 51 images: the top-50 predictions are the whole ranking."""
    return json.loads((run / "stages" / "eval" / f"predictions.{split}.json").read_text())


@pytest.mark.parametrize("dataset", list(KEYS))
def test_official_layout_run_equals_oracle(dataset, cli, tmp_path):
    """zeroshot on each official layout: every metric key, and the values recomputed by the reference rules
    from the run's predictions and the official annotation files. Each check asserts the run can tell the
    right rule from the wrong one (categories differ, first-GT recall differs from any-GT recall)."""
    root = materialize(dataset, tmp_path / dataset)
    run = tmp_path / "run"
    # image fusion: the query is its reference image, which then ranks first unless removed
    code, out, err = cli(
        "+method=zeroshot", "method.fusion=image", f"dataset={dataset}", f"dataset.root={root}", run_dir=run
    )
    assert code == 0, err
    metrics = results(run)["metrics"]
    for key in KEYS[dataset]:
        assert key in metrics and 0 <= metrics[key] <= 100, key
    split = "test" if dataset == "shoes" else "val"
    preds = ranks_from_predictions(run, split)
    check = {"fashioniq": _fashioniq, "cirr": _cirr, "circo": _circo, "shoes": _shoes}[dataset]
    check(root, preds, metrics)
    table = run / "metrics_per_category.csv"  # FashionIQ's per-category table, only where there are groups
    if dataset != "fashioniq":
        assert not table.exists()
        return
    rows = list(csv.reader(table.read_text().splitlines()))
    assert rows[0] == ["category", "Recall@10", "Recall@50", "mAP@10", "mAP@50"]
    assert [r[0] for r in rows[1:]] == ["dress", "shirt", "toptee", "average"]
    for cat, *cells in rows[1:]:
        keys = [f"val/{cat}/{kind}_at_{k}" for kind in ("recall", "map") for k in (10, 50)]
        assert cells == [f"{metrics[key]:.2f}" for key in keys]


def _fashioniq(root, preds, metrics):
    oracle = {}
    for cat in ("dress", "shirt", "toptee"):
        caps = json.loads((root / "captions" / f"cap.{cat}.val.json").read_text())
        gallery = json.loads((root / "image_splits" / f"split.{cat}.val.json").read_text())
        ranked = [preds[f"{cat}/{i}"] for i in range(len(caps))]
        assert all(len(r) == len(gallery) for r in ranked)  # the reference stays in
        for k in (10, 50):
            oracle[f"val/{cat}/recall_at_{k}"] = recall(ranked, [c["target"] for c in caps], k)
            oracle[f"val/{cat}/map_at_{k}"] = one_target_map(ranked, [c["target"] for c in caps], k)
    assert_same(metrics, oracle)
    assert 0 < metrics["val/dress/map_at_10"] < metrics["val/dress/recall_at_10"]  # 1/rank < 1 somewhere
    for k in (10, 50):  # the average is the mean of the three categories of this same run
        cats = [metrics[f"val/{c}/recall_at_{k}"] for c in ("dress", "shirt", "toptee")]
        assert k == 50 or len(set(cats)) > 1  # R@50 is 100 in 28-image galleries
        assert metrics[f"val/average/recall_at_{k}"] == pytest.approx(sum(cats) / 3, rel=1e-12)
    assert metrics["val/average_recall"] == pytest.approx(
        (metrics["val/average/recall_at_10"] + metrics["val/average/recall_at_50"]) / 2, rel=1e-12
    )


def _cirr(root, preds, metrics):
    caps = json.loads((root / "captions" / "cap.rc2.val.json").read_text())
    gallery = json.loads((root / "image_splits" / "split.rc2.val.json").read_text())
    ranked = [preds[str(c["pairid"])] for c in caps]
    for c, r in zip(caps, ranked):
        assert c["reference"] not in r and len(r) == len(gallery) - 1  # deleted, and only it
    targets = [c["target_hard"] for c in caps]
    oracle = {f"val/recall_at_{k}": recall(ranked, targets, k) for k in (1, 5, 10, 50)}
    in_set = [[n for n in r if n in c["img_set"]["members"]] for r, c in zip(ranked, caps)]
    assert all(len(s) == 5 for s in in_set)
    oracle.update({f"val/recall_subset_at_{k}": recall(in_set, targets, k) for k in (1, 2, 3)})
    assert_same(metrics, oracle)


def _circo(root, preds, metrics):
    anns = json.loads((root / "annotations" / "val.json").read_text())
    name = "{:012d}".format
    ranked = [preds[str(a["id"])] for a in anns]
    gts = [[name(i) for i in a["gt_img_ids"]] for a in anns]
    assert all(g[0] == name(a["target_img_id"]) for g, a in zip(gts, anns))
    assert sum(len(g) > 1 for g in gts) >= 6
    oracle = {}
    for k in (5, 10, 25, 50):
        aps = []
        for r, g in zip(ranked, gts):
            labels = [1 if n in g else 0 for n in r[:50]]
            aps.append(
                sum(sum(labels[: i + 1]) * labels[i] / (i + 1) for i in range(min(k, len(labels))))
                / min(len(g), k)
            )
        oracle[f"val/map_at_{k}"] = 100 * sum(aps) / len(aps)
        oracle[f"val/recall_at_{k}"] = recall(ranked, [g[0] for g in gts], k)
    assert_same(metrics, oracle)
    # the fixture's run tells first-GT recall from any-GT recall: the check above could fail
    any_gt = {
        k: 100 * sum(bool(set(r[:k]) & set(g)) for r, g in zip(ranked, gts)) / len(gts) for k in (5, 10)
    }
    assert any(any_gt[k] != metrics[f"val/recall_at_{k}"] for k in any_gt)


def _shoes(root, preds, metrics):
    rows = json.loads((root / "relative_captions_shoes.json").read_text())
    names = set((root / "eval_im_names.txt").read_text().split())
    rows = [r for r in rows if r["ImageName"] in names and r["ReferenceImageName"] in names]
    ranked = [preds[str(i)] for i in range(len(rows))]
    for r, row in zip(ranked, rows):
        assert row["ReferenceImageName"] not in r and len(r) == len(names) - 1
    assert_same(
        metrics,
        {f"test/recall_at_{k}": recall(ranked, [r["ImageName"] for r in rows], k) for k in (1, 10, 50)},
    )
