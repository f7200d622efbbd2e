"""``RunSpec``: everything one job needs, resolved once from its config (normlab/validation.py ``resolve_run``).

The Hydra config stops at the app's edge (normlab/train.py, normlab/validation.py, the sweep callbacks). Below
it, the engine, the data and the optimizer take this frozen object, or its typed parts, and never read a config:
the batch protocol (N, W, B, lr) is computed once, an image folder is listed once, and the runtime (device,
precision, threads, where this process stands in the job) is decided once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from normlab.data import DataSpec
from normlab.engine.dist import World
from normlab.protocol import BatchPlan
from normlab.settings import EvalConfig, LoggerConfig, ModelConfig, OptimConfig, Precision, ScheduleConfig


@dataclass(frozen=True)
class ModelSpec:
    """Which model, with its own options (unset ones left out) for ``build_model``."""

    name: str
    options: dict[str, Any]  # width, shortcut: what the model builder takes
    zero_init_last: bool

    @classmethod
    def from_settings(cls, model: ModelConfig) -> ModelSpec:
        options = {k: getattr(model, k) for k in ("width", "shortcut") if getattr(model, k) is not None}
        return cls(model.name, options, model.zero_init_last)


@dataclass(frozen=True)
class NormSpec:
    """Which norm, with the options its layer takes (unset ones left out): ``build_model``'s `norm`."""

    name: str
    options: dict[str, Any]  # name included: the mapping the norm registry builds a layer from


@dataclass(frozen=True)
class Runtime:
    """How this process runs the job: decided once from the config, the machine and the launcher."""

    device: torch.device
    precision: Precision  # fp32 or bf16 (auto resolved)
    threads: int | None  # torch's CPU threads; None keeps torch's default
    channels_last: str  # auto | true | false: the memory format, or auto to probe it at job start
    compile: bool
    cuda_graph: bool
    deterministic: bool
    world: World = World()


@dataclass(frozen=True)
class TrainingLength:
    """How long the job trains and how often it evaluates and checkpoints."""

    epochs: int
    eval_every: int
    checkpoint: bool
    force: bool  # start the run folder over, whatever it holds
    progress: bool  # draw a progress bar


@dataclass(frozen=True)
class RunSpec:
    """One job, resolved: what it trains (model, norm, data), how (batch plan, optimizer, schedule, length,
    evaluation), where (runtime), and how it is recorded."""

    name: str  # the experiment's name
    seed: int
    model: ModelSpec
    norm: NormSpec
    batch: BatchPlan
    data: DataSpec
    optim: OptimConfig
    schedule: ScheduleConfig
    length: TrainingLength
    eval: EvalConfig
    logger: LoggerConfig
    runtime: Runtime
    # The composed config as plain data: what config.yaml records, what a resumed run is compared with and
    # what W&B shows. Records only: nothing below the edge reads a setting from it.
    recorded_config: dict[str, Any]
    config_yaml: str  # that record as config.yaml's text
    identity: dict[str, Any]  # the flat keys that identify the run in its summary (protocol.identity)
    dataset: str | None = None  # the data config Hydra composed (e.g. cifar10_jpeg): provenance, not identity

    @property
    def run_name(self) -> str:
        """A readable job name: ``gn-G32-N4xW8-s0``."""
        norm = self.norm.name
        if self.norm.options.get("groups") is not None:
            norm += f"-G{self.norm.options['groups']}"
        if self.norm.options.get("group_size") is not None:
            norm += f"-C{self.norm.options['group_size']}"
        return f"{norm}-N{self.batch.per_worker}xW{self.batch.workers}-s{self.seed}"
