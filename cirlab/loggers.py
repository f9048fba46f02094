"""Loggers that a stage must close: `conf/logger/*.yaml` names them, the pipeline calls `close()`."""

from __future__ import annotations

from lightning.pytorch.loggers import WandbLogger


class StageWandbLogger(WandbLogger):
    """One wandb run per stage. wandb keeps one active run per process and Lightning's logger attaches
    to it, so without `close()` the next stage would log into this stage's run."""

    def close(self) -> None:
        import wandb

        wandb.finish()
