"""Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan, CVPR 2020).

Per sample and channel, ``ν² = mean_{H,W}(x²)``, ``x̂ = x / sqrt(ν² + ε)``, ``y = γ·x̂ + β`` and
``z = max(y, τ)``. There is no mean subtraction; TLU's learned threshold τ stands in for it, so
FRN replaces a norm *and* the ReLU after it. Where the norm had no activation after it (the last
norm of a residual block, shortcut projections), it is used without TLU (``apply_act=False``).
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.norms.worker_stats import for_statistics


class FilterResponseNorm2d(nn.Module):
    """FRN + TLU. ``learnable_eps=True`` learns ε as ``eps + |ε_l|`` (ε_l starts at 1e-4), the
    paper's remedy for 1×1 feature maps."""

    def __init__(self, num_channels: int, *, eps: float = 1e-6, learnable_eps: bool = False,
                 apply_act: bool = True) -> None:
        super().__init__()
        self.num_channels, self.eps, self.apply_act = num_channels, eps, apply_act
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.tau = nn.Parameter(torch.zeros(num_channels)) if apply_act else None
        self.learned_eps = nn.Parameter(torch.full((num_channels,), 1e-4)) if learnable_eps else None

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, eps={self.eps}, learnable_eps={self.learned_eps is not None}, "
                f"apply_act={self.apply_act}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.learned_eps is None else self.eps + self.learned_eps.abs().view(1, -1, 1, 1)
        nu2 = for_statistics(x).square().mean(dim=(2, 3), keepdim=True)
        y = x * torch.rsqrt(nu2 + eps).to(x.dtype)
        y = torch.addcmul(self.bias.to(x.dtype).view(1, -1, 1, 1), y, self.weight.to(x.dtype).view(1, -1, 1, 1))
        if self.tau is not None:
            y = torch.maximum(y, self.tau.to(x.dtype).view(1, -1, 1, 1))
        return y
