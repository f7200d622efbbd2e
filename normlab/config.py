"""Typed config schemas (Hydra's ConfigStore), and the values derived from a composed config.

Every config group has a dataclass schema, so a misspelt key or a wrong type fails at start-up
with Hydra's own message. The norm schemas are generated from the norm registry, so each
``conf/norm/<name>.yaml`` takes exactly the options its layer takes. Whatever a single group
cannot check alone is checked by ``normlab.validation.validate`` before any data is read.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from normlab.norms import REGISTRY

# Options that the model binds itself, not the user: W comes from batch.workers, and whether a
# norm-activation layer applies its activation depends on where it sits in the block.
MODEL_BOUND_NORM_OPTIONS = ("workers", "apply_act")


# ---------------------------------------------------------------- group schemas

@dataclass
class ModelConfig:
    name: str = "resnet20"
    width: Optional[int] = None  # CIFAR ResNet-(6n+2) only: stage widths width, 2·width, 4·width (default 16)
    shortcut: Optional[str] = None  # CIFAR ResNet-(6n+2) only: "A" (zero-padding, default) or "B" (projection)
    zero_init_last: bool = True


@dataclass
class BatchConfig:
    per_worker: int = 32  # N: the normalization batch, the paper's "batch size"
    workers: Optional[int] = 8  # W: workers simulated on one device; the optimizer step sees N·W images
    total: Optional[int] = None  # B: a fixed total batch instead (W = B/N; set workers to null)


@dataclass
class DataConfig:
    name: str = MISSING
    root: Optional[str] = None  # cifar: the torchvision root; imagefolder: a folder or a .zip
    download: bool = False
    image_size: Optional[int] = None  # imagefolder: resize (shorter side) and center-crop to this size
    num_classes: Optional[int] = None  # imagefolder: a seeded subset of this many classes; synthetic: classes
    classes: Optional[list[str]] = None  # imagefolder: an explicit class list (folder names)
    class_seed: int = 0  # imagefolder: the seed that picks num_classes classes
    num_train: int = 512  # synthetic only
    num_test: int = 128  # synthetic only
    channels: int = 3  # synthetic only
    size: int = 32  # synthetic only: height and width
    augment: bool = True  # random crop with padding (and flip), drawn per sample, applied on the device
    crop_padding: Optional[int] = None  # default: size/8 (4 for 32×32, 1 for 8×8)
    flip: bool = True  # horizontal flips in the augmentation (off for digits: they are not mirror-symmetric)
    in_memory_max_gb: float = 4.0  # imagefolder: larger decoded sets stream through a DataLoader
    max_image_pixels: int = 40_000_000  # imagefolder: larger images (by their header) are refused before decoding
    loader_workers: int = 4  # DataLoader workers for streamed image folders
    cache_dir: Optional[str] = None  # where decoded uint8 arrays are cached (default $NORMLAB_CACHE or ~/.cache/normlab)
    eval_batch: int = 512
    train_subset: Optional[int] = None  # a seeded, class-stratified subset of this many training images
    test_subset: Optional[int] = None  # the same for the test set (default: the whole test set)
    subset_seed: int = 0  # picks the subsets; fixed across run seeds, so every run sees the same images


@dataclass
class OptimConfig:
    base_lr: float = 0.1  # the paper: 0.1 at a total batch of 256 (32 images × 8 GPUs)
    base_batch: int = 256
    lr: Optional[float] = None  # None: linear scaling rule, base_lr · N·W / base_batch
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = True  # the paper decays γ and β too; false excludes norms and biases
    label_smoothing: float = 0.0


@dataclass
class ScheduleConfig:
    name: str = "step"  # step | cosine
    milestones: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.9])  # step: fractions of training
    gamma: float = 0.1  # step: factor at each milestone
    min_lr_factor: float = 0.0  # cosine: final lr as a fraction of the peak
    warmup_epochs: float = 0.0  # linear warm-up, in epochs (fractions allowed)
    warmup_start_factor: float = 0.1  # warm-up starts at this fraction of the peak lr


@dataclass
class TrainerConfig:
    epochs: int = 30
    eval_every: int = 1  # evaluate every k epochs (and always after the last)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA and on CPUs with native bf16, else fp32) | fp32 | bf16
    channels_last: str = "auto"  # auto | true | false
    threads: Optional[int] = None  # CPU threads; None keeps torch's default
    compile: bool = False  # torch.compile the model (checked against eager for every norm: tests/test_compile.py)
    cuda_graph: str = "auto"  # auto (on CUDA, unless compile) | true | false: the training step as one CUDA graph
    checkpoint: bool = True  # atomic checkpoint at each epoch end, for resume
    force: bool = False  # rerun even when summary.json says done
    deterministic: bool = False  # torch.use_deterministic_algorithms
    progress: str = "auto"  # auto (a bar only on a terminal) | true | false


@dataclass
class EvalConfig:
    bn_stats: str = "ema"  # ema | precise | batch: which statistics BN normalizes the test images with
    precise_images: int = 4096  # precise: training images the population statistics are recomputed from
    compare_bn_stats: bool = False  # evaluate every mode each time: val_error_ema/_precise/_batch columns


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    project: str = "normlab"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    tags: list[str] = field(default_factory=list)
    dir: Optional[str] = None  # default: the run directory


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    norm: Any = MISSING
    data: DataConfig = MISSING
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = MISSING
    schedule: ScheduleConfig = MISSING
    trainer: TrainerConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = MISSING
    seed: int = 0
    name: str = "train"  # the experiment's name: W&B group, results/<name>/...


# ---------------------------------------------------------------- norm schemas from the registry

def _config_type(annotation: Any) -> Any:
    """A type OmegaConf accepts: ``int | None`` becomes ``Optional[int]``."""
    if isinstance(annotation, types.UnionType):
        args = [a for a in annotation.__args__ if a is not type(None)]
        return Optional[args[0]] if len(args) == 1 else Any
    return annotation


def norm_schema(name: str) -> type:
    """A dataclass with ``name`` and every option of the norm's layer, with the layer's defaults."""
    spec = REGISTRY[name]
    factory = spec.layer.__init__ if isinstance(spec.layer, type) else spec.layer
    hints = typing.get_type_hints(factory)
    fields = [("name", str, field(default=name))]
    for option, default in spec.options.items():
        if option not in MODEL_BOUND_NORM_OPTIONS:
            fields.append((option, _config_type(hints.get(option, Any)), field(default=default)))
    return dataclasses.make_dataclass(f"{name.title().replace('_', '')}NormConfig", fields)


GROUP_SCHEMAS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
                 "trainer": TrainerConfig, "logger": LoggerConfig}


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore. The yaml files in conf/ extend them by name."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=f"schema/{group}", name=group, node=schema)  # apart, so no group lists it as an option
    for name in REGISTRY:
        cs.store(group="schema/norm", name=name, node=norm_schema(name))


def schema_defaults(norm_name: str) -> dict[str, Any]:
    """Every key's default, as a nested dict: what a config saved before a key existed would have held."""
    groups = {group: OmegaConf.to_container(OmegaConf.structured(schema)) for group, schema in GROUP_SCHEMAS.items()}
    norm = OmegaConf.to_container(OmegaConf.structured(norm_schema(norm_name))) if norm_name in REGISTRY else {}
    return {**groups, "norm": norm, "batch": OmegaConf.to_container(OmegaConf.structured(BatchConfig)),
            "eval": OmegaConf.to_container(OmegaConf.structured(EvalConfig))}


# ---------------------------------------------------------------- derived values

def norm_options(cfg: DictConfig) -> dict[str, Any]:
    """The norm node as a plain mapping for ``build_model``, unset (None) options left out."""
    node = OmegaConf.to_container(cfg.norm, resolve=True)
    return {k: v for k, v in node.items() if v is not None}


def model_options(cfg: DictConfig) -> dict[str, Any]:
    """The model's own options (unset ones left out), for ``build_model``."""
    options = {k: cfg.model[k] for k in ("width", "shortcut") if cfg.model[k] is not None}
    return options
