"""Every user-facing config key with its type and range, checked in one pass over the composed config.

The CLI runs `validate` before any data or model is touched, so a bad value stops at start-up naming
the key, the value and what is allowed, instead of surfacing as a traceback deep in Lightning or a
model. A new key in conf/ needs an entry in SCHEMA (tests/test_schema.py fails until it has one).
Keys match patterns: `*` is one path segment, `**` one or more. Keys starting with `_` (Hydra's
`_target_`) and plain aliases of another key (`${method.oti}`) are not checked: their source is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cirlab.errors import CirlabError


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Int:
    lo: int | None = None
    hi: int | None = None
    null: bool = False

    def accepts(self, value) -> bool:
        if value is None:
            return self.null
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and (self.lo is None or value >= self.lo)
            and (self.hi is None or value <= self.hi)
        )

    @property
    def allowed(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"an integer from {self.lo} to {self.hi}"
        else:
            text = "an integer" + (f" >= {self.lo}" if self.lo is not None else "")
        return text + (" or null" if self.null else "")


@dataclass(frozen=True)
class Float:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself excluded (a learning rate of 0 trains nothing)
    hi_open: bool = False
    null: bool = False

    def accepts(self, value) -> bool:
        if value is None:
            return self.null
        if not _number(value):
            return False
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return above and below

    @property
    def allowed(self) -> str:
        bounds = []
        if self.lo is not None:
            bounds.append(f"{'>' if self.lo_open else '>='} {self.lo}")
        if self.hi is not None:
            bounds.append(f"{'<' if self.hi_open else '<='} {self.hi}")
        return "a number" + (f" {' and '.join(bounds)}" if bounds else "") + (" or null" if self.null else "")


@dataclass(frozen=True)
class Plain:
    """A value of one plain type (true/false, a string), or null where `null`."""

    type: type
    name: str
    null: bool = False

    def accepts(self, value) -> bool:
        return isinstance(value, self.type) or (value is None and self.null)

    @property
    def allowed(self) -> str:
        return self.name + (" or null" if self.null else "")


def Bool(null: bool = False) -> Plain:  # named like the type it checks, as Int and Float
    return Plain(bool, "true or false", null)


def Str(null: bool = False) -> Plain:
    return Plain(str, "a string", null)


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
    item: Int | Float | Plain | OneOf
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


POSITIVE = Int(lo=1)
COUNT = Int(lo=0)
SEED = Int(lo=0, hi=2**32 - 1)  # numpy's seed range (Lightning's seed_everything)
RATE = Float(lo=0, lo_open=True)  # learning rates, scales, temperatures, eps
NONNEG = Float(lo=0)  # weight decays, loss weights, margins
PROB = Float(lo=0, hi=1, hi_open=True)  # dropout probabilities
FILE = Str(null=True)  # a path; whether it exists is checked where it is read, with what it should hold

TRAINER = {
    "trainer.accelerator": OneOf("auto", "cpu", "gpu", "cuda", "mps", "tpu"),
    "trainer.devices": Either(POSITIVE, OneOf(-1, "auto"), ListOf(COUNT, min_len=1)),
    "trainer.num_nodes": POSITIVE,
    "trainer.precision": OneOf(
        "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", 32, 16, 64, "32", "16", "bf16"
    ),
    "trainer.strategy": Str(),
    "trainer.log_every_n_steps": POSITIVE,
    "trainer.num_sanity_val_steps": Int(lo=-1),
    "trainer.enable_model_summary": Bool(),
    "trainer.deterministic": OneOf(True, False, "warn"),
    "trainer.use_distributed_sampler": Bool(),
}

DATASET = {
    "dataset.name": Str(),
    "dataset.path": Str(),
    "dataset.root": Str(),
    "dataset.image_root": FILE,
    "dataset.preprocess": OneOf("clip", "squarepad", "targetpad"),
    "dataset.val_split": Str(),
    "dataset.test_split": Str(),
    "dataset.split": Str(),
    "dataset.split_scheme": OneOf("karpathy", "reference"),
    "dataset.visualize": Bool(),
    "dataset.missing_images": OneOf("error", "skip"),
    "dataset.source.categories": ListOf(OneOf("dress", "shirt", "toptee"), min_len=1),
    "dataset.source.extensions": ListOf(Str(), min_len=1),
    "dataset.source.image_ext": OneOf("auto", "jpg", "png"),
    "dataset.source.seed": SEED,
    "dataset.source.image_size": POSITIVE,
    "dataset.source.slots": Int(lo=1, hi=4),
    "dataset.source.n_colors": Int(lo=1, hi=8),
    "dataset.source.n_shapes": Int(lo=1, hi=4),
    "dataset.source.max_edits": POSITIVE,
    "dataset.source.n_pretrain": POSITIVE,
    "dataset.source.n_train": POSITIVE,
    "dataset.source.n_val": POSITIVE,
    "dataset.source.n_test": POSITIVE,
    "dataset.source.hard_negatives": COUNT,
    "dataset.source.style": OneOf("plain", "light", "outline", "noisy"),
    "dataset.source.train_split": OneOf("train", "val"),
}

BLIP_SIZES = (  # BlipConfig kwargs (blip_base's architecture, blip_tiny's model_cfg)
    "image_text_hidden_size",
    "vision_config.hidden_size",
    "vision_config.intermediate_size",
    "vision_config.num_hidden_layers",
    "vision_config.num_attention_heads",
    "vision_config.image_size",
    "vision_config.patch_size",
    "text_config.vocab_size",
    "text_config.hidden_size",
    "text_config.intermediate_size",
    "text_config.num_hidden_layers",
    "text_config.num_attention_heads",
    "text_config.encoder_hidden_size",
    "text_config.max_position_embeddings",
)
BACKBONE = {
    "backbone.name": Str(),
    "backbone.checkpoint": FILE,
    "backbone.pretrained": Str(null=True),
    "backbone.hf_id": Str(),
    "backbone.quick_gelu": Bool(null=True),
    "backbone.allow_torchscript": Bool(),
    "backbone.openai_fp16_rounding": Bool(),
    "backbone.model.model_name": Str(),
    "backbone.model.max_length": POSITIVE,
    "backbone.model.target_ratio": Float(lo=1),
    **{f"backbone.**.{key}": POSITIVE for key in BLIP_SIZES},
    "backbone.**.vision_config.layer_norm_eps": RATE,
    "backbone.**.initializer_range": RATE,
    "backbone.**.text_config.hidden_dropout_prob": PROB,
    "backbone.**.text_config.attention_probs_dropout_prob": PROB,
    # backbone=tiny's open_clip model_cfg
    "backbone.model.model_cfg.embed_dim": POSITIVE,
    "backbone.model.model_cfg.vision_cfg.image_size": POSITIVE,
    "backbone.model.model_cfg.vision_cfg.layers": ListOf(POSITIVE, min_len=1),
    "backbone.model.model_cfg.vision_cfg.width": POSITIVE,
    "backbone.model.model_cfg.vision_cfg.head_width": POSITIVE,
    "backbone.model.model_cfg.text_cfg.*": POSITIVE,
    # caption pretraining of tiny / blip_tiny
    "backbone.model.pretrain.seed": SEED,
    "backbone.model.pretrain.epochs": POSITIVE,
    "backbone.model.pretrain.lr": RATE,
    "backbone.model.pretrain.weight_decay": NONNEG,
    "backbone.model.pretrain.batch_size": POSITIVE,
    "backbone.model.pretrain.grad_clip": Float(lo=0, lo_open=True, null=True),
    "backbone.model.pretrain.dataset.seed": SEED,
    "backbone.model.pretrain.edit_captions": Bool(),
    "backbone.model.pretrain.position_init": OneOf("random", "sincos"),
    "backbone.model.pretrain.position_scale": RATE,
    "backbone.model.pretrain.threads": Int(lo=1, null=True),
}

METHOD = {
    "method.name": Str(),
    "method.stages": ListOf(Str(), min_len=1),
    "method.direction": OneOf("text", "learned"),
    "method.bidirectional": Bool(),
    "method.fusion": OneOf("image", "text", "sum"),
    "method.train": OneOf("adapter", "projections"),
    "method.loss": OneOf("margin", "infonce"),
    "method.mccl": Bool(),
    "method.sscl": Bool(),
    "method.sscl_views": POSITIVE,
    "method.prompt": Str(),
    "method.token_dir": Str(),
    "method.concepts.vocabulary": FILE,
    "method.phrases.file": FILE,
    "method.phrases.generator": OneOf("template", "lm"),
    "method.phrases.lm": Str(null=True),
    "method.phrases.per_concept": Int(lo=1, null=True),
    # SEARLE's unlabeled images: a dataset config (+dataset@method.unlabeled=imagenet)
    **{f"method.unlabeled.{key.removeprefix('dataset.')}": rule for key, rule in DATASET.items()},
    # every stage (method.<stage>.*)
    "method.*.max_epochs": COUNT,
    "method.*.checkpoint": FILE,
    "method.*.module.encoders": OneOf("both", "text", "image"),
    "method.*.module.train": OneOf("none", "adapter", "projections"),
    # hyperparameters, wherever they sit below method (a stage's module, method.oti, an optimiser)
    "method.**.lr": RATE,
    "method.**.min_lr": NONNEG,
    "method.*.module.scheduler.epochs": POSITIVE,  # BLIP4CIR+Bi: the cosine's period
    "method.**.weight_decay": NONNEG,
    "method.**.eps": RATE,
    "method.**.betas": ListOf(Float(lo=0, hi=1, hi_open=True), min_len=2, max_len=2),
    "method.**.batch_size": POSITIVE,
    "method.**.seed": SEED,
    "method.**.steps": POSITIVE,
    "method.**.ema_decay": Float(lo=0, hi=1),
    "method.**.lambda_cos": NONNEG,
    "method.**.lambda_gpt": NONNEG,
    "method.**.lambda_distil": NONNEG,
    "method.**.top_k": POSITIVE,
    "method.**.top_k_concepts": POSITIVE,
    "method.**.init_std": RATE,
    "method.**.save_every": POSITIVE,
    "method.**.logit_scale": RATE,
    "method.**.proj_lr_scale": RATE,
    "method.**.reverse_weight": NONNEG,
    "method.**.projection_dim": Int(lo=1, null=True),
    "method.**.hidden_dim": Int(lo=1, null=True),
    "method.**.dropout": PROB,
    "method.**.loss_weight_lr": RATE,
    "method.**.learn_t": Bool(),
    "method.**.margin": NONNEG,
    "method.**.adapter_ratio": Float(lo=0, hi=1),
    "method.**.adapter_reduction": POSITIVE,
    "method.**.init_temperature": RATE,
    "method.**.temperature": RATE,
    "method.**.image_splits": ListOf(Str(), min_len=1),
    "method.**.max_images": Int(lo=0, null=True),
    "method.**.token_norm": Either(OneOf(None, "oti"), RATE),
}

SCHEMA = {
    "seed": SEED,
    "run_name": Str(),
    "resume": Bool(),
    "num_workers": Either(COUNT, OneOf("auto")),
    "eval.batch_size": POSITIVE,
    "eval.gallery_on_disk": Bool(),
    "eval.visualize": Bool(),
    "eval.visualize_n": POSITIVE,
    "eval.visualize_k": POSITIVE,
    "retrieval.search": OneOf("exact", "faiss"),
    "retrieval.options.chunk": Int(lo=1, null=True),
    "retrieval.options.index_type": OneOf("flat", "ivf", "hnsw"),
    "retrieval.options.nlist": POSITIVE,
    "retrieval.options.nprobe": POSITIVE,
    "paths.*": Str(),
    "logger.project": Str(),
    "logger.offline": Bool(),
    **TRAINER,
    **DATASET,
    **BACKBONE,
    **METHOD,
}


def _regex(pattern: str) -> re.Pattern:
    parts = (
        r"[^.]+(\.[^.]+)*" if p == "**" else "[^.]+" if p == "*" else re.escape(p) for p in pattern.split(".")
    )
    return re.compile(r"\.".join(parts))


_PATTERNS = [(_regex(p), p) for p in SCHEMA]
_ALIAS = re.compile(r"\$\{(oc\.select:)?[\w.]+(,[^${}]*)?\}")  # the value is another key's: checked there


def pattern_of(key: str) -> str | None:
    """The SCHEMA entry a dotted key falls under (the first that matches), or None."""
    return next((p for regex, p in _PATTERNS if regex.fullmatch(key)), None)


def leaves(node: DictConfig, prefix: str = ""):
    """(dotted key, raw node) of every checked value: not `_`-keys, not aliases, not a group set to null
    that has entries below it (`logger: null`, `method.unlabeled: null`)."""
    for key in node:
        full = f"{prefix}{key}"
        if str(key).startswith("_"):
            continue
        child = node._get_node(key)
        raw = child._value()
        if isinstance(raw, str) and _ALIAS.fullmatch(raw):
            continue
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            if pattern_of(full) is None:  # a dict where a value belongs is a leaf, and wrong
                yield from leaves(child, full + ".")
            else:
                yield full, child
        elif not (raw is None and any(p.startswith(full + ".") for p in SCHEMA)):
            yield full, child


def validate(cfg: DictConfig) -> None:
    """Check every value that has a SCHEMA entry; one CirlabError lists every bad one."""
    problems = []
    for key, node in leaves(cfg):
        pattern = pattern_of(key)
        if pattern is None:
            continue  # `+key=value` extras (task arguments) and keys below a dict option
        rule = SCHEMA[pattern]
        if node._is_missing():
            problems.append(f"{key} must be set: {rule.allowed}")
            continue
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
        except OmegaConfBaseException as err:
            problems.append(f"{key}: {err}".splitlines()[0])
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        if not rule.accepts(value):
            shown = "null" if value is None else repr(value)
            problems.append(f"{key}={shown} is not allowed: {rule.allowed}")
    if problems:
        raise CirlabError("invalid config values:\n  " + "\n  ".join(problems))
