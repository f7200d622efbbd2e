"""Normalization layers by name: ``build_norm(name, num_channels, **options)`` and ``NORMS``.

One module per family: ``batch`` (per-worker BN, Batch Renorm), ``group`` (GN, LN, IN),
``response`` (FRN), ``evo`` (EvoNorm), ``ws`` (Weight Standardization of convs); ``cpu_kernel`` runs
per-worker BN and GN on a CPU.
"""

from normlab.norms.batch import BatchRenorm2d, PerWorkerBatchNorm2d
from normlab.norms.evo import EvoNormB0, EvoNormS0
from normlab.norms.group import GroupNorm2d, NormChannelError
from normlab.norms.registry import NORMS, REGISTRY, NormSpec, build_norm, check_norm_options, is_norm, norm_spec
from normlab.norms.response import FilterResponseNorm2d
from normlab.norms.ws import WSConv2d, standardize_convs

__all__ = [
    "NORMS", "REGISTRY", "NormSpec", "NormChannelError", "build_norm", "check_norm_options", "is_norm",
    "norm_spec", "standardize_convs", "PerWorkerBatchNorm2d", "BatchRenorm2d", "GroupNorm2d", "FilterResponseNorm2d",
    "EvoNormB0", "EvoNormS0", "WSConv2d",
]
