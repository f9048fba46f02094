"""Each accepted on-disk layout of CIRR, Shoes and FashionIQ works from `dataset.root` alone (the folder the
README names), and a wrong root or missing images say which layouts are accepted and which was found.

Trees are built from the real (cut-down) annotation fixtures with placeholder images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import results
from fixtures.make_images import FIXTURES, materialize, write_image

from cirlab.data.check import check_images, split_images
from cirlab.data.sources.cirr import CIRRSource
from cirlab.data.sources.fashioniq import FashionIQSource
from cirlab.data.sources.layout import ImageNotFound
from cirlab.data.sources.shoes import ShoesSource
from cirlab.errors import CirlabError

CIRR_SPLITS = ("train", "val", "test1")


def split_paths(ann: Path) -> dict[str, str]:
    """name -> relative path ("./dev/x.png") over the three split files."""
    return {
        n: rel
        for s in CIRR_SPLITS
        for n, rel in json.loads((ann / f"image_splits/split.rc2.{s}.json").read_text()).items()
    }


def cirr_seed(root: Path, images: bool = True) -> Path:
    """CLIP4Cir/SEARLE: CIRR/cirr/{captions,image_splits}/ beside the images CIRR/{train,dev,test1}/."""
    shutil.copytree(FIXTURES / "cirr", root / "cirr")
    if images:
        for rel in split_paths(root / "cirr").values():
            write_image(root / rel)
    return root


def shoes_unpacked(root: Path, images: bool = True) -> Path:
    """The Attribute Discovery zip unpacked in place: womens_<category>/<sub>/.../name, no images/ folder."""
    shutil.copytree(FIXTURES / "shoes", root)
    if images:
        for f in ("train_im_names.txt", "eval_im_names.txt"):
            for i, name in enumerate((root / f).read_text().split()):
                category = name.removeprefix("img_womens_").rsplit("_", 1)[0]
                write_image(root / f"womens_{category}" / str(i % 3) / ("deep" if i % 2 else "") / name)
    return root


def both_cirr_layouts(text: str) -> bool:
    return "cirr/image_splits/split.rc2.<split>.json" in text and "img_raw/dev/<name>.png" in text


def both_shoes_layouts(text: str) -> bool:
    return "\n      womens_<category>/" in text and "images/womens_<category>/" in text


def both_fashioniq_layouts(text: str) -> bool:
    return "images/<ASIN>.jpg" in text and "dress/<ASIN>.jpg, shirt/<ASIN>.jpg, toptee/<ASIN>.jpg" in text


# ---- CIRR ---------------------------------------------------------------------------------------
def test_cirr_seed_layout_from_its_root(tmp_path):
    root = cirr_seed(tmp_path / "CIRR")
    src = CIRRSource(root)
    assert src.root == root / "cirr" and src.image_root == root
    assert src.detected.startswith("CLIP4Cir/SEARLE layout")
    paths = split_paths(root / "cirr")
    for name, rel in paths.items():
        assert src.image_path(name) == root / rel and src.image_path(name).is_file()
    train = src.train_queries()[0].reference
    assert src.image_path(train).relative_to(root).parts[0] == "train"
    assert src.image_path("dev-244-0-img0") == root / "dev" / "dev-244-0-img0.png"
    assert check_images(src, ["train", "val", "test1"]).ok


def test_cirr_seed_layout_from_its_cirr_folder(tmp_path):
    """dataset.root=CIRR/cirr (as the old two-override recipe began) finds the images beside it."""
    root = cirr_seed(tmp_path / "CIRR")
    src = CIRRSource(root / "cirr")
    assert src.image_root == root and src.detected.startswith("CLIP4Cir/SEARLE layout")
    assert src.image_path("dev-244-0-img0") == root / "dev" / "dev-244-0-img0.png"


def test_cirr_official_layout(tmp_path):
    root = materialize("cirr", tmp_path / "cirr")
    src = CIRRSource(root)
    assert src.root == root and src.image_root == root / "img_raw"
    assert src.detected.startswith("official cirr_dataset layout")
    assert src.image_path("dev-244-0-img0") == root / "img_raw" / "dev" / "dev-244-0-img0.png"
    assert check_images(src, ["train", "val"]).ok


def test_cirr_explicit_image_root_wins(tmp_path):
    root = cirr_seed(tmp_path / "CIRR")
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(root / "dev", moved / "dev")
    src = CIRRSource(root, image_root=moved)
    assert src.image_path("dev-244-0-img0") == moved / "dev" / "dev-244-0-img0.png"
    assert "(dataset.image_root)" in src.detected


def test_cirr_wrong_root_shows_both_layouts(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(CirlabError) as err:
        CIRRSource(tmp_path / "photos")
    assert "no captions/ or image_splits/ folder" in str(err.value) and both_cirr_layouts(str(err.value))


@pytest.mark.parametrize("layout", ["seed", "official"])
def test_cirr_missing_image_names_layouts_and_detected(layout, tmp_path):
    if layout == "seed":
        root = cirr_seed(tmp_path / "CIRR", images=False)
        expected, absent = root / "dev" / "dev-244-0-img0.png", ""
    else:
        root = tmp_path / "cirr"
        shutil.copytree(FIXTURES / "cirr", root)
        expected, absent = (
            root / "img_raw" / "dev" / "dev-244-0-img0.png",
            f"there is no folder {root / 'img_raw'}",
        )
    src = CIRRSource(root)
    with pytest.raises(ImageNotFound) as err:
        src.image_path("dev-244-0-img0")
    text = str(err.value)
    assert str(expected) in text and absent in text and both_cirr_layouts(text)
    assert f"Detected: {'CLIP4Cir/SEARLE' if layout == 'seed' else 'official cirr_dataset'} layout" in text
    assert check_images(src, ["val"]).missing[0] == "dev-244-0-img0"


# ---- Shoes --------------------------------------------------------------------------------------
def test_shoes_images_unpacked_in_place(tmp_path):
    root = shoes_unpacked(tmp_path / "shoes")
    src = ShoesSource(root)
    (ev,) = src.eval_sets("val")
    for name in ev.gallery + [n for q in src.train_queries() for n in (q.reference, *q.targets)]:
        path = src.image_path(name)
        assert path.is_file() and path.name == name and path.relative_to(root).parts[0].startswith("womens_")
    assert any(len(src.image_path(n).relative_to(root).parts) == 4 for n in ev.gallery)  # nested two deep
    assert src.detected.startswith("images as unpacked:") and "womens_" in src.detected
    assert check_images(src, ["train", "val"]).ok


def test_shoes_images_folder(tmp_path):
    root = materialize("shoes", tmp_path / "shoes")
    src = ShoesSource(root)
    assert (
        src.image_path("img_womens_flats_1491.jpg") == root / "images/womens_flats/img_womens_flats_1491.jpg"
    )
    assert src.detected.startswith("images gathered in images/:")


def test_shoes_duplicate_file_name_is_an_error_naming_both(tmp_path):
    root = shoes_unpacked(tmp_path / "shoes")
    first = ShoesSource(root).image_path("img_womens_flats_1491.jpg")
    copy = root / "images" / "womens_flats" / "img_womens_flats_1491.jpg"
    write_image(copy)
    src = ShoesSource(root)
    with pytest.raises(CirlabError, match="occurs more than once") as err:
        src.image_path("img_womens_flats_1491.jpg")
    assert str(first) in str(err.value) and str(copy) in str(err.value)
    assert src.image_path("img_womens_flats_1490.jpg").is_file()  # other names still resolve


@pytest.mark.parametrize("images", [False, True])
def test_shoes_missing_image_shows_both_layouts(images, tmp_path):
    root = shoes_unpacked(tmp_path / "shoes", images=images)
    if images:
        next(root.rglob("img_womens_flats_1490.jpg")).unlink()
    src = ShoesSource(root)
    with pytest.raises(ImageNotFound) as err:
        src.image_path("img_womens_flats_1490.jpg")
    text = str(err.value)
    assert both_shoes_layouts(text) and "Detected: " in text
    assert ("no .jpg/.jpeg/.png file at all" in text) == (not images)


# ---- FashionIQ ----------------------------------------------------------------------------------
FIQ_SPLITS = ("train", "val", "test")


def test_fashioniq_per_category_layout_reads_as_the_official_one(tmp_path):
    official = FashionIQSource(materialize("fashioniq", tmp_path / "official"))
    root = materialize("fashioniq", tmp_path / "FashionIQ", fashioniq_per_category=True)
    src = FashionIQSource(root)
    assert not (root / "images").exists() and src.detected.startswith("per-category layout (FTI4CIR)")
    assert official.detected.startswith("official layout")
    assert src.train_queries() == official.train_queries()
    for split in ("val", "test"):
        assert src.eval_sets(split) == official.eval_sets(split)
        for es in src.eval_sets(split):  # each image in its own category's folder
            for name in es.gallery:
                assert src.image_path(name) == root / es.group / f"{name}.png"
    for name in {n for split in FIQ_SPLITS for n in split_images(src, split)}:
        assert src.image_path(name).read_bytes() == official.image_path(name).read_bytes()
    assert check_images(src, FIQ_SPLITS).ok


def test_fashioniq_per_category_prefers_jpg_as_the_official_layout(tmp_path):
    root = materialize("fashioniq", tmp_path / "FashionIQ", fashioniq_per_category=True)
    write_image(root / "dress" / "B005X4PL1G.jpg")
    assert FashionIQSource(root).image_path("B005X4PL1G") == root / "dress/B005X4PL1G.jpg"
    assert FashionIQSource(root, image_ext="png").image_path("B005X4PL1G") == root / "dress/B005X4PL1G.png"


def test_fashioniq_asin_in_two_category_folders(tmp_path):
    """The same file in two folders is one image; different files are an error naming both."""
    root = materialize("fashioniq", tmp_path / "FashionIQ", fashioniq_per_category=True)
    name = json.loads((root / "image_splits/split.dress.val.json").read_text())[0]
    first = root / "dress" / f"{name}.png"
    copy = root / "toptee" / f"{name}.png"
    shutil.copy(first, copy)
    assert FashionIQSource(root).image_path(name) == first
    copy.write_bytes(first.read_bytes() + b"\0")
    with pytest.raises(CirlabError, match="different files") as err:
        FashionIQSource(root).image_path(name)
    assert str(first) in str(err.value) and str(copy) in str(err.value)


@pytest.mark.parametrize("layout", ["neither", "per-category"])
def test_fashioniq_missing_image_names_both_layouts(layout, tmp_path):
    root = tmp_path / "FashionIQ"
    if layout == "neither":
        shutil.copytree(FIXTURES / "fashioniq", root)
    else:
        materialize("fashioniq", root, fashioniq_per_category=True)
        (root / "dress" / "B005X4PL1G.png").unlink()
    src = FashionIQSource(root)
    with pytest.raises(ImageNotFound) as err:
        src.image_path("B005X4PL1G")
    text = str(err.value)
    assert both_fashioniq_layouts(text) and str(root) in text
    detected = "Detected: no images" if layout == "neither" else "Detected: per-category layout (FTI4CIR)"
    assert detected in text
    assert "B005X4PL1G" in check_images(src, ["val"]).missing


# ---- the CLI ------------------------------------------------------------------------------------
LAYOUTS = {
    "cirr-seed": ("cirr", lambda d: cirr_seed(d / "CIRR"), "CLIP4Cir/SEARLE layout"),
    "cirr-seed-cirr-folder": ("cirr", lambda d: cirr_seed(d / "CIRR") / "cirr", "CLIP4Cir/SEARLE layout"),
    "cirr-official": ("cirr", lambda d: materialize("cirr", d / "cirr"), "official cirr_dataset layout"),
    "shoes-unpacked": ("shoes", lambda d: shoes_unpacked(d / "shoes"), "images as unpacked"),
    "shoes-images": ("shoes", lambda d: materialize("shoes", d / "shoes"), "images gathered in images/"),
    "fashioniq-official": ("fashioniq", lambda d: materialize("fashioniq", d / "fiq"), "official layout"),
    "fashioniq-per-category": (
        "fashioniq",
        lambda d: materialize("fashioniq", d / "FashionIQ", fashioniq_per_category=True),
        "per-category layout (FTI4CIR)",
    ),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_check_data_passes_on_each_layout(case, cli, tmp_path):
    dataset, build, detected = LAYOUTS[case]
    root = build(tmp_path)
    code, out, err = cli("+task=check_data", f"dataset={dataset}", f"dataset.root={root}")
    assert code == 0, out + err
    assert "0 missing, 0 unreadable" in out and f"detected layout: {detected}" in out


@pytest.mark.parametrize("override", ["dataset.image_root", "dataset.source.image_root"])
def test_check_data_explicit_image_root(override, cli, tmp_path):
    """The two-override recipe of earlier versions, and its natural spelling, still work."""
    root = cirr_seed(tmp_path / "CIRR")
    code, out, err = cli(
        "+task=check_data", "dataset=cirr", f"dataset.root={root / 'cirr'}", f"{override}={root}"
    )
    assert code == 0, out + err
    assert "(dataset.image_root)" in out


def test_check_data_wrong_cirr_root(cli, tmp_path):
    (tmp_path / "photos").mkdir()
    code, out, err = cli("+task=check_data", "dataset=cirr", f"dataset.root={tmp_path / 'photos'}")
    assert code == 2 and both_cirr_layouts(err) and "Traceback" not in err


@pytest.mark.parametrize(
    "dataset, build",
    [
        ("cirr", lambda d: cirr_seed(d / "CIRR", images=False)),
        ("shoes", lambda d: shoes_unpacked(d / "shoes", images=False)),
        ("fashioniq", lambda d: shutil.copytree(FIXTURES / "fashioniq", d / "FashionIQ")),
    ],
)
def test_check_data_without_images(dataset, build, cli, tmp_path):
    root = build(tmp_path)
    code, out, err = cli("+task=check_data", f"dataset={dataset}", f"dataset.root={root}", "+splits=[val]")
    assert code == 2 and " 0 unreadable" in out and "0 missing" not in out
    assert "detected layout: " in out
    both = {"cirr": both_cirr_layouts, "shoes": both_shoes_layouts, "fashioniq": both_fashioniq_layouts}
    assert both[dataset](out)


def test_zeroshot_on_cirr_seed_layout(cli, tmp_path):
    root = cirr_seed(tmp_path / "CIRR")
    run = tmp_path / "run"
    code, out, err = cli(
        "+method=zeroshot", "dataset=cirr", f"dataset.root={root}", "eval.visualize=false", run_dir=run
    )
    assert code == 0, err
    metrics = results(run)["metrics"]
    assert 0 <= metrics["val/avg_recall_at_5_subset_at_1"] <= 100
