"""The runtime settings a job resolves once: device, precision and whether the step replays as a CUDA graph."""

from __future__ import annotations

from typing import Any

import torch

from normlab.engine.cpu_features import has_fast_bf16
from normlab.settings import Precision
from normlab.switches import resolve_switch


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_precision(setting: str, device: torch.device) -> Precision:
    """auto: bf16 autocast on CUDA, and on CPUs that compute bf16 natively; fp32 elsewhere."""
    if setting == Precision.auto:
        return Precision.bf16 if device.type == "cuda" or has_fast_bf16() else Precision.fp32
    return Precision(setting)


def emulated_bf16(precision: Precision, device: torch.device, flags: frozenset[str] | None = None) -> str | None:
    """A warning when bf16 is asked for on a CPU that emulates it: the run is right, only many times slower."""
    if device.type == "cpu" and precision == Precision.bf16 and not has_fast_bf16(flags):
        return ("trainer.precision=bf16 on a CPU without AVX512-BF16 or AMX: bf16 is emulated here, many times slower "
                "than fp32 (trainer.precision=auto picks fp32 on this CPU)")
    return None


def resolve_cuda_graph(setting: Any, device: torch.device, compile: bool, host_synced: bool = False,
                       ranks: int = 1) -> bool:
    """auto: on CUDA, unless the model is compiled, the norm reads a value on the host (`host_synced`) or the
    job runs on several processes (DDP's gradient all-reduce is not captured here). A graph replays the whole
    step with one launch, which pays most at small batches (docs/performance.md)."""
    return resolve_switch(setting, device.type == "cuda" and not compile and not host_synced and ranks == 1)
