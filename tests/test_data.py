"""Synthetic generator determinism and the jsonl format (parsing and its errors)."""

import hashlib
import json

import pytest

from cirlab.data.sources.jsonl import JsonlSource
from cirlab.data.synthetic import SyntheticSpec, generate
from cirlab.errors import CirlabError

SMALL = dict(n_pretrain=20, n_train=30, n_val=6, n_test=6, hard_negatives=2)


def _digest(root):
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_synthetic_is_deterministic_and_splits_are_disjoint(tmp_path):
    a = generate(SyntheticSpec(seed=3, **SMALL), tmp_path / "a")
    b = generate(SyntheticSpec(seed=3, **SMALL), tmp_path / "b")
    c = generate(SyntheticSpec(seed=4, **SMALL), tmp_path / "c")
    assert _digest(a) == _digest(b) != _digest(c)
    src = JsonlSource(a)
    train = set(src.train_images())
    val = set(src.eval_sets("val")[0].gallery)
    test = set(src.eval_sets("test")[0].gallery)
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(src.queries("test")) == 6 and all(q.targets for q in src.queries("test"))


def test_more_pretraining_images_than_distinct_scenes_is_a_clear_error(tmp_path):
    """3 slots of 2 x 2 objects or nothing: 5**3 - 1 = 124 scenes; the CIR splits take some of them."""
    spec = SyntheticSpec(
        n_colors=2, n_shapes=2, n_pretrain=124, n_train=10, n_val=2, n_test=2, hard_negatives=1
    )
    with pytest.raises(CirlabError, match=r"n_pretrain=124, but only \d+ distinct scenes are left"):
        generate(spec, tmp_path / "b")


def test_synthetic_style_changes_pixels_only(tmp_path):
    """A rendering style is an image-domain shift of the same benchmark: same scenes, captions and
    triplets, other pixels. A field at its neutral value stays out of the cache key (edit_captions=0 is
    the benchmark without edit captions: same images and triplets, see the edit-caption test)."""
    assert (
        SyntheticSpec(edit_captions=0).digest()
        == SyntheticSpec(style="plain", edit_captions=0).digest()
        == "063fcdb25b"
    )
    assert SyntheticSpec().digest() == "a73cacbf18"
    assert SyntheticSpec(style="noisy").digest() != SyntheticSpec().digest()
    plain = generate(SyntheticSpec(seed=3, **SMALL), tmp_path / "plain")
    noisy = generate(SyntheticSpec(seed=3, style="noisy", **SMALL), tmp_path / "noisy")
    for name in ("captions.jsonl", "triplets.test.jsonl", "triplets.train.jsonl", "gallery.test.txt"):
        assert (plain / name).read_text() == (noisy / name).read_text()
    image = sorted((plain / "images").iterdir())[0].name
    assert (plain / "images" / image).read_bytes() != (noisy / "images" / image).read_bytes()
    with pytest.raises(CirlabError, match="unknown synthetic style"):
        generate(SyntheticSpec(style="sketch", **SMALL), tmp_path / "bad")


def _write(root, name, lines):
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("".join(lines))


def test_jsonl_parsing(tmp_path):
    _write(
        tmp_path,
        "triplets.val.jsonl",
        [
            json.dumps({"id": "q1", "reference": "a.png", "text": "make it red", "target": "b.png"}) + "\n",
            "\n",
            json.dumps({"reference": "b.png", "text": "two targets", "target": ["a.png", "c.png"]}) + "\n",
        ],
    )
    src = JsonlSource(tmp_path)
    qs = src.queries("val")
    assert [q.qid for q in qs] == ["q1", "3"]  # missing id -> line number
    assert qs[1].targets == ("a.png", "c.png")
    assert src.eval_sets("val")[0].gallery == ["a.png", "b.png", "c.png"]


@pytest.mark.parametrize(
    "lines,match",
    [
        (
            ['{"reference": "a", "text": "x", "target": "b"}\n', '{"reference": "a", text}\n'],
            r"line 2: not valid JSON",
        ),
        (['{"reference": "a", "target": "b"}\n'], r"line 1: missing field\(s\) text"),
        (['{"reference": "a", "text": "  ", "target": "b"}\n'], r"line 1: empty modification text"),
        (["[1, 2]\n"], r"line 1: expected a JSON object"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, lines, match):
    _write(tmp_path, "triplets.val.jsonl", lines)
    with pytest.raises(CirlabError, match=match):
        JsonlSource(tmp_path).queries("val")


def test_jsonl_missing_file_and_root(tmp_path):
    with pytest.raises(CirlabError, match="dataset root folder not found"):
        JsonlSource(tmp_path / "nope")
    with pytest.raises(CirlabError, match="missing file: .*triplets.val.jsonl"):
        JsonlSource(tmp_path).queries("val")


def test_edit_captions_describe_their_image(tmp_path):
    """An edit caption names another scene and the modification that turns it into the image's scene,
    in the grammar of the CIR texts; only training/pretraining images get them."""
    import random
    import re

    from cirlab.data.synthetic import Generator

    gen = Generator(SyntheticSpec())
    obj = r"a (\w+) (\w+) (on the left|in the middle|on the right)"
    for seed in range(200):
        rng = random.Random(seed)
        scene = gen.random_scene(rng)
        caption = gen.edit_caption(scene, rng)
        head, changes = re.fullmatch(r"a photo of (.+?) that (.+)", caption).groups()
        slots = {m[2]: (m[0], m[1]) for m in re.findall(obj, head)}
        for change in changes.split(" and "):
            if m := re.fullmatch(r"has nothing (.+)", change):
                assert m[1] in slots, caption  # removes an object the named scene has
                slots.pop(m[1])
            else:
                m = re.fullmatch(r"(also )?has " + obj, change)
                assert bool(m[1]) == (m[4] not in slots), caption  # "also" exactly when the slot was empty
                slots[m[4]] = (m[2], m[3])
        assert slots == {gen.slot_names[i]: o for i, o in enumerate(scene) if o}, caption

    root = generate(SyntheticSpec(seed=3, **SMALL), tmp_path / "b")
    records = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    assert all(("edit_captions" in r) == (r["split"] in ("train", "pretrain")) for r in records)
    assert all(len(r["edit_captions"]) == 3 for r in records if "edit_captions" in r)
    src = JsonlSource(root)
    assert [c for _, c in src.image_captions("test", edits=True)] == [
        c for _, c in src.image_captions("test")
    ]
    with_edits = src.image_captions("train", edits=True)
    assert all(len(c) == len(p) + 3 for (_, c), (_, p) in zip(with_edits, src.image_captions("train")))


def test_loader_workers_auto_is_none_on_cpu_and_the_cores_per_device_on_gpu(monkeypatch):
    from omegaconf import OmegaConf

    from cirlab.stage import loader_workers

    def cfg(workers, accelerator, devices=1):
        return OmegaConf.create(
            {"num_workers": workers, "trainer": {"accelerator": accelerator, "devices": devices}}
        )

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert loader_workers(cfg("auto", "cpu")) == 0
    assert loader_workers(cfg("auto", "gpu")) == 8  # capped
    assert loader_workers(cfg("auto", "gpu", 4)) == 4
    assert loader_workers(cfg("auto", "gpu", "auto")) == 8
    assert loader_workers(cfg(3, "cpu")) == 3  # a count is taken as given
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert loader_workers(cfg("auto", "auto", 3)) == 0  # trainer=ddp on a machine without CUDA
