"""ResNets with the norm injected: ``build_model(name, num_classes, norm, **options)`` and ``MODELS``."""

from normlab.models.norm_layer import NormLayer, parse_norm
from normlab.models.registry import MODELS, build_model, model_builder

__all__ = ["MODELS", "NormLayer", "build_model", "model_builder", "parse_norm"]
