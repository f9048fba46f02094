"""The config schema (cirlab/schema.py): every key of every conf/ group and experiment has an entry, every
entry refuses a value of the wrong type and one out of its range with a message naming the key, the value
and what is allowed, and the CLI stops on bad values before any data or model is touched."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cirlab.errors import CirlabError
from cirlab.schema import SCHEMA, Either, Float, Int, ListOf, OneOf, Plain, leaves, pattern_of, validate

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def combos() -> list[list[str]]:
    """Every option of every group once, every experiment, and the documented extras."""
    out = [[f"method={m}"] for m in options("method")] + [[f"+experiment={e}"] for e in options("experiment")]
    for group in ("dataset", "backbone", "trainer", "logger"):
        out += [["method=zeroshot", f"{group}={o}"] for o in options(group)]
    out += [
        ["method=searle", "+dataset@method.unlabeled=imagenet"],
        ["method=zeroshot", "retrieval.search=faiss", "retrieval.options.index_type=ivf"]
        + ["retrieval.options.nlist=8", "retrieval.options.nprobe=2"],
        ["method=zeroshot", "retrieval.options.chunk=1024", "eval.visualize=false"],
    ]
    for c in out:  # the datasets of your own data have no default folder
        if any(o in c for o in ("dataset=jsonl", "dataset=captions_jsonl")):
            c.append("dataset.path=/data")
    return out


@pytest.fixture(scope="module")
def configs():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return [(c, compose("config", overrides=c)) for c in combos()]


def test_every_conf_key_has_a_schema_entry_and_every_default_is_valid(configs):
    unchecked = {}
    for overrides, cfg in configs:
        unchecked.update({key: overrides for key, _ in leaves(cfg) if pattern_of(key) is None})
        validate(cfg)
    assert not unchecked, f"add these keys to cirlab/schema.py SCHEMA (key: where): {unchecked}"


# Either rules: (wrong type, out of range), written out as their alternatives make generic values ambiguous
EITHER_BAD = {
    "trainer.devices": (["x"], 0),
    "method.**.token_norm": ([1.0], -1.0),
    "num_workers": ("many", -1),
}


def bad_values(pattern: str, rule) -> tuple[object, object | None]:
    """(a value of the wrong type, one of the right type out of range or None where there is no range),
    from the rule's declared type and bounds."""
    if isinstance(rule, Either):
        return EITHER_BAD[pattern]
    if isinstance(rule, Int):
        return "x", (rule.lo - 1 if rule.lo is not None else rule.hi + 1)
    if isinstance(rule, Float):
        if rule.lo is not None:
            return "x", (rule.lo if rule.lo_open else rule.lo - 1)
        return "x", rule.hi + 1
    if isinstance(rule, Plain):  # a bool or a string
        return ("yes" if rule.type is bool else 5), None
    if isinstance(rule, OneOf):
        return [1], "no-such-choice"
    if isinstance(rule, ListOf):
        wrong_item = bad_values("", rule.item)
        return "x", ([] if rule.min_len else [wrong_item[1] if wrong_item[1] is not None else wrong_item[0]])
    raise AssertionError(f"no bad values for {type(rule).__name__}: teach this test the new rule kind")


def concrete_keys(configs) -> dict[str, str]:
    """pattern -> a key of conf/ it matches; a pattern without wildcards is its own key."""
    found = {pattern_of(key): key for _, cfg in configs for key, _ in leaves(cfg)}
    return found | {p: p for p in SCHEMA if "*" not in p and p not in found}


def test_every_schema_entry_refuses_a_wrong_type_and_an_out_of_range_value(configs):
    found = concrete_keys(configs)
    unused = [p for p in SCHEMA if p not in found]
    assert not unused, f"schema entries that match no key of conf/: {unused}"
    for pattern, rule in SCHEMA.items():
        key = found[pattern]
        for value in bad_values(pattern, rule):
            if value is None:
                continue
            bad = OmegaConf.create()  # the key alone: the patterns match keys, not their neighbours
            OmegaConf.update(bad, key, value, force_add=True)
            with pytest.raises(CirlabError) as err:
                validate(bad)
            message = str(err.value)
            assert f"{key}={value!r} is not allowed: {rule.allowed}" in message, (pattern, message)


def test_choices_and_bounds_match_the_code():
    from cirlab.data import synthetic
    from cirlab.data.sources.fashioniq import CATEGORIES
    from cirlab.data.transforms import PREPROCESS_MODES
    from cirlab.methods import blip4cir, clip4cir, crossmodal, zeroshot

    choices = {
        "method.fusion": zeroshot.FUSIONS,
        "method.direction": blip4cir.DIRECTIONS,
        "method.*.module.encoders": clip4cir.ENCODERS,
        "method.*.module.train": crossmodal.TRAIN_MODES,
        "method.train": crossmodal.TRAIN_MODES[1:],
        "method.loss": crossmodal.LOSSES,
        "dataset.preprocess": PREPROCESS_MODES,
        "dataset.source.style": tuple(synthetic.STYLES),
        "dataset.source.categories": CATEGORIES,
    }
    for pattern, values in choices.items():
        rule = SCHEMA[pattern]
        assert (rule.item if isinstance(rule, ListOf) else rule).choices == tuple(values), pattern
    assert SCHEMA["dataset.source.slots"].hi == max(synthetic.SLOT_NAMES)
    assert SCHEMA["dataset.source.n_colors"].hi == len(synthetic.COLORS)
    assert SCHEMA["dataset.source.n_shapes"].hi == len(synthetic.SHAPES)


def test_aliases_and_unknown_extras_are_not_checked(configs):
    cfg = copy.deepcopy(configs[0][1])
    OmegaConf.update(cfg, "task_argument", [1, "x"], force_add=True)  # +key=value extras of tasks
    validate(cfg)
    assert pattern_of("method.finetune.module.lr") == pattern_of("method.oti.lr") == "method.**.lr"
    assert pattern_of("backbone.model.model_cfg.vision_config.patch_size") == (
        "backbone.**.vision_config.patch_size"
    )


def test_cli_stops_on_bad_values_before_touching_data(cli, tmp_path):
    code, out, err = cli(
        "method=zeroshot",
        "dataset=fashioniq",
        f"dataset.root={tmp_path / 'absent'}",
        "trainer.devices=0",
        "method.eval.batch_size=abc",
        "dataset.missing_images=ignore",
        "backbone.checkpoint=7",
    )
    assert code == 2 and "Traceback" not in err
    assert "trainer.devices=0 is not allowed: an integer >= 1" in err
    assert "method.eval.batch_size='abc' is not allowed: an integer >= 1" in err
    assert "dataset.missing_images='ignore' is not allowed: one of error, skip" in err
    assert "backbone.checkpoint=7 is not allowed: a string or null" in err
    assert "dataset root" not in err and not (tmp_path / "run" / "results.json").exists()


def test_a_required_value_left_unset(cli):
    code, out, err = cli("method=zeroshot", "dataset=jsonl")
    assert code == 2 and "dataset.path must be set: a string" in err
