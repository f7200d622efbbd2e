"""Per-worker BN's and GN's CPU kernel (cpu_kernel.cpp): built once per machine with the C++ compiler, loaded with ctypes.

torch's CPU BN kernels normalize a whole batch: per-worker BN built from them needs extra passes and a Python
loop over the workers. In channels_last torch's BN and GroupNorm are slow even alone, while the convolutions
around them want that layout. The kernel makes each statistic in one read of memory, in either layout, for
float32, bfloat16 and float64, for any "unit" of normalization: a worker's N samples of one channel (BN) or
one sample's C/G channels (GN).

It is plain C++ (no torch headers: about a second to build), compiled with ``$CXX`` (else ``c++``) and
``-O3 -march=native -fopenmp`` into normlab's cache folder under a name hashed from the source, the compiler,
the flags and the CPU, so an edit, another compiler or another CPU builds afresh. A library is loaded only if
it and its folder are this user's, no symlinks, and writable by no one else; one that does not load is rebuilt.
Without a compiler, when the build fails, or with ``NORMLAB_CPU_KERNEL=0``, both norms run on torch's own
kernels instead (one warning says why); so does code that ``torch.compile`` traces, to which a ctypes call is
opaque. The kernel trusts the sizes it is given, so :func:`normalize` checks them all first.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from normlab.cache import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
FLAGS = ("-std=c++17", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float64: 2}  # the kernel's dtype codes
BUILD_TIMEOUT_S = 300


def compiler() -> list[str] | None:
    """The C++ compiler's command: ``$CXX`` (a wrapper such as ``ccache g++`` included), else ``c++``; None if
    it is not on PATH."""
    command = shlex.split(os.environ.get("CXX", "c++"))
    found = shutil.which(command[0]) if command else None
    return [found, *command[1:]] if found else None


def _cpu_identity() -> str:
    """The CPU's model and instruction-set flags: what ``-march=native`` compiles for."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted))


def library_path(cxx: list[str]) -> Path:
    version = subprocess.run([*cxx, "--version"], capture_output=True, timeout=60).stdout.decode(errors="replace")
    identity = [SOURCE.read_text(), " ".join(cxx), version, " ".join(FLAGS), _cpu_identity()]
    digest = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"cpu_kernel-{digest}.so"


def _private(path: Path) -> bool:
    """Not a symlink, owned by this user, and writable by no one else."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return (not stat.S_ISLNK(info.st_mode) and info.st_uid == os.getuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def build(cxx: list[str], path: Path) -> None:
    """Compile SOURCE into `path`, atomically: each build writes a file of its own and renames it into place."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    partial = Path(name)
    try:
        done = subprocess.run([*cxx, *FLAGS, "-o", str(partial), str(SOURCE)], capture_output=True,
                              timeout=BUILD_TIMEOUT_S)
        if done.returncode:
            message = (done.stderr or done.stdout).decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"{' '.join(cxx)} failed: {message}")
        os.chmod(partial, 0o755)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _load(path: Path) -> ctypes.CDLL:
    if not (_private(path) and _private(path.parent)):
        raise RuntimeError(f"{path} or its folder is a symlink, another user's, or writable by others; not loaded")
    lib = ctypes.CDLL(str(path))
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.normlab_norm_forward.argtypes = [i32, *[ptr] * 9, ctypes.c_double, i64, i64, i64, i64, i64, i32,
                                         ctypes.c_double, i32]
    lib.normlab_norm_backward.argtypes = [i32, *[ptr] * 8, i64, i64, i64, i64, i64, i32, i32]
    lib.normlab_norm_forward.restype = lib.normlab_norm_backward.restype = i32
    return lib


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded kernel, or why there is none. A cached library that is not private, or does not load, is
    built afresh (once)."""
    if os.environ.get("NORMLAB_CPU_KERNEL", "1") == "0":
        return "NORMLAB_CPU_KERNEL=0"
    cxx = compiler()
    if cxx is None:
        return f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"
    try:
        path = library_path(cxx)
        if _private(path):
            try:
                return _load(path)
            except (OSError, AttributeError, RuntimeError):
                pass
        build(cxx, path)
        return _load(path)
    except Exception as error:  # noqa: BLE001 - whatever stops the kernel, torch's kernels take over, and say why
        return f"building or loading {SOURCE.name} failed: {error}"


@functools.cache
def _warn_once(reason: str) -> None:
    log.warning("per-worker BN and GN on the CPU use torch's kernels, slower: %s", reason)


def status() -> str:
    """What per-worker BN and GN run on the CPU: the kernel's file name, or torch's kernels and why."""
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


def is_channels_last(x: torch.Tensor) -> bool:
    """Laid out channels_last and not also contiguous (as a (N, C, 1, 1) tensor is both)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _in_a_layout(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous() or is_channels_last(x) else x.contiguous()


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of `x`'s statistics and of the parameters met with it: float64 for float64, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dims(x: torch.Tensor, unit_samples: int, unit_channels: int) -> tuple[int, ...]:
    """(S, C, H·W, unit samples, unit channels, channels_last) as the kernel takes them."""
    return (x.shape[0], x.shape[1], x.shape[2] * x.shape[3], unit_samples, unit_channels, int(is_channels_last(x)))


class _Normalize(torch.autograd.Function):
    """The kernel's forward and backward; the statistics are outputs, not differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias, unit_samples: int, unit_channels: int, eps: float, running):
        x = _in_a_layout(x)
        y = torch.empty_like(x)
        units = (x.shape[0] // unit_samples, x.shape[1] // unit_channels)
        mean, var, invstd = (torch.empty(units, dtype=weight.dtype) for _ in range(3))
        running_mean, running_var, factor = running or (None, None, 0.0)
        error = _library().normlab_norm_forward(
            DTYPES[x.dtype], x.data_ptr(), y.data_ptr(), weight.data_ptr(), bias.data_ptr(), mean.data_ptr(),
            var.data_ptr(), invstd.data_ptr(), running_mean.data_ptr() if running else None,
            running_var.data_ptr() if running else None, factor, *_dims(x, unit_samples, unit_channels), eps,
            torch.get_num_threads())
        if error:
            raise RuntimeError(f"normlab's CPU kernel refused the call (code {error})")
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.units = unit_samples, unit_channels
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_y = grad_y.contiguous(memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format)
        grad_x = torch.empty_like(x)
        grad_weight, grad_bias = torch.empty_like(weight), torch.empty_like(weight)
        error = _library().normlab_norm_backward(
            DTYPES[x.dtype], grad_y.data_ptr(), x.data_ptr(), grad_x.data_ptr(), weight.data_ptr(), mean.data_ptr(),
            invstd.data_ptr(), grad_weight.data_ptr(), grad_bias.data_ptr(), *_dims(x, *ctx.units),
            torch.get_num_threads())
        if error:
            raise RuntimeError(f"normlab's CPU kernel refused the call (code {error})")
        return grad_x, grad_weight, grad_bias, None, None, None, None


def normalize(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, *, unit_samples: int,
              unit_channels: int, eps: float,
              running: tuple[torch.Tensor, torch.Tensor, float] | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, biased var) of a (S, C, H, W) batch normalized per unit of `unit_samples` consecutive samples
    and `unit_channels` consecutive channels, then scaled by `weight` and shifted by `bias` per channel
    (None: 1 and 0). The statistics are (S / unit_samples, C / unit_channels), float32 (float64 for float64
    input); y has x's dtype and memory format. `running` (running mean, running var, factor), for units of one
    channel: both buffers move by `factor` toward the units' mean and unbiased variance averaged over the
    units of each channel, in place. Call only where :func:`usable` says so."""
    dtype = stat_dtype(x)
    w = x.new_ones(x.shape[1], dtype=dtype) if weight is None else weight.to(dtype)
    b = x.new_zeros(x.shape[1], dtype=dtype) if bias is None else bias.to(dtype)
    buffers = running[:2] if running else ()
    _check(x, {"weight": w, "bias": b, **dict(zip(("running_mean", "running_var"), buffers))}, unit_samples,
           unit_channels)
    kept = [t if t.dtype == dtype and t.is_contiguous() else t.to(dtype, memory_format=torch.contiguous_format)
            for t in buffers]
    y, mean, var = _Normalize.apply(x, w.contiguous(), b.contiguous(), unit_samples, unit_channels, eps,
                                    (*kept, running[2]) if running else None)
    for buffer, copy in zip(buffers, kept):
        if copy is not buffer:
            buffer.copy_(copy)
        else:  # written through a pointer: tell autograd, as an in-place op would
            torch.autograd.graph.increment_version(buffer)
    return y, mean, var


def _check(x: torch.Tensor, per_channel: dict[str, torch.Tensor], unit_samples: int, unit_channels: int) -> None:
    """Everything the kernel trusts about its arguments' sizes: it reads and writes by pointer."""
    if x.dim() != 4:
        raise ValueError(f"normlab's CPU kernel takes a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    samples, channels = x.shape[:2]
    for name, tensor in per_channel.items():
        if tensor.numel() != channels:
            raise ValueError(f"{name} has {tensor.numel()} elements for an input of {channels} channels "
                             f"(shape {tuple(x.shape)})")
    if unit_samples < 1 or samples % unit_samples or unit_channels < 1 or channels % unit_channels:
        raise ValueError(f"units of {unit_samples} samples × {unit_channels} channels do not tile an input of shape "
                         f"{tuple(x.shape)}")
