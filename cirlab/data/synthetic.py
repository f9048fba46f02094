"""The bundled synthetic CIR benchmark: coloured shapes in slots, declarative modification texts.

Generated deterministically from a seed into a cache folder, written in the generic jsonl format
(see `sources/jsonl.py`), so the synthetic path exercises the custom-data path.

Each image is a scene: `slots` horizontal positions, each empty or holding a (colour, shape).
Captions describe the scene in several surface forms ("a red circle on the left and ...",
"a photo of a red circle on the left that has a blue square on the right", ...), so a CLIP
pretrained on them speaks the language of the modification texts ("has a blue circle on the
left", "also has a green square on the right", "has nothing in the middle"). Training and pretraining
images also get edit captions ("a photo of <another scene> that <modification>"), the language
SEARLE's prompt "a photo of $ that {text}" relies on; held-out images never do.
Galleries are built around the queries with hard negatives (the target with one other slot
changed, the reference itself), so zero-shot baselines stay low and training has headroom.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cirlab.errors import CirlabError
from cirlab.io import build_lock, write_json, write_text

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
    "white": (235, 235, 235),
    "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "cross")
SLOT_NAMES = {
    1: ("in the middle",),
    2: ("on the left", "on the right"),
    3: ("on the left", "in the middle", "on the right"),
    4: ("on the far left", "on the left", "on the right", "on the far right"),
}

Scene = tuple  # per slot: None or (colour, shape)

# Rendering styles: "plain" is what the tiny backbone was pretrained on; the others are image-domain
# shifts of the same scenes (captions unchanged) for adapting a frozen backbone to a new domain.
STYLES = {
    "plain": {},
    "light": {"background": (200, 200, 200)},
    "outline": {"outline": True},
    "noisy": {"noise": 0.15},
}


@dataclass(frozen=True)
class SyntheticSpec:
    """Difficulty knobs. Defaults are tuned so zero-shot stays well below 50% R@10."""

    seed: int = 0
    image_size: int = 32
    slots: int = 3
    n_colors: int = 6
    n_shapes: int = 4
    max_edits: int = 2
    n_pretrain: int = 5000  # captioned images for backbone pretraining (none from val/test)
    n_train: int = 4000  # CIR training triplets
    n_val: int = 400
    n_test: int = 400
    hard_negatives: int = 3  # per query: target variants with one other slot changed
    noise: float = 0.04  # pixel noise std (0..1 scale)
    style: str = "plain"  # rendering style (STYLES): same scenes and captions, other pixels
    edit_captions: int = 3  # per train/pretraining image: captions in the modification grammar (below)

    def digest(self) -> str:
        """The cache key. A field at its neutral value (no restyling, no edit captions) is left out."""
        fields = asdict(self)
        for name, neutral in (("style", "plain"), ("edit_captions", 0)):
            if fields[name] == neutral:
                del fields[name]
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def describe_object(obj) -> str:
    return f"a {obj[0]} {obj[1]}"


def change_text(where: str, old, new) -> str:
    """One slot's modification text, the grammar shared by CIR queries and edit captions."""
    if new is None:
        return f"has nothing {where}"
    return f"{'also ' if old is None else ''}has {describe_object(new)} {where}"


class Generator:
    def __init__(self, spec: SyntheticSpec):
        self.spec = spec
        self.colors = list(COLORS)[: spec.n_colors]
        self.shapes = list(SHAPES)[: spec.n_shapes]
        self.slot_names = SLOT_NAMES[spec.slots]
        self.objects = [(c, s) for c in self.colors for s in self.shapes]
        if spec.style not in STYLES:
            raise CirlabError(f"unknown synthetic style {spec.style!r}; choose one of {', '.join(STYLES)}")
        self.style = STYLES[spec.style]

    # ---- scenes -------------------------------------------------------------------------------
    def objects_space(self) -> range:
        return range((len(self.objects) + 1) ** self.spec.slots - 1)

    def random_scene(self, rng: random.Random) -> Scene:
        n = rng.randint(1, self.spec.slots)
        filled = set(rng.sample(range(self.spec.slots), n))
        return tuple(rng.choice(self.objects) if i in filled else None for i in range(self.spec.slots))

    def caption(self, scene: Scene, rng: random.Random) -> str:
        parts = [f"{describe_object(o)} {self.slot_names[i]}" for i, o in enumerate(scene) if o]
        form = rng.random()
        if form < 0.35 or len(parts) == 1:
            text = " and ".join(parts)
            return text if rng.random() < 0.5 else f"a photo of {text}"
        # "a photo of A that has B and has C": the same grammar as the modification texts
        head, rest = parts[0], parts[1:]
        rng.shuffle(rest)
        if form < 0.7:
            return f"a photo of {head} that " + " and ".join(f"has {p}" for p in rest)
        k = rng.randrange(len(parts))
        head, rest = parts[k], parts[:k] + parts[k + 1 :]
        empties = [f"has nothing {self.slot_names[i]}" for i, o in enumerate(scene) if o is None]
        return f"a photo of {head} that " + " and ".join([f"has {p}" for p in rest] + empties)

    def edit(self, scene: Scene, rng: random.Random) -> tuple[Scene, str]:
        """Apply 1..max_edits edits to distinct slots; return the target scene and the modification text."""
        target = list(scene)
        n = rng.randint(1, self.spec.max_edits)
        texts = []
        for slot in rng.sample(range(self.spec.slots), n):
            where = self.slot_names[slot]
            obj = target[slot]
            if obj is None:
                new = rng.choice(self.objects)
            else:
                choice = rng.random()
                if choice < 0.25 and sum(o is not None for o in target) > 1:
                    new = None
                elif choice < 0.6:
                    new = (rng.choice([c for c in self.colors if c != obj[0]]), obj[1])
                else:
                    new = (obj[0], rng.choice([s for s in self.shapes if s != obj[1]]))
            texts.append(change_text(where, obj, new))
            target[slot] = new
        return tuple(target), " and ".join(texts)

    def edit_caption(self, scene: Scene, rng: random.Random) -> str:
        """Describe `scene` as another scene plus the modification that turns it into this one:
        "a photo of a red circle on the left and a cyan cross on the right that has a blue square on
        the left". Web captions teach real CLIP this language ("a photo of X that ..."); the tiny
        backbone learns it from these, so a pseudo-word for a reference image can be composed with a
        modification text zero-shot (SEARLE)."""
        source, _ = self.edit(scene, rng)
        head = " and ".join(f"{describe_object(o)} {self.slot_names[i]}" for i, o in enumerate(source) if o)
        changes = [
            change_text(self.slot_names[i], source[i], scene[i])
            for i in range(self.spec.slots)
            if source[i] != scene[i]
        ]
        rng.shuffle(changes)
        return f"a photo of {head} that " + " and ".join(changes)

    def perturb(self, scene: Scene, rng: random.Random) -> Scene:
        """A hard negative: change one slot's object (or fill/empty it)."""
        out = list(scene)
        slot = rng.randrange(self.spec.slots)
        others = [o for o in self.objects if o != out[slot]]
        if out[slot] is not None and sum(o is not None for o in out) > 1 and rng.random() < 0.2:
            out[slot] = None
        else:
            out[slot] = rng.choice(others)
        return tuple(out)

    # ---- pixels -------------------------------------------------------------------------------
    def render(self, scene: Scene, rng: random.Random) -> Image.Image:
        size = self.spec.image_size
        scale = 4  # draw large and downsample: anti-aliased shapes
        big = size * scale
        img = Image.new("RGB", (big, big), self.style.get("background", (30, 30, 30)))
        draw = ImageDraw.Draw(img)
        cell = big / self.spec.slots
        for i, obj in enumerate(scene):
            if obj is None:
                continue
            color = tuple(int(np.clip(v + rng.randint(-20, 20), 0, 255)) for v in COLORS[obj[0]])
            r = cell * rng.uniform(0.30, 0.40)
            cx = cell * (i + 0.5) + rng.uniform(-0.08, 0.08) * cell
            cy = big / 2 + rng.uniform(-0.15, 0.15) * big
            box = (cx - r, cy - r, cx + r, cy + r)
            paint = (
                {"outline": color, "width": max(1, round(r / 4))}
                if self.style.get("outline")
                else {"fill": color}
            )
            if obj[1] == "circle":
                draw.ellipse(box, **paint)
            elif obj[1] == "square":
                draw.rectangle(box, **paint)
            elif obj[1] == "triangle":
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], **paint)
            else:  # cross
                w = r / 3
                if self.style.get("outline"):
                    draw.polygon(
                        [
                            (cx - w, cy - r),
                            (cx + w, cy - r),
                            (cx + w, cy - w),
                            (cx + r, cy - w),
                            (cx + r, cy + w),
                            (cx + w, cy + w),
                            (cx + w, cy + r),
                            (cx - w, cy + r),
                            (cx - w, cy + w),
                            (cx - r, cy + w),
                            (cx - r, cy - w),
                            (cx - w, cy - w),
                        ],
                        **paint,
                    )
                else:
                    draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=color)
                    draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=color)
        img = img.resize((size, size), Image.BICUBIC)
        noise = self.style.get("noise", self.spec.noise)
        if noise > 0:
            arr = np.asarray(img, dtype=np.float32) / 255.0
            nrng = np.random.default_rng(rng.randrange(2**32))
            arr = np.clip(arr + nrng.normal(0, noise, arr.shape), 0, 1)
            img = Image.fromarray((arr * 255).round().astype(np.uint8))
        return img


class ImageNames(dict):
    """Scene -> image file name, numbered in the order scenes are first named."""

    def __call__(self, scene: Scene) -> str:
        if scene not in self:
            self[scene] = f"images/{len(self):06d}.png"
        return self[scene]


def triplet(split: str, i: int, ref: Scene, text: str, tgt: Scene, name: ImageNames) -> dict:
    return {"id": f"{split}-{i}", "reference": name(ref), "text": text, "target": name(tgt)}


def held_out_queries(
    gen: Generator, rng: random.Random, split: str, n: int, used: set[Scene], name: ImageNames
) -> tuple[list[dict], list[Scene]]:
    """`n` queries whose reference, target and hard negatives no other held-out query uses (disjoint
    val/test galleries), and the split's gallery scenes. Adds the scenes to `used`."""

    def claim(scene: Scene) -> bool:
        if scene in used or all(o is None for o in scene):
            return False
        used.add(scene)
        return True

    triplets, scenes = [], []
    while len(triplets) < n:
        ref = gen.random_scene(rng)
        tgt, text = gen.edit(ref, rng)
        if ref in used or tgt in used or ref == tgt:
            continue
        claim(ref), claim(tgt)
        scenes += [ref, tgt]
        for _ in range(gen.spec.hard_negatives):
            neg = gen.perturb(tgt, rng)
            if claim(neg):
                scenes.append(neg)
        triplets.append(triplet(split, len(triplets), ref, text, tgt, name))
    return triplets, scenes


def train_queries(
    gen: Generator, rng: random.Random, held_out: set[Scene], name: ImageNames
) -> tuple[list[dict], set[Scene]]:
    """Training queries over any scene not held out (images may repeat), and their scenes."""
    triplets, scenes = [], set()
    while len(triplets) < gen.spec.n_train:
        ref = gen.random_scene(rng)
        tgt, text = gen.edit(ref, rng)
        if ref in held_out or tgt in held_out:
            continue
        scenes.update((ref, tgt))
        triplets.append(triplet("train", len(triplets), ref, text, tgt, name))
    return triplets, scenes


def pretrain_scenes(gen: Generator, rng: random.Random, held_out: set[Scene]) -> list[Scene]:
    """Distinct scenes, none held out, for the backbone's caption pretraining."""
    scenes: list[Scene] = []
    seen = set(held_out)
    free = len(gen.objects_space()) - len(seen)
    if gen.spec.n_pretrain > free:  # the loop below would never end
        raise CirlabError(
            f"synthetic spec: n_pretrain={gen.spec.n_pretrain}, but only {free} distinct scenes are left after "
            "the CIR splits: lower n_pretrain or raise n_colors/n_shapes/slots"
        )
    while len(scenes) < gen.spec.n_pretrain:
        s = gen.random_scene(rng)
        if s not in seen:
            seen.add(s)
            scenes.append(s)
    return scenes


def captions_line(gen: Generator, scene: Scene, split: str, name: ImageNames) -> str:
    """One captions.jsonl record; an image's captions are seeded by its name alone."""
    cap_rng = random.Random(f"{gen.spec.seed}-cap-{name(scene)}")
    captions = sorted({gen.caption(scene, cap_rng) for _ in range(8)})[:5]
    record = {"image": name(scene), "captions": captions, "split": split}
    if gen.spec.edit_captions and split in ("train", "pretrain"):  # never of held-out images
        edit_rng = random.Random(f"{gen.spec.seed}-edit-{name(scene)}")
        record["edit_captions"] = [gen.edit_caption(scene, edit_rng) for _ in range(gen.spec.edit_captions)]
    return json.dumps(record) + "\n"


def write_benchmark(
    gen: Generator,
    records: dict[str, list],
    split_scenes: dict[str, list[Scene]],
    name: ImageNames,
    root: Path,
) -> None:
    """Images, triplets, galleries, captions and vocabulary in the jsonl layout; spec.json last."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for scene, file in name.items():
        gen.render(scene, random.Random(f"{gen.spec.seed}-{file}")).save(root / file)
    for split, triplets in records.items():
        write_text(root / f"triplets.{split}.jsonl", "".join(json.dumps(t) + "\n" for t in triplets))
    for split in ("val", "test"):
        write_text(root / f"gallery.{split}.txt", "".join(name(s) + "\n" for s in split_scenes[split]))
    lines = [captions_line(gen, s, split, name) for split, scenes in split_scenes.items() for s in scenes]
    write_text(root / "captions.jsonl", "".join(lines))
    (root / "vocabulary.txt").write_text("".join(f"{c} {s}\n" for c, s in gen.objects))
    write_json(root / "spec.json", asdict(gen.spec))  # last: its presence marks a complete benchmark


def generate(spec: SyntheticSpec, root: Path) -> Path:
    """Write the benchmark under `root` (jsonl layout). Deterministic in `spec`: one random stream
    draws the queries in a fixed order (test, val, train, pretraining scenes); pixels and captions are
    seeded per image name."""
    gen = Generator(spec)
    if 2 * (spec.n_val + spec.n_test) * (2 + spec.hard_negatives) > len(gen.objects_space()):
        raise CirlabError(
            "synthetic spec too small for its splits: raise n_colors/n_shapes/slots or lower n_val/n_test"
        )
    rng = random.Random(spec.seed)
    name = ImageNames()
    used: set[Scene] = set()
    records: dict[str, list] = {}
    split_scenes: dict[str, list[Scene]] = {}
    for split, n in (("test", spec.n_test), ("val", spec.n_val)):  # each query brings its gallery scenes
        records[split], split_scenes[split] = held_out_queries(gen, rng, split, n, used, name)
    records["train"], train_scenes = train_queries(gen, rng, used, name)
    split_scenes["train"] = sorted(train_scenes, key=name)
    split_scenes["pretrain"] = [s for s in pretrain_scenes(gen, rng, used) if s not in train_scenes]
    for scenes in split_scenes.values():  # gallery and pretraining scenes are named after all queries
        for s in scenes:
            name(s)
    write_benchmark(gen, records, split_scenes, name, root)
    return root


def ensure(spec: SyntheticSpec, cache_dir: str | Path) -> Path:
    """Return the benchmark folder for `spec`, generating it on first use: once, under a lock, in a
    unique temp folder renamed into place (mkdtemp, not a name from the seeded `random`, which would be
    the same in two runs with one seed)."""
    root = Path(cache_dir) / f"synthetic-{spec.digest()}"
    if (root / "spec.json").is_file():
        return root
    with build_lock(root):
        if (root / "spec.json").is_file():  # another run generated it while this one waited
            return root
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
        try:
            generate(spec, tmp)
            shutil.rmtree(root, ignore_errors=True)  # an incomplete folder (no spec.json): a killed write
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
