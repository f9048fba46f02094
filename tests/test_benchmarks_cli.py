"""`+method=zeroshot` through the CLI on the official benchmark layouts (cut-down real annotations,
placeholder images): test-server files and the data check. Every metric key and value on each layout:
tests/test_protocol_oracles.py."""

import json

import pytest
from conftest import assert_same_ranking, evaluation_scores, results
from fixtures.make_images import materialize

KEYS = {
    "fashioniq": [
        "val/dress/recall_at_10",
        "val/shirt/recall_at_50",
        "val/toptee/recall_at_10",
        "val/average/recall_at_10",
        "val/average/recall_at_50",
        "val/average_recall",
        "val/dress/map_at_10",
        "val/toptee/map_at_50",
        "val/average/map_at_10",
        "val/average/map_at_50",
    ],
    "cirr": [
        "val/recall_at_1",
        "val/recall_at_5",
        "val/recall_at_10",
        "val/recall_at_50",
        "val/recall_subset_at_1",
        "val/recall_subset_at_2",
        "val/recall_subset_at_3",
        "val/avg_recall_at_5_subset_at_1",
    ],
    "circo": ["val/map_at_5", "val/map_at_10", "val/map_at_25", "val/map_at_50", "val/recall_at_10"],
    "shoes": ["test/recall_at_1", "test/recall_at_10", "test/recall_at_50", "test/mean_recall"],
}


def test_cirr_test1_writes_both_submission_files_and_no_metrics(cli, tmp_path):
    root = materialize("cirr", tmp_path / "cirr")
    run = tmp_path / "run"
    code, out, err = cli(
        "+method=zeroshot", "dataset=cirr", f"dataset.root={root}", "dataset.test_split=test1", run_dir=run
    )
    assert code == 0, err
    assert not [k for k in results(run)["metrics"] if k.startswith("test1/")]  # never a fake test score
    stage = run / "stages" / "eval"
    recall = json.loads((stage / "recall_submission_test1.json").read_text())
    subset = json.loads((stage / "recall_subset_submission_test1.json").read_text())
    assert recall.pop("version") == "rc2" and recall.pop("metric") == "recall"
    assert subset.pop("version") == "rc2" and subset.pop("metric") == "recall_subset"
    captions = json.loads((root / "captions" / "cap.rc2.test1.json").read_text())
    gallery = json.loads((root / "image_splits" / "split.rc2.test1.json").read_text())
    assert set(recall) == set(subset) == {str(c["pairid"]) for c in captions}
    for c in captions:
        ranked = recall[str(c["pairid"])]
        assert len(ranked) == min(50, len(gallery) - 1) and c["reference"] not in ranked
        top3 = subset[str(c["pairid"])]
        assert len(top3) == 3 and set(top3) <= set(c["img_set"]["members"]) - {c["reference"]}


def test_circo_test_submission_format(cli, tmp_path):
    root = materialize("circo", tmp_path / "circo")
    run = tmp_path / "run"
    code, out, err = cli(
        "+method=zeroshot", "dataset=circo", f"dataset.root={root}", "dataset.test_split=test", run_dir=run
    )
    assert code == 0, err
    sub = json.loads((run / "stages" / "eval" / "circo_submission_test.json").read_text())
    queries = json.loads((root / "annotations" / "test.json").read_text())
    assert set(sub) == {str(q["id"]) for q in queries}
    for ids in sub.values():
        assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids) > 0


def test_check_data_lists_missing_and_corrupt_images(cli, tmp_path):
    root = materialize("cirr", tmp_path / "cirr")
    gallery = json.loads((root / "image_splits" / "split.rc2.val.json").read_text())
    names = list(gallery)
    (root / "img_raw" / gallery[names[0]]).unlink()
    (root / "img_raw" / gallery[names[1]]).write_bytes(b"")
    code, out, err = cli("+task=check_data", "dataset=cirr", f"dataset.root={root}", "+splits=[val]")
    assert code == 2
    assert "1 missing, 1 unreadable" in out and names[0] in out and "zero bytes" in out
    assert (
        cli(
            "+task=check_data",
            "dataset=cirr",
            f"dataset.root={materialize('cirr', tmp_path / 'ok')}",
            "+splits=[val]",
        )[0]
        == 0
    )


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["fashioniq", "cirr"])
def test_blip4cir_bi_trains_on_official_layout(dataset, cli, tmp_path):
    """BLIP4CIR+Bi's direction markers reach FashionIQ/CIRR through the ordinary sources."""
    root = materialize(dataset, tmp_path / dataset)
    run = tmp_path / "run"
    code, out, err = cli(
        "+method=blip4cir_bi",
        f"dataset={dataset}",
        f"dataset.root={root}",
        "method.finetune.max_epochs=1",
        "method.finetune.batch_size=4",
        "method.combiner.max_epochs=1",
        "method.combiner.batch_size=4",
        "eval.visualize=false",
        run_dir=run,
    )
    assert code == 0, err
    stages = results(run)["stages"]
    for key in KEYS[dataset]:
        assert key in stages["finetune"] and key in stages["combiner"], key


@pytest.mark.parametrize("dataset", ["fashioniq", "circo"])
def test_searle_oti_runs_on_official_layout(dataset, cli, tmp_path):
    """SEARLE-OTI through the ordinary sources (FashionIQ: both caption orders averaged per query)."""
    root = materialize(dataset, tmp_path / dataset)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("dress\nshirt\nred dress\ndog\n")
    run = tmp_path / "run"
    code, out, err = cli(
        "+method=searle_oti",
        f"dataset={dataset}",
        f"dataset.root={root}",
        f"method.concepts.vocabulary={vocab}",
        "method.phrases.per_concept=4",
        "method.oti.steps=3",
        f"method.token_dir={tmp_path / 'tokens'}",
        "eval.visualize=false",
        run_dir=run,
    )
    assert code == 0, err
    metrics = results(run)["metrics"]
    for key in KEYS[dataset]:
        assert key in metrics and 0 <= metrics[key] <= 100, key
    if dataset == "fashioniq":  # a query by its two raw captions searches as evaluated (both orders)
        assert_caption_queries_search_as_evaluated(run, results(run)["reported_split"])


def assert_caption_queries_search_as_evaluated(run, split: str, k: int = 10) -> None:
    import cirlab

    retriever = cirlab.load(run)
    source = retriever.data.source
    predictions = json.loads((run / "stages" / retriever.stage / f"predictions.{split}.json").read_text())
    for es in source.eval_sets(split):
        retriever.index([source.image_path(n) for n in es.gallery])
        name_of = {source.image_path(n): n for n in es.gallery}
        for q in es.queries[:3]:  # FashionIQ keeps the reference in the ranking
            reference, captions = source.image_path(q.reference), list(q.captions)
            hits = [
                name_of[p] for p, _ in retriever.search(reference, captions, k=k, exclude_reference=False)
            ]
            score = evaluation_scores(retriever, es.gallery, q)
            assert_same_ranking(hits, predictions[q.qid][:k], score)
