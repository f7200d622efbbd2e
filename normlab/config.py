"""Typed config schemas (Hydra's ConfigStore) and ``validate(cfg)``, the one place invariants are checked.

Every config group has a dataclass schema, so a misspelt key or a wrong type fails at start-up
with Hydra's own message. The norm schemas are generated from the norm registry, so each
``conf/norm/<name>.yaml`` takes exactly the options its layer takes. Whatever a single group
cannot check alone (groups vs every layer's channels, the per-worker batch vs the norm, a data
path that does not exist) is checked by :func:`validate` before any data is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from normlab.errors import ConfigError
from normlab.norms import REGISTRY
from normlab.protocol import ProtocolError, effective

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
    loader_workers: int = 4  # DataLoader workers for streamed image folders
    cache_dir: Optional[str] = None  # where decoded uint8 arrays are cached (default ~/.cache/normlab)
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


# ---------------------------------------------------------------- validate

def _check(condition: bool, key: str, value: Any, valid: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: {valid}")


INF = float("inf")
# key: (low, high, what is valid); a value must be a finite number with low <= value <= high ("(" excludes low)
RANGES: dict[str, tuple[str, float, float, str]] = {
    "seed": ("[", 0, 2**32 - 1, "an integer in [0, 2^32)"),
    "model.width": ("[", 1, INF, "an integer >= 1, or null for 16"),
    "data.num_classes": ("[", 1, INF, ">= 1, or null"),
    "data.class_seed": ("[", 0, 2**32 - 1, "an integer in [0, 2^32)"),
    "data.num_train": ("[", 1, INF, ">= 1"),
    "data.num_test": ("[", 1, INF, ">= 1"),
    "data.channels": ("[", 1, INF, ">= 1"),
    "data.size": ("[", 1, INF, ">= 1"),
    "data.image_size": ("[", 1, INF, ">= 1, or null"),
    "data.in_memory_max_gb": ("[", 0, INF, ">= 0 (0 streams every image folder)"),
    "data.loader_workers": ("[", 0, INF, ">= 0"),
    "data.train_subset": ("[", 1, INF, ">= 1, or null for the whole training set"),
    "data.test_subset": ("[", 1, INF, ">= 1, or null for the whole test set"),
    "data.subset_seed": ("[", 0, 2**32 - 1, "an integer in [0, 2^32)"),
    "optim.momentum": ("[", 0, 0.999999, "in [0, 1)"),
    "optim.weight_decay": ("[", 0, INF, ">= 0"),
    "schedule.gamma": ("(", 0, 1, "in (0, 1]: the factor at each milestone"),
    "schedule.min_lr_factor": ("[", 0, 1, "in [0, 1]: the final lr as a fraction of the peak"),
    "schedule.warmup_start_factor": ("(", 0, 1, "in (0, 1]"),
    "norm.momentum": ("[", 0, 1, "in [0, 1], or null for a cumulative average"),
    "eval.precise_images": ("[", 1, INF, ">= 1"),
    "norm.r_max": ("[", 1, INF, ">= 1"),
    "norm.d_max": ("[", 0, INF, ">= 0"),
    "norm.warmup_steps": ("[", 0, INF, ">= 0"),
    "norm.ramp_steps": ("[", 0, INF, ">= 0"),
}


def _check_ranges(cfg: DictConfig) -> None:
    for key, (bracket, low, high, valid) in RANGES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or isinstance(value, bool):
            continue
        above = value > low if bracket == "(" else value >= low
        _check(isinstance(value, (int, float)) and math.isfinite(value) and above and value <= high, key, value,
               f"must be {valid}")


def _check_known_keys(cfg: DictConfig) -> None:
    """A key no schema has (a misspelt one, added with '+') is refused, naming the keys that exist."""
    nodes = {"": TrainConfig, "batch": BatchConfig, "eval": EvalConfig, **GROUP_SCHEMAS}
    for prefix, schema in nodes.items():
        node = cfg if not prefix else cfg.get(prefix)
        if not isinstance(node, DictConfig):
            continue
        known = [f.name for f in dataclasses.fields(schema)]
        for key in node.keys():
            if key not in known and not (prefix == "" and key == "hydra"):
                name = f"{prefix}.{key}" if prefix else str(key)
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}? " if close else ""
                raise ConfigError(f"{name} is not a normlab key ('+' adds keys the schema does not know); "
                                  f"{hint}valid keys{' of ' + prefix if prefix else ''}: {', '.join(known)}")


def validate(cfg: DictConfig) -> None:
    """Check the invariants across groups, before any data is read. Raises ConfigError."""
    from normlab.data import describe

    _check_known_keys(cfg)
    _check_ranges(cfg)
    _check(cfg.batch.per_worker >= 1, "batch.per_worker", cfg.batch.per_worker, "need at least 1 image per worker")
    _check(cfg.batch.workers is None or cfg.batch.workers >= 1, "batch.workers", cfg.batch.workers,
           "need at least 1 worker")
    _check(cfg.batch.total is None or cfg.batch.total >= 1, "batch.total", cfg.batch.total,
           "must be >= 1, or null for the paper's protocol (W = batch.workers)")
    try:
        workers = effective(cfg).workers
    except ProtocolError as e:
        raise ConfigError(str(e)) from None
    _check(cfg.trainer.epochs >= 1, "trainer.epochs", cfg.trainer.epochs, "need at least 1 epoch")
    _check(cfg.trainer.eval_every >= 1, "trainer.eval_every", cfg.trainer.eval_every, "must be >= 1")
    _check(cfg.trainer.precision in ("auto", "fp32", "bf16"), "trainer.precision", cfg.trainer.precision,
           "valid: auto, fp32, bf16")
    _check(str(cfg.trainer.channels_last).lower() in ("auto", "true", "false"), "trainer.channels_last",
           cfg.trainer.channels_last, "valid: auto, true, false")
    _check(cfg.schedule.name in ("step", "cosine"), "schedule.name", cfg.schedule.name, "valid: step, cosine")
    _check(all(0 < m < 1 for m in cfg.schedule.milestones), "schedule.milestones", list(cfg.schedule.milestones),
           "milestones are fractions of training, each between 0 and 1")
    _check(0 <= cfg.schedule.warmup_epochs <= cfg.trainer.epochs, "schedule.warmup_epochs", cfg.schedule.warmup_epochs,
           f"must be in [0, trainer.epochs={cfg.trainer.epochs}]")
    _check(cfg.optim.base_batch >= 1, "optim.base_batch", cfg.optim.base_batch, "must be >= 1")
    _check(0 < cfg.optim.base_lr < INF, "optim.base_lr", cfg.optim.base_lr, "must be > 0")
    _check(cfg.optim.lr is None or 0 < cfg.optim.lr < INF, "optim.lr", cfg.optim.lr,
           "must be > 0, or null for the linear scaling rule")
    _check(cfg.data.eval_batch >= 1, "data.eval_batch", cfg.data.eval_batch, "must be >= 1")
    _check(cfg.data.crop_padding is None or cfg.data.crop_padding >= 0, "data.crop_padding", cfg.data.crop_padding,
           "must be >= 0, or null for size/8")
    _check(cfg.trainer.threads is None or cfg.trainer.threads >= 1, "trainer.threads", cfg.trainer.threads,
           "must be >= 1, or null for torch's default")
    _check(str(cfg.trainer.progress).lower() in ("auto", "true", "false"), "trainer.progress",
           cfg.trainer.progress, "valid: auto, true, false")
    _check(0 <= cfg.optim.label_smoothing < 1, "optim.label_smoothing", cfg.optim.label_smoothing,
           "must be in [0, 1)")
    _check(cfg.logger.name in ("none", "wandb"), "logger.name", cfg.logger.name, "valid: none, wandb")
    _check(cfg.logger.mode in ("offline", "online", "disabled"), "logger.mode", cfg.logger.mode,
           "valid: offline, online, disabled")
    _check(cfg.eval.bn_stats in ("ema", "precise", "batch"), "eval.bn_stats", cfg.eval.bn_stats,
           "valid: ema, precise, batch")
    if cfg.eval.bn_stats != "ema" or cfg.eval.compare_bn_stats:
        spec = REGISTRY[cfg.norm.name]
        _check(not (spec.batch_dependent or spec.synced) or cfg.norm.name == "bn", "eval.bn_stats", cfg.eval.bn_stats,
               f"precise and batch statistics are built for norm=bn; norm={cfg.norm.name} keeps statistics of "
               "its own: use eval.bn_stats=ema and eval.compare_bn_stats=false")
    _check_device(cfg.trainer.device)
    _check(not cfg.trainer.compile or REGISTRY[cfg.norm.name].compile_safe, "trainer.compile", cfg.trainer.compile,
           f"torch.compile does not match eager for norm={cfg.norm.name} (tests/test_compile.py); "
           f"use trainer.compile=false")
    graph = str(cfg.trainer.cuda_graph).lower()
    _check(graph in ("auto", "true", "false"), "trainer.cuda_graph", cfg.trainer.cuda_graph, "valid: auto, true, false")
    if graph == "true":
        _check(not cfg.trainer.compile, "trainer.cuda_graph", True, "use trainer.cuda_graph or trainer.compile, not both")
        _check(not host_synced_norm(cfg), "trainer.cuda_graph", True,
               f"norm={cfg.norm.name} with norm.momentum=null (and one worker, for bn) is torch's BatchNorm, "
               "whose cumulative average reads the step count on the host, which a CUDA graph cannot capture; give norm.momentum "
               "a value, or use trainer.cuda_graph=auto (off for this norm)")
        _check(_resolves_to_cuda(cfg.trainer.device), "trainer.cuda_graph", True,
               f"CUDA graphs need a CUDA device, and trainer.device={cfg.trainer.device} resolves to the CPU here; "
               f"use trainer.cuda_graph=auto or false")
    shape = describe(cfg.data)  # checks the data name, its options and that its files exist
    total = cfg.batch.per_worker * workers
    if shape.train_size is not None and total > shape.train_size:
        raise ConfigError(f"batch.per_worker × workers = {cfg.batch.per_worker} × {workers} = {total} "
                          f"is invalid: data={cfg.data.name} has {shape.train_size} training images, fewer than one "
                          f"step's batch; lower batch.per_worker, batch.workers or batch.total")
    _check_model(cfg, shape)


def host_synced_norm(cfg: DictConfig) -> bool:
    """A norm whose training step reads a value on the host: it cannot run inside a CUDA graph."""
    one_batch_bn = (cfg.norm.name == "bn" and effective(cfg).workers == 1) or cfg.norm.name == "syncbn"
    return one_batch_bn and cfg.norm.get("momentum", 0.1) is None and cfg.norm.get("track_running_stats", True)


def _check_device(device: str) -> None:
    import torch

    _check(device == "auto" or device == "cpu" or device.startswith("cuda"), "trainer.device", device,
           "valid: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={device!r} is invalid: CUDA is not available here; use auto or cpu")


def _resolves_to_cuda(device: str) -> bool:
    import torch

    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def _check_model(cfg: DictConfig, shape) -> None:
    """Build the model on the meta device and run one training batch through it: shapes only, no memory.

    This is where the norm meets every layer: G against each layer's channels, and batch statistics
    against the per-worker batch and each feature map's size.
    """
    import torch

    from normlab.models import build_model

    from normlab.models import model_builder
    from normlab.options import check_options

    options = model_options(cfg)
    try:
        check_options(f"model={cfg.model.name}", model_builder(cfg.model.name), options)
    except ValueError as e:
        raise ConfigError(f"{e} (model.* keys)") from None
    norm = norm_options(cfg)
    try:
        with torch.device("meta"):
            model = build_model(cfg.model.name, shape.num_classes, norm, workers=effective(cfg).workers,
                                in_chans=shape.channels, **options)
    except ValueError as e:
        raise ConfigError(f"cannot build model={cfg.model.name} with norm={cfg.norm.name}: {e}") from None
    entered: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _x, path=path: entered.append(path))
             for path, m in model.named_modules() if path]
    batch = torch.empty(effective(cfg).total_batch, shape.channels, shape.size, shape.size,
                        device="meta")
    try:
        model.train()(batch)
    except ValueError as e:
        layer = entered[-1] if entered else "the model"
        raise ConfigError(
            f"batch.per_worker={cfg.batch.per_worker} cannot work with norm={cfg.norm.name} in "
            f"{cfg.model.name}: at {layer}, {e}"
        ) from None
    finally:
        for hook in hooks:
            hook.remove()
