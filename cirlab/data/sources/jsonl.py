"""The generic jsonl format, for users' own data (the synthetic benchmark is written in it too).

    <root>/triplets.<split>.jsonl   {"id": "q1", "reference": "images/a.png", "text": "make it red",
                                     "target": "images/b.png"}            (target: a name or a list)
    <root>/gallery.<split>.txt      optional: one image per line (default: all images of the split)
    <root>/captions.jsonl           optional: {"image": ..., "captions": [...], "split": "train"}

Image names are paths relative to <root>. Splits: train, val, test.
"""

from __future__ import annotations

import json
from pathlib import Path

from cirlab.data.records import CIRQuery, EvalSet, Protocol
from cirlab.data.sources.base import CIRSource
from cirlab.data.sources.common import check_targets
from cirlab.errors import CirlabError

LAYOUT = """  <root>/
    triplets.train.jsonl, triplets.val.jsonl, triplets.test.jsonl
        one JSON object a line: {"id": ..., "reference": "images/a.png", "text": "...", "target": "images/b.png"}
    gallery.val.txt, gallery.test.txt   (optional; one image path a line)
    captions.jsonl                      (optional; {"image": ..., "captions": [...], "split": ...})
    images/...                          (paths in the files are relative to <root>)"""


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise CirlabError(f"missing file: {path}\nExpected layout:\n{LAYOUT}")
    rows = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CirlabError(
                    f"{path}, line {lineno}: not valid JSON ({err.msg} at column {err.colno})"
                ) from err
            if not isinstance(row, dict):
                raise CirlabError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row | {"_line": lineno})
    return rows


class JsonlSource(CIRSource):
    name = "jsonl"
    layout = LAYOUT
    readme_section = "Your own data (jsonl)"

    def __init__(self, root: str | Path, protocol: Protocol | None = None, name: str = "jsonl"):
        self.root = self.require_dir(Path(root), "dataset root")
        self.name = name
        self.protocol = protocol or Protocol()
        self._queries: dict[str, list[CIRQuery]] = {}

    def image_path(self, name: str) -> Path:
        return self.root / name

    def queries(self, split: str) -> list[CIRQuery]:
        if split not in self._queries:
            path = self.root / f"triplets.{split}.jsonl"
            out = []
            for row in read_jsonl(path):
                missing = [k for k in ("reference", "text") if k not in row]
                if missing:
                    raise CirlabError(f"{path}, line {row['_line']}: missing field(s) {', '.join(missing)}")
                text = row["text"]
                if not isinstance(text, str) or not text.strip():
                    raise CirlabError(f"{path}, line {row['_line']}: empty modification text")
                target = row.get("target", [])
                targets = tuple(target) if isinstance(target, list) else (target,)
                out.append(
                    CIRQuery(
                        qid=str(row.get("id", row["_line"])),
                        reference=row["reference"],
                        captions=(text,),
                        targets=targets,
                        subset=tuple(row.get("subset", ())),
                    )
                )
            if not out:
                raise CirlabError(f"{path} has no triplets")
            self._queries[split] = out
        return self._queries[split]

    def train_queries(self) -> list[CIRQuery]:
        return self.queries("train")

    def eval_sets(self, split: str) -> list[EvalSet]:
        queries = self.queries(split)
        gallery_file = self.root / f"gallery.{split}.txt"
        if gallery_file.is_file():
            gallery = [line.strip() for line in gallery_file.read_text().splitlines() if line.strip()]
        else:
            seen: dict[str, None] = {}
            for q in queries:
                seen.setdefault(q.reference)
                seen.update(dict.fromkeys(q.targets))
            gallery = list(seen)
        if not gallery:
            raise CirlabError(f"{self.name}: the {split} gallery is empty ({gallery_file})")
        check_targets(self.name, split, queries, gallery, gallery_file, hint="Add it to the gallery file.")
        return [EvalSet(queries=queries, gallery=gallery)]

    def has_answers(self, split: str) -> bool:
        return all(q.targets for q in self.queries(split))

    def image_captions(self, split: str, edits: bool = False) -> list[tuple[str, list[str]]]:
        """(image, captions) of a split; `edits` adds the synthetic benchmark's edit captions."""
        path = self.root / "captions.jsonl"
        splits = {"train": ("train", "pretrain")}.get(split, (split,))
        return [
            (r["image"], list(r["captions"]) + (list(r.get("edit_captions", [])) if edits else []))
            for r in read_jsonl(path)
            if r.get("split", "train") in splits
        ]
