"""Initialization as in the paper (Wu & He 2018, following Goyal et al. 2017).

He (fan_out) init for convs; γ=1 and β=0 for every norm, except the last norm of each residual
block, whose γ starts at 0 so that every block starts as the identity (``zero_init_last``). Norms
without γ/β, and extra parameters such as FRN's τ or EvoNorm's v, keep their own init. The
classifier gets N(0, 0.01²) weights and zero bias, as in pycls and Detectron.
"""

from __future__ import annotations

from torch import nn

from normlab.models.blocks import ResidualBlock
from normlab.norms import is_norm


def has_affine(module: nn.Module) -> bool:
    return is_norm(module) and getattr(module, "weight", None) is not None


def init_weights(model: nn.Module, zero_init_last: bool = True) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        elif has_affine(m):
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    if zero_init_last:
        for m in model.modules():
            if isinstance(m, ResidualBlock) and has_affine(m.last_norm):
                nn.init.zeros_(m.last_norm.weight)
