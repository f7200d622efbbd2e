"""Swapping SyncBN layers in a built model for another BN over the same parameters and buffers: torch's
``nn.SyncBatchNorm`` under DDP on CUDA (its fused kernels), or plain BN over this process's images alone (a model
that runs on one rank while the others do not, as the memory-format probe does, must not wait on a collective)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from normlab.norms.sync_bn import SyncBatchNorm2d


def _swap(model: nn.Module, make: Callable[[SyncBatchNorm2d], nn.BatchNorm2d]) -> nn.Module:
    """`model` with each SyncBatchNorm2d replaced, in place, by `make(layer)`, sharing its parameters, buffers and
    mode; other BN layers (per-worker BN) are left alone."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is SyncBatchNorm2d:
                swapped = make(child)
                swapped.weight, swapped.bias = child.weight, child.bias
                for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                    setattr(swapped, buffer, getattr(child, buffer))
                swapped.train(child.training)
                setattr(parent, name, swapped)
    return model


def to_torch_sync_bn(model: nn.Module) -> nn.Module:
    """`model` with each SyncBatchNorm2d replaced, in place, by torch's ``nn.SyncBatchNorm`` (CUDA only)."""
    return _swap(model, lambda bn: nn.SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine,
                                                    bn.track_running_stats))


def to_process_local_bn(model: nn.Module) -> nn.Module:
    """`model` with each SyncBatchNorm2d replaced, in place, by ``nn.BatchNorm2d``: statistics over this process's
    images alone, no collective, whatever the world size."""
    return _swap(model, lambda bn: nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine,
                                                  bn.track_running_stats))
