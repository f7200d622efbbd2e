"""Weights & Biases: one run per job, across kills and resumes; offline by default; never fatal.

- The job's W&B run id is kept in its folder (``wandb.json``): a job that resumes from its checkpoint (an
  epoch's, or the step a preemption signal stopped at, in its first epoch too) goes on in the same W&B run
  (``resume="allow"``) and sends the epochs it resumes after again, since a kill loses what W&B's service
  had not yet written; W&B keeps one row per step (the epoch), so every epoch is there once. A job that
  starts over (a fresh folder, ``trainer.force``) gets a new run: the id is the folder's path hashed, plus a
  random part.
- The epoch is every metric's step (``define_metric``); the error metrics' summaries are their minimum while the
  run goes, and at the end the run's summary is ``summary.json`` (``val_error`` the final one, ``best_val_error``
  the minimum), as ``normlab-report --wandb`` reads it.
- A job owns its W&B service. A service token inherited from the launching process (``WANDB_SERVICE``, left by
  any W&B run in that process) is dropped: in a shared service a killed attempt's stream stays open, and the
  resumed attempt's records would never reach its own log.
- At the end the run's records (the resolved ``config.yaml``, ``summary.json``, ``metrics.jsonl``) are logged
  as an artifact; an online run's URL is logged when it starts.

wandb is imported only here, when ``logger=wandb`` is chosen, so ``logger=none`` runs without it. Any W&B
failure (no key, no network, an init error) warns once and turns the logger off; the results on disk are
complete either way.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from normlab.records import CONFIG, METRICS, SUMMARY, read_json, read_metrics, write_json

if TYPE_CHECKING:
    from normlab.run_spec import RunSpec

log = logging.getLogger(__name__)
STATE_FILE = "wandb.json"  # in the run folder: {"id": the job's W&B run}


def run_state(run_dir: Path, resuming: bool) -> tuple[str, list[dict[str, Any]]]:
    """(run id, the epochs this job resumes after: its ``metrics.jsonl``, which the trainer realigns with the
    checkpoint before the logger starts). A job `resuming` from a checkpoint keeps the id in its folder; any
    other gets a new one."""
    kept = read_json(run_dir / STATE_FILE) or {}
    if resuming and str(kept.get("id", "")).isalnum():
        return kept["id"], read_metrics(run_dir / METRICS)
    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8] + secrets.token_hex(4), []


SERVICE_TOKEN = "WANDB_SERVICE"  # W&B's "<version>-<pid of the process that started it>-<transport>-<address>"


def drop_inherited_service() -> None:
    """Forget a W&B service that another process started; one this process started is kept."""
    fields = os.environ.get(SERVICE_TOKEN, "").split("-")
    if len(fields) > 1 and fields[1] != str(os.getpid()):
        del os.environ[SERVICE_TOKEN]


class WandbLogger:
    def __init__(self, spec: RunSpec, run_dir, resuming: bool) -> None:
        self.run, self.run_dir, self.defined = None, Path(run_dir), set()
        cfg = spec.logger
        try:
            import wandb

            run_id, resumed = run_state(self.run_dir, resuming)
            os.environ.setdefault("WANDB_SILENT", "true")
            drop_inherited_service()
            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity, group=spec.name, job_type=spec.norm.name,
                name=spec.run_name, config=spec.recorded_config,
                tags=list(cfg.tags), mode=cfg.mode, dir=str(cfg.dir or run_dir), reinit="finish_previous",
                id=run_id, resume="allow", settings=wandb.Settings(init_timeout=60),
            )
            self.run.define_metric("epoch")
            self.run.define_metric("*", step_metric="epoch")
            if cfg.mode == "online" and self.run.url:
                log.info("W&B run: %s", self.run.url)
            write_json(self.run_dir / STATE_FILE, {"id": run_id})
            for row in resumed:  # W&B keeps the first row of a step: a resend adds only what a kill lost
                self._log(row)
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

    def _log(self, row: dict[str, Any]) -> None:
        for key in row.keys() - self.defined:
            if "error" in key:  # train_error, val_error, val_error_top5, val_error_ema, ...: lower is better
                self.run.define_metric(key, step_metric="epoch", summary="min")
            self.defined.add(key)
        self.run.log(row, step=row["epoch"])

    def log_epoch(self, row: dict[str, Any]) -> None:
        self._safely("log", lambda: self._log(row))

    def log_summary(self, summary: dict[str, Any]) -> None:
        self._safely("summary", lambda: self.run.summary.update(summary))

    def _log_records(self) -> None:
        import wandb

        records = wandb.Artifact(f"records-{self.run.id}", type="run-records",
                                 description="normlab's run folder: config.yaml (resolved), summary.json, metrics.jsonl")
        for name in (CONFIG, SUMMARY, METRICS):
            if (self.run_dir / name).is_file():
                records.add_file(str(self.run_dir / name), name=name)
        self.run.log_artifact(records)

    def finish(self, exit_code: int = 0) -> None:
        self._safely("artifact", self._log_records)
        self._safely("finish", lambda: self.run.finish(exit_code=exit_code))
        self.run = None
