"""GroupNorm and its two extremes, LayerNorm (G=1) and InstanceNorm (G=C).

Wu & He, "Group Normalization" (ECCV 2018): channels are split into G groups and each sample is
normalized over (C/G, H, W) within every group, with a per-channel affine γ, β. The paper's Table 3
ablates G at a fixed count and at a fixed number of channels per group, hence the two options.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.norms import cpu_kernel

DEFAULT_GROUPS = 32  # the paper's G


class GroupNorm2d(nn.GroupNorm):
    """``nn.GroupNorm``; a channels_last batch on a CPU goes through normlab's kernel where it is built: torch's
    GroupNorm kernel is slow in that layout, which the convolutions around it want (in NCHW torch's is faster)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not cpu_kernel.is_channels_last(x) or not cpu_kernel.usable(x):
            return super().forward(x)
        return cpu_kernel.normalize(x, self.weight, self.bias, unit_samples=1,
                                    unit_channels=self.num_channels // self.num_groups, eps=self.eps)[0]


class NormChannelError(ValueError):
    """A norm's options do not fit the channel count of the layer it was asked for."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_groups(num_channels: int, groups: int | None, group_size: int | None) -> int:
    """The group count G from either `groups` or `group_size` (channels per group), checked against C."""
    if groups is not None and group_size is not None:
        raise ValueError(f"give either groups or group_size, not both (got groups={groups}, group_size={group_size})")
    if group_size is not None:
        if group_size < 1 or num_channels % group_size:
            raise NormChannelError(
                f"group_size={group_size} does not divide num_channels={num_channels}; "
                f"valid group sizes for {num_channels} channels: {divisors(num_channels)}"
            )
        return num_channels // group_size
    groups = DEFAULT_GROUPS if groups is None else groups
    if groups < 1 or num_channels % groups:
        raise NormChannelError(
            f"groups={groups} does not divide num_channels={num_channels}; "
            f"valid group counts for {num_channels} channels: {divisors(num_channels)}"
        )
    return groups


def group_norm(num_channels: int, *, groups: int | None = None, group_size: int | None = None,
               eps: float = 1e-5, affine: bool = True) -> GroupNorm2d:
    """GroupNorm with G = `groups` (default 32) or G = C / `group_size`."""
    return GroupNorm2d(resolve_groups(num_channels, groups, group_size), num_channels, eps, affine)


def layer_norm(num_channels: int, *, eps: float = 1e-5, affine: bool = True) -> GroupNorm2d:
    """LayerNorm over (C, H, W) per sample with a per-channel affine: GroupNorm with G=1, as in the paper."""
    return GroupNorm2d(1, num_channels, eps, affine)


def instance_norm(num_channels: int, *, eps: float = 1e-5, affine: bool = True) -> GroupNorm2d:
    """InstanceNorm over (H, W) per sample and channel: GroupNorm with G=C, as in the paper."""
    return GroupNorm2d(num_channels, num_channels, eps, affine)
