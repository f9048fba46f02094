"""The official-benchmark sources on cut-down real annotations (tests/fixtures) with placeholder images."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from fixtures.make_images import materialize, write_image

from cirlab.data.check import check_images, format_report
from cirlab.data.records import CIRQuery
from cirlab.data.sources.circo import CIRCOSource
from cirlab.data.sources.cirr import CIRRSource
from cirlab.data.sources.fashioniq import FashionIQSource
from cirlab.data.sources.shoes import ShoesSource
from cirlab.errors import CirlabError

# The full official annotation files (tens of MB, not committed): set CIRLAB_REAL_ANNOTATIONS to a folder
# holding fashioniq/, cirr/, shoes/ in their official layouts to run the full-count checks.
REAL = Path(os.environ.get("CIRLAB_REAL_ANNOTATIONS", "/nonexistent"))
NO_REAL = (
    "the full official annotation files are not in this checkout (set CIRLAB_REAL_ANNOTATIONS to "
    "run the full-count checks; the committed fixtures cover the formats)"
)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Each fixture dataset materialised once; tests that change files make their own copy."""
    base = tmp_path_factory.mktemp("data")
    return {d: materialize(d, base / d) for d in ("fashioniq", "cirr", "circo", "shoes")}


class FixedRng(random.Random):
    def __init__(self, u: float):
        super().__init__()
        self.u = u

    def random(self) -> float:
        return self.u


# ---- FashionIQ ----------------------------------------------------------------------------------
def test_fashioniq_splits(roots):
    src = FashionIQSource(roots["fashioniq"])
    train = src.train_queries()
    assert len(train) == 36
    assert [q.qid for q in train[:2]] == ["dress/0", "dress/1"] and train[-1].qid == "toptee/11"
    val = src.eval_sets("val")
    assert [es.group for es in val] == ["dress", "shirt", "toptee"]
    gallery = json.loads((roots["fashioniq"] / "image_splits/split.dress.val.json").read_text())
    assert val[0].gallery == gallery and len(val[0].queries) == 12
    q = val[0].queries[0]
    assert (q.reference, q.targets) == ("B005X4PL1G", ("B0084Y8XIU",))
    assert q.captions == ("is shiny and silver with shorter sleeves", "fit and flare")
    test = src.eval_sets("test")
    assert all(not q.targets for es in test for q in es.queries)
    assert src.has_answers("val") and not src.has_answers("test")
    assert src.protocol.recall_ks == (10, 50) and src.protocol.group_average
    assert src.protocol.main_metric == "average_recall" and not src.protocol.exclude_reference


def test_fashioniq_categories_subset(roots):
    src = FashionIQSource(roots["fashioniq"], categories=["shirt"])
    assert [es.group for es in src.eval_sets("val")] == ["shirt"]
    assert {q.qid.split("/")[0] for q in src.train_queries()} == {"shirt"}


def test_fashioniq_eval_text():
    q = CIRQuery("dress/0", "a", (" is SHINY and silver.", ", fit and Flare?"), ("b",))
    assert FashionIQSource.eval_text(None, q) == "Is shiny and silver and fit and Flare"


@pytest.mark.parametrize(
    "u, expected",
    [
        (0.1, "Is red and has Dots"),
        (0.3, "Has dots and is RED"),
        (0.6, "Is red"),
        (0.9, "Has dots"),
        (0.25, "Has dots"),
        (0.5, "Has dots"),
        (0.75, "Has dots"),  # boundaries fall to the last branch
    ],
)
def test_fashioniq_train_text_branches(u, expected):
    q = CIRQuery("dress/0", "a", ("is RED.", " has Dots"), ("b",))
    assert FashionIQSource.train_text(None, q, FixedRng(u)) == expected


def test_fashioniq_image_ext(tmp_path):
    root = materialize("fashioniq", tmp_path / "fiq")
    auto = FashionIQSource(root)
    assert auto.image_path("B005X4PL1G") == root / "images/B005X4PL1G.png"
    write_image(root / "images/B0084Y8XIU.jpg")
    assert auto.image_path("B0084Y8XIU").suffix == ".jpg"  # jpg first, as the reference code reads
    assert FashionIQSource(root, image_ext="png").image_path("X") == root / "images/X.png"
    with pytest.raises(CirlabError, match="image_ext"):
        FashionIQSource(root, image_ext="gif")


# ---- CIRR ---------------------------------------------------------------------------------------
def test_cirr_splits(roots):
    src = CIRRSource(roots["cirr"])
    (val,) = src.eval_sets("val")
    split = json.loads((roots["cirr"] / "image_splits/split.rc2.val.json").read_text())
    assert val.gallery == list(split)
    q = val.queries[0]
    assert (q.qid, q.reference, q.targets) == ("12060", "dev-244-0-img0", ("dev-1028-1-img1",))
    assert q.captions == ("show three bottles of soft drink",) and len(q.subset) == 6
    assert len(src.train_queries()) == 12
    for name in ("test", "test1"):
        (test,) = src.eval_sets(name)
        assert len(test.queries) == 12 and all(not q.targets for q in test.queries)
        assert not src.has_answers(name)
    assert src.has_answers("val")
    assert src.protocol.subset_ks == (1, 2, 3) and src.protocol.exclude_reference
    assert src.protocol.main_metric == "avg_recall_at_5_subset_at_1"


def test_cirr_image_paths(roots):
    src = CIRRSource(roots["cirr"])
    train_name = src.train_queries()[0].reference
    path = src.image_path(train_name)
    assert path.is_file() and path.parent.parent.name == "train" and path.parent.name.isdigit()
    assert src.image_path("dev-244-0-img0") == roots["cirr"] / "img_raw/dev/dev-244-0-img0.png"
    with pytest.raises(CirlabError, match="none of the split files"):
        src.image_path("nope")


# ---- CIRCO --------------------------------------------------------------------------------------
def test_circo(roots):
    src = CIRCOSource(roots["circo"])
    (val,) = src.eval_sets("val")
    q = val.queries[0]
    assert q.qid == "0" and q.reference == "000000271520" and q.targets[0] == "000000355099"
    assert len(q.targets) == 3
    assert src.image_path(q.reference) == roots["circo"] / "COCO2017_unlabeled/unlabeled2017/000000271520.jpg"
    assert src.image_path(q.reference).is_file()
    assert src.shared_concepts("val")["0"] == "a girl with a traditional Chinese umbrella"
    (test,) = src.eval_sets("test")
    assert len(test.queries) == 12 and not any(q.targets for q in test.queries)
    assert not src.has_answers("test") and src.protocol.main_metric == "map_at_10"
    with pytest.raises(CirlabError, match="CIRCO has no training split"):
        src.train_queries()


# ---- Shoes --------------------------------------------------------------------------------------
def test_shoes_fixture(roots):
    src = ShoesSource(roots["shoes"])
    assert len(src.train_queries()) == 8
    (ev,) = src.eval_sets("val")
    assert [q.qid for q in ev.queries] == ["0", "1", "2", "3"]
    assert ev.gallery == (roots["shoes"] / "eval_im_names.txt").read_text().split()
    assert src.eval_sets("test")[0].queries == ev.queries
    q = ev.queries[-1]
    assert (q.reference, q.targets) == ("img_womens_flats_1491.jpg", ("img_womens_flats_1490.jpg",))
    assert src.image_path(q.reference) == roots["shoes"] / "images/womens_flats/img_womens_flats_1491.jpg"
    assert src.protocol.recall_ks == (1, 10, 50) and src.protocol.exclude_reference


@pytest.mark.skipif(not (REAL / "shoes").is_dir(), reason=NO_REAL)
def test_shoes_real_counts():
    src = ShoesSource(REAL / "shoes")
    assert len(src.train_queries()) == 8990
    (ev,) = src.eval_sets("val")
    assert len(ev.queries) == 1761 and len(ev.gallery) == 4658


# ---- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [FashionIQSource, CIRRSource, CIRCOSource, ShoesSource])
def test_missing_root(cls, tmp_path):
    with pytest.raises(CirlabError) as err:
        cls(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(err.value) and "Expected layout" in str(err.value)
    assert cls.layout in str(err.value)


def test_missing_split_file(tmp_path):
    root = materialize("fashioniq", tmp_path / "fiq")
    (root / "image_splits/split.dress.val.json").unlink()
    with pytest.raises(CirlabError, match="split.dress.val.json") as err:
        FashionIQSource(root).eval_sets("val")
    assert "image_splits/split.<category>.<split>.json" in str(err.value)


def test_malformed_json_names_file_and_line(tmp_path):
    root = materialize("cirr", tmp_path / "cirr")
    path = root / "captions/cap.rc2.val.json"
    path.write_text('[\n{"pairid": 1,,}\n]')
    with pytest.raises(CirlabError, match="line 2") as err:
        CIRRSource(root).eval_sets("val")
    assert str(path) in str(err.value)


def test_target_not_in_gallery(tmp_path):
    root = materialize("cirr", tmp_path / "cirr")
    path = root / "image_splits/split.rc2.val.json"
    split = json.loads(path.read_text())
    del split["dev-1028-1-img1"]
    path.write_text(json.dumps(split))
    with pytest.raises(CirlabError, match="query 12060 .* target dev-1028-1-img1"):
        CIRRSource(root).eval_sets("val")


def test_missing_record_field(tmp_path):
    root = materialize("circo", tmp_path / "circo")
    path = root / "annotations/val.json"
    rows = json.loads(path.read_text())
    del rows[3]["gt_img_ids"]
    path.write_text(json.dumps(rows))
    with pytest.raises(CirlabError, match="record 3: missing field"):
        CIRCOSource(root).eval_sets("val")


# ---- image check --------------------------------------------------------------------------------
def test_check_images(tmp_path):
    root = materialize("shoes", tmp_path / "shoes")
    src = ShoesSource(root)
    assert check_images(src, ["val"]).ok
    (root / "images/womens_flats/img_womens_flats_1490.jpg").unlink()
    empty = root / "images/womens_flats/img_womens_flats_1491.jpg"
    empty.write_bytes(b"")
    report = check_images(ShoesSource(root), ["train", "val"])
    assert report.missing == ["img_womens_flats_1490.jpg"]
    assert report.unreadable == [(empty, "zero bytes")]
    text = format_report(report)
    assert "img_womens_flats_1490.jpg" in text and str(empty) in text


def test_check_images_corrupt_file(tmp_path):
    root = materialize("circo", tmp_path / "circo")
    broken = root / "COCO2017_unlabeled/unlabeled2017/000000271520.jpg"
    broken.write_bytes(b"not an image")
    report = check_images(CIRCOSource(root), ["val"])
    assert [p for p, _ in report.unreadable] == [broken] and not report.missing


@pytest.mark.skipif(not (REAL / "cirr").is_dir(), reason=NO_REAL)
def test_real_fashioniq_and_cirr_counts():
    fiq = FashionIQSource(REAL / "fashioniq")
    assert [(len(es.queries), len(es.gallery)) for es in fiq.eval_sets("val")] == [
        (2017, 3817),
        (2038, 6346),
        (1961, 5373),
    ]
    cirr = CIRRSource(REAL / "cirr")
    assert [(len(es.queries), len(es.gallery)) for es in cirr.eval_sets("val")] == [(4181, 2297)]
    assert [(len(es.queries), len(es.gallery)) for es in cirr.eval_sets("test")] == [(4148, 2315)]
