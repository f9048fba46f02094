"""Image-caption datasets for text<->image retrieval (`dataset.kind: captions`).

A `CaptionSource` holds, per split, (image name, captions) pairs and resolves names to files.
Builders:
  * `karpathy_source`  Karpathy split JSON (`dataset_coco.json` / `dataset_flickr30k.json`):
    split train|restval -> train, val, test; captions = sentences[*].raw, first 5 per image.
  * `coco_source` / `flickr30k_source` with `split_scheme: karpathy | reference`; `reference` is
    hxhhxx/Clip_crossmodal_retrieval's own splits (COCO 2017: train2017 randomly split 95/5 into
    train/val, test = val2017; Flickr30k kaggle `captions.txt` randomly split into
    all-2000 / 1000 / 1000), here with a fixed seed (the reference uses none).
  * `synthetic_captions` (the bundled benchmark) and `jsonl_captions` (own data, captions.jsonl).
Facts: docs/methods/crossmodal.md#data, docs/benchmarks.md#coco-and-flickr30k.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from cirlab.data.records import Protocol
from cirlab.errors import CirlabError

SPLITS = ("train", "val", "test")
KARPATHY_SPLIT = {"train": "train", "restval": "train", "val": "val", "test": "test"}
MAX_CAPTIONS = 5
PROTOCOL = Protocol(recall_ks=(1, 5, 10), main_metric="rsum")

COCO_LAYOUT = """  <root>/                              (dataset.root, default ${paths.data_dir}/coco)
    dataset_coco.json                   Karpathy splits (split_scheme=karpathy)
    train2014/COCO_train2014_*.jpg, val2014/COCO_val2014_*.jpg
    annotations/captions_train2017.json, annotations/captions_val2017.json   (split_scheme=reference)
    train2017/*.jpg, val2017/*.jpg"""
FLICKR_LAYOUT = """  <root>/                              (dataset.root, default ${paths.data_dir}/flickr30k)
    dataset_flickr30k.json              Karpathy splits (split_scheme=karpathy)
    captions.txt                        kaggle 'image_name | comment_number | comment' (split_scheme=reference)
    flickr30k-images/<id>.jpg"""


class CaptionSource:
    """(image, captions) pairs per split; image names are paths relative to `root`."""

    protocol = PROTOCOL

    def __init__(self, root: str | Path, splits: dict[str, list[tuple[str, list[str]]]], name: str):
        self.root, self.name = Path(root), name
        self.splits = splits

    def image_path(self, name: str) -> Path:
        return self.root / name

    def has_answers(self, split: str) -> bool:
        return True

    def image_captions(self, split: str) -> list[tuple[str, list[str]]]:
        if split not in self.splits:
            raise CirlabError(f"{self.name}: no split {split!r}; splits: {', '.join(self.splits)}")
        pairs = self.splits[split]
        if not pairs:
            raise CirlabError(f"{self.name}: split {split!r} has no captioned images")
        return pairs


def _require(path: Path, what: str, layout: str) -> Path:
    if not path.exists():
        raise CirlabError(f"{what} not found: {path}\nExpected layout under dataset.root:\n{layout}")
    return path


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CirlabError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from err


def read_karpathy(path: str | Path) -> dict[str, list[tuple[str, list[str]]]]:
    """Karpathy JSON -> {train, val, test: [(relative image path, first 5 raw captions)]}.
    COCO entries carry `filepath` (train2014/val2014), Flickr30k entries only `filename`."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CirlabError(f"{path}: expected a Karpathy split file {{'images': [...], 'dataset': ...}}")
    out: dict[str, list[tuple[str, list[str]]]] = {s: [] for s in SPLITS}
    for i, img in enumerate(data["images"]):
        try:
            split = KARPATHY_SPLIT[img["split"]]
            name = f"{img['filepath']}/{img['filename']}" if img.get("filepath") else img["filename"]
            caps = [s["raw"].strip() for s in img["sentences"]][:MAX_CAPTIONS]
        except KeyError as err:
            raise CirlabError(
                f"{path}: image entry {i} lacks field {err} (or has an unknown split "
                f"{img.get('split')!r}; expected train/restval/val/test)"
            ) from err
        if caps:
            out[split].append((name, caps))
    return out


def karpathy_source(
    root: str | Path, annotation: str, image_dir: str = "", name: str = "karpathy", layout: str = ""
) -> CaptionSource:
    root = Path(root)
    pairs = read_karpathy(_require(root / annotation, "Karpathy split file", layout))
    return CaptionSource(root / image_dir if image_dir else root, pairs, name)


def _random_split(items: list, sizes: dict[str, int], seed: int) -> dict[str, list]:
    items = list(items)
    random.Random(seed).shuffle(items)
    out, start = {}, 0
    for split, n in sizes.items():
        out[split] = items[start : start + n]
        start += n
    return out


def coco_source(
    root: str | Path, split_scheme: str = "karpathy", seed: int = 0, val_fraction: float = 0.05
) -> CaptionSource:
    root = Path(root)
    if split_scheme == "karpathy":
        return karpathy_source(root, "dataset_coco.json", name="coco", layout=COCO_LAYOUT)
    if split_scheme != "reference":
        raise CirlabError(f"unknown dataset.split_scheme={split_scheme!r}; choose karpathy or reference")

    def read(split: str) -> list[tuple[str, list[str]]]:
        path = _require(
            root / "annotations" / f"captions_{split}2017.json", "COCO 2017 captions", COCO_LAYOUT
        )
        data = _load_json(path)
        caps: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            caps.setdefault(ann["image_id"], []).append(ann["caption"].strip())
        return [
            (f"{split}2017/{img['file_name']}", caps[img["id"]][:MAX_CAPTIONS])
            for img in data["images"]
            if img["id"] in caps
        ]

    train = read("train")
    n_val = round(len(train) * val_fraction)
    splits = _random_split(train, {"val": n_val, "train": len(train) - n_val}, seed)
    return CaptionSource(root, {"train": splits["train"], "val": splits["val"], "test": read("val")}, "coco")


def read_flickr_kaggle(path: Path, max_words: int = 50) -> list[tuple[str, list[str]]]:
    """kaggle `captions.txt`: header line, then `image_name| comment_number| comment`; punctuation
    removed and captions cut to 50 words, as the reference's Datasets/Flickr30k.py."""
    caps: dict[str, list[str]] = {}
    for lineno, line in enumerate(path.read_text().splitlines()[1:], 2):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 3:
            raise CirlabError(f"{path}, line {lineno}: expected 'image_name | comment_number | comment'")
        text = " ".join(re.sub(r"[^\w\s]", "", "|".join(parts[2:])).split()[:max_words])
        caps.setdefault(parts[0], []).append(text)
    return [(f"flickr30k-images/{n}", c[:MAX_CAPTIONS]) for n, c in caps.items()]


def flickr30k_source(
    root: str | Path, split_scheme: str = "karpathy", seed: int = 0, n_val: int = 1000, n_test: int = 1000
) -> CaptionSource:
    root = Path(root)
    if split_scheme == "karpathy":
        return karpathy_source(
            root,
            "dataset_flickr30k.json",
            image_dir="flickr30k-images",
            name="flickr30k",
            layout=FLICKR_LAYOUT,
        )
    if split_scheme != "reference":
        raise CirlabError(f"unknown dataset.split_scheme={split_scheme!r}; choose karpathy or reference")
    pairs = read_flickr_kaggle(_require(root / "captions.txt", "Flickr30k captions.txt", FLICKR_LAYOUT))
    splits = _random_split(pairs, {"test": n_test, "val": n_val, "train": len(pairs) - n_val - n_test}, seed)
    return CaptionSource(root, splits, "flickr30k")


def jsonl_captions(root: str | Path, name: str = "jsonl") -> CaptionSource:
    """Own data: <root>/captions.jsonl, {"image": ..., "captions": [...], "split": train|val|test}."""
    from cirlab.data.sources.jsonl import JsonlSource

    src = JsonlSource(root, name=name)
    return CaptionSource(src.root, {s: src.image_captions(s) for s in SPLITS}, name)


def synthetic_captions(cache_dir: str, train_split: str = "train", **spec) -> CaptionSource:
    """The synthetic benchmark's captions: train = its train + pretrain images (exactly the tiny
    backbone's pretraining data), val/test = the held-out images of the CIR val/test galleries.
    train_split=val trains on the val images' captions instead (images the tiny backbone never saw;
    val then monitors training data, test stays held out)."""
    from cirlab.data.sources.synthetic import synthetic_source

    if train_split not in ("train", "val"):
        raise CirlabError(f"unknown dataset.source.train_split={train_split!r}; choose train or val")
    src = synthetic_source(cache_dir, **spec)
    splits = {s: src.image_captions(s) for s in SPLITS}
    splits["train"] = splits[train_split]
    return CaptionSource(src.root, splits, "synthetic_captions")
