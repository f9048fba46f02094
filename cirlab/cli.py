"""`cirlab`: the Hydra entry point. Exit 2 with a one-line message for what the user can fix (no traceback
unless HYDRA_FULL_ERROR=1), exit 1 with the traceback for a bug; a usage message when no method is given,
and a results table at the end."""

from __future__ import annotations

import os

# Before torch loads: idle OpenMP threads sleep instead of spinning. On a shared or small CPU a spinning
# thread steals the core its partner needs, and every parallel op then waits a scheduler tick:
# bench/encode_workers.py measures 3.5-4.7x faster encoding on 2 cores, with bit-identical features.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hashlib  # noqa: E402
import logging
import sys
import traceback
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException
from omegaconf import DictConfig, OmegaConf

from cirlab.config_dir import CONF
from cirlab.distributed import rank_overrides
from cirlab.errors import CirlabError, exit_on_user_error
from cirlab.schema import validate


def short_dirname(name: str, limit: int = 160) -> str:
    """A sweep job's folder name from its overrides, cut to `limit` bytes plus an 8-digit hash of the
    whole: a multirun with many overrides otherwise stops on the file system's 255-byte name limit."""
    if len(name.encode()) <= limit:
        return name
    cut = name.encode()[:limit].decode(errors="ignore")
    return f"{cut}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


OmegaConf.register_new_resolver("cirlab_dirname", short_dirname, replace=True)  # conf/config.yaml

# conf/hydra/launcher/submitit_*.yaml set the submitit plugin's keys under its names, on its schema (wanted)
warnings.filterwarnings("ignore", message=r"(?s).*validated against ConfigStore schema with the same name")

HYDRA = Path(hydra.__file__).parent
log = logging.getLogger("cirlab")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def usage() -> str:
    return (
        "cirlab: composed image retrieval experiments.\n"
        f"  methods:     {', '.join(options('method'))}\n"
        f"  datasets:    {', '.join(options('dataset'))}\n"
        f"  backbones:   {', '.join(options('backbone'))}\n"
        f"  experiments: {', '.join(options('experiment')) or '(none)'}\n"
        "Choose a method with method=NAME (or a checked-in experiment with +experiment=NAME), e.g.\n"
        "  cirlab method=clip4cir dataset=synthetic backbone=tiny\n"
        "Tasks: +task=check_data (verify a dataset's files), +task=report (leaderboard of runs),\n"
        "       +task=export +run=DIR (a run's weights in the authors' layouts),\n"
        "       +task=convert_blip +src=model_base.pth +out=DIR (BLIP's pretraining file -> HF folder),\n"
        "       +task=prepare (generate the dataset and pretrain the backbone into the cache, nothing else).\n"
        "Released weights: backbone.checkpoint=FILE, method.<stage>.checkpoint=FILE (see the README).\n"
        "Resume an interrupted run: hydra.run.dir=RUN_FOLDER resume=true.\n"
        "Any config value can be overridden (key=value); sweeps with -m. Full config: cirlab method=X --cfg job"
    )


def print_table(results: dict) -> None:
    metrics = results["metrics"]
    if not metrics:
        print("no metrics (split without public answers): see the prediction/submission files")
        return
    width = max(len(k) for k in metrics)
    print(f"\nResults: {results['method']} on {results['dataset']} ({results['backbone']})")
    print(f"  {'metric'.ljust(width)}  value")
    for key, value in metrics.items():
        print(f"  {key.ljust(width)}  {value:6.2f}")
    reported = results.get("reported_split")
    for stage, how in results.get("selection", {}).items():
        note = (
            " (the reported split: not held out)" if reported and how.startswith(f"best {reported}/") else ""
        )
        print(f"  stage {stage}: weights = {how}{note}")
    if "skipped_images" in results:
        from cirlab.data.sources.readable import describe

        print(f"  skipped (dataset.missing_images=skip), skipped/all: {describe(results['skipped_images'])}")
    phases = results.get("phase_wall_time_s")
    if phases:
        spent = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items())
        print(f"  wall time {results['wall_time_s']:.0f} s: {spent}")


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
def _main(cfg: DictConfig) -> float | None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":  # every error with its traceback
        return _dispatch(cfg)
    with exit_on_user_error("cirlab"):
        return _dispatch(cfg)


def _dispatch(cfg: DictConfig) -> float | None:
    # frozen backbones are in eval mode on purpose (the reference keeps BatchNorm statistics frozen)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # Lightning prints through its own handler; without this Hydra's root handler repeats every line
    logging.getLogger("lightning.pytorch").propagate = False
    validate(cfg, HydraConfig.get())  # every bad value and `+key` at once, before data or models
    task = cfg.get("task")
    if task:
        from cirlab.tasks import run_task

        return run_task(cfg)
    if "method" not in cfg:
        print(usage(), file=sys.stderr)
        sys.exit(2)
    from cirlab.pipeline import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    results = run(cfg, run_dir)
    print_table(results)
    print(f"run folder: {run_dir}")
    return results["metrics"].get(results["main_metric"])


def hydra_args(args: list[str]) -> list[str]:
    """The command line as Hydra should read it. `+method=X` means `method=X`: the defaults list holds
    `method: null` (so a method's config can choose its default dataset or backbone), where Hydra
    refuses an append. `ckpt_path=` (Lightning's resume argument) is answered with cirlab's switch."""
    for arg in args:
        if arg.lstrip("+").startswith("ckpt_path="):
            raise CirlabError(
                f"{arg}: cirlab resumes a run with resume=true (and hydra.run.dir=<run folder>); "
                "weights from a file: method.<stage>.checkpoint=FILE or backbone.checkpoint=FILE"
            )
    return [arg[1:] if arg.startswith("+method=") else arg for arg in args]


def user_error(err: BaseException) -> bool:
    """What the user can fix: cirlab's own errors and Hydra's config errors (unknown override, missing
    group option, a `_target_` that names nothing or gets arguments it does not take, a package not
    installed). An error raised by a target's own code, or by its module's import, is a bug, even when
    Hydra reports it as a one-line instantiation error."""
    cause = err.__cause__
    if isinstance(err, InstantiationException) and cause is not None:
        if isinstance(cause, (CirlabError, InstantiationException)):
            return user_error(cause)
        tb = cause.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is None or not Path(tb.tb_frame.f_code.co_filename).is_relative_to(HYDRA):
            return False  # raised inside the target
        imported = cause.__cause__  # Hydra's "Error locating target" wraps what the import raised
        return imported is None or isinstance(imported, (ModuleNotFoundError, AttributeError))
    return isinstance(err, (CirlabError, CompactHydraException))


def exit_code(exc: SystemExit) -> int | str | None:
    """Hydra ends every failure with exit 1, having printed a config error's message or anything else's
    traceback; the exception it handled is the exit's context. A user's error exits 2, a bug 1."""
    err = exc.__context__
    if exc.code != 1 or isinstance(err, KeyboardInterrupt):  # (Lightning exits 1 on Ctrl-C)
        return exc.code
    if err is None or user_error(err):  # (no exception: Hydra's own refusals, e.g. an unknown --package)
        return 2
    if isinstance(err, InstantiationException):  # Hydra printed one line: show where the bug is
        traceback.print_exception(err.__cause__, file=sys.stderr)
    print(
        "cirlab: unexpected error (traceback above); unless your setup caused it, please report it",
        file=sys.stderr,
    )
    return 1


def main() -> None:
    if any(a in ("--help", "-h") for a in sys.argv[1:]) and not any(
        a.startswith("--hydra-help") for a in sys.argv
    ):
        print(usage())
        return
    with exit_on_user_error("cirlab"):
        sys.argv[1:] = hydra_args(sys.argv[1:])
        sys.argv += rank_overrides(sys.argv[1:])  # torchrun/srun: one run folder, written by rank 0
    try:
        with exit_on_user_error("cirlab"):
            _main()
    except SystemExit as exc:
        sys.exit(exit_code(exc))


if __name__ == "__main__":
    main()
