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


def test_synthetic_style_changes_pixels_only(tmp_path):
    """A rendering style is an image-domain shift of the same benchmark: same scenes, captions and
    triplets, other pixels; the default benchmark keeps its folder (every cached result depends on it)."""
    assert SyntheticSpec().digest() == SyntheticSpec(style="plain").digest() == "063fcdb25b"
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
    _write(tmp_path, "triplets.val.jsonl", [
        json.dumps({"id": "q1", "reference": "a.png", "text": "make it red", "target": "b.png"}) + "\n",
        "\n",
        json.dumps({"reference": "b.png", "text": "two targets", "target": ["a.png", "c.png"]}) + "\n"])
    src = JsonlSource(tmp_path)
    qs = src.queries("val")
    assert [q.qid for q in qs] == ["q1", "3"]          # missing id -> line number
    assert qs[1].targets == ("a.png", "c.png")
    assert src.eval_sets("val")[0].gallery == ["a.png", "b.png", "c.png"]


@pytest.mark.parametrize("lines,match", [
    (['{"reference": "a", "text": "x", "target": "b"}\n', '{"reference": "a", text}\n'], r"line 2: not valid JSON"),
    (['{"reference": "a", "target": "b"}\n'], r"line 1: missing field\(s\) text"),
    (['{"reference": "a", "text": "  ", "target": "b"}\n'], r"line 1: empty modification text"),
    (['[1, 2]\n'], r"line 1: expected a JSON object"),
])
def test_jsonl_errors_name_the_line(tmp_path, lines, match):
    _write(tmp_path, "triplets.val.jsonl", lines)
    with pytest.raises(CirlabError, match=match):
        JsonlSource(tmp_path).queries("val")


def test_jsonl_missing_file_and_root(tmp_path):
    with pytest.raises(CirlabError, match="dataset root folder not found"):
        JsonlSource(tmp_path / "nope")
    with pytest.raises(CirlabError, match="missing file: .*triplets.val.jsonl"):
        JsonlSource(tmp_path).queries("val")
