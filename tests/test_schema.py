"""The config schema (cirlab/schema.py): every key of every conf/ group and experiment has an entry, every
entry refuses a value of the wrong type and one out of its range with a message naming the key, the value
and what is allowed, a `+key=value` that adds a key nothing reads is refused naming the nearest keys, and
the CLI stops on all of these before any data or model is touched."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cirlab.errors import CirlabError
from cirlab.schema import SCHEMA, TASK_ARGUMENTS, Either, ListOf, OneOf, Value, entry_of, leaves, validate

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
NULL_GROUPS = ("logger", "method.unlabeled")  # logger=none, SEARLE's own images: a group set to null


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


def composed(*overrides: str):
    """(config, Hydra's config) of `cirlab OVERRIDES...`, as the CLI's validate sees them."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        full = compose("config", overrides=list(overrides), return_hydra_config=True)
    return OmegaConf.masked_copy(full, [k for k in full if k != "hydra"]), full.hydra


def test_every_conf_key_has_a_schema_entry_and_every_default_is_valid(configs):
    unchecked = {}
    for overrides, cfg in configs:
        for key, raw in leaves(cfg):
            if entry_of(key) is None and not (raw is None and key in NULL_GROUPS):
                unchecked[key] = overrides
        validate(cfg)
    assert not unchecked, f"add these keys to cirlab/schema.py SCHEMA (key: where): {unchecked}"


# Either rules: (wrong type, out of range), written out as their alternatives make generic values ambiguous
EITHER_BAD = {"devices": (["x"], 0), "token_norm": ([1.0], -1.0), "num_workers": ("many", -1)}


def bad_values(entry: str, rule) -> tuple[object, object | None]:
    """(a value of the wrong type, one of the right type out of range or None where there is no range),
    from the rule's declared type and bounds."""
    if isinstance(rule, Either):
        return EITHER_BAD[entry]
    if isinstance(rule, Value):
        wrong = "x" if rule.type in (int, float) else "yes" if rule.type is bool else 5
        if rule.lo is not None:
            return wrong, (rule.lo if rule.lo_open else rule.lo - 1)
        return wrong, (rule.hi + 1 if rule.hi is not None else None)
    if isinstance(rule, OneOf):
        return [1], "no-such-choice"
    if isinstance(rule, ListOf):
        wrong_item = bad_values("", rule.item)
        return "x", ([] if rule.min_len else [wrong_item[1] if wrong_item[1] is not None else wrong_item[0]])
    raise AssertionError(f"no bad values for {type(rule).__name__}: teach this test the new rule kind")


def every_key(node: dict, prefix: str = ""):
    """Every dotted key below a plain dict, interpolations included (a user may set paths.root_dir)."""
    for key, value in node.items():
        yield from every_key(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]


def test_every_schema_entry_refuses_a_wrong_type_and_an_out_of_range_value(configs):
    keys = {key for _, cfg in configs for key in every_key(OmegaConf.to_container(cfg, resolve=False))}
    found = {entry_of(key): key for key in sorted(keys)}
    found.setdefault("n_pretrain", "dataset.source.n_pretrain")  # synthetic_captions' generator, added with +
    unused = [e for e in SCHEMA if e not in found]
    assert not unused, f"schema entries that match no key of conf/: {unused}"
    for entry, rule in SCHEMA.items():
        key = found[entry]
        for value in bad_values(entry, rule):
            if value is None:
                continue
            bad = OmegaConf.create()  # the key alone: each is checked on its own
            OmegaConf.update(bad, key, value, force_add=True)
            with pytest.raises(CirlabError) as err:
                validate(bad)
            message = str(err.value)
            assert f"{key}={value!r} is not allowed: {rule.allowed}" in message, (entry, message)


def test_choices_and_bounds_match_the_code():
    from cirlab.data import synthetic
    from cirlab.data.sources.fashioniq import CATEGORIES
    from cirlab.data.transforms import PREPROCESS_MODES
    from cirlab.methods import blip4cir, clip4cir, crossmodal, zeroshot

    choices = {
        "fusion": zeroshot.FUSIONS,
        "direction": blip4cir.DIRECTIONS,
        "encoders": clip4cir.ENCODERS,
        "module.train": crossmodal.TRAIN_MODES,
        "method.train": crossmodal.TRAIN_MODES[1:],
        "loss": crossmodal.LOSSES,
        "preprocess": PREPROCESS_MODES,
        "style": tuple(synthetic.STYLES),
        "categories": CATEGORIES,
    }
    for entry, values in choices.items():
        rule = SCHEMA[entry]
        assert (rule.item if isinstance(rule, ListOf) else rule).choices == tuple(values), entry
    assert SCHEMA["slots"].hi == max(synthetic.SLOT_NAMES)
    assert SCHEMA["n_colors"].hi == len(synthetic.COLORS)
    assert SCHEMA["n_shapes"].hi == len(synthetic.SHAPES)


def test_a_name_has_one_rule_wherever_it_sits_and_interpolations_are_checked_at_their_source():
    assert entry_of("method.finetune.module.optimizer.lr") == entry_of("backbone.model.pretrain.lr") == "lr"
    assert (
        entry_of("method.zeroshot.module.train") == "module.train"
        and entry_of("method.train") == "method.train"
    )
    assert entry_of("backbone.model.model_cfg.vision_cfg.layers") == "vision_cfg.layers"
    assert entry_of("backbone.model.model_cfg.text_cfg.layers") == "layers"
    validate(OmegaConf.create({"seed": 1, "method": {"oti": {"seed": "${seed}"}}, "task_argument": [1, "x"]}))
    with pytest.raises(CirlabError, match=r"seed=-1 is not allowed"):
        validate(OmegaConf.create({"seed": -1, "method": {"oti": {"seed": "${seed}"}}}))


def test_every_task_argument_is_one_that_the_tasks_read():
    text = "".join((ROOT / "cirlab" / name).read_text() for name in ("tasks.py", "captioning.py"))
    read = set(re.findall(r"cfg\.get\(\"(\w+)\"\)|cfg\.(\w+)\b", text))
    read = {a or b for a, b in read}
    assert set(TASK_ARGUMENTS) <= read, set(TASK_ARGUMENTS) - read


def test_documented_additions_pass():
    """Group selections, task arguments and arguments of a `_target_` may be added with `+`."""
    cfg, hydra = composed(
        "method=searle",
        "+dataset@method.unlabeled=imagenet",
        "+task=report",
        "+runs=[a]",
        "+splits=[val]",
        "+trainer.limit_train_batches=3",
        "+dataset.source.n_pretrain=300",  # the generator takes **settings: it names a misspelt one itself
        "++no_such.key=1",  # `++` adds unchecked
    )
    validate(cfg, hydra)
    validate(*composed("+experiment=clip4cir_synthetic", "+method.combiner.module.gather_negatives=true"))


def test_a_misspelt_addition_is_refused_naming_the_nearest_keys():
    with pytest.raises(CirlabError) as err:
        validate(*composed("method=clip4cir", "+method.combiner.lrr=1", "+trainer.limit_train_batchs=3"))
    message = str(err.value)
    assert (
        "+method.combiner.lrr=1: no config has method.combiner.lrr (nearest: method.combiner.module.optimizer.lr"
        in (message)
    )
    assert (
        "+trainer.limit_train_batchs=3: lightning.Trainer takes no argument 'limit_train_batchs' (nearest: "
        in (message)
    )
    assert "trainer.limit_train_batches" in message


def test_cli_stops_on_bad_values_before_touching_data(cli, tmp_path):
    code, out, err = cli(
        "method=zeroshot",
        "dataset=fashioniq",
        f"dataset.root={tmp_path / 'absent'}",
        "trainer.devices=0",
        "method.eval.batch_size=abc",
        "dataset.missing_images=ignore",
        "backbone.checkpoint=7",
        "+method.eval.batch_sise=8",
    )
    assert code == 2 and "Traceback" not in err
    assert "trainer.devices=0 is not allowed: an integer >= 1" in err
    assert "method.eval.batch_size='abc' is not allowed: an integer >= 1" in err
    assert "dataset.missing_images='ignore' is not allowed: one of error, skip" in err
    assert "backbone.checkpoint=7 is not allowed: a string or null" in err
    assert (
        "+method.eval.batch_sise=8: no config has method.eval.batch_sise (nearest: method.eval.batch_size"
        in err
    )
    assert "dataset root" not in err and not (tmp_path / "run" / "results.json").exists()


def test_a_required_value_left_unset(cli):
    code, out, err = cli("method=zeroshot", "dataset=jsonl")
    assert code == 2 and "dataset.path must be set: a string" in err
