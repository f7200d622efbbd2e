"""Each parallel job's share of the machine: CPU threads (a budget from the launcher's settings) and a GPU.

Hydra's launcher runs the jobs of ``normlab-train -m``:

    basic (default)      one after another, in this process
    joblib               ``hydra.launcher.n_jobs`` at once on this machine, each in a worker process (loky)
    submitit_local       every job of the sweep at once on this machine, each in its own process
    submitit_slurm       one SLURM job per job (``hydra/launcher=slurm``: conf/hydra/launcher/slurm.yaml)

Jobs that run side by side on one machine must share it. ``share_machine`` (called by the app around
each job) gives a job whose ``trainer.threads`` is null its ``threads_budget``, and, on a machine with
several GPUs and ``trainer.device=auto``, a GPU of its own (normlab/gpu_locks.py). It returns them as a value
(``MachineShare``), which the app resolves into the job's spec; config.yaml records them, and one log line.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.gpu_locks import GPU_LOCK_DIR, claim_gpu

log = logging.getLogger("normlab.sweep")


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


@dataclass(frozen=True)
class MachineShare:
    """What the launcher leaves one job of a sweep: CPU threads and a GPU (None: the job's own settings stand)."""

    threads: int | None = None
    device: str | None = None


@contextlib.contextmanager
def share_machine(threads: int | None, device: str, launcher: Mapping | None = None, job_num: int | None = None,
                  sweep_dir: str | os.PathLike | None = None) -> Iterator[MachineShare]:
    """Around one job whose config says `threads` (trainer.threads) and `device` (trainer.device): its share of
    the machine, as a value. Its ``threads_budget`` when `threads` is null, and a GPU of its own (held until the
    block ends) when ``gpu_slots`` says so.

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
    budget = None
    if threads is None:
        budget = threads_budget(launcher, cpus)
        if budget is not None:
            k = concurrent_jobs(launcher, cpus)
            where = f" ({cpus} CPUs / {k} jobs at once)" if k else " (cpus_per_task)"
            notes.append(f"trainer.threads={budget}{where}")
    slots = 0
    from normlab.engine.dist import launched

    if str(device) == "auto" and launched() is None:  # a rank's GPU is its local rank's
        import torch

        n_gpus = torch.cuda.device_count()
        slots = gpu_slots("auto", launcher, n_gpus, cpus)
        if n_gpus == 0 and hides_gpus(launcher):
            log.warning("submitit_local shows a job no GPU unless hydra.launcher.gpus_per_node is set "
                        "(CUDA_VISIBLE_DEVICES is empty): this job runs on the CPU")
    with contextlib.ExitStack() as stack:
        gpu = None
        if slots:
            gpu = f"cuda:{stack.enter_context(claim_gpu(Path(sweep_dir or '.') / GPU_LOCK_DIR, n_gpus, slots, job_num))}"
            notes.append(f"trainer.device={gpu} ({n_gpus} GPUs, {slots} job(s) each)")
        if notes:
            log.info("job #%d shares the machine: %s", job_num, ", ".join(notes))
        yield MachineShare(threads=budget, device=gpu)
