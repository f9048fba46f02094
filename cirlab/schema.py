"""Every user-facing config value's type and range, and every `+key=value` addition, checked in one pass
before any data or model is touched: a bad value stops at start-up naming the key, the value and what is
allowed, and a misspelt `+key` naming the nearest known keys, instead of a traceback deep in Lightning or
a setting silently ignored. A new key name in conf/ needs an entry in SCHEMA (tests/test_schema.py fails
until it has one). Only OmegaConf's and Hydra's public API is used.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from cirlab.errors import CirlabError

_TYPES = {
    int: ("an integer", int),
    float: ("a number", (int, float)),
    bool: ("true or false", bool),
    str: ("a string", str),
}


@dataclass(frozen=True)
class Value:
    """A value of one type (int, float, bool or str); a number within lo..hi, an open end excluding its
    bound (a learning rate of 0 trains nothing); null only where `null`."""

    type: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    null: bool = False

    def accepts(self, value) -> bool:
        if value is None:
            return self.null
        if isinstance(value, bool) != (self.type is bool) or not isinstance(value, _TYPES[self.type][1]):
            return False
        above = self.lo is None or value > self.lo or (value == self.lo and not self.lo_open)
        return above and (self.hi is None or value < self.hi or (value == self.hi and not self.hi_open))

    @property
    def allowed(self) -> str:
        text = _TYPES[self.type][0]
        bounds = [f"{'>' if self.lo_open else '>='} {self.lo}"] if self.lo is not None else []
        bounds += [f"{'<' if self.hi_open else '<='} {self.hi}"] if self.hi is not None else []
        if len(bounds) == 2 and not (self.lo_open or self.hi_open):
            text += f" from {self.lo} to {self.hi}"
        elif bounds:
            text += " " + " and ".join(bounds)
        return text + (" or null" if self.null else "")


class OneOf:
    """One of fixed values; 1 and true are different values here, as they are to the code reading them."""

    def __init__(self, *choices):
        self.choices = choices

    def accepts(self, value) -> bool:
        return any(value == c and type(value) is type(c) for c in self.choices)

    @property
    def allowed(self) -> str:
        return "one of " + ", ".join("null" if c is None else str(c) for c in self.choices)


@dataclass(frozen=True)
class ListOf:
    item: Value | OneOf
    min_len: int = 0
    max_len: int | None = None

    def accepts(self, value) -> bool:
        return (
            isinstance(value, list)
            and self.min_len <= len(value) <= (self.max_len or len(value))
            and all(map(self.item.accepts, value))
        )

    @property
    def allowed(self) -> str:
        if self.min_len == self.max_len:
            size = f"a list of {self.min_len} items"
        else:
            size = "a non-empty list" if self.min_len == 1 else "a list"
        return f"{size}, each item {self.item.allowed}"


class Either:
    def __init__(self, *rules):
        self.rules = rules

    def accepts(self, value) -> bool:
        return any(r.accepts(value) for r in self.rules)

    @property
    def allowed(self) -> str:
        return "; or ".join(r.allowed for r in self.rules)


POSITIVE = Value(int, lo=1)
COUNT = Value(int, lo=0)
SEED = Value(int, lo=0, hi=2**32 - 1)  # numpy's seed range (Lightning's seed_everything)
RATE = Value(float, lo=0, lo_open=True)  # a learning rate of 0 trains nothing
STR = Value(str)
NAMES = ListOf(STR, min_len=1)

# A key's rule is that of its name, the same wherever it appears (`lr` below any stage, `seed` of the run,
# the generator and OTI; SEARLE's method.unlabeled is checked as a dataset). Where a name means two
# things, the entry names it with its parent (`vision_cfg.layers`, `module.train`).
SCHEMA = {
    **dict.fromkeys(
        """batch_size epochs steps save_every top_k top_k_concepts sscl_views adapter_reduction visualize_n
        visualize_k nlist nprobe log_every_n_steps num_nodes max_edits n_pretrain n_train n_val n_test
        image_size patch_size embed_dim width head_width heads layers context_length vocab_size max_length
        hidden_size intermediate_size num_hidden_layers num_attention_heads encoder_hidden_size
        max_position_embeddings image_text_hidden_size middle_dim n_layer num_k topk n_layers n_heads""".split(),
        POSITIVE,
    ),
    **dict.fromkeys("max_epochs hard_negatives warmup_steps".split(), COUNT),
    **dict.fromkeys(
        "chunk threads projection_dim hidden_dim per_concept".split(), Value(int, lo=1, null=True)
    ),
    "max_images": Value(int, lo=0, null=True),
    "patch_width": Value(int, lo=1, null=True),
    "milestones": ListOf(COUNT),
    "mlp_ratio": RATE,
    "epsilon": Value(float, lo=0, hi=1),
    "max_captions": Value(int, lo=0, null=True),
    "noise_scale": Value(float, lo=0),
    "tagger": OneOf("auto", "spacy", "synthetic"),
    "num_sanity_val_steps": Value(int, lo=-1),
    "slots": Value(int, lo=1, hi=4),
    "n_colors": Value(int, lo=1, hi=8),
    "n_shapes": Value(int, lo=1, hi=4),
    "seed": SEED,
    **dict.fromkeys(
        """lr eps init_std logit_scale proj_lr_scale loss_weight_lr temperature init_temperature
        initializer_range layer_norm_eps position_scale""".split(),
        RATE,
    ),
    **dict.fromkeys(
        "weight_decay min_lr margin reverse_weight lambda_cos lambda_gpt lambda_distil lambda_reg".split(),
        Value(float, lo=0),
    ),
    **dict.fromkeys(
        "dropout hidden_dropout_prob attention_probs_dropout_prob".split(),
        Value(float, lo=0, hi=1, hi_open=True),
    ),
    **dict.fromkeys("ema_decay adapter_ratio gamma".split(), Value(float, lo=0, hi=1)),
    "betas": ListOf(Value(float, lo=0, hi=1, hi_open=True), min_len=2, max_len=2),
    "target_ratio": Value(float, lo=1),
    "grad_clip": Value(float, lo=0, lo_open=True, null=True),
    "token_norm": Either(OneOf(None, "oti"), RATE),
    **dict.fromkeys(
        """resume visualize gallery_on_disk offline enable_model_summary use_distributed_sampler allow_torchscript
        openai_fp16_rounding edit_captions bidirectional mccl sscl learn_t l2_normalize""".split(),
        Value(bool),
    ),
    "quick_gelu": Value(bool, null=True),
    **dict.fromkeys(
        """run_name name path root split val_split test_split hf_id model_name prompt token_dir project strategy
        root_dir data_dir output_dir cache_dir train_prompt placeholder description caption_prefix""".split(),
        STR,
    ),
    # a path (whether it exists is checked where it is read, with what it should hold), or a name
    **dict.fromkeys(
        "checkpoint image_root file vocabulary pretrained lm corpus pairs_file image_dir image_name".split(),
        Value(str, null=True),
    ),
    **dict.fromkeys("stages extensions image_splits".split(), NAMES),
    "vision_cfg.layers": ListOf(POSITIVE, min_len=1),
    "num_workers": Either(COUNT, OneOf("auto")),
    "accelerator": OneOf("auto", "cpu", "gpu", "cuda", "mps", "tpu"),
    "devices": Either(POSITIVE, OneOf(-1, "auto"), ListOf(COUNT, min_len=1)),
    "precision": OneOf(
        "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", 32, 16, 64, "32", "16", "bf16"
    ),
    "deterministic": OneOf(True, False, "warn"),
    "search": OneOf("exact", "faiss"),
    "index_type": OneOf("flat", "ivf", "hnsw"),
    "preprocess": OneOf("clip", "squarepad", "targetpad"),
    "split_scheme": OneOf("karpathy", "reference"),
    "missing_images": OneOf("error", "skip"),
    "categories": ListOf(OneOf("dress", "shirt", "toptee"), min_len=1),
    "image_ext": OneOf("auto", "jpg", "png"),
    "style": OneOf("plain", "light", "outline", "noisy"),
    "train_split": OneOf("train", "val"),
    "position_init": OneOf("random", "sincos"),
    "direction": OneOf("text", "learned"),
    "fusion": OneOf("image", "text", "sum"),
    "method.train": OneOf("adapter", "projections"),
    "module.train": OneOf("none", "adapter", "projections"),
    "encoders": OneOf("both", "text", "image"),
    "loss": OneOf("margin", "infonce"),
    "generator": OneOf("template", "lm"),
}

# `+key=value` arguments of the tasks (cirlab/tasks.py), which no config file holds
TASK_ARGUMENTS = (
    "task",
    "run",
    "runs",
    "src",
    "out",
    "tokenizer",
    "splits",
    "csv",
    "images",
    "captioner",
    "tagger",
)


def entry_of(key: str) -> str | None:
    """The SCHEMA entry of a dotted key: the longest tail of it that SCHEMA names, or None."""
    parts = key.split(".")
    return next((tail for i in range(len(parts)) if (tail := ".".join(parts[i:])) in SCHEMA), None)


def leaves(cfg: DictConfig) -> Iterator[tuple[str, object]]:
    """(dotted key, value as written) of every value below cfg, a dict counting as one where its key has
    a rule (which refuses it). Left out: `_`-keys (Hydra's `_target_`) and interpolations (`${seed}`),
    whose source is checked."""

    def walk(node: dict, prefix: str):
        for key, value in node.items():
            full = f"{prefix}{key}"
            if str(key).startswith("_") or (isinstance(value, str) and "${" in value):
                continue
            if isinstance(value, dict) and entry_of(full) is None:
                yield from walk(value, full + ".")
            else:
                yield full, value

    yield from walk(OmegaConf.to_container(cfg, resolve=False), "")


def bad_values(cfg: DictConfig) -> list[str]:
    problems = []
    for key, _ in leaves(cfg):
        entry = entry_of(key)
        if entry is None:
            continue  # a task argument, or an argument added below a `_target_`
        rule = SCHEMA[entry]
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
        except MissingMandatoryValue:
            problems.append(f"{key} must be set: {rule.allowed}")
            continue
        except OmegaConfBaseException as err:
            problems.append(f"{key}: {err}".splitlines()[0])
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        if not rule.accepts(value):
            problems.append(
                f"{key}={'null' if value is None else repr(value)} is not allowed: {rule.allowed}"
            )
    return problems


def nearest(key: str, known: Iterable[str]) -> str:
    """' (nearest: ...)' with up to 3 known keys: those of a close last name first (`lrr`: the `lr`s)."""
    known = [k for k in dict.fromkeys(known) if k != key]
    name = key.rpartition(".")[2]
    close = [k for k in known if difflib.SequenceMatcher(None, name, k.rpartition(".")[2]).ratio() >= 0.6]
    found = difflib.get_close_matches(key, close, n=3, cutoff=0) or difflib.get_close_matches(key, known, n=3)
    return f" (nearest: {', '.join(found)})" if found else ""


def arguments(target: str) -> set[str] | None:
    """The keyword arguments a `_target_` takes, a class's up its bases while each passes **kwargs on (as
    the methods' modules do); None where it takes any, or cannot be imported here (Hydra reports that,
    with its cause, where it builds the target)."""
    try:
        module, _, name = target.rpartition(".")
        obj = getattr(importlib.import_module(module), name)
        inits = (
            [vars(c)["__init__"] for c in obj.__mro__ if "__init__" in vars(c)]
            if isinstance(obj, type)
            else [obj]
        )
        names = set()
        for params in (inspect.signature(init).parameters.values() for init in inits):
            names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                return names
    except Exception:
        pass
    return None


def unknown_additions(cfg: DictConfig, hydra: DictConfig) -> list[str]:
    """`+key=value` adds a key that no composed config holds: right for a config group (`+experiment=X`,
    `+dataset@method.unlabeled=imagenet`), a task argument, and an argument a `_target_` takes
    (`+trainer.limit_train_batches=3`, `+method.combiner.module.gather_negatives=true`); anything else
    would be ignored, so it is refused, naming the nearest keys. `++key=value` adds a key unchecked."""
    problems = []
    for override in OverridesParser.create().parse_overrides(list(hydra.overrides.task)):
        key, package = override.key_or_group, override.package
        group = f"{key}@{package}" if package else key
        if not override.is_add() or key in TASK_ARGUMENTS or group in hydra.runtime.choices:
            continue
        parent, _, name = key.rpartition(".")
        target = OmegaConf.select(cfg, f"{parent}._target_") if parent else None
        if not isinstance(target, str):
            near = nearest(key, (k for k, _ in leaves(cfg)))
            problems.append(f"{override.input_line}: no config has {key}{near}; `++` adds it unchecked")
            continue
        takes = arguments(target)
        if takes is not None and name not in takes:
            near = nearest(key, (f"{parent}.{a}" for a in sorted(takes)))
            problems.append(f"{override.input_line}: {target} takes no argument {name!r}{near}")
    return problems


def validate(cfg: DictConfig, hydra: DictConfig | None = None) -> None:
    """Check every value that has a SCHEMA entry and, given the run's Hydra config (HydraConfig.get()),
    every `+key=value` addition; one CirlabError lists every problem."""
    problems = bad_values(cfg) + (unknown_additions(cfg, hydra) if hydra is not None else [])
    if problems:
        raise CirlabError("invalid config values:\n  " + "\n  ".join(problems))
