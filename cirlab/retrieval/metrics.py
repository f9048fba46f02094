"""CIR metrics exactly as the reference code computes them (docs/benchmarks.md#common-protocol).

- Recall@K: the (first) target within the top K; CIRR and Shoes rank with the reference removed.
  CIRCO's Recall@K is w.r.t. `target_img_id`, its first ground truth.
- Recall_subset@K (CIRR): the reference-removed ranking restricted to the query's img_set members.
- mAP@K (CIRCO): AP@K = sum_{i<=K} P@i * rel_i / min(K, |GT|), from the top-50 list.
Percentages come from integer counts, exactly (Fractions, one rounding to float64 at the end):
141 hits of 400 is 35.25, not float32's 35.2499991, so runs compare in queries, not float noise.
Written by hand because torchmetrics' RetrievalMAP divides by the relevant items retrieved, not
min(K, |GT|), and has no reference exclusion or subset ranking; the unit tests cross-check the
cases where the definitions coincide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import torch

from cirlab.data.records import EvalSet, Protocol
from cirlab.errors import CirlabError
from cirlab.retrieval.search import search

TOP_PREDICTIONS = 50


def percent(hits: int | Fraction, n: int) -> float:
    """100 * hits / n rounded once to the nearest float64."""
    return float(Fraction(hits) * 100 / n)


def mean(values) -> float:
    """The exact mean of floats, rounded once (averages of averages stay order-independent)."""
    values = list(values)
    return float(sum(map(Fraction, values)) / len(values))


def hit_percent(hits: torch.Tensor, ks) -> dict[int, float]:
    """hits [Q, >=K] bool: percentage of rows with a hit in the first k columns, for each k."""
    return {k: percent(int(hits[:, :k].any(1).sum()), len(hits)) for k in ks}


def recall_at_k(topk: torch.Tensor, target: torch.Tensor, ks) -> dict[str, float]:
    """topk [Q, >=K] gallery indices, target [Q] index. Returns percentages."""
    return {f"recall_at_{k}": v for k, v in hit_percent(topk == target[:, None], ks).items()}


def map_at_k(topk: torch.Tensor, targets: list[list[int]], ks) -> dict[str, float]:
    """AP@K = sum_{i<=K, rel_i} (hits in the first i) / i / min(K, |GT|), summed exactly."""
    out = {}
    for k in ks:
        total = Fraction(0)
        for row, gt in zip(topk[:, :k].tolist(), targets):
            gt = set(gt)
            hits, ap = 0, Fraction(0)
            for i, item in enumerate(row, 1):
                if item in gt:
                    hits += 1
                    ap += Fraction(hits, i)
            total += ap / min(k, len(gt))
        out[f"map_at_{k}"] = percent(total, len(targets))
    return out


def subset_ranking(queries: torch.Tensor, gallery: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Rank each query's subset members (gallery indices, -1 padded, reference already removed)
    by (score desc, gallery index asc): the order they have in the full ranking."""
    safe = members.clamp(min=0)
    scores = torch.einsum("qd,qmd->qm", queries.float(), gallery[safe].float())
    scores = scores.masked_fill(members < 0, float("-inf"))
    order = torch.argsort(safe, dim=1, stable=True)
    scores, safe = scores.gather(1, order), safe.gather(1, order)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    return safe.gather(1, order)


@dataclass
class SetResult:
    """One eval set's ranking as every consumer reads it: metrics, the top-50 gallery names per query id
    and their scores (prediction/submission files, visualisation), CIRR's subset top-3."""

    metrics: dict[str, float]
    predictions: dict[str, list[str]]
    subset_predictions: dict[str, list[str]]
    scores: dict[str, list[float]] = field(default_factory=dict)


def rank_subsets(queries, index: dict[str, int], names: list[str], query_emb: torch.Tensor, gallery_emb):
    """CIRR's subset protocol: each query ranks only its image set (its reference left out);
    returns the top-3 names per query and the [Q, width] ranked gallery indices (-1 = padding)."""
    width = max(len(q.subset) for q in queries)
    members = torch.full((len(queries), width), -1, dtype=torch.long)
    for row, q in enumerate(queries):
        ids = [index[m] for m in q.subset if m != q.reference and m in index]
        members[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    gallery_t = torch.as_tensor(gallery_emb[:]) if not isinstance(gallery_emb, torch.Tensor) else gallery_emb
    ranked = subset_ranking(query_emb, gallery_t, members)
    predictions = {}
    for q, row, m in zip(queries, ranked.tolist(), members.tolist()):
        n_valid = sum(x >= 0 for x in m)
        predictions[q.qid] = [names[i] for i in row[: min(3, n_valid)]]
    return predictions, ranked


def score_eval_set(
    protocol: Protocol,
    eval_set: EvalSet,
    query_emb: torch.Tensor,
    gallery_emb,
    has_answers: bool = True,
    backend: str = "exact",
    **search_options,
) -> SetResult:
    """Rank one eval set; metrics only where answers exist (never a fake test score)."""
    names = eval_set.gallery
    index = {n: i for i, n in enumerate(names)}
    queries = eval_set.queries
    if len(queries) == 0:
        raise CirlabError("no queries to evaluate")
    exclude = None
    if protocol.exclude_reference:
        exclude = torch.tensor([index.get(q.reference, -1) for q in queries])
    k = max([TOP_PREDICTIONS, *protocol.recall_ks, *protocol.map_ks])
    ranking = search(query_emb, gallery_emb, k, exclude=exclude, backend=backend, **search_options)
    topk = ranking.indices
    predictions = {q.qid: [names[i] for i in row[:TOP_PREDICTIONS]] for q, row in zip(queries, topk.tolist())}
    scores = {q.qid: row[:TOP_PREDICTIONS] for q, row in zip(queries, ranking.scores.tolist())}

    subset_predictions, ranked_subset = {}, None
    if protocol.subset_ks:
        subset_predictions, ranked_subset = rank_subsets(queries, index, names, query_emb, gallery_emb)

    metrics: dict[str, float] = {}
    if has_answers:
        missing = [q for q in queries if not q.targets or q.targets[0] not in index]
        if missing:
            raise CirlabError(
                f"query {missing[0].qid}: target {missing[0].targets[:1]} is not in the gallery "
                f"({len(missing)} such queries); the gallery must contain every target"
            )
        target = torch.tensor([index[q.targets[0]] for q in queries])
        metrics.update(recall_at_k(topk, target, protocol.recall_ks))
        if protocol.map_ks:
            metrics.update(
                map_at_k(
                    topk, [[index[t] for t in q.targets if t in index] for q in queries], protocol.map_ks
                )
            )
        if ranked_subset is not None:
            hits = hit_percent(ranked_subset == target[:, None], protocol.subset_ks)
            metrics.update({f"recall_subset_at_{k}": v for k, v in hits.items()})
        metrics.update(derived_metrics(metrics, protocol))
    return SetResult(metrics, predictions, subset_predictions, scores)


def derived_metrics(metrics: dict[str, float], protocol: Protocol) -> dict[str, float]:
    out = {}
    recalls = [metrics[f"recall_at_{k}"] for k in protocol.recall_ks if f"recall_at_{k}" in metrics]
    if recalls:
        out["mean_recall"] = mean(recalls)
    if "recall_at_5" in metrics and "recall_subset_at_1" in metrics:
        out["avg_recall_at_5_subset_at_1"] = mean([metrics["recall_at_5"], metrics["recall_subset_at_1"]])
    return out


def split_metrics(split: str, results: dict[str, SetResult], protocol: Protocol) -> dict[str, float]:
    """Flat `<split>/<metric>` keys; with groups (FashionIQ) `<split>/<group>/<metric>` plus
    `<split>/average/<metric>` and `<split>/average_recall` = (avg R@10 + avg R@50) / 2."""
    if list(results) == [""]:
        return {f"{split}/{k}": v for k, v in results[""].metrics.items()}
    out = {}
    for group, res in results.items():
        out.update({f"{split}/{group}/{k}": v for k, v in res.metrics.items()})
    if protocol.group_average and results and all(r.metrics for r in results.values()):
        keys = next(iter(results.values())).metrics.keys()
        avg = {k: mean(r.metrics[k] for r in results.values()) for k in keys}
        out.update({f"{split}/average/{k}": v for k, v in avg.items()})
        if "mean_recall" in avg:
            out[f"{split}/average_recall"] = avg["mean_recall"]
    return out
