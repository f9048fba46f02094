"""`dataset.missing_images=skip` on the official FashionIQ layout (real cut-down annotations, placeholder
images) with broken files as real FashionIQ has them: a dead ASIN (no file), a 0-byte download and a
truncated image. The default (`error`) stops naming the file and the option."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import results
from fixtures.make_images import materialize

from cirlab.data.sources.captions import CaptionSource
from cirlab.data.sources.fashioniq import CATEGORIES, FashionIQSource
from cirlab.data.sources.readable import ReadableOnly


def annotations(root: Path, split: str) -> dict[str, tuple[list[dict], list[str]]]:
    return {
        c: (
            json.loads((root / "captions" / f"cap.{c}.{split}.json").read_text()),
            json.loads((root / "image_splits" / f"split.{c}.{split}.json").read_text()),
        )
        for c in CATEGORIES
    }


def broken_fashioniq(root: Path) -> tuple[Path, set[str]]:
    """The fixture with a val reference and a train reference gone, a val target of 0 bytes and a
    gallery-only val image truncated."""
    root = materialize("fashioniq", root)
    val, train = annotations(root, "val"), annotations(root, "train")
    used = {r[k] for caps, _ in val.values() for r in caps for k in ("candidate", "target")}
    gone = [val["dress"][0][0]["candidate"], train["shirt"][0][0]["candidate"]]
    empty = val["shirt"][0][1]["target"]
    truncated = next(n for n in val["toptee"][1] if n not in used)
    for name in gone:
        (root / "images" / f"{name}.png").unlink()
    (root / "images" / f"{empty}.png").write_bytes(b"")
    path = root / "images" / f"{truncated}.png"
    path.write_bytes(path.read_bytes()[:20])
    return root, {*gone, empty, truncated}


def expected(root: Path, split: str, broken: set[str]) -> dict[str, dict[str, int]]:
    """The counts straight from the annotation files."""
    sets = annotations(root, split).values()
    queries = [r for caps, _ in sets for r in caps]
    gallery = [n for _, names in sets for n in names]
    dropped = [r for r in queries if {r["candidate"], r["target"]} & broken]
    counts = {"queries": {"skipped": len(dropped), "of": len(queries)}}
    if split != "train":
        counts["gallery"] = {"skipped": sum(n in broken for n in gallery), "of": len(gallery)}
    return counts


def test_skip_drops_the_queries_and_gallery_images_of_broken_files(tmp_path):
    root, broken = broken_fashioniq(tmp_path / "fiq")
    source = ReadableOnly(FashionIQSource(root))
    full = FashionIQSource(root)
    kept = source.eval_sets("val")
    for es, whole in zip(kept, full.eval_sets("val"), strict=True):
        assert es.group == whole.group
        assert es.gallery == [n for n in whole.gallery if n not in broken]
        assert es.queries == [q for q in whole.queries if not {q.reference, *q.targets} & broken]
    train = source.train_queries()
    assert not {n for q in train for n in (q.reference, *q.targets)} & broken
    assert source.skipped == {"val": expected(root, "val", broken), "train": expected(root, "train", broken)}
    assert all(c["skipped"] > 0 for split in source.skipped.values() for c in split.values())


def test_skip_keeps_every_rule_of_the_wrapped_source(tmp_path):
    """ReadableOnly defines every public method of CIRSource, so none falls back to the base default in
    place of the wrapped source's rule (SEARLE's two-order FashionIQ prompt was lost that way)."""
    from cirlab.data.sources.base import CIRSource
    from cirlab.data.sources.layout import FolderLayout

    rules = [k for k in CIRSource.__mro__ if k not in (object, *FolderLayout.__mro__)]
    public = {n for klass in rules for n, v in vars(klass).items() if callable(v) and not n.startswith("_")}
    assert public - set(vars(ReadableOnly)) == set()
    root, broken = broken_fashioniq(tmp_path / "fiq")
    query = FashionIQSource(root).eval_sets("val")[0].queries[0]
    assert ReadableOnly(FashionIQSource(root)).query_texts(query) == FashionIQSource(root).query_texts(query)
    assert len(FashionIQSource(root).query_texts(query)) == 2  # both caption orders


def test_skip_drops_unreadable_images_of_a_captions_dataset(tmp_path):
    materialize("fashioniq", tmp_path)  # any images will do
    names = sorted(p.name for p in (tmp_path / "images").iterdir())[:3]
    (tmp_path / "images" / names[1]).write_bytes(b"")
    pairs = [(f"images/{n}", ["a caption"]) for n in names]
    source = ReadableOnly(CaptionSource(tmp_path, {"val": pairs}, "mine"))
    assert source.image_captions("val") == [pairs[0], pairs[2]]
    assert source.skipped == {"val": {"images": {"skipped": 1, "of": 3}}}


def test_error_is_the_default_and_names_skip(cli, tmp_path):
    root, _ = broken_fashioniq(tmp_path / "fiq")
    code, out, err = cli(
        "+method=zeroshot", "dataset=fashioniq", f"dataset.root={root}", "eval.visualize=false"
    )
    assert code == 2 and "Traceback" not in err
    assert "dataset.missing_images=skip" in err


def test_zeroshot_run_reports_what_it_skipped(cli, tmp_path):
    root, broken = broken_fashioniq(tmp_path / "fiq")
    run = tmp_path / "run"
    code, out, err = cli(
        "+method=zeroshot",
        "dataset=fashioniq",
        f"dataset.root={root}",
        "dataset.missing_images=skip",
        "eval.visualize=false",
        run_dir=run,
    )
    assert code == 0, err
    counts = expected(root, "val", broken)
    assert results(run)["skipped_images"] == {"val": counts}
    q, g = counts["queries"], counts["gallery"]
    line = f"val: {q['skipped']}/{q['of']} queries, {g['skipped']}/{g['of']} gallery"
    assert f"skipped (dataset.missing_images=skip), skipped/all: {line}" in out
    assert 0 <= results(run)["metrics"]["val/average_recall"] <= 100
