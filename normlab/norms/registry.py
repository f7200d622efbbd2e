"""The norm registry: every 2-D normalization layer in normlab, keyed by the name used in config.

A model asks for ``build_norm(name, C, **options)`` with the layer's channel count first and the
options from config, as timm's ``create_norm_layer`` does. Options are checked here
(``check_norm_options``) before any layer is built, by the same rules whoever asks: a model's
``NormLayer`` or a direct caller.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from normlab.norms.batch_renorm import BatchRenorm2d
from normlab.norms.evo import EvoNormB0, EvoNormS0
from normlab.norms.group import NormChannelError, group_norm, instance_norm, layer_norm
from normlab.norms.per_worker_bn import PerWorkerBatchNorm2d
from normlab.norms.response import FilterResponseNorm2d
from normlab.norms.sync_bn import SyncBatchNorm2d
from normlab.options import accepted_options, check_options


def no_norm(num_channels: int) -> nn.Identity:
    """No normalization: the identity."""
    return nn.Identity()


@dataclass(frozen=True)
class NormEntry:
    """One registry entry: how to build the layer and what a model must know about it."""

    name: str
    layer: Callable[..., nn.Module]  # layer(num_channels, **options)
    paper: str
    batch_dependent: bool = False  # statistics over the batch: takes `workers` (per-worker statistics)
    synced: bool = False  # statistics over every worker's images (N·W), across processes too
    trains_on_running_stats: bool = False  # training reads the running statistics: ranks average them each step
    has_activation: bool = False  # a norm-activation layer: replaces the ReLU after it, takes `apply_act`
    standardize_convs: bool = False  # the model's convs use Weight Standardization
    compile_safe: bool = True  # torch.compile matches eager in train and eval (tests/test_compile.py)

    @property
    def options(self) -> dict[str, Any]:
        """Option names and defaults."""
        return accepted_options(self.layer)

    @property
    def module_type(self) -> type:
        """The class of the layers it builds: the layer itself, or its factory's return annotation."""
        return self.layer if isinstance(self.layer, type) else typing.get_type_hints(self.layer)["return"]


_ENTRIES = (
    NormEntry("bn", PerWorkerBatchNorm2d, "Ioffe & Szegedy 2015; per-worker statistics as in Wu & He 2018",
             batch_dependent=True),
    NormEntry("gn", group_norm, "Wu & He, Group Normalization, ECCV 2018"),
    NormEntry("ln", layer_norm, "Ba et al. 2016, as GN with G=1 (Wu & He 2018)"),
    NormEntry("in", instance_norm, "Ulyanov et al. 2016, as GN with G=C (Wu & He 2018)"),
    NormEntry("none", no_norm, "no normalization"),
    # compiled, BRN's γ gradient differs from eager's (its outputs and input gradients match): tests/test_compile.py
    NormEntry("brn", BatchRenorm2d, "Ioffe, Batch Renormalization, NeurIPS 2017", batch_dependent=True,
             compile_safe=False, trains_on_running_stats=True),
    NormEntry("frn", FilterResponseNorm2d, "Singh & Krishnan, Filter Response Normalization, CVPR 2020",
             has_activation=True),
    NormEntry("evonorm_b0", EvoNormB0, "Liu et al., Evolving Normalization-Activation Layers, NeurIPS 2020",
             batch_dependent=True, has_activation=True),
    NormEntry("evonorm_s0", EvoNormS0, "Liu et al., Evolving Normalization-Activation Layers, NeurIPS 2020",
             has_activation=True),
    NormEntry("gn_ws", group_norm, "Qiao et al., Weight Standardization, 2019 (with GN)", standardize_convs=True),
    NormEntry("syncbn", SyncBatchNorm2d, "Ioffe & Szegedy 2015, statistics synchronized over all workers "
             "(Peng et al., MegDet, CVPR 2018); the large-batch BN of Wu & He 2018, Sec. 6", synced=True),
)
REGISTRY: dict[str, NormEntry] = {entry.name: entry for entry in _ENTRIES}
NORMS: tuple[str, ...] = tuple(REGISTRY)


def norm_entry(name: str) -> NormEntry:
    """The registry entry for `name`; ValueError listing the valid names if there is none."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown norm {name!r}; valid norms: {', '.join(NORMS)}") from None


def check_norm_options(name: str, **options: Any) -> NormEntry:
    """Check everything about `options` that does not depend on the channel count; return the spec."""
    spec = norm_entry(name)
    check_options(name, spec.layer, options)
    workers = options.get("workers", 1)
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"{name}: workers={workers!r} is invalid; workers must be an integer >= 1")
    eps = options.get("eps", 1.0)
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{name}: eps={eps!r} is invalid; eps must be a number > 0 (e.g. 1e-5)")
    groups, group_size = options.get("groups"), options.get("group_size")
    if groups is not None and group_size is not None:
        raise ValueError(
            f"{name}: give either groups or group_size, not both (got groups={groups}, group_size={group_size})"
        )
    for key in ("groups", "group_size"):
        value = options.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: {key}={value!r} is invalid; {key} must be an integer >= 1")
    return spec


def build_norm(name: str, num_channels: int, **options: Any) -> nn.Module:
    """Build the norm layer `name` for `num_channels` channels, with `options` from config."""
    spec = check_norm_options(name, **options)
    try:
        return spec.layer(num_channels, **options)
    except NormChannelError as e:
        raise NormChannelError(f"{name}: {e}") from None


NORM_TYPES = tuple({entry.module_type for entry in _ENTRIES} - {nn.Identity})


def is_norm(module: nn.Module) -> bool:
    """Whether `module` is a normalization layer from this registry (the identity excluded)."""
    return isinstance(module, NORM_TYPES)
