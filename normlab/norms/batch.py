"""Norms whose statistics come from the batch: per-worker BatchNorm and Batch Renormalization.

The paper's "batch size" is images per GPU: 8 GPUs each normalize their own N images, with
BN statistics not synchronized. Here one device simulates W such workers: a batch of W·N
images is viewed as (W, N, C, H, W) and every statistic is taken per worker, in one pass,
without a Python loop over workers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def check_workers(x: torch.Tensor, workers: int, kind: str) -> None:
    """A (W·N, C, H, W) batch must split evenly among W workers, with more than one value per channel each."""
    if x.dim() != 4:
        raise ValueError(f"{kind}: expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] % workers:
        raise ValueError(
            f"{kind}: a batch of {x.shape[0]} images cannot be split among workers={workers}; "
            f"the batch must be a multiple of {workers} (per-worker batch × workers)"
        )
    per_worker = x.shape[0] // workers
    if per_worker * x.shape[2] * x.shape[3] < 2:
        raise ValueError(
            f"{kind}: each worker sees a single value per channel (per-worker batch "
            f"{per_worker} of {x.shape[2]}×{x.shape[3]} maps), so batch statistics are undefined; "
            f"use a larger per-worker batch or a batch-independent norm (gn, ln, in, frn, evonorm_s0)"
        )


def for_statistics(x: torch.Tensor) -> torch.Tensor:
    """`x` in a precision fit for sums of squares: half precision is raised to float32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def worker_moments(x: torch.Tensor, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased variance and mean per worker and channel of a (W·N, C, H, W) batch, at least in float32.

    Taken per sample over (H, W), one fast reduction over contiguous memory, then pooled over each
    worker's N samples by the law of total variance (every sample has the same H·W values).
    """
    var, mean = torch.var_mean(for_statistics(x), dim=(2, 3), correction=0)
    var, mean = var.unflatten(0, (workers, -1)), mean.unflatten(0, (workers, -1))
    pooled_mean = mean.mean(1)
    return var.mean(1) + (mean - pooled_mean[:, None]).square().mean(1), pooled_mean


def per_sample(stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (W, C) per-worker statistic as (W·N, C, 1, 1), to broadcast over a (W·N, C, H, W) batch."""
    return stat.repeat_interleave(x.shape[0] // stat.shape[0], dim=0)[:, :, None, None].to(x.dtype)


def per_sample_dot(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Σ over (H, W) of a·b, per sample and channel, without a full-size temporary where it can."""
    if a.device.type == "cpu" and a.dtype == b.dtype == dtype and a.is_contiguous() and b.is_contiguous():
        return torch.einsum("bchw,bchw->bc", a, b)
    return (a * b).sum((2, 3), dtype=dtype)


class _PerWorkerBatchNormFn(torch.autograd.Function):
    """BN with per-worker statistics: ``F.batch_norm``'s formulas applied to each worker's chunk at once.

    Statistics: on CUDA, the pooled per-sample Welford moments of :func:`worker_moments` (stable, and
    cheap there). On a CPU, where that reduction is slow, per-sample sums of x and x² (one cheap pass
    each, no temporary); their E[x²] − E[x]² loses precision only where a channel's mean exceeds its
    std ~100-fold (relative error ~1e-3 there), which conv outputs in a ResNet do not approach.
    The output and the input gradient are one fused pass each.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, workers: int, eps: float):
        count = x.shape[0] // workers * x.shape[2] * x.shape[3]  # values per worker and channel
        if x.device.type == "cpu":
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            sums = x.sum((2, 3), dtype=dtype).unflatten(0, (workers, -1)).sum(1)
            squares = torch.linalg.vector_norm(x, dim=(2, 3), dtype=dtype).square()
            mean = sums / count
            var = (squares.unflatten(0, (workers, -1)).sum(1) / count - mean.square()).clamp_min(0.0)
        else:
            var, mean = worker_moments(x, workers)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        y = torch.addcmul(per_sample(shift, x), x, per_sample(scale, x))
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.workers, ctx.count = workers, count
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, mean, invstd = ctx.saved_tensors
        workers, count = ctx.workers, ctx.count
        sum_g = grad_y.sum((2, 3), dtype=mean.dtype).unflatten(0, (workers, -1)).sum(1)
        sum_gx = per_sample_dot(grad_y, x, mean.dtype).unflatten(0, (workers, -1)).sum(1)
        sum_g_xhat = invstd * (sum_gx - mean * sum_g)  # Σ grad·x̂ per worker and channel
        a = invstd if weight is None else invstd * weight
        b = -a * invstd * sum_g_xhat / count
        c = -a * sum_g / count - b * mean
        grad_x = torch.mul(x, per_sample(b, x))  # grad_x = a·grad + b·x + c, in place after one allocation
        grad_x.add_(per_sample(c, x)).addcmul_(grad_y, per_sample(a, x))
        grad_weight = sum_g_xhat.sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_g.sum(0).to(weight.dtype) if ctx.needs_input_grad[2] else None
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
        y, mean, var = _PerWorkerBatchNormFn.apply(x, self.weight, self.bias, self.workers, self.eps)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean, var, count=x.shape[0] // self.workers * x.shape[2] * x.shape[3])
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        self.num_batches_tracked.add_(1)
        factor = self.momentum
        if factor is None:  # cumulative average, as a tensor: no host sync
            factor = self.num_batches_tracked.to(self.running_mean.dtype).reciprocal()
        unbiased = var * (count / (count - 1))
        self.running_mean.lerp_(mean.mean(0).to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.mean(0).to(self.running_var.dtype), factor)


class BatchRenorm2d(nn.Module):
    """Batch Renormalization (Ioffe, NeurIPS 2017), with per-worker batch statistics.

    Training: ``x̂ = (x − μ_B)/σ_B · r + d`` with ``σ_B = sqrt(var_B + eps)``,
    ``r = clip(σ_B/σ, 1/r_max, r_max)`` and ``d = clip((μ_B − μ)/σ, −d_max, d_max)``, both
    treated as constants by the gradient; then ``y = γ·x̂ + β``. The moving averages follow the
    paper's Algorithm 1, ``μ += momentum·(μ_B − μ)`` and ``σ += momentum·(σ_B − σ)``, with
    μ_B and σ_B averaged over workers as in :class:`PerWorkerBatchNorm2d`. Eval: ``y = γ(x − μ)/σ + β``.

    Warm-up, as in the paper: for the first ``warmup_steps`` training steps r_max = 1 and
    d_max = 0 (plain BN); over the next ``ramp_steps`` steps both limits grow linearly to
    ``r_max`` and ``d_max``. The step count is ``num_batches_tracked``, saved with the model.
    """

    def __init__(
        self,
        num_features: int,
        *,
        workers: int = 1,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        ramp_steps: int = 20000,
        eps: float = 1e-5,
        momentum: float = 0.01,
    ) -> None:
        super().__init__()
        if r_max < 1 or d_max < 0 or warmup_steps < 0 or ramp_steps < 0:
            raise ValueError(
                f"brn: need r_max >= 1, d_max >= 0, warmup_steps >= 0 and ramp_steps >= 0; got "
                f"r_max={r_max}, d_max={d_max}, warmup_steps={warmup_steps}, ramp_steps={ramp_steps}"
            )
        self.num_features, self.workers, self.eps, self.momentum = num_features, workers, eps, momentum
        self.r_max, self.d_max, self.warmup_steps, self.ramp_steps = r_max, d_max, warmup_steps, ramp_steps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, workers={self.workers}, r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup_steps={self.warmup_steps}, ramp_steps={self.ramp_steps}, eps={self.eps}, "
                f"momentum={self.momentum}")

    def limits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_max, d_max) at the current training step, as tensors: no host sync in the step."""
        ramped = self.num_batches_tracked.float() - self.warmup_steps + 1  # steps into the ramp, this one included
        frac = (ramped / self.ramp_steps).clamp(0.0, 1.0) if self.ramp_steps else (ramped > 0).float()
        return 1.0 + (self.r_max - 1.0) * frac, self.d_max * frac

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            scale = self.weight / self.running_std
            shift = self.bias - self.running_mean * scale
            return torch.addcmul(shift.to(x.dtype).view(1, -1, 1, 1), x, scale.to(x.dtype).view(1, -1, 1, 1))
        check_workers(x, self.workers, "brn")
        var, mean = worker_moments(x, self.workers)
        std = torch.sqrt(var + self.eps)
        r_max, d_max = self.limits()
        with torch.no_grad():
            r = torch.minimum(torch.maximum(std / self.running_std, 1.0 / r_max), r_max)
            d = torch.minimum(torch.maximum((mean - self.running_mean) / self.running_std, -d_max), d_max)
            self.running_mean.lerp_(mean.mean(0), self.momentum)
            self.running_std.lerp_(std.mean(0), self.momentum)
            self.num_batches_tracked.add_(1)
        scale = self.weight * r / std
        shift = self.bias + self.weight * d - mean * scale
        return torch.addcmul(per_sample(shift, x), x, per_sample(scale, x))

