"""EvoNorm-B0 and EvoNorm-S0 (Liu, Brock, Simonyan & Le, NeurIPS 2020): searched norm-activation layers.

Both replace a norm *and* the ReLU after it. Where the replaced norm had no activation after it,
the official implementation applies only the affine ``γ·x + β`` (``apply_act=False`` here).

- B0: ``y = x / max(sqrt(s²_B + ε), v·x + sqrt(s²_I + ε)) · γ + β``, with s²_B the batch variance
  over (N, H, W) per channel (a moving average in eval) and s²_I the instance variance over (H, W).
- S0: ``y = x·σ(v·x) / sqrt(s²_G + ε) · γ + β``, with s²_G the group variance over (C/G, H, W)
  per sample: batch-independent.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.norms.group import resolve_groups
from normlab.norms.worker_stats import check_workers, for_statistics, per_sample, worker_moments


def _channel_param(num_channels: int, value: float) -> nn.Parameter:
    return nn.Parameter(torch.full((num_channels,), value))


def _view(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return p.to(x.dtype).view(1, -1, 1, 1)


class EvoNormB0(nn.Module):
    """EvoNorm-B0. The batch variance is taken per worker, as in :class:`PerWorkerBatchNorm2d`;
    its moving average tracks the biased variance averaged over workers, as the official code does."""

    def __init__(self, num_channels: int, *, workers: int = 1, eps: float = 1e-5, momentum: float = 0.1,
                 apply_act: bool = True) -> None:
        super().__init__()
        self.num_channels, self.workers, self.eps, self.momentum = num_channels, workers, eps, momentum
        self.apply_act = apply_act
        self.weight = _channel_param(num_channels, 1.0)
        self.bias = _channel_param(num_channels, 0.0)
        self.v = _channel_param(num_channels, 1.0) if apply_act else None
        self.register_buffer("running_var", torch.ones(num_channels))

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, workers={self.workers}, eps={self.eps}, momentum={self.momentum}, "
                f"apply_act={self.apply_act}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.v is None:
            return torch.addcmul(_view(self.bias, x), x, _view(self.weight, x))
        inst_var = for_statistics(x).var(dim=(2, 3), keepdim=True, correction=0)
        right = torch.addcmul(torch.sqrt(inst_var + self.eps).to(x.dtype), x, _view(self.v, x))
        if self.training:
            check_workers(x, self.workers, "evonorm_b0")
            var, _ = worker_moments(x, self.workers)
            with torch.no_grad():
                self.running_var.lerp_(var.mean(0), self.momentum)
            y = x / torch.maximum(per_sample(torch.sqrt(var + self.eps), x), right)
        else:
            y = x / torch.maximum(_view(torch.sqrt(self.running_var + self.eps), x), right)
        return torch.addcmul(_view(self.bias, x), y, _view(self.weight, x))


class EvoNormS0(nn.Module):
    """EvoNorm-S0, with G from `groups` (default 32) or `group_size`, as for GroupNorm."""

    def __init__(self, num_channels: int, *, groups: int | None = None, group_size: int | None = None,
                 eps: float = 1e-5, apply_act: bool = True) -> None:
        super().__init__()
        self.num_channels, self.eps, self.apply_act = num_channels, eps, apply_act
        self.groups = resolve_groups(num_channels, groups, group_size)
        self.weight = _channel_param(num_channels, 1.0)
        self.bias = _channel_param(num_channels, 0.0)
        self.v = _channel_param(num_channels, 1.0) if apply_act else None

    def extra_repr(self) -> str:
        return f"{self.num_channels}, groups={self.groups}, eps={self.eps}, apply_act={self.apply_act}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.v is None:
            return torch.addcmul(_view(self.bias, x), x, _view(self.weight, x))
        xg = x.unflatten(1, (self.groups, -1))
        group_var = for_statistics(xg).var(dim=(2, 3, 4), keepdim=True, correction=0)
        y = (xg * torch.sigmoid(xg * self.v.to(x.dtype).view(1, self.groups, -1, 1, 1))
             * torch.rsqrt(group_var + self.eps).to(x.dtype)).flatten(1, 2)
        return torch.addcmul(_view(self.bias, x), y, _view(self.weight, x))
