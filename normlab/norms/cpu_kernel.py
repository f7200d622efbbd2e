"""Per-worker BN's CPU kernel (per_worker_bn.cpp): built once per machine with the C++ compiler, loaded with ctypes.

torch's CPU BN kernels normalize a whole batch; per-worker BN built from them needs extra passes and a Python
loop over the workers, and in channels_last torch's BN is slow even alone. The kernel makes each statistic in
one read of memory, in either layout, for float32, bfloat16 and float64.

It is plain C++ (no torch headers: about a second to build), compiled with ``$CXX`` (else ``c++``) and
``-O3 -march=native -fopenmp`` into normlab's cache folder under a name hashed from the source, the compiler,
the flags and the CPU, so an edit, another compiler or another CPU builds afresh. A library is loaded only if
this user owns it and no one else may write it. Without a compiler, when the build fails, or with
``NORMLAB_CPU_KERNEL=0``, per-worker BN runs on torch's own kernels instead (one warning says why); so does
code that ``torch.compile`` traces, to which a ctypes call is opaque.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
from pathlib import Path

import torch

from normlab.cache import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("per_worker_bn.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float64: 2}  # the kernel's dtype codes
BUILD_TIMEOUT_S = 300


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def _cpu_identity() -> str:
    """The CPU's model and instruction-set flags: what ``-march=native`` compiles for."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted))


def library_path(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = hashlib.sha256("\n".join([SOURCE.read_text(), cxx, version, " ".join(FLAGS), _cpu_identity()]).encode())
    return cache_dir() / "kernels" / f"per_worker_bn-{digest.hexdigest()[:16]}.so"


def _trusted(path: Path) -> bool:
    """A library this user owns and only this user may write (else it is rebuilt, not loaded)."""
    try:
        info = path.stat()
    except OSError:
        return False
    return info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def build(cxx: str, path: Path) -> None:
    """Compile SOURCE into `path`, atomically: concurrent jobs each build their own file and the last rename wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        done = subprocess.run([cxx, *FLAGS, "-o", str(partial), str(SOURCE)], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if done.returncode:
            raise RuntimeError(f"{cxx} failed: {(done.stderr or done.stdout).strip()[-2000:]}")
        os.chmod(partial, 0o755)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded kernel, or why there is none."""
    if os.environ.get("NORMLAB_CPU_KERNEL", "1") == "0":
        return "NORMLAB_CPU_KERNEL=0"
    cxx = compiler()
    if cxx is None:
        return f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"
    try:
        path = library_path(cxx)
        if not _trusted(path):
            build(cxx, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return f"building {SOURCE.name} failed: {error}"
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.normlab_pwbn_forward.argtypes = [i32, *[ptr] * 7, i64, i64, i64, i64, i32, ctypes.c_double, i32]
    lib.normlab_pwbn_backward.argtypes = [i32, *[ptr] * 8, i64, i64, i64, i64, i32, i32]
    lib.normlab_pwbn_forward.restype = lib.normlab_pwbn_backward.restype = i32
    return lib


@functools.cache
def _warn_once(reason: str) -> None:
    log.warning("per-worker BN on the CPU uses torch's kernels, slower: %s", reason)


def status() -> str:
    """What per-worker BN runs on the CPU: the kernel's file name, or torch's kernels and why."""
    lib = _library()
    return Path(lib._name).name if isinstance(lib, ctypes.CDLL) else f"torch ({lib})"


def usable(x: torch.Tensor) -> bool:
    """Whether the kernel takes `x`: a CPU tensor of a dtype it has, outside torch.compile, the kernel built."""
    if x.device.type != "cpu" or x.dtype not in DTYPES or torch.compiler.is_compiling():
        return False
    lib = _library()
    if isinstance(lib, str):
        _warn_once(lib)
        return False
    return True


def _channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _dims(x: torch.Tensor, workers: int) -> tuple[int, int, int, int, int]:
    """(workers, per-worker batch, channels, H·W, channels_last) as the kernel takes them."""
    return workers, x.shape[0] // workers, x.shape[1], x.shape[2] * x.shape[3], int(_channels_last(x))


def forward(x, weight, bias, workers, eps):
    """(y, mean, var, invstd), each statistic (W, C); `weight` and `bias` in the statistics' dtype."""
    x = x if x.is_contiguous() or _channels_last(x) else x.contiguous()
    y = torch.empty_like(x)
    mean, var, invstd = (torch.empty(workers, x.shape[1], dtype=weight.dtype) for _ in range(3))
    error = _library().normlab_pwbn_forward(DTYPES[x.dtype], x.data_ptr(), y.data_ptr(), weight.data_ptr(),
                                            bias.data_ptr(), mean.data_ptr(), var.data_ptr(), invstd.data_ptr(),
                                            *_dims(x, workers), eps, torch.get_num_threads())
    assert not error, f"per-worker BN kernel: unknown dtype {x.dtype}"
    return y, mean, var, invstd


def backward(grad_y, x, weight, mean, invstd, workers, eps):
    """(grad_x, Σ grad·x̂, Σ grad), the sums per worker and channel; `x` as :func:`forward` took it."""
    x = x if x.is_contiguous() or _channels_last(x) else x.contiguous()
    grad_y = grad_y.contiguous(memory_format=torch.channels_last if _channels_last(x) else torch.contiguous_format)
    grad_x = torch.empty_like(x)
    sum_g_xhat, sum_g = torch.empty_like(mean), torch.empty_like(mean)
    error = _library().normlab_pwbn_backward(DTYPES[x.dtype], grad_y.data_ptr(), x.data_ptr(), grad_x.data_ptr(),
                                             weight.data_ptr(), mean.data_ptr(), invstd.data_ptr(),
                                             sum_g_xhat.data_ptr(), sum_g.data_ptr(), *_dims(x, workers),
                                             torch.get_num_threads())
    assert not error, f"per-worker BN kernel: unknown dtype {x.dtype}"
    return grad_x, sum_g_xhat, sum_g
