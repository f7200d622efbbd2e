"""The app's edge: ``validate(cfg)`` checks a composed config, ``resolve_run`` turns it into the job's ``RunSpec``.

Each group's schema (normlab/settings.py) checks its keys, types and fixed sets of words as Hydra composes; what
one group cannot check alone is checked here, before any data is read: value ranges, keys no schema has, and
the invariants across groups (G against every layer's channels, the per-worker batch against the norm, a data
path that does not exist). Every failure is a ConfigError naming the key, the value and what is valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from normlab.config import GROUP_SCHEMAS, BatchConfig, EvalConfig, TrainConfig, model_options, norm_options
from normlab.data import DataSpec
from normlab.engine import dist
from normlab.engine.runtime import resolve_cuda_graph, resolve_device, resolve_precision
from normlab import memory
from normlab.errors import ConfigError
from normlab.loggers.progress import ProgressBar
from normlab.norms import REGISTRY
from normlab.protocol import BatchPlan, ProtocolError, effective, identity
from normlab.run_spec import ModelSpec, NormSpec, RunSpec, Runtime, TrainingLength
from normlab.settings import BnStats
from normlab.switches import SWITCH, switch


def _check(condition: bool, key: str, value: Any, valid: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: {valid}")


INF = float("inf")
MAX_THREADS = 1024  # more intra-op threads than any machine has cores: each costs a stack, and a process can run out
WORD = 2**32 - 1  # the largest seed torch and numpy take


@dataclass(frozen=True)
class Bounds:
    """The numbers a key may hold (finite, ``low`` to ``high``, each end open or closed), and the refusal's text."""

    low: float
    high: float
    valid: str
    open_low: bool = False
    open_high: bool = False

    def admits(self, value: Any) -> bool:
        try:  # an integer too large for a float (10**400) is out of every range, not an OverflowError
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                return False
        except OverflowError:
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below


# Every key whose valid values are one interval; null (where the schema allows it) means the default and passes.
RANGES: dict[str, Bounds] = {
    "seed": Bounds(0, WORD, "must be an integer in [0, 2^32)"),
    "batch.per_worker": Bounds(1, INF, "need at least 1 image per worker"),
    "batch.workers": Bounds(1, INF, "need at least 1 worker"),
    "batch.total": Bounds(1, INF, "must be >= 1, or null for the paper's protocol (W = batch.workers)"),
    "model.width": Bounds(1, INF, "must be an integer >= 1, or null for 16"),
    "data.num_classes": Bounds(1, INF, "must be >= 1, or null"),
    "data.class_seed": Bounds(0, WORD, "must be an integer in [0, 2^32)"),
    "data.num_train": Bounds(1, INF, "must be >= 1"),
    "data.num_test": Bounds(1, INF, "must be >= 1"),
    "data.channels": Bounds(1, INF, "must be >= 1"),
    "data.size": Bounds(1, INF, "must be >= 1"),
    "data.image_size": Bounds(1, INF, "must be >= 1, or null"),
    "data.in_memory_max_gb": Bounds(0, INF, "must be >= 0 (0 streams every image folder)"),
    "data.loader_workers": Bounds(0, INF, "must be >= 0"),
    "data.train_subset": Bounds(1, INF, "must be >= 1, or null for the whole training set"),
    "data.test_subset": Bounds(1, INF, "must be >= 1, or null for the whole test set"),
    "data.subset_seed": Bounds(0, WORD, "must be an integer in [0, 2^32)"),
    "data.eval_batch": Bounds(1, INF, "must be >= 1"),
    "data.crop_padding": Bounds(0, INF, "must be >= 0, or null for size/8"),
    "optim.base_lr": Bounds(0, INF, "must be > 0", open_low=True),
    "optim.lr": Bounds(0, INF, "must be > 0, or null for the linear scaling rule", open_low=True),
    "optim.base_batch": Bounds(1, INF, "must be >= 1"),
    "optim.momentum": Bounds(0, 1, "must be in [0, 1)", open_high=True),
    "optim.weight_decay": Bounds(0, INF, "must be >= 0"),
    "optim.label_smoothing": Bounds(0, 1, "must be in [0, 1)", open_high=True),
    "trainer.epochs": Bounds(1, INF, "need at least 1 epoch"),
    "trainer.eval_every": Bounds(1, INF, "must be >= 1"),
    "trainer.threads": Bounds(1, MAX_THREADS, f"must be in [1, {MAX_THREADS}], or null for torch's default"),
    "schedule.gamma": Bounds(0, 1, "must be in (0, 1]: the factor at each milestone", open_low=True),
    "schedule.min_lr_factor": Bounds(0, 1, "must be in [0, 1]: the final lr as a fraction of the peak"),
    "schedule.warmup_start_factor": Bounds(0, 1, "must be in (0, 1]", open_low=True),
    "norm.momentum": Bounds(0, 1, "must be in [0, 1], or null for a cumulative average"),
    "eval.precise_images": Bounds(1, INF, "must be >= 1"),
    "norm.r_max": Bounds(1, INF, "must be >= 1"),
    "norm.d_max": Bounds(0, INF, "must be >= 0"),
    "norm.warmup_steps": Bounds(0, INF, "must be >= 0"),
    "norm.ramp_steps": Bounds(0, INF, "must be >= 0"),
}


def _check_ranges(cfg: DictConfig) -> None:
    for key, bounds in RANGES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or isinstance(value, bool) or bounds.admits(value):
            continue
        if isinstance(value, int) and abs(value) > 2**53:  # Hydra takes integers of any size; shown cut short
            raise ConfigError(f"{key}={reprlib.repr(value)} is invalid: too large for any setting "
                              f"(above 2^53); {bounds.valid}")
        _check(False, key, value, bounds.valid)


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


def validate(cfg: DictConfig) -> DataSpec:
    """Check the invariants across groups, before any data is read. Raises ConfigError.

    Returns the data it resolved to check it (an image folder listed, its classes picked), for ``resolve_run``."""
    from normlab.data import resolve as resolve_data

    _check_known_keys(cfg)
    _check_ranges(cfg)
    try:
        plan = effective(cfg)
    except ProtocolError as e:
        raise ConfigError(str(e)) from None
    _check(switch(cfg.trainer.channels_last) in SWITCH, "trainer.channels_last",
           cfg.trainer.channels_last, "valid: auto, true, false")
    _check(all(0 < m < 1 for m in cfg.schedule.milestones), "schedule.milestones", list(cfg.schedule.milestones),
           "milestones are fractions of training, each between 0 and 1")
    _check(0 <= cfg.schedule.warmup_epochs <= cfg.trainer.epochs, "schedule.warmup_epochs", cfg.schedule.warmup_epochs,
           f"must be in [0, trainer.epochs={cfg.trainer.epochs}]")
    _check(switch(cfg.trainer.progress) in SWITCH, "trainer.progress",
           cfg.trainer.progress, "valid: auto, true, false")
    if cfg.eval.bn_stats != BnStats.ema or cfg.eval.compare_bn_stats:
        spec = REGISTRY[cfg.norm.name]
        key, value = (("eval.bn_stats", str(cfg.eval.bn_stats)) if cfg.eval.bn_stats != BnStats.ema
                      else ("eval.compare_bn_stats", cfg.eval.compare_bn_stats))
        _check(not (spec.batch_dependent or spec.synced) or cfg.norm.name == "bn", key, value,
               f"precise and batch statistics are built for norm=bn; norm={cfg.norm.name} keeps statistics of "
               "its own: use eval.bn_stats=ema and eval.compare_bn_stats=false")
    _check_device(cfg.trainer.device)
    _check(not cfg.trainer.compile or REGISTRY[cfg.norm.name].compile_safe, "trainer.compile", cfg.trainer.compile,
           f"torch.compile does not match eager for norm={cfg.norm.name} (tests/test_compile.py); "
           f"use trainer.compile=false")
    graph = switch(cfg.trainer.cuda_graph)
    _check(graph in SWITCH, "trainer.cuda_graph", cfg.trainer.cuda_graph, "valid: auto, true, false")
    if graph == "true":
        _check(not cfg.trainer.compile, "trainer.cuda_graph", True, "use trainer.cuda_graph or trainer.compile, not both")
        _check(not host_synced_norm(cfg, plan.workers), "trainer.cuda_graph", True,
               f"norm={cfg.norm.name} with norm.momentum=null (and one worker, for bn) is torch's BatchNorm, "
               "whose cumulative average reads the step count on the host, which a CUDA graph cannot capture; give "
               "norm.momentum a value, or use trainer.cuda_graph=auto (off for this norm)")
        _check(_resolves_to_cuda(cfg.trainer.device), "trainer.cuda_graph", True,
               f"CUDA graphs need a CUDA device, and trainer.device={cfg.trainer.device} resolves to the CPU here; "
               f"use trainer.cuda_graph=auto or false")
    data = resolve_data(OmegaConf.to_object(cfg.data))  # checks the data name, its options and its files
    shape, total = data.shape, plan.total_batch
    if shape.train_size is not None and total > shape.train_size:
        raise ConfigError(f"batch.per_worker × workers = {cfg.batch.per_worker} × {plan.workers} = {total} "
                          f"is invalid: data={cfg.data.name} has {shape.train_size} training images, fewer than one "
                          f"step's batch; lower batch.per_worker, batch.workers or batch.total")
    _check(cfg.data.crop_padding is None or cfg.data.crop_padding <= shape.size, "data.crop_padding",
           cfg.data.crop_padding, f"must be in [0, {shape.size}] (the image size), or null for size/8")
    _check_model(cfg, plan, shape)
    return data


def host_synced_norm(cfg: DictConfig, workers: int) -> bool:
    """A norm whose training step reads a value on the host: it cannot run inside a CUDA graph."""
    one_batch_bn = (cfg.norm.name == "bn" and workers == 1) or cfg.norm.name == "syncbn"
    return one_batch_bn and cfg.norm.get("momentum", 0.1) is None and cfg.norm.get("track_running_stats", True)


def check_world(cfg: DictConfig, plan: BatchPlan, world: dist.World) -> None:
    """What a job on several processes needs of its config (and its batch plan); ConfigError naming both sides."""
    if world.size == 1:
        return
    if plan.workers % world.size:
        key = "batch.total" if cfg.batch.total is not None else "batch.workers"
        raise ConfigError(f"{key}: W={plan.workers} workers cannot be split among the job's {world.size} processes "
                          f"(WORLD_SIZE={world.size}); each rank simulates W/{world.size} of them, so W must be a "
                          f"multiple of {world.size}")
    if str(cfg.trainer.device).startswith("cuda:"):
        raise ConfigError(f"trainer.device={cfg.trainer.device} names one GPU for all {world.size} processes; use "
                          "trainer.device=cuda or auto: each rank takes the GPU of its LOCAL_RANK")
    if switch(cfg.trainer.cuda_graph) == "true":
        raise ConfigError(f"trainer.cuda_graph=true is invalid for a job on {world.size} processes: DDP's gradient "
                          "all-reduce is not captured in the graph; use trainer.cuda_graph=auto (off) or false")


def resolve_run(cfg: DictConfig, data: DataSpec, world: dist.World = dist.World(), *, threads: int | None = None,
                device: str | None = None, dataset: str | None = None) -> RunSpec:
    """The job's ``RunSpec``, from a config ``validate`` passed (and the `data` it resolved) and this process's
    place in the job. `threads` and `device`: what the launcher gave a job that runs beside others
    (normlab/machine_share.py), used where the config leaves trainer.threads null and trainer.device auto.
    `dataset`: the data config's name, which only Hydra knows (``cifar10_jpeg``; its ``data.name`` is the source
    kind, ``imagefolder``)."""
    plan = effective(cfg)
    check_world(cfg, plan, world)
    trainer = cfg.trainer
    threads = trainer.threads if trainer.threads is not None else threads
    device_setting = device if device is not None and trainer.device == "auto" else trainer.device
    resolved_device = dist.device_for(world, resolve_device(device_setting))
    runtime = Runtime(
        device=resolved_device, precision=resolve_precision(trainer.precision, resolved_device), threads=threads,
        channels_last=switch(trainer.channels_last), compile=bool(trainer.compile),
        cuda_graph=resolve_cuda_graph(trainer.cuda_graph, resolved_device, trainer.compile,
                                      host_synced_norm(cfg, plan.workers), world.size),
        deterministic=trainer.deterministic, world=world)
    recorded = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    recorded["trainer"].update(threads=threads, device=device_setting)  # config.yaml: what the job ran with
    return RunSpec(
        name=cfg.name, seed=cfg.seed, model=ModelSpec.from_settings(OmegaConf.to_object(cfg.model)),
        norm=NormSpec(cfg.norm.name, norm_options(cfg)), batch=plan, data=data,
        optim=OmegaConf.to_object(cfg.optim), schedule=OmegaConf.to_object(cfg.schedule),
        length=TrainingLength(epochs=trainer.epochs, eval_every=trainer.eval_every, checkpoint=trainer.checkpoint,
                              force=trainer.force, progress=ProgressBar.wanted(trainer.progress)),
        eval=OmegaConf.to_object(cfg.eval), logger=OmegaConf.to_object(cfg.logger), runtime=runtime,
        recorded_config=recorded, config_yaml=OmegaConf.to_yaml(recorded), identity=identity(recorded),
        dataset=dataset)


def _check_device(device: str) -> None:
    import torch

    _check(device == "auto" or device == "cpu" or device.startswith("cuda"), "trainer.device", device,
           "valid: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={device!r} is invalid: CUDA is not available here; use auto or cpu")


def _resolves_to_cuda(device: str) -> bool:
    import torch

    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def _check_model(cfg: DictConfig, plan: BatchPlan, shape) -> None:
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
            model = build_model(cfg.model.name, shape.num_classes, norm, workers=plan.workers,
                                in_chans=shape.channels, **options)
    except ValueError as e:
        raise ConfigError(f"cannot build model={cfg.model.name} with norm={cfg.norm.name}: {e}") from None
    parameters = sum(p.numel() for p in model.parameters())  # the weights, their gradients and SGD's momentum
    memory.check_fits(3 * parameters * 4, memory.host_available_bytes(),
                      f"model={cfg.model.name} at model.width={cfg.model.get('width')} ({parameters:,} parameters; "
                      "their weights, gradients and momentum)",
                      "this machine", "Use a smaller model.width")
    entered: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _x, path=path: entered.append(path))
             for path, m in model.named_modules() if path]
    batch = torch.empty(plan.total_batch, shape.channels, shape.size, shape.size, device="meta")
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
