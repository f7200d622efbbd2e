"""The norm chosen in config, bound to its options: what a model calls to get each norm layer.

``norm = NormLayer({"name": "gn", "groups": 32}, workers=8)``; then ``norm(C)`` builds one layer
for C channels. A layer whose channel count does not fit the options (G does not divide C) is
built as an :class:`InvalidNorm` placeholder, so that :func:`raise_invalid_norms` can report the
layer's path in the finished model (``layer1.0.bn2``), which a norm being built cannot know.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from normlab.norms import NormChannelError, build_norm, check_norm_options, norm_entry

NormChoice = str | Mapping[str, Any]


def parse_norm(norm: NormChoice) -> tuple[str, dict[str, Any]]:
    """Split a norm choice, a registry name or a mapping with a ``name`` key, into (name, options)."""
    if isinstance(norm, str):
        return norm, {}
    if isinstance(norm, Mapping) and "name" in norm:
        options = {k: v for k, v in norm.items() if k != "name"}
        return norm["name"], options
    raise ValueError(f"norm={norm!r} is invalid; give a registry name such as 'gn' or a mapping "
                     f"such as {{'name': 'gn', 'groups': 32}}")


class InvalidNorm(nn.Module):
    """Stands where a norm could not be built; the model builder reports it with its path."""

    def __init__(self, num_channels: int, error: NormChannelError) -> None:
        super().__init__()
        self.num_channels, self.error = num_channels, error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"this norm layer could not be built: {self.error}")


class NormLayer:
    """A factory for one model's norm layers: `norm(C)` for a layer of C channels.

    ``act=True`` marks a norm that is followed by the block's activation: norm-activation layers
    (frn, evonorm_*) then include it, and :meth:`activation` gives the module that goes after the norm
    (``nn.Identity`` for those, ``nn.ReLU`` for the rest). `workers` goes to the norms that take
    batch statistics; the batch-independent ones ignore it.
    """

    def __init__(self, norm: NormChoice, workers: int = 1) -> None:
        name, options = parse_norm(norm)
        self.spec = norm_entry(name)
        if self.spec.batch_dependent:
            if options.get("workers", workers) != workers:
                raise ValueError(f"{name}: workers={options['workers']} in the norm options disagrees with "
                                 f"workers={workers} given to the model; give it once")
            options["workers"] = workers
        check_norm_options(name, **options)
        self.options = options

    @property
    def name(self) -> str:
        return self.spec.name

    def __call__(self, num_channels: int, act: bool = False) -> nn.Module:
        options = dict(self.options)
        if self.spec.has_activation:
            options["apply_act"] = act
        try:
            return build_norm(self.name, num_channels, **options)
        except NormChannelError as error:
            return InvalidNorm(num_channels, error)

    def activation(self) -> nn.Module:
        """The activation after a norm built with ``act=True``."""
        return nn.Identity() if self.spec.has_activation else nn.ReLU(inplace=True)


def raise_invalid_norms(model: nn.Module, model_name: str) -> None:
    """Raise one ValueError naming every layer whose norm could not be built, grouped by cause."""
    by_cause: dict[str, list[str]] = {}
    for path, m in model.named_modules():
        if isinstance(m, InvalidNorm):
            by_cause.setdefault(str(m.error), []).append(path)
    if not by_cause:
        return
    count = sum(len(paths) for paths in by_cause.values())
    lines = [f"  {_listed(paths)}: {cause}" for cause, paths in by_cause.items()]
    raise ValueError(f"{model_name}: the norm does not fit {count} layer(s):\n" + "\n".join(lines))


def _listed(paths: list[str], shown: int = 6) -> str:
    more = f", ... ({len(paths)} layers)" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more
