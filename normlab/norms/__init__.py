"""Normalization layers by name: ``build_norm(name, num_channels, **options)`` and ``NORMS``.

One module per family: ``per_worker_bn``, ``batch_renorm`` and ``sync_bn`` (with ``worker_stats``, the batch
statistics they share, and ``sync_bn_swap``, SyncBN's stand-ins), ``group`` (GN, LN, IN), ``response`` (FRN),
``evo`` (EvoNorm), ``ws`` (Weight Standardization of convs). ``cpu_kernel`` runs per-worker BN and GN on a CPU as
torch ops, from the library ``kernel_library`` builds and loads.
"""

from normlab.norms.batch_renorm import BatchRenorm2d
from normlab.norms.evo import EvoNormB0, EvoNormS0
from normlab.norms.group import GroupNorm2d, NormChannelError
from normlab.norms.per_worker_bn import PerWorkerBatchNorm2d
from normlab.norms.registry import (NORMS, REGISTRY, NormEntry, build_norm, check_norm_options, is_norm,
                                    norm_entry)
from normlab.norms.response import FilterResponseNorm2d
from normlab.norms.sync_bn import SyncBatchNorm2d
from normlab.norms.sync_bn_swap import to_process_local_bn, to_torch_sync_bn
from normlab.norms.ws import WSConv2d, standardize_convs

__all__ = [
    "NORMS", "REGISTRY", "NormEntry", "NormChannelError", "build_norm", "check_norm_options", "is_norm",
    "norm_entry", "standardize_convs", "PerWorkerBatchNorm2d", "BatchRenorm2d", "GroupNorm2d", "FilterResponseNorm2d",
    "EvoNormB0", "EvoNormS0", "WSConv2d", "SyncBatchNorm2d", "to_process_local_bn", "to_torch_sync_bn",
]
