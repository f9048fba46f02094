"""A run folder is data: what `cirlab.load`, `cirlab-demo RUN` and `+task=export` build from it is limited to
the targets cirlab's configs name.

A run's `.hydra/config.yaml` and `results.json` hold `_target_` strings that Hydra would import and call.
Hydra's own policy blocks `subprocess`, `os.system`, `exec` and the like, but not every callable with side
effects (a `{_target_: shutil.copyfile, src: ..., dst: ...}` writes the file), so a run folder someone shared
could run code the way a pickled checkpoint could. Weight files are read with `weights_only=True`; configs
are read here: every `_target_` must be one of cirlab's own classes (methods, backbones, sources,
datamodules, loggers), one of the factories its configs name, a torch.optim optimiser or scheduler, or
Lightning's Trainer / CSVLogger. The checks run before anything is imported or called. Configs given on
the command line are the user's own and are not checked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cirlab.errors import CirlabError

# cirlab functions the configs name (a function is allowed by name; classes by their base, below)
FUNCTIONS = frozenset(
    {
        "cirlab.pretrain.pretrained_tiny",
        "cirlab.pretrain.pretrained_blip_tiny",
        "cirlab.data.sources.synthetic.synthetic_source",
        "cirlab.data.sources.captions.synthetic_captions",
        "cirlab.data.sources.captions.jsonl_captions",
        "cirlab.data.sources.captions.flickr30k_source",
        "cirlab.data.sources.captions.coco_source",
        "cirlab.methods.blip4cir.encoder_cosine",
    }
)
# library classes the configs name, besides torch.optim's optimisers and schedulers
CLASSES = frozenset({"lightning.Trainer", "lightning.pytorch.Trainer", "lightning.pytorch.loggers.CSVLogger"})
# (prefix of the target, the module its class must come from, the bases it must subclass)
FAMILIES = (
    (
        "cirlab.",
        "cirlab.",
        (
            "cirlab.methods.retrieval_module.RetrievalModule",
            "cirlab.backbones.base.Backbone",
            "cirlab.data.sources.base.CIRSource",
            "cirlab.data.sources.captions.CaptionSource",
            "cirlab.data.datamodule.CIRDataModule",
            "lightning.pytorch.loggers.Logger",
        ),
    ),
    ("torch.optim.", "torch.optim.", ("torch.optim.Optimizer", "torch.optim.lr_scheduler.LRScheduler")),
)
KINDS = "cirlab's own classes, the factories its configs name, torch.optim optimisers and schedulers, " + (
    ", ".join(sorted(CLASSES))
)


def _locate(path: str) -> Any:
    from hydra.utils import get_object

    return get_object(path)


def allowed(target: object) -> bool:
    """Whether a run folder may name `target`. Only names under cirlab. and torch.optim. are imported to
    check their class; anything else is refused (or allowed, CLASSES and FUNCTIONS) by its name alone."""
    if not isinstance(target, str):
        return False
    if target in FUNCTIONS or target in CLASSES:
        return True
    for prefix, module, bases in FAMILIES:
        if not target.startswith(prefix) or any(part.startswith("_") for part in target.split(".")):
            continue
        try:
            obj = _locate(target)
            base_classes = tuple(_locate(b) for b in bases)
        except Exception:  # noqa: BLE001 -- names nothing importable: refused like any other
            return False
        return isinstance(obj, type) and obj.__module__.startswith(module) and issubclass(obj, base_classes)
    return False


def targets(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """(key, value) of every `_target_` in a plain (resolved) config: mappings and lists, any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            name = f"{where}.{key}" if where else str(key)
            if key == "_target_":
                yield name, value
            else:
                yield from targets(value, name)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from targets(value, f"{where}[{i}]")


def resolved(cfg: Any, file: Path | str) -> Any:
    """The config as plain containers with its interpolations resolved, as instantiate would see them
    (a resolver such as oc.create can make a `_target_` that the file does not spell out)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = cfg if OmegaConf.is_config(cfg) else OmegaConf.create(cfg)
        return OmegaConf.to_container(cfg, resolve=True)
    except (OmegaConfBaseException, ValueError, TypeError) as err:
        raise CirlabError(
            f"{file}: the run's config does not resolve ({type(err).__name__}: {err})"
        ) from None


def check_targets(cfg: Any, file: Path | str) -> None:
    """CirlabError naming the key, the target and `file` for any `_target_` a run folder may not build."""
    for key, target in targets(resolved(cfg, file)):
        if not allowed(target):
            raise CirlabError(
                f"{file}: {key}={target!r} is not something a run folder may build ({KINDS}): a run folder "
                "is read as data. If you wrote this config and trust the target, run it through the "
                "`cirlab` command line instead; otherwise the run folder has been tampered with."
            )


def _need(ok: bool, file: Path, what: str) -> None:
    if not ok:
        raise CirlabError(f"{file} is not a cirlab run's config: {what}. Is it damaged or from another tool?")


def check_structure(config: Any, file: Path) -> None:
    """The parts of a run's config that loading reads before anything else, with the file named."""
    _need(isinstance(config, dict), file, "it holds no mapping of settings")
    method = config.get("method")
    if method is None:
        return  # not a training run: the caller says so
    _need(isinstance(method, dict), file, "`method` is not a mapping")
    stages = method.get("stages")
    _need(
        isinstance(stages, list) and stages and all(isinstance(s, str) for s in stages),
        file,
        "`method.stages` is not a list of stage names",
    )
    for stage in stages:
        module = method.get(stage, {}).get("module") if isinstance(method.get(stage), dict) else None
        _need(isinstance(module, dict), file, f"`method.{stage}.module` is missing")
        _need(isinstance(module.get("_target_"), str), file, f"`method.{stage}.module._target_` is missing")


def read_run_config(path: Path):
    """A run's `.hydra/config.yaml` as a DictConfig, refused (CirlabError naming it) when it does not parse,
    lacks what loading reads or names a target a run folder may not build."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    try:
        cfg = OmegaConf.load(path)
    except (OSError, UnicodeDecodeError, YAMLError, OmegaConfBaseException) as err:
        raise CirlabError(f"{path} is not a readable run config ({type(err).__name__}: {err})") from None
    _need(isinstance(cfg, DictConfig), path, "it holds no mapping of settings")
    container = resolved(cfg, path)
    check_structure(container, path)
    _need(
        "method" not in container or isinstance((container.get("backbone") or {}).get("model"), dict),
        path,
        "`backbone.model` is missing",
    )
    check_targets(container, path)
    return cfg


def read_results(path: Path) -> dict:
    """A run's `results.json` (its `config` resolved), refused as read_run_config refuses the config."""
    try:
        results = json.loads(Path(path).read_bytes())
    except OSError as err:
        raise CirlabError(f"cannot read {path}: {err}") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise CirlabError(f"{path} is not valid JSON ({err}): the run's results are damaged") from None
    _need(isinstance(results, dict) and isinstance(results.get("config"), dict), path, "it has no `config`")
    check_structure(results["config"], path)
    check_targets(results["config"], path)
    return results
