"""The model registry: ``build_model(name, num_classes, norm, **options)``.

Every entry takes the class count, a :class:`NormLayer` and keyword-only options; ``build_model``
checks the options, binds the norm, reports layers the norm does not fit by their path, applies
Weight Standardization when the norm asks for it, and initializes the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from normlab.models.cifar_resnet import CifarResNet
from normlab.models.imagenet_resnet import ResNet
from normlab.models.init import init_weights
from normlab.models.norm_layer import NormChoice, NormLayer, raise_invalid_norms
from normlab.norms import standardize_convs
from normlab.options import check_options

ModelBuilder = Callable[..., nn.Module]


def _cifar_resnet(depth: int) -> ModelBuilder:
    def build(num_classes: int, norm: NormLayer, *, width: int = 16, shortcut: str = "A",
              in_chans: int = 3) -> nn.Module:
        return CifarResNet(depth, num_classes, norm, width=width, shortcut=shortcut, in_chans=in_chans)

    build.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016), widths 16/32/64 × width/16."
    return build


def _torchvision_resnet(depth: int, cifar_stem: bool) -> ModelBuilder:
    def build(num_classes: int, norm: NormLayer, *, in_chans: int = 3) -> nn.Module:
        return ResNet(depth, num_classes, norm, cifar_stem=cifar_stem, in_chans=in_chans)

    build.__doc__ = f"ResNet-{depth} on torchvision's trunk, {'3×3 CIFAR' if cifar_stem else '7×7 ImageNet'} stem."
    return build


MODELS: dict[str, ModelBuilder] = {
    **{f"resnet{d}": _cifar_resnet(d) for d in (8, 20, 32, 44, 56, 110)},
    **{f"resnet{d}": _torchvision_resnet(d, cifar_stem=True) for d in (18, 34, 50)},
    **{f"imagenet_resnet{d}": _torchvision_resnet(d, cifar_stem=False) for d in (18, 34, 50, 101)},
}


def model_builder(name: str) -> ModelBuilder:
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}") from None


def build_model(name: str, num_classes: int, norm: NormChoice, *, workers: int = 1,
                zero_init_last: bool = True, **options: Any) -> nn.Module:
    """Build model `name` with every norm layer from `norm` (a registry name or a mapping).

    `workers` (W) goes to the norms that take batch statistics; `options` are the model's own
    (``width``, ``shortcut`` for the CIFAR ResNets, ``in_chans`` for all).
    """
    builder = model_builder(name)
    check_options(name, builder, options)
    norm_layer = NormLayer(norm, workers=workers)
    model = builder(num_classes, norm_layer, **options)
    raise_invalid_norms(model, name)
    if norm_layer.spec.standardize_convs:
        model = standardize_convs(model)
    init_weights(model, zero_init_last=zero_init_last)
    return model
