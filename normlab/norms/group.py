"""GroupNorm and its two extremes, LayerNorm (G=1) and InstanceNorm (G=C), on torch's native kernel.

Wu & He, "Group Normalization" (ECCV 2018): channels are split into G groups and each sample is
normalized over (C/G, H, W) within every group, with a per-channel affine γ, β. The paper's Table 3
ablates G at a fixed count and at a fixed number of channels per group, hence the two options.
"""

from __future__ import annotations

from torch import nn

from normlab.protocol import DEFAULT_GROUPS


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
               eps: float = 1e-5, affine: bool = True) -> nn.GroupNorm:
    """GroupNorm with G = `groups` (default 32) or G = C / `group_size`."""
    return nn.GroupNorm(resolve_groups(num_channels, groups, group_size), num_channels, eps, affine)


def layer_norm(num_channels: int, *, eps: float = 1e-5, affine: bool = True) -> nn.GroupNorm:
    """LayerNorm over (C, H, W) per sample with a per-channel affine: GroupNorm with G=1, as in the paper."""
    return nn.GroupNorm(1, num_channels, eps, affine)


def instance_norm(num_channels: int, *, eps: float = 1e-5, affine: bool = True) -> nn.GroupNorm:
    """InstanceNorm over (H, W) per sample and channel: GroupNorm with G=C, as in the paper."""
    return nn.GroupNorm(num_channels, num_channels, eps, affine)
