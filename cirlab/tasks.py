"""Non-training tasks of the `cirlab` CLI (`+task=NAME`)."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from cirlab.config_dir import CONF
from cirlab.data.check import check_images, format_report
from cirlab.errors import CirlabError


def check_data(cfg: DictConfig) -> None:
    """List what is missing or unreadable in a dataset, with the expected layout; exit 2 on problems."""
    source = instantiate(cfg.dataset.source)
    splits = list(cfg.get("splits") or ["train", cfg.dataset.val_split, cfg.dataset.test_split])
    usable = []
    for split in dict.fromkeys(splits):
        try:
            (source.train_queries() if split == "train" else source.eval_sets(split))
            usable.append(split)
        except CirlabError as err:
            print(f"split {split}: {err}")
    report = check_images(source, usable)
    print(f"dataset {cfg.dataset.name} ({', '.join(usable)}): {format_report(report)}")
    if source.detected:
        print(f"detected layout: {source.detected}")
    if not report.ok:
        print("a run with dataset.missing_images=skip leaves out the queries and gallery images they break")
    if not report.ok or len(usable) < len(dict.fromkeys(splits)):
        if source.layout:
            print(f"expected layout:\n{source.layout}")
        sys.exit(2)


def report(cfg: DictConfig) -> None:
    """Leaderboard of finished runs: `cirlab +task=report [+runs=[DIR,...]]` (default: all of paths.output_dir)."""
    from cirlab.report import report as leaderboard

    runs = cfg.get("runs") or [cfg.paths.output_dir]
    print(
        leaderboard([runs] if isinstance(runs, str) else list(runs), "csv" if cfg.get("csv") else "markdown")
    )


def export(cfg: DictConfig) -> None:
    """A finished run's trained weights in their authors' layouts (tuned_clip.pt, combiner.pt, phi.pt, ...),
    so they can be handed to the reference code or loaded back with backbone.checkpoint /
    method.<stage>.checkpoint: `cirlab +task=export +run=RUN_DIR [+out=DIR]` (default RUN_DIR/reference)."""
    from hydra.utils import get_class

    from cirlab.io import load_torch, read_json, save_torch
    from cirlab.trusted import read_results

    if not cfg.get("run"):
        raise CirlabError("name the run folder: cirlab +task=export +run=outputs/runs/<run> [+out=DIR]")
    run = Path(cfg.run)
    if not (run / "results.json").is_file():
        raise CirlabError(f"{run} is not a finished cirlab run (no results.json)")
    config = read_results(run / "results.json")["config"]  # the run folder is data: its targets checked
    if "method" not in config:
        raise CirlabError(f"{run} is not a training run (no method in its results.json config)")
    out = Path(cfg.get("out") or run / "reference")
    written = 0
    for stage in config["method"]["stages"]:
        done = run / "stages" / stage / "done.json"
        record = read_json(done)
        if not isinstance(record, dict):
            raise CirlabError(f"{done} is not a stage record; is it damaged?")
        if not record.get("best_checkpoint"):
            print(f"stage {stage}: not trained in this run, nothing to export")
            continue
        ckpt = load_torch(record["best_checkpoint"])
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "epoch" not in ckpt:
            raise CirlabError(f"{record['best_checkpoint']} (from {done}) is not a Lightning checkpoint")
        files = get_class(config["method"][stage]["module"]["_target_"]).reference_files(
            ckpt["state_dict"], int(ckpt["epoch"])
        )
        if not files:
            print(f"stage {stage}: its method has no reference layout to export")
        for name, obj in files.items():
            save_torch(out / name, obj)
            written += 1
            print(f"stage {stage}: {out / name}")
    if not written:
        raise CirlabError(f"nothing to export from {run}")


def convert_blip(cfg: DictConfig) -> None:
    """BLIP's own checkpoint (e.g. model_base.pth, where BLIP4CIR+Bi starts) -> a save_pretrained folder:
    `cirlab +task=convert_blip +src=model_base.pth +out=DIR [+tokenizer=bert-base-uncased|DIR]`, then
    `backbone=blip_base backbone.hf_id=DIR`. The sizes come from the file; head width, image size (the
    position embedding is resized to it), eps and dropout from the chosen backbone's BLIP architecture,
    else blip_base's (e.g. backbone=blip_base backbone.architecture.vision_config.image_size=224)."""
    from omegaconf import OmegaConf

    from cirlab.backbones.blip_convert import convert_blip_checkpoint

    if not cfg.get("src") or not cfg.get("out"):
        raise CirlabError(
            "name the checkpoint and the folder to write: "
            "cirlab +task=convert_blip +src=model_base.pth +out=DIR"
        )
    architecture = (
        cfg.backbone.get("architecture") or OmegaConf.load(CONF / "backbone" / "blip_base.yaml").architecture
    )
    dropped = convert_blip_checkpoint(
        cfg.src, cfg.out, architecture, tokenizer=cfg.get("tokenizer") or "bert-base-uncased"
    )
    for why, keys in dropped.items():
        print(f"not used ({why}): {len(keys)} tensors, e.g. {keys[0]}")
    print(f"wrote {cfg.out}: use it with backbone=blip_base backbone.hf_id={cfg.out}")


def prepare(cfg: DictConfig) -> None:
    """Build what a run would build first, and stop: the dataset (the synthetic benchmark is generated)
    and the backbone (backbone=tiny/blip_tiny are pretrained), both into the cache. Before a parallel
    sweep, on a login node, or beside other work: `cirlab +task=prepare [dataset=...] [backbone=...]`."""
    import time

    start = time.time()
    source = instantiate(cfg.dataset.source)
    print(f"dataset {cfg.dataset.name} ready in {time.time() - start:.0f} s: {getattr(source, 'root', '')}")
    start = time.time()
    instantiate(cfg.backbone.model)
    print(f"backbone {cfg.backbone.name} ready in {time.time() - start:.0f} s")


def caption(cfg: DictConfig) -> None:
    """FTI4CIR's subject/attribute training file from an image folder, captioned by BLIP: `cirlab
    +task=caption +images=DIR +out=pairs.json [+captioner=HUB_ID|DIR] [+tagger=spacy|synthetic]`."""
    from cirlab.captioning import caption_folder

    caption_folder(cfg)


TASKS = {
    "check_data": check_data,
    "report": report,
    "export": export,
    "convert_blip": convert_blip,
    "prepare": prepare,
    "caption": caption,
}


def run_task(cfg: DictConfig):
    if cfg.task not in TASKS:
        raise CirlabError(f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    return TASKS[cfg.task](cfg)
