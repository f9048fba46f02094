"""The catalogue of bad inputs: each gives a `cirlab error` that says what to do, exit code 2,
no traceback, and leaves nothing half-written."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from fixtures.make_images import materialize

from cirlab.errors import CirlabError
from cirlab.io import write_json
from cirlab.methods.combiner import Combiner

ROW = {"id": "q", "reference": "images/a.png", "text": "make it red", "target": "images/b.png"}


def jsonl_data(root: Path, rows=(ROW,), gallery: list[str] | None = None, images=("a", "b")) -> Path:
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    for name in images:
        Image.new("RGB", (8, 8), (200, 0, 0)).save(root / "images" / f"{name}.png")
    for split in ("val", "test"):
        (root / f"triplets.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if gallery is not None:
            (root / f"gallery.{split}.txt").write_text("".join(g + "\n" for g in gallery))
    return root


def _zero_byte(root):
    (jsonl_data(root) / "images" / "a.png").write_bytes(b"")


def _corrupt(root):
    (jsonl_data(root) / "images" / "b.png").write_bytes(b"not a png at all")


def _broken_fiq_json(root):
    materialize("fashioniq", root)
    (root / "captions" / "cap.dress.val.json").write_text('[{"candidate": "x",\n "target": }]')


def _fiq_without_captions(root):
    materialize("fashioniq", root)
    for f in (root / "captions").iterdir():
        f.unlink()
    (root / "captions").rmdir()


def _cirr_without_split(root):
    materialize("cirr", root)
    (root / "image_splits" / "split.rc2.val.json").unlink()


def _wrong_checkpoint(root):
    torch.save(
        {"backbone": "tiny", "state_dict": {"model.text_projection": torch.zeros(3, 3)}}, root / "bad.pt"
    )


def _other_backbone_checkpoint(root):
    torch.save({"backbone": "clip_vit_b32", "state_dict": {}}, root / "other.pt")


J = ["+method=zeroshot", "dataset=jsonl"]
CASES = {
    # name: (prepare(root), args (ROOT replaced by the case folder), expected message pieces)
    "no_method": (None, [], ["methods:", "method=NAME"]),
    "unknown_method": (None, ["+method=nope"], ["Could not find 'method/nope'", "clip4cir"]),
    "unknown_dataset": (
        None,
        ["+method=zeroshot", "dataset=nope"],
        ["Could not find 'dataset/nope'", "synthetic"],
    ),
    "unknown_backbone": (
        None,
        ["+method=zeroshot", "backbone=nope"],
        ["Could not find 'backbone/nope'", "tiny"],
    ),
    "bad_override_type": (
        None,
        ["+method=clip4cir", "method.combiner.max_epochs=abc"],
        ["method.combiner.max_epochs", "integer", "abc"],
    ),
    "unknown_fusion": (
        None,
        ["+method=zeroshot", "method.fusion=max"],
        ["method.fusion", "image, text, sum"],
    ),
    "missing_dataset_root": (
        None,
        J + ["dataset.path=ROOT/absent"],
        ["dataset root folder not found", "triplets.train.jsonl"],
    ),
    # the annotations are read before the backbone is built (or pretrained): this checkpoint is never opened
    "missing_split_file": (
        None,
        J + ["dataset.path=ROOT", "backbone.checkpoint=ROOT/never_read.pt"],
        ["missing file", "triplets.val.jsonl"],
    ),
    "wrong_layout": (
        _fiq_without_captions,
        ["+method=zeroshot", "dataset=fashioniq", "dataset.root=ROOT"],
        ["captions", "Expected layout"],
    ),
    "missing_official_split": (
        _cirr_without_split,
        ["+method=zeroshot", "dataset=cirr", "dataset.root=ROOT"],
        ["split.rc2.val.json"],
    ),
    "malformed_json": (
        _broken_fiq_json,
        ["+method=zeroshot", "dataset=fashioniq", "dataset.root=ROOT"],
        ["malformed JSON", "cap.dress.val.json", "line 2"],
    ),
    # so is every evaluation image's presence (not its decoding): again the checkpoint is never opened
    "image_missing": (
        lambda r: jsonl_data(r, images=("a",)),
        J + ["dataset.path=ROOT", "backbone.checkpoint=ROOT/never_read.pt"],
        ["image not found", "b.png"],
    ),
    "zero_byte_image": (_zero_byte, J + ["dataset.path=ROOT"], ["corrupt or unreadable image", "a.png"]),
    "corrupt_image": (_corrupt, J + ["dataset.path=ROOT"], ["corrupt or unreadable image", "b.png"]),
    "empty_caption": (
        lambda r: jsonl_data(r, rows=(ROW | {"text": ""},)),
        J + ["dataset.path=ROOT"],
        ["line 1", "empty modification text"],
    ),
    "empty_gallery": (lambda r: jsonl_data(r, gallery=[]), J + ["dataset.path=ROOT"], ["gallery is empty"]),
    "target_not_in_gallery": (
        lambda r: jsonl_data(r, gallery=["images/a.png"]),
        J + ["dataset.path=ROOT"],
        ["target images/b.png", "not in the gallery"],
    ),
    "checkpoint_wrong_shape": (
        _wrong_checkpoint,
        ["+method=zeroshot", "backbone.checkpoint=ROOT/bad.pt"],
        ["backbone.checkpoint=", "does not fit", "missing in the file", "model.visual"],
    ),
    "checkpoint_other_backbone": (
        _other_backbone_checkpoint,
        ["+method=zeroshot", "backbone.checkpoint=ROOT/other.pt"],
        ["'clip_vit_b32'", "'tiny'"],
    ),
    "checkpoint_missing": (None, ["+method=zeroshot", "backbone.checkpoint=ROOT/none.pt"], ["no such file"]),
    "dataset_without_datamodule": (None, ["method=zeroshot", "~dataset.datamodule"], ["names no datamodule"]),
    "checkpoint_unknown_layout": (
        lambda r: torch.save({"Phi": {"layers.0.weight": torch.zeros(2, 2)}}, r / "phi.pt"),
        ["+method=zeroshot", "backbone.checkpoint=ROOT/phi.pt"],
        ["none of the layouts", "'Phi'", "{'epoch': int, 'CLIP': state_dict}"],
    ),
    "combiner_checkpoint_other_size": (
        lambda r: torch.save({"epoch": 3, "Combiner": Combiner(128, 64, 96).state_dict()}, r / "c.pt"),
        ["+method=clip4cir_combiner", "method.combiner.checkpoint=ROOT/c.pt"],
        [
            "method.combiner.checkpoint=",
            "CLIP4Cir / BLIP4CIR+Bi combiner",
            "another shape",
            "text_projection_layer.weight: file (64, 128) vs model (512, 128)",
        ],
    ),
    "combiner_checkpoint_missing": (
        None,
        ["+method=clip4cir_combiner", "method.combiner.checkpoint=ROOT/c.pt"],
        ["method.combiner.checkpoint=", "no such file"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, cli, tmp_path):
    prepare, args, expected = CASES[case]
    root = tmp_path / "case"
    root.mkdir()
    if prepare:
        prepare(root)
    code, out, err = cli(*[a.replace("ROOT", str(root)) for a in args])
    assert code == 2, (out, err)
    for piece in expected:
        assert piece in err, f"{piece!r} not in:\n{err}"
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "results.json").exists()


def test_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"

    def disk_full(obj, fh, **kwargs):
        fh.write('{"metrics": {"half')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", disk_full)
    with pytest.raises(CirlabError, match="No space left on device"):
        write_json(target, {"metrics": {}})
    assert list(tmp_path.iterdir()) == []
