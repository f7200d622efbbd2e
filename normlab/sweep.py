"""Sweeps beyond one job at a time: each parallel job's share of the machine, and a line per finished job.

Hydra's launcher runs the jobs of ``normlab-train -m``:

    basic (default)      one after another, in this process
    joblib               ``hydra.launcher.n_jobs`` at once on this machine, each in a worker process (loky)
    submitit_local       every job of the sweep at once on this machine, each in its own process
    submitit_slurm       one SLURM job per job (``hydra/launcher=slurm``: conf/hydra/launcher/slurm.yaml)

Jobs that run side by side on one machine must share it. ``share_machine`` (called by the app around
each job) gives a job whose ``trainer.threads`` is null its ``threads_budget``, and, on a machine with
several GPUs and ``trainer.device=auto``, a GPU of its own (``claim_gpu``). What it chose goes into the
job's config (and so into ``config.yaml``) and one log line.

``SweepProgress``, a Hydra callback registered in conf/train.yaml, logs one line per finished job
("3 of 12 finished · done · val error 4.17% · norm=gn,...") and a tally at the end of the sweep.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from normlab import sweep_outcome
from normlab.pace import eta
from normlab.records import RunDir

log = logging.getLogger("normlab.sweep")

PROGRESS_FILE = ".normlab_progress.jsonl"  # in the sweep dir: one line per finished job, tagged with its sweep
GPU_LOCK_DIR = ".gpu_locks"                # in the sweep dir: gpu<K>.<slot>.lock, held by the job on that GPU


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, which cgroups and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _get(launcher: Mapping | None, key: str) -> Any:
    return launcher.get(key) if launcher is not None else None


def concurrent_jobs(launcher: Mapping | None, cpus: int) -> int | None:
    """How many jobs the launcher runs at once on this machine, when it says: joblib's ``n_jobs``, read
    as joblib reads it (-1: one per CPU, -2: all CPUs but one, ...). None for the other launchers."""
    n_jobs = _get(launcher, "n_jobs")
    if n_jobs is None:
        return None
    n_jobs = int(n_jobs)
    return max(1, cpus + 1 + n_jobs) if n_jobs < 0 else max(1, n_jobs)


def threads_budget(launcher: Mapping | None, cpus: int) -> int | None:
    """CPU threads for one job of a sweep, or None to keep torch's default.

    - joblib with n_jobs = k > 1: max(1, cpus // k), so that k jobs side by side do not oversubscribe the CPU
      (k = 1 runs one job at a time: torch's default stands);
    - submitit (SLURM or local) with ``cpus_per_task`` = c: c, what the job asked for;
    - anything else (the basic launcher, a single run): None.
    """
    cpus_per_task = _get(launcher, "cpus_per_task")
    if cpus_per_task:
        return int(cpus_per_task)
    k = concurrent_jobs(launcher, cpus)
    if k is None or k <= 1:
        return None
    return max(1, cpus // k)


def _is_submitit_local(launcher: Mapping | None) -> bool:
    return str(_get(launcher, "_target_") or "").endswith("submitit_launcher.LocalLauncher")


def gpu_slots(device: str, launcher: Mapping | None, n_gpus: int, cpus: int) -> int:
    """How many jobs share each GPU, or 0 when a job need not pick one.

    A job picks a GPU when ``trainer.device=auto``, this machine shows it several GPUs, and the launcher
    runs several jobs at once here: joblib with n_jobs = k > 1 (ceil(k / n_gpus) jobs per GPU), or
    submitit_local with ``gpus_per_node`` > 1 (one job per GPU; the others wait for one to free).
    Under SLURM a job sees only the GPUs it was given.
    """
    if device != "auto" or n_gpus <= 1:
        return 0
    k = concurrent_jobs(launcher, cpus)
    if k is not None:
        return math.ceil(k / n_gpus) if k > 1 else 0
    return 1 if _is_submitit_local(launcher) else 0


def hides_gpus(launcher: Mapping | None, gpu_present: bool | None = None) -> bool:
    """True when submitit_local hid this machine's GPUs from the job: without ``gpus_per_node`` it sets
    ``CUDA_VISIBLE_DEVICES=""``, and ``trainer.device=auto`` then means the CPU."""
    if gpu_present is None:
        gpu_present = Path("/dev/nvidia0").exists()
    return (gpu_present and _is_submitit_local(launcher) and not _get(launcher, "gpus_per_node")
            and os.environ.get("CUDA_VISIBLE_DEVICES") == "")


@contextlib.contextmanager
def claim_gpu(lock_dir: str | os.PathLike, n_gpus: int, slots: int = 1, job_num: int = 0) -> Iterator[int]:
    """Hold a GPU index for the duration of the block: an exclusive lock on ``lock_dir/gpu<K>.<slot>.lock``.

    The first free (GPU, slot), trying GPUs from ``job_num % n_gpus`` on and filling every GPU's first
    slot before any second one; when all are held, wait for GPU ``job_num % n_gpus``. The lock goes
    with the process, so a killed job frees its GPU.
    """
    import fcntl

    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    first = job_num % n_gpus
    order = [(first + i) % n_gpus for i in range(n_gpus)]
    for slot in range(max(1, slots)):
        for gpu in order:
            f = open(lock_dir / f"gpu{gpu}.{slot}.lock", "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            try:
                yield gpu
            finally:
                f.close()  # closing the file releases the lock
            return
    with open(lock_dir / f"gpu{first}.0.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield first


@contextlib.contextmanager
def share_machine(cfg: DictConfig, launcher: Mapping | None = None, job_num: int | None = None,
                  sweep_dir: str | os.PathLike | None = None) -> Iterator[None]:
    """Around one job: set ``cfg.trainer.threads`` to the job's ``threads_budget`` when it is null, and
    ``cfg.trainer.device`` to a GPU of its own when ``gpu_slots`` says so (held until the block ends).

    ``launcher``, ``job_num`` and ``sweep_dir`` default to the running job's Hydra config.
    """
    from hydra.core.hydra_config import HydraConfig

    if launcher is None and HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        launcher = hydra_cfg.launcher
        job_num = hydra_cfg.job.get("num", 0) if job_num is None else job_num
        sweep_dir = hydra_cfg.sweep.dir if sweep_dir is None else sweep_dir
    job_num = job_num or 0
    cpus = cpu_count()
    notes = []
    if cfg.trainer.threads is None:
        budget = threads_budget(launcher, cpus)
        if budget is not None:
            cfg.trainer.threads = budget
            k = concurrent_jobs(launcher, cpus)
            where = f" ({cpus} CPUs / {k} jobs at once)" if k else " (cpus_per_task)"
            notes.append(f"trainer.threads={budget}{where}")
    slots = 0
    from normlab.engine.dist import launched

    if str(cfg.trainer.device) == "auto" and launched() is None:  # a rank's GPU is its local rank's
        import torch

        n_gpus = torch.cuda.device_count()
        slots = gpu_slots("auto", launcher, n_gpus, cpus)
        if n_gpus == 0 and hides_gpus(launcher):
            log.warning("submitit_local shows a job no GPU unless hydra.launcher.gpus_per_node is set "
                        "(CUDA_VISIBLE_DEVICES is empty): this job runs on the CPU")
    with contextlib.ExitStack() as stack:
        if slots:
            gpu = stack.enter_context(claim_gpu(Path(sweep_dir or ".") / GPU_LOCK_DIR, n_gpus, slots, job_num))
            cfg.trainer.device = f"cuda:{gpu}"
            notes.append(f"trainer.device=cuda:{gpu} ({n_gpus} GPUs, {slots} job(s) each)")
        if notes:
            log.info("job #%d shares the machine: %s", job_num, ", ".join(notes))
        yield


def count_jobs(config: DictConfig) -> int | None:
    """How many jobs a multirun launches, as Hydra's BasicSweeper builds them. None for other sweepers."""
    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    return len(job_overrides(config))


def job_overrides(config: DictConfig) -> list[list[str]]:
    """Every job's overrides, as Hydra's BasicSweeper will launch them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(sweep_arguments(config))
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def invalid_jobs(config: DictConfig, config_name: str = "train") -> list[tuple[list[str], str]]:
    """The jobs that ``validate`` will refuse, found before the sweep starts: (overrides, reason)."""
    from hydra import compose

    from normlab.errors import ConfigError
    from normlab.validation import validate

    found = []
    for overrides in job_overrides(config):
        try:
            validate(compose(config_name=config_name, overrides=overrides))
        except ConfigError as e:
            found.append((overrides, " ".join(line.strip() for line in str(e).splitlines()[:2])))
    return found


def sweep_arguments(config: DictConfig) -> list[str]:
    """The overrides a multirun sweeps over, as the sweeper sees them: ``hydra.sweeper.params``, then the
    command line's."""
    params = config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=True) if params is not None else {}
    return [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)


def swept_keys(config: DictConfig) -> list[str]:
    """The keys that take more than one value in a multirun (``norm`` in ``norm=bn,gn``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(sweep_arguments(config))
    return [o.get_key_element() for o in overrides if o.is_sweep_override()]


MAX_PRECHECKED_JOBS = 500  # a larger grid is checked job by job only


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
            status = f"failed ({type(job_return._return_value).__name__})"
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
            return sum(1 for e in _entries(f.read()) if e.get("sweep") == self.sweep_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            if self.sweep_id is None or self.sweep_dir is None:
                return
            path = Path(self.sweep_dir) / PROGRESS_FILE
            mine = [e for e in _entries(path.read_text() if path.exists() else "") if e.get("sweep") == self.sweep_id]
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


def _entries(text: str) -> Iterator[dict]:
    for line in text.splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue
