"""Per-worker BatchNorm: the paper's multi-GPU BN, each worker's statistics its own (:mod:`worker_stats`).

Two implementations: normlab's CPU kernel (:mod:`normlab.norms.cpu_kernel`, a torch op, compiled runs included)
where it is loaded, and one portable path in torch's ops (:class:`_PerWorkerBatchNormFn`) on any other device,
dtype, or machine without the kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.norms import cpu_kernel
from normlab.norms.worker_stats import check_workers, for_statistics, per_sample, update_running_stats, worker_moments


def _torch_forward(x, weight, bias, workers, eps):
    """(y, mean, var, invstd): pooled per-sample moments, one fused elementwise pass for y."""
    var, mean = worker_moments(x, workers)
    invstd = torch.rsqrt(var + eps)
    scale = invstd * weight
    y = torch.addcmul(per_sample(bias - mean * scale, x), x, per_sample(scale, x))
    return y, mean, var, invstd


def _torch_backward(grad_y, x, weight, mean, invstd, workers):
    """(grad_x, Σ grad·x̂, Σ grad): reductions per sample, pooled; one fused pass for grad_x."""
    count = x.shape[0] // workers * x.shape[2] * x.shape[3]
    sum_g = grad_y.sum((2, 3), dtype=mean.dtype).unflatten(0, (workers, -1)).sum(1)
    sum_gx = (for_statistics(grad_y) * for_statistics(x)).sum((2, 3)).unflatten(0, (workers, -1)).sum(1)
    sum_g_xhat = invstd * (sum_gx - mean * sum_g)
    a = invstd * weight
    b = -a * invstd * sum_g_xhat / count
    c = -a * sum_g / count - b * mean
    grad_x = torch.mul(x, per_sample(b, x))  # grad_x = a·grad + b·x + c, in place after one allocation
    grad_x.add_(per_sample(c, x)).addcmul_(grad_y, per_sample(a, x))
    return grad_x, sum_g_xhat, sum_g


def per_worker_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, workers: int,
                          eps: float, running: nn.BatchNorm2d | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, biased var) of `x` normalized per worker chunk, the statistics (W, C); `running`: a layer whose
    running statistics take this batch's (:func:`update_running_stats`). normlab's CPU kernel where it takes
    `x` (:func:`normlab.norms.cpu_kernel.usable`), else :class:`_PerWorkerBatchNormFn`."""
    if cpu_kernel.usable(x):
        buffers = None
        if running is not None:  # torch's factor for this batch: the momentum, or 1/batches for momentum=None
            momentum = running.momentum
            factor = momentum if momentum is not None else 1.0 / (int(running.num_batches_tracked) + 1)
            buffers = (running.running_mean, running.running_var, factor)
        out = cpu_kernel.normalize(x, weight, bias, unit_samples=x.shape[0] // workers, unit_channels=1, eps=eps,
                                   running=buffers)
        if running is not None:
            running.num_batches_tracked.add_(1)
        return out
    y, mean, var = _PerWorkerBatchNormFn.apply(x, weight, bias, workers, eps)
    if running is not None:
        update_running_stats(running, mean, var, count=x.shape[0] // workers * x.shape[2] * x.shape[3])
    return y, mean, var


class _PerWorkerBatchNormFn(torch.autograd.Function):
    """BN with per-worker statistics in torch's ops: ``F.batch_norm``'s formulas applied to each worker's chunk at
    once, on any device (:func:`_torch_forward`, :func:`_torch_backward`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, workers: int, eps: float):
        dtype = cpu_kernel.stat_dtype(x)  # torch's kernels take bf16 input with float32 parameters, not bf16 ones
        w = x.new_ones(x.shape[1], dtype=dtype) if weight is None else weight.to(dtype)
        b = x.new_zeros(x.shape[1], dtype=dtype) if bias is None else bias.to(dtype)
        y, mean, var, invstd = _torch_forward(x, w, b, workers, eps)
        ctx.save_for_backward(x, w, mean, invstd)
        ctx.workers, ctx.param_dtype = workers, dtype if weight is None else weight.dtype
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_x, sum_g_xhat, sum_g = _torch_backward(grad_y, x, weight, mean, invstd, ctx.workers)
        grad_weight = sum_g_xhat.sum(0).to(ctx.param_dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_g.sum(0).to(ctx.param_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None


class PerWorkerBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with statistics per worker batch: the paper's multi-GPU BN, statistics not synced.

    In training, a batch of W·N images is normalized as W independent groups of N, each by its
    own mean and (biased) variance over (N, H, W), exactly as W GPUs running plain BN would.

    Running statistics: each real worker would keep its own exponential moving average,
    ``r_w ← (1 − m)·r_w + m·s_w``, with ``s_w`` its batch mean and its *unbiased* batch variance
    (N·H·W/(N·H·W − 1) times the biased one), as ``nn.BatchNorm2d`` does. Averaging the W
    buffers at the end, which is how the worker models are merged into one, gives the same
    result as keeping a single buffer updated with the average of the W statistics,
    ``r ← (1 − m)·r + m·mean_w(s_w)``, because the update is linear and all workers start equal.
    That single buffer is what this layer keeps. ``momentum=None`` (cumulative average) is
    linear too and is handled the same way.

    With ``workers=1``, and whenever running statistics are used (eval mode), this is
    ``nn.BatchNorm2d`` itself, bit for bit.
    """

    def __init__(
        self,
        num_features: int,
        *,
        workers: int = 1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.workers = workers

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, workers={self.workers}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        uses_batch_stats = self.training or not self.track_running_stats
        if not uses_batch_stats:
            return super().forward(x)
        check_workers(x, self.workers, "bn")  # checks the shape, before torch's terser check
        if self.workers == 1:
            return super().forward(x)
        running = self if self.training and self.track_running_stats else None
        return per_worker_batch_norm(x, self.weight, self.bias, self.workers, self.eps, running)[0]


class ChunkStatisticsBatchNorm2d(nn.Module):
    """A BN layer's stand-in at test time (``eval.bn_stats=batch``): each chunk of `per_chunk` images normalized
    by its own statistics, as training normalized each worker's, with the layer's own γ and β (a last, smaller
    chunk by its own). No running statistics are read or written."""

    def __init__(self, layer: nn.BatchNorm2d, per_chunk: int) -> None:
        super().__init__()
        self.weight, self.bias, self.eps, self.per_chunk = layer.weight, layer.bias, layer.eps, per_chunk

    def extra_repr(self) -> str:
        return f"per_chunk={self.per_chunk}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = x.shape[0] // self.per_chunk * self.per_chunk
        parts = [(x[:full], full // self.per_chunk)] * bool(full) + [(x[full:], 1)] * (full < x.shape[0])
        outs = [per_worker_batch_norm(part, self.weight, self.bias, chunks, self.eps)[0] for part, chunks in parts]
        return outs[0] if len(outs) == 1 else torch.cat(outs)
