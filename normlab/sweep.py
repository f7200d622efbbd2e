"""``SweepProgress``, a Hydra callback registered in conf/train.yaml: a line per finished job of a multirun.

It logs "3 of 12 finished · done · val error 4.17% · norm=gn,..." per job and a tally at the end of the sweep;
at the start it names the jobs whose config ``validate`` will refuse (normlab/sweep_jobs.py). Each job's share
of the machine is normlab/machine_share.py's.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from normlab import sweep_outcome
from normlab.pace import eta
from normlab.records import RunDir, parse_rows, read_metrics
from normlab.sweep_jobs import MAX_PRECHECKED_JOBS, count_jobs, invalid_jobs, swept_keys

log = logging.getLogger("normlab.sweep")

PROGRESS_FILE = ".normlab_progress.jsonl"  # in the sweep dir: one line per finished job, tagged with its sweep


def failure_name(job_return: Any) -> str:
    """The exception a failed job raised, by name: Hydra's ``JobReturn.return_value`` raises it again."""
    try:
        job_return.return_value
    except Exception as e:  # noqa: BLE001 - any exception the job raised
        return type(e).__name__
    return "no exception"


def _percent(value: Any) -> str:
    return f"{value:.2f}%" if isinstance(value, (int, float)) else "n/a"


class SweepProgress(Callback):
    """One log line per finished job of a multirun, and a tally when the sweep ends.

    ``on_multirun_start`` runs in the launching process: it counts the jobs and names the sweep. The
    callback travels with the job to joblib's and submitit's worker processes, where ``on_job_end``
    runs, so the finished jobs are counted in a file in the sweep dir (``PROGRESS_FILE``, one JSON line
    per job, tagged with the sweep), not in memory. Under submitit the lines go to each job's log
    (``.submitit/``, the run dir's ``train.log``); the tally comes back to the launching terminal.
    Nothing here can stop a sweep: every failure is a warning.
    """

    def __init__(self) -> None:
        self.sweep_id: str | None = None
        self.total: int | None = None
        self.sweep_dir: str | None = None
        self.keys: list[str] = []
        self.started: float | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_id = uuid.uuid4().hex[:12]
        self.started = time.time()
        try:
            self.sweep_dir = str(config.hydra.sweep.dir)
            self.keys = swept_keys(config)
            self.total = count_jobs(config)
        except Exception as e:  # noqa: BLE001 - a sweep we cannot count still runs
            log.debug("sweep progress: cannot count the jobs: %r", e)
        self._announce_invalid(config)

    def _announce_invalid(self, config: DictConfig) -> None:
        """Say at sweep start which jobs will be skipped, and why; they are skipped again at job start."""
        if self.total is None or self.total > MAX_PRECHECKED_JOBS:
            return
        try:
            invalid = invalid_jobs(config)
        except Exception as e:  # noqa: BLE001
            log.debug("sweep progress: cannot check the jobs ahead: %r", e)
            return
        if invalid:
            log.warning("sweep: %d of %d jobs will be skipped, their config is invalid:", len(invalid), self.total)
            for overrides, reason in invalid:
                swept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in self.keys] or overrides
                log.warning("  skip %s: %s", " ".join(swept), reason)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        try:
            from normlab.engine.dist import launched_rank

            if config.hydra.mode != RunMode.MULTIRUN or launched_rank() > 0:  # a job's rank 0 reports it
                return
            self._job_end(config, job_return)
        except Exception as e:  # noqa: BLE001
            log.warning("sweep progress: no line for this job (%s: %s)", type(e).__name__, e)

    def _job_end(self, config: DictConfig, job_return: Any) -> None:
        from hydra.core.utils import JobStatus

        run_dir = config.hydra.runtime.output_dir
        summary = RunDir(run_dir).read_summary() or {}
        outcome = job_return.return_value if job_return.status == JobStatus.COMPLETED else None
        if job_return.status == JobStatus.FAILED:
            status = f"failed ({failure_name(job_return)})"
        elif outcome in ("invalid", "busy"):
            status = outcome if outcome == "invalid" else "busy (another process holds its folder)"
        elif summary.get("status"):
            status = summary["status"] + (" (already done, skipped)" if outcome == "skipped" else "")
        else:
            status = "no summary.json"
        job = self._name(config)
        entry = {"sweep": self.sweep_id, "num": config.hydra.job.get("num"), "job": job, "status": status,
                 "val_error": summary.get("val_error"), "run_dir": str(run_dir)}
        finished = self._record(Path(self.sweep_dir or config.hydra.sweep.dir), entry)
        position = f"{finished} of {self.total}" if finished and self.total else \
            f"{finished} of ?" if finished else "1 more"
        left = f" · sweep ETA {eta(time.time() - self.started, finished, self.total)}" if (
            self.started and finished and self.total and finished < self.total) else ""
        log.info("sweep: %s finished · %s · val error %s · %s%s", position, status,
                 _percent(entry["val_error"]), job, left)

    def _name(self, config: DictConfig) -> str:
        """The job by what the sweep varies ("norm=gn batch.per_worker=8"), else its override dirname."""
        task = [str(o) for o in config.hydra.overrides.get("task", [])]
        varied = [o for o in task if o.split("=", 1)[0].lstrip("+~") in self.keys]
        return " ".join(varied) or config.hydra.job.get("override_dirname") or f"#{config.hydra.job.get('num')}"

    def _record(self, sweep_dir: Path, entry: dict) -> int | None:
        """Append the job's line to the progress file; the number of this sweep's lines so far."""
        if self.sweep_id is None:
            return None
        import fcntl

        sweep_dir.mkdir(parents=True, exist_ok=True)
        with open(sweep_dir / PROGRESS_FILE, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(json.dumps(entry) + "\n")
            f.flush()
            f.seek(0)
            return sum(1 for e in parse_rows(f.read().splitlines()) if e.get("sweep") == self.sweep_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            if self.sweep_id is None or self.sweep_dir is None:
                return
            path = Path(self.sweep_dir) / PROGRESS_FILE
            mine = [e for e in read_metrics(path) if e.get("sweep") == self.sweep_id]
            counts: dict[str, int] = {}
            for e in mine:
                counts[e["status"]] = counts.get(e["status"], 0) + 1
            tally = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no job reported back"
            scored = [e for e in mine if isinstance(e.get("val_error"), (int, float))]
            best = min(scored, key=lambda e: e["val_error"]) if scored else None
            best_text = f" · best val error {_percent(best['val_error'])} ({best['job']})" if best else ""
            unfinished = sweep_outcome.record([e["status"] for e in mine], self.total)
            log.info("sweep finished: %d of %s jobs reported · %s%s · %s%s", len(mine), self.total or "?", tally,
                     best_text, self.sweep_dir, f" · {unfinished} not finished: exit code 1" if unfinished else "")
        except Exception as e:  # noqa: BLE001
            log.warning("sweep progress: no tally (%s: %s)", type(e).__name__, e)
