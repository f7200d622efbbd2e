"""Observers of a run: W&B, or nothing. Training is complete without them, and their failures are not fatal."""

from __future__ import annotations

from typing import Any


class NullLogger:
    """``logger=none``: the files in the run directory are the whole record."""

    def log_epoch(self, row: dict[str, Any]) -> None:
        pass

    def log_summary(self, summary: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def build_logger(cfg, run_dir, resolved_config: dict[str, Any], run_name: str, *, resuming: bool = False):
    """The chosen logger; `resuming`: the job goes on from a checkpoint (W&B continues its run)."""
    if cfg.name == "wandb":
        from normlab.loggers.wandb import WandbLogger

        return WandbLogger(cfg, run_dir, resolved_config, run_name, resuming)
    return NullLogger()
