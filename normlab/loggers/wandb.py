"""Weights & Biases: one run per job, offline by default; never fatal.

wandb is imported only here, when ``logger=wandb`` is chosen, so ``logger=none`` runs without it.
Any W&B failure (not installed, no key, no network, an init error) warns once and turns the
logger off; the results on disk are complete either way.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


class WandbLogger:
    def __init__(self, cfg, run_dir, resolved_config: dict[str, Any], run_name: str) -> None:
        self.run = None
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity, group=resolved_config.get("name"),
                job_type=resolved_config["norm"]["name"], name=run_name, config=resolved_config,
                tags=list(cfg.tags), mode=cfg.mode, dir=str(cfg.dir or run_dir), reinit="finish_previous",
                settings=wandb.Settings(init_timeout=60),
            )
        except Exception as e:  # noqa: BLE001 - an observer must never stop training
            self._disable(f"W&B init failed ({type(e).__name__}: {e})")

    def _disable(self, why: str) -> None:
        log.warning("%s; continuing without W&B, the results on disk are complete", why)
        self.run = None

    def _safely(self, what: str, call) -> None:
        if self.run is None:
            return
        try:
            call()
        except Exception as e:  # noqa: BLE001
            self._disable(f"W&B {what} failed ({type(e).__name__}: {e})")

    def log_epoch(self, row: dict[str, Any]) -> None:
        self._safely("log", lambda: self.run.log(row, step=row["epoch"]))

    def log_summary(self, summary: dict[str, Any]) -> None:
        self._safely("summary", lambda: self.run.summary.update(summary))

    def finish(self, exit_code: int = 0) -> None:
        self._safely("finish", lambda: self.run.finish(exit_code=exit_code))
        self.run = None
