"""A GPU of its own for each job of a sweep that runs beside others on one machine: a lock file per GPU slot."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

GPU_LOCK_DIR = ".gpu_locks"  # in the sweep dir: gpu<K>.<slot>.lock, held by the job on that GPU


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
