"""The schemas in Hydra's ConfigStore, and the values the app's edge derives from a composed config.

Every config group has a dataclass schema (normlab/settings.py), so a misspelt key, a wrong type or a word
outside a fixed set fails at start-up with Hydra's own message. The norm schemas are generated from the norm
registry, so each ``conf/norm/<name>.yaml`` takes exactly the options its layer takes. Whatever a single group
cannot check alone is checked by ``normlab.validation.validate`` before any data is read.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from normlab.norms import REGISTRY
from normlab.settings import (GROUP_SCHEMAS, MODEL_BOUND_NORM_OPTIONS, BatchConfig, DataConfig, EvalConfig,
                              LoggerConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig, TrainerConfig,
                              norm_schema, schema_defaults)

__all__ = ["GROUP_SCHEMAS", "MODEL_BOUND_NORM_OPTIONS", "BatchConfig", "DataConfig", "EvalConfig", "LoggerConfig",
           "ModelConfig", "OptimConfig", "ScheduleConfig", "TrainConfig", "TrainerConfig", "model_options",
           "norm_options", "norm_schema", "register_configs", "schema_defaults"]


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore. The yaml files in conf/ extend them by name."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=f"schema/{group}", name=group, node=schema)  # apart, so no group lists it as an option
    for name in REGISTRY:
        cs.store(group="schema/norm", name=name, node=norm_schema(name))


# ---------------------------------------------------------------- derived values

def norm_options(cfg: DictConfig) -> dict[str, Any]:
    """The norm node as a plain mapping for ``build_model``, unset (None) options left out."""
    node = OmegaConf.to_container(cfg.norm, resolve=True)
    return {k: v for k, v in node.items() if v is not None}


def model_options(cfg: DictConfig) -> dict[str, Any]:
    """The model's own options (unset ones left out), for ``build_model``."""
    options = {k: cfg.model[k] for k in ("width", "shortcut") if cfg.model[k] is not None}
    return options
