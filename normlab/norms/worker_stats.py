"""Batch statistics per worker in torch's ops, shared by every norm that takes them (per-worker BN, Batch Renorm,
EvoNorm-B0, SyncBN's running statistics).

The paper's "batch size" is images per GPU: 8 GPUs each normalize their own N images, with BN statistics not
synchronized. Here one device simulates W such workers: a batch of W·N images is normalized as W chunks of N,
each by its own statistics, as W GPUs running plain BN would.
"""

from __future__ import annotations

import torch
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


@torch.no_grad()
def update_running_stats(layer: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count) -> None:
    """torch's BN update of `layer`'s running statistics, from (W, C) per-worker batch means and biased variances
    over `count` values each (averaged over the workers; see :class:`~normlab.norms.per_worker_bn.PerWorkerBatchNorm2d`). ``momentum=None``: the
    cumulative average, its factor kept as a tensor, so the step never syncs with the host."""
    layer.num_batches_tracked.add_(1)
    factor = layer.momentum
    if factor is None:
        factor = layer.num_batches_tracked.to(layer.running_mean.dtype).reciprocal()
    unbiased = var * (count / (count - 1))
    layer.running_mean.lerp_(mean.mean(0).to(layer.running_mean.dtype), factor)
    layer.running_var.lerp_(unbiased.mean(0).to(layer.running_var.dtype), factor)
