"""``trainer.channels_last=auto``: the memory format chosen by timing both, not by a rule per norm.

Which format makes a whole training step faster depends on the convolutions (fast in channels_last on
modern CPUs and GPUs) and on the norms (torch's BN, GN and per-worker BN each prefer one or the other,
differently by precision, W and N), so it flips with the model, norm, batch, precision and device. At job
start, a short probe trains throw-away copies of the model on random data for a few steps in each format,
alternating, and keeps the faster one. The result is cached per (device, threads, the CPU kernel's build,
torch and normlab versions, model, norm, N and W for a batch-statistics norm or the total batch for the others,
precision) in normlab's cache folder, so a sweep probes each setting once, and a batch-independent norm runs in
one format at every N of a fixed total batch. A job shorter than
PROBE_STEPS / MAX_PROBE_SHARE steps is not probed: it uses the cached choice if there is one, else NCHW.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import normlab
import normlab.cache
from normlab.norms import cpu_kernel
from normlab.records import READ_ERRORS, read_record_text, write_json
from normlab.switches import switch

WARMUP_STEPS, TIMED_STEPS, ROUNDS = 2, 3, 2
PROBE_STEPS = 2 * ROUNDS * (WARMUP_STEPS + TIMED_STEPS)  # training steps the probe costs
MAX_PROBE_SHARE = 0.02  # of the job's training steps
CACHE_FILE = "memory_format.json"
FORMATS = {False: "contiguous", True: "channels_last"}


@dataclass(frozen=True)
class FormatChoice:
    channels_last: bool
    reason: str  # why: set by the user, probed (with the times), cached, or too short to probe

    @property
    def name(self) -> str:
        return FORMATS[self.channels_last]


StepFactory = Callable[[bool], Callable[[torch.Tensor, torch.Tensor], Any]]


def cache_key(device: torch.device, **setting: Any) -> str:
    """One string per setting that can change which format is faster."""
    if device.type == "cuda":
        hardware = {"device": torch.cuda.get_device_name(device)}
    else:  # BN's and GN's speed, and so the faster format, depends on normlab's CPU kernel being built
        hardware = {"device": f"cpu ({torch.get_num_threads()} threads)", "cpu_kernel": cpu_kernel.status()}
    parts = {**hardware, "torch": torch.__version__, "normlab": normlab.__version__, **setting}
    return json.dumps(parts, sort_keys=True, default=str)


def read_cache(folder: Path) -> dict[str, Any]:
    try:
        cache = json.loads(read_record_text(folder / CACHE_FILE))
    except READ_ERRORS:
        return {}
    return cache if isinstance(cache, dict) else {}


def time_formats(make_step: StepFactory, shape: tuple[int, int, int, int], classes: int,
                 device: torch.device) -> dict[bool, float]:
    """Median seconds per training step in each format: fresh model copies, random data, rounds alternating."""
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(shape, generator=generator, device=device)
    labels = torch.randint(0, classes, (shape[0],), generator=generator, device=device)
    steps = {fmt: make_step(fmt) for fmt in FORMATS}
    inputs = {fmt: images.contiguous(memory_format=torch.channels_last if fmt else torch.contiguous_format)
              for fmt in FORMATS}
    times: dict[bool, list[float]] = {fmt: [] for fmt in FORMATS}
    for round_ in range(ROUNDS):
        for fmt in (FORMATS if round_ % 2 == 0 else reversed(list(FORMATS))):
            for i in range(WARMUP_STEPS + TIMED_STEPS):
                _sync(device)
                start = time.perf_counter()
                steps[fmt](inputs[fmt], labels)
                _sync(device)
                if i >= WARMUP_STEPS:
                    times[fmt].append(time.perf_counter() - start)
    return {fmt: statistics.median(t) for fmt, t in times.items()}


def choose_memory_format(setting: Any, make_step: StepFactory, *, shape: tuple[int, int, int, int], classes: int,
                         device: torch.device, key: str, job_steps: int | None,
                         cache_dir: Path | None = None) -> FormatChoice:
    """The format for `setting` (auto | true | false); `make_step(channels_last)` builds a throw-away step."""
    setting = switch(setting)
    if setting != "auto":
        return FormatChoice(setting == "true", f"trainer.channels_last={setting}")
    folder = cache_dir or normlab.cache.cache_dir()
    with _cache_lock(folder):  # jobs of a sweep that start together probe once, and agree
        cached = read_cache(folder).get(key)
        if isinstance(cached, dict) and cached.get("format") in FORMATS.values():
            return FormatChoice(cached["format"] == FORMATS[True], f"auto, cached probe: {cached.get('times', '')}")
        if job_steps is None or PROBE_STEPS > MAX_PROBE_SHARE * job_steps:
            return FormatChoice(False, f"auto, job too short to probe ({job_steps} steps): contiguous")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            seconds = time_formats(make_step, shape, classes, device)
        faster = min(seconds, key=seconds.get)
        times = ", ".join(f"{FORMATS[fmt]} {1e3 * s:.1f} ms" for fmt, s in seconds.items())
        _remember(folder, key, {"format": FORMATS[faster], "times": f"{times} per step"})
    return FormatChoice(faster, f"auto, probed: {times} per step")


@contextlib.contextmanager
def _cache_lock(folder: Path) -> Iterator[None]:
    """An OS advisory lock on the cache folder (none where the folder cannot be written: each job probes)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f".{CACHE_FILE}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remember(folder: Path, key: str, entry: dict[str, Any]) -> None:
    """Add one entry to the cache; a write that fails (read-only home) only costs a later probe."""
    try:
        write_json(folder / CACHE_FILE, {**read_cache(folder), key: entry})
    except OSError:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
