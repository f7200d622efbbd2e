"""Per-worker BN's and GN's CPU kernel (cpu_kernel.cpp) as torch ops: ``normlab::norm_forward``,
``normlab::norm_backward`` and ``normlab::running_update``.

torch's CPU BN kernels normalize a whole batch: per-worker BN built from them needs extra passes and a loop over
the workers. In channels_last torch's BN and GroupNorm are slow even alone, while the convolutions around them
want that layout. The kernel makes each statistic in one read of memory, in either layout, for float32, bfloat16
and float64, for any "unit" of normalization: a worker's N samples of one channel (BN) or one sample's C/G
channels (GN).

Registered with ``torch.library.custom_op``, with fake (meta) implementations and an autograd formula, the kernel
is an op like torch's own: ``torch.compile`` keeps it in its graphs instead of tracing around it. Where the
library is missing (no compiler, a failed build, a refused file: :mod:`normlab.norms.kernel_library`) or
``NORMLAB_CPU_KERNEL=0``, :func:`usable` says no and the norms run on torch's ops (one warning says why). The
kernel trusts the sizes it is given, so each op checks every size, dtype and layout before it passes a pointer.
"""

from __future__ import annotations

import functools
import logging

import torch

from normlab.norms import kernel_library

log = logging.getLogger(__name__)

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float64: 2}  # the kernel's dtype codes


@functools.cache
def _warn_once(reason: str) -> None:
    log.warning("per-worker BN and GN on the CPU use torch's ops, slower: %s", reason)


_loaded = False  # available()'s last eager answer: compiled code reads it, a constant, never the file system


def available() -> bool:
    """Whether the library is built and loaded (the first call builds it). Under torch.compile, the answer of the
    last eager call: ``engine.step.compile_model`` asks once before compiling. (Not Dynamo's
    ``assume_constant_result``: its decorator imports Dynamo, which would slow every process's start.)"""
    global _loaded
    if torch.compiler.is_compiling():
        return _loaded
    lib = kernel_library.library()
    if isinstance(lib, str):
        _warn_once(lib)
    _loaded = not isinstance(lib, str)
    return _loaded


def status() -> str:
    """What per-worker BN and GN run on the CPU: the kernel's file name, or torch's ops and why."""
    lib = kernel_library.library()
    return f"torch ({lib})" if isinstance(lib, str) else lib.path.name


def usable(x: torch.Tensor) -> bool:
    """Whether the kernel takes `x`: a CPU tensor of a dtype it has, the library loaded."""
    return x.device.type == "cpu" and x.dtype in DTYPES and available()


def is_channels_last(x: torch.Tensor) -> bool:
    """Laid out channels_last and not also contiguous (as a (N, C, 1, 1) tensor is both)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of `x`'s statistics and of the parameters met with it: float64 for float64, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dims(x: torch.Tensor, unit_samples: int, unit_channels: int) -> tuple[int, ...]:
    """(S, C, H·W, unit samples, unit channels, channels_last) as the kernel takes them."""
    return (x.shape[0], x.shape[1], x.shape[2] * x.shape[3], unit_samples, unit_channels, int(is_channels_last(x)))


def _call(name: str, *args) -> None:
    lib = kernel_library.library()
    if isinstance(lib, str):
        raise RuntimeError(f"normlab's CPU kernel is not loaded: {lib}")
    error = getattr(lib.functions, name)(*args)
    if error:
        raise RuntimeError(f"normlab's CPU kernel refused the call to {name} (code {error})")


def _forward_outputs(x: torch.Tensor, weight: torch.Tensor, unit_samples: int, unit_channels: int):
    """Empty (y, mean, var, invstd): y in x's dtype and memory format, the statistics (units) in weight's dtype."""
    y = torch.empty_like(x, memory_format=_memory_format(x))
    units = (x.shape[0] // unit_samples, x.shape[1] // unit_channels)
    return (y, *(x.new_empty(units, dtype=weight.dtype) for _ in range(3)))


@torch.library.custom_op("normlab::norm_forward", mutates_args=(), device_types="cpu")
def norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, unit_samples: int, unit_channels: int,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, biased var, invstd) of `x` per unit (see :func:`normalize`), in x's memory format."""
    _check(x, {"weight": weight, "bias": bias}, unit_samples, unit_channels)
    x = x.contiguous(memory_format=_memory_format(x))
    y, mean, var, invstd = _forward_outputs(x, weight, unit_samples, unit_channels)
    _call("normlab_norm_forward", DTYPES[x.dtype], x.data_ptr(), y.data_ptr(), weight.data_ptr(), bias.data_ptr(),
          mean.data_ptr(), var.data_ptr(), invstd.data_ptr(), *_dims(x, unit_samples, unit_channels), eps,
          torch.get_num_threads())
    return y, mean, var, invstd


@norm_forward.register_fake
def _(x, weight, bias, unit_samples, unit_channels, eps):
    return _forward_outputs(x, weight, unit_samples, unit_channels)


@torch.library.custom_op("normlab::norm_backward", mutates_args=(), device_types="cpu")
def norm_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                  invstd: torch.Tensor, unit_samples: int, unit_channels: int,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad x, grad weight, grad bias) of :func:`norm_forward`; no formula of its own (no second derivative)."""
    _check(x, {"weight": weight}, unit_samples, unit_channels, {"mean": mean, "invstd": invstd})
    if grad_y.shape != x.shape or grad_y.dtype != x.dtype:
        raise ValueError(f"grad_y {tuple(grad_y.shape)} {grad_y.dtype} does not match x {tuple(x.shape)} {x.dtype}")
    x = x.contiguous(memory_format=_memory_format(x))
    grad_y = grad_y.contiguous(memory_format=_memory_format(x))
    grad_x = torch.empty_like(x, memory_format=_memory_format(x))
    grad_weight, grad_bias = torch.empty_like(weight), torch.empty_like(weight)
    _call("normlab_norm_backward", DTYPES[x.dtype], grad_y.data_ptr(), x.data_ptr(), grad_x.data_ptr(),
          weight.data_ptr(), mean.data_ptr(), invstd.data_ptr(), grad_weight.data_ptr(), grad_bias.data_ptr(),
          *_dims(x, unit_samples, unit_channels), torch.get_num_threads())
    return grad_x, grad_weight, grad_bias


@norm_backward.register_fake
def _(grad_y, x, weight, mean, invstd, unit_samples, unit_channels):
    return torch.empty_like(x, memory_format=_memory_format(x)), torch.empty_like(weight), torch.empty_like(weight)


def _save_for_backward(ctx, inputs, output) -> None:
    x, weight, _bias, unit_samples, unit_channels, _eps = inputs
    _y, mean, var, invstd = output
    ctx.mark_non_differentiable(mean, var, invstd)
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.units = unit_samples, unit_channels


def _backward(ctx, grad_y, _grad_mean, _grad_var, _grad_invstd):
    x, weight, mean, invstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = norm_backward(grad_y, x, weight, mean, invstd, *ctx.units)
    return grad_x, grad_weight, grad_bias, None, None, None


norm_forward.register_autograd(_backward, setup_context=_save_for_backward)


@torch.library.custom_op("normlab::running_update", mutates_args=("running_mean", "running_var"), device_types="cpu")
def running_update(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                   factor: float, count: int) -> None:
    """torch's BN update of the (C,) running buffers, in place, by `factor` toward the (W, C) per-worker means and
    unbiased variances (biased `var` over `count` values each) averaged over the workers."""
    tensors = (running_mean, running_var, mean, var)
    if (mean.dim() != 2 or var.shape != mean.shape or running_mean.shape != (mean.shape[1],)
            or running_var.shape != (mean.shape[1],)
            or mean.dtype not in (torch.float32, torch.float64) or any(t.dtype != mean.dtype for t in tensors)
            or not all(t.is_contiguous() for t in tensors)):
        raise ValueError(f"running_update takes contiguous float32 or float64 (C,) buffers and (W, C) statistics of "
                         f"one dtype, got {[(tuple(t.shape), t.dtype) for t in tensors]}")
    _call("normlab_running_update", DTYPES[mean.dtype], mean.data_ptr(), var.data_ptr(), running_mean.data_ptr(),
          running_var.data_ptr(), factor, mean.shape[0], mean.shape[1], float(count))


@running_update.register_fake
def _(running_mean, running_var, mean, var, factor, count):
    return None


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
    w = x.new_ones(x.shape[1], dtype=dtype) if weight is None else weight.to(dtype).contiguous()
    b = x.new_zeros(x.shape[1], dtype=dtype) if bias is None else bias.to(dtype).contiguous()
    buffers = running[:2] if running else ()
    for name, buffer in zip(("running_mean", "running_var"), buffers):
        if x.dim() == 4 and buffer.numel() != x.shape[1]:
            raise ValueError(f"{name} has {buffer.numel()} elements for an input of {x.shape[1]} channels "
                             f"(shape {tuple(x.shape)})")
    _check(x, {"weight": w, "bias": b}, unit_samples, unit_channels)
    if running and unit_channels != 1:
        raise ValueError("running statistics are kept for units of one channel (per-worker BN) only")
    y, mean, var, _invstd = norm_forward(x, w, b, unit_samples, unit_channels, eps)
    if running:
        kept = [t if t.dtype == dtype and t.is_contiguous() else t.to(dtype, memory_format=torch.contiguous_format)
                for t in buffers]
        running_update(*kept, mean, var, running[2], unit_samples * x.shape[2] * x.shape[3])
        for buffer, copy in zip(buffers, kept):
            if copy is not buffer:
                buffer.copy_(copy)
    return y, mean, var


def _check(x: torch.Tensor, per_channel: dict[str, torch.Tensor], unit_samples: int, unit_channels: int,
           per_unit: dict[str, torch.Tensor] | None = None) -> None:
    """Everything the kernel trusts about its arguments' sizes, dtypes and layouts: it reads and writes by
    pointer."""
    if x.dim() != 4 or x.dtype not in DTYPES or x.device.type != "cpu":
        raise ValueError(f"normlab's CPU kernel takes a 4-D (N, C, H, W) CPU input of {list(DTYPES)}, got shape "
                         f"{tuple(x.shape)}, {x.dtype} on {x.device}")
    for name, tensor in {**per_channel, **(per_unit or {})}.items():
        if tensor.dtype != stat_dtype(x) or not tensor.is_contiguous() or tensor.device != x.device:
            raise ValueError(f"{name} must be a contiguous {stat_dtype(x)} CPU tensor for {x.dtype} input, got "
                             f"{tensor.dtype} on {tensor.device}")
    samples, channels = x.shape[:2]
    for name, tensor in per_channel.items():
        if tensor.numel() != channels:
            raise ValueError(f"{name} has {tensor.numel()} elements for an input of {channels} channels "
                             f"(shape {tuple(x.shape)})")
    if unit_samples < 1 or samples % unit_samples or unit_channels < 1 or channels % unit_channels:
        raise ValueError(f"units of {unit_samples} samples × {unit_channels} channels do not tile an input of shape "
                         f"{tuple(x.shape)}")
    units = (samples // unit_samples, channels // unit_channels)
    for name, tensor in (per_unit or {}).items():
        if tuple(tensor.shape) != units:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, not the {units} units of the input")
