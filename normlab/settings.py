"""The typed settings of each config group: Hydra's schemas (normlab/config.py registers them) and the typed
parts of a job's ``RunSpec`` (normlab/run_spec.py) at once. Each default is defined here; the YAML files of
conf/ restate many for whoever reads them, and tests/test_config.py keeps every restated one equal to this.

No Hydra or OmegaConf here: the engine and the data take these types without importing the config system.
Fixed sets of words are ``Enum`` fields, which Hydra refuses at composition, listing the valid words; each
member's value is its name, so a config saved as text (``precision: fp32``) reads back as the same job.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from normlab.norms import REGISTRY

MISSING: Any = "???"  # OmegaConf's marker for a value a config must set (omegaconf.MISSING)


class Word(str, Enum):
    """A fixed set of words: equal to, and printed as, its word (``Precision.bf16 == "bf16"``)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Precision(Word):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class ScheduleName(Word):
    step = "step"
    cosine = "cosine"


class LoggerName(Word):
    none = "none"
    wandb = "wandb"


class LoggerMode(Word):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class BnStats(Word):
    ema = "ema"
    precise = "precise"
    batch = "batch"


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
    name: ScheduleName = ScheduleName.step
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
    precision: Precision = Precision.auto  # auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32
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
    bn_stats: BnStats = BnStats.ema  # which statistics BN normalizes the test images with
    precise_images: int = 4096  # precise: training images the population statistics are recomputed from
    compare_bn_stats: bool = False  # evaluate every mode each time: val_error_ema/_precise/_batch columns


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.none
    project: str = "normlab"
    entity: Optional[str] = None
    mode: LoggerMode = LoggerMode.offline
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

# Options that the model binds itself, not the user: W comes from batch.workers, and whether a
# norm-activation layer applies its activation depends on where it sits in the block.
MODEL_BOUND_NORM_OPTIONS = ("workers", "apply_act")


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


def schema_defaults(norm_name: str) -> dict[str, Any]:
    """Every key's default, as a nested dict: what a config saved before a key existed would have held."""
    def plain(schema: type) -> dict[str, Any]:
        return {k: v.value if isinstance(v, Enum) else v for k, v in dataclasses.asdict(schema()).items()}

    norm = plain(norm_schema(norm_name)) if norm_name in REGISTRY else {}
    return {**{group: plain(schema) for group, schema in GROUP_SCHEMAS.items()}, "norm": norm,
            "batch": plain(BatchConfig), "eval": plain(EvalConfig)}
