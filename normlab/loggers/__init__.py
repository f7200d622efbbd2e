"""Observers of a run: W&B, or nothing. Training is complete without them, and their failures are not fatal."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from normlab.run_spec import RunSpec


class NullLogger:
    """``logger=none``: the files in the run directory are the whole record."""

    def log_epoch(self, row: dict[str, Any]) -> None:
        pass

    def log_summary(self, summary: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def build_logger(spec: RunSpec, run_dir, *, resuming: bool = False):
    """The logger `spec` chose; `resuming`: the job goes on from a checkpoint (W&B continues its run)."""
    if spec.logger.name == "wandb":
        from normlab.loggers.wandb import WandbLogger

        return WandbLogger(spec, run_dir, resuming)
    return NullLogger()
