"""What this CPU computes natively, read from the kernel's CPU flags (Linux ``/proc/cpuinfo``).

torch's public API says only which vector ISA its kernels use (``torch.backends.cpu.get_cpu_capability``), not
whether the CPU computes bf16 natively, so the flags are read where the operating system lists them.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
FAST_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "amx_tile"})  # AVX512-BF16 or AMX


@cache
def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The feature flags of the first CPU listed; empty where the file is missing (not Linux) or unreadable."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, arm64
            return frozenset(value.split())
    return frozenset()


def has_fast_bf16(flags: frozenset[str] | None = None) -> bool:
    """bf16 is only fast on CPUs with AVX512-BF16 or AMX; elsewhere it is emulated and slower than fp32."""
    return bool(FAST_BF16_FLAGS & (cpu_flags() if flags is None else flags))
