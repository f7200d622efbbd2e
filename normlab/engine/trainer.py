"""One training run, start to finish: skip or resume, build, train, evaluate, record.

``train(cfg, run_dir)`` is what the Hydra app calls for each job. Its results are the files of
``records.RunDir``; loggers only watch. A NaN/inf loss ends the run as ``diverged``; an exception
ends it as ``failed`` (and is re-raised). Either way, what was recorded before stays.

Under torchrun (or a SLURM job's tasks) every rank runs this, each simulating W/K of the W workers on its
slice of every global batch (engine/dist.py). Rank 0 decides, holds the folder and writes every record.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import normlab
from normlab import data as datasets
from normlab.config import model_options, norm_options
from normlab.errors import ConfigError
from normlab.validation import host_synced_norm, validate
from normlab.engine.checkpoint import read_resume_state, restore_checkpoint, save_checkpoint, set_aside
from normlab.engine import bn_eval, dist
from normlab.engine.loop import train_epoch
from normlab.engine.memory_format import FORMATS, FormatChoice, cache_key, choose_memory_format
from normlab.engine.step import CudaGraphStep, TrainStep, compile_model
from normlab.engine.optim import build_optimizer, build_schedule
from normlab.engine.rerun import job_changes, refuse_another_job
from normlab.loggers import NullLogger, build_logger
from normlab.loggers.progress import ProgressBar
from normlab.models import build_model
from normlab.norms import cpu_kernel, norm_spec, to_process_local_bn
from normlab.protocol import effective, identity
from normlab.records import RunDir, append_metrics, atomic_write, write_json, write_metrics
from normlab.switches import resolve_switch, switch

log = logging.getLogger("normlab")
PRECISE_EPOCH = 0  # the training images PreciseBN draws: epoch 0's order and crops, which training never uses


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def cpu_has_fast_bf16() -> bool:
    """bf16 is only fast on CPUs with AVX512-BF16 or AMX; elsewhere it is emulated and slower than fp32."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, check, lambda: False)() for check in checks)


def resolve_precision(setting: str, device: torch.device) -> str:
    """auto: bf16 autocast on CUDA, and on CPUs that compute bf16 natively; fp32 elsewhere."""
    if setting == "auto":
        return "bf16" if device.type == "cuda" or cpu_has_fast_bf16() else "fp32"
    return setting


def build_run_model(cfg: DictConfig, shape, device: torch.device, channels_last: bool,
                    ranks: int = 1) -> torch.nn.Module:
    """The job's model on its device, in its memory format: one of `ranks`, simulating W/ranks workers."""
    model = build_model(cfg.model.name, shape.num_classes, norm_options(cfg), workers=effective(cfg).workers // ranks,
                        zero_init_last=cfg.model.zero_init_last, in_chans=shape.channels,
                        **model_options(cfg)).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def resolve_memory_format(cfg: DictConfig, shape, device: torch.device, precision: str,
                          state: dict | None, ranks: int = 1) -> FormatChoice:
    """A resumed run keeps the format it started in; otherwise trainer.channels_last, probed when auto (on
    one rank's step, N·W/ranks images and W/ranks workers, compiled when the job is: compiled, the faster format
    can be the other one)."""
    if state is not None and state.get("memory_format") in FORMATS.values():
        return FormatChoice(state["memory_format"] == FORMATS[True], "resumed in the format the run started in")
    eff = effective(cfg)

    def make_step(channels_last: bool) -> TrainStep:  # the step as the job runs it: compiled too, if it is
        model = to_process_local_bn(build_run_model(cfg, shape, device, channels_last, ranks))  # rank 0 alone
        forward = compile_model(model) if cfg.trainer.compile else model
        return TrainStep(forward, build_optimizer(model, cfg.optim, eff.lr), device=device, precision=precision)

    job_steps = shape.train_size // eff.total_batch * cfg.trainer.epochs if shape.train_size else None
    rank_batch = eff.total_batch // ranks
    batch = ((cfg.batch.per_worker, eff.workers // ranks) if norm_spec(cfg.norm.name).batch_dependent
             else rank_batch)  # W changes a batch-dependent norm's step
    key = cache_key(device, model=cfg.model.name, model_options=model_options(cfg), norm=norm_options(cfg),
                    batch=batch, precision=precision, image=(shape.channels, shape.size),
                    compiled=bool(cfg.trainer.compile))
    return choose_memory_format(cfg.trainer.channels_last, make_step, classes=shape.num_classes, device=device,
                                shape=(rank_batch, shape.channels, shape.size, shape.size), key=key,
                                job_steps=job_steps)


def resolve_cuda_graph(setting: Any, device: torch.device, compile: bool, host_synced: bool = False,
                       ranks: int = 1) -> bool:
    """auto: on CUDA, unless the model is compiled, the norm reads a value on the host (`host_synced`) or the
    job runs on several processes (DDP's gradient all-reduce is not captured here).
    A graph replays the whole step with one launch: 12× the eager step for resnet20 at 2 × 8 on an H100,
    and no slower at large batches (README "Performance")."""
    return resolve_switch(setting, device.type == "cuda" and not compile and not host_synced and ranks == 1)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def git_commit() -> str | None:
    try:
        root = Path(normlab.__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_name(cfg: DictConfig) -> str:
    """A readable job name: ``gn-G32-N4xW8-s0``."""
    norm = cfg.norm.name
    if cfg.norm.get("groups") is not None:
        norm += f"-G{cfg.norm.groups}"
    if cfg.norm.get("group_size") is not None:
        norm += f"-C{cfg.norm.group_size}"
    return f"{norm}-N{cfg.batch.per_worker}xW{effective(cfg).workers}-s{cfg.seed}"


def median_of_last(rows: list[dict], key: str, n: int = 5) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None][-n:]
    return statistics.median(values) if values else None


def summarize(cfg: DictConfig, rows: list[dict], status: str, wall_time_s: float, extra: dict) -> dict[str, Any]:
    evaluated = [r for r in rows if r.get("val_error") is not None]
    return {
        "status": status,
        "val_error": evaluated[-1]["val_error"] if evaluated else None,
        "val_error_median5": median_of_last(evaluated, "val_error"),
        "best_val_error": min((r["val_error"] for r in evaluated), default=None),
        **{key: value for mode in bn_eval.MODES if any(f"val_error_{mode}" in r for r in evaluated)
           for key, value in ((f"val_error_{mode}", evaluated[-1].get(f"val_error_{mode}")),
                              (f"val_error_{mode}_median5", median_of_last(evaluated, f"val_error_{mode}")))},
        "epochs": len(rows), "wall_time_s": round(wall_time_s, 3),
        **identity(cfg), **extra,
        "normlab_version": normlab.__version__, "git_commit": git_commit(),
    }


def decide(cfg: DictConfig, records: RunDir) -> bool:
    """Whether to run this job in `records` (False: it is done). Refuses (ConfigError) a folder holding another
    config's run, or records that cannot be read; trainer.force=true starts the folder over, whatever it holds."""
    if cfg.trainer.force:
        for path in (records.summary, records.metrics, records.checkpoint, records.previous_checkpoint):
            path.unlink(missing_ok=True)
    else:
        unreadable = records.unreadable()
        if unreadable:
            raise ConfigError(f"{records.path} holds records that cannot be read: {', '.join(unreadable)}; the "
                              "folder is treated as occupied, not empty. trainer.force=true discards what it holds")
        changes = job_changes(cfg, records)
        if changes:
            refuse_another_job(records, changes)
        if records.is_final():
            log.info("skipping %s: summary.json says %s (trainer.force=true reruns it)", records.path,
                     records.read_summary()["status"])
            return False
    text = OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write(records.config, lambda f: f.write(text.encode()))
    return True


@dataclass(frozen=True)
class Runtime:
    """How this job runs, resolved once from the config and the machine."""

    device: torch.device
    precision: str
    cuda_graph: bool
    layout: FormatChoice
    world: dist.World = dist.World()


def resolve_runtime(cfg: DictConfig, state: dict | None, world: dist.World = dist.World()) -> Runtime:
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    device = dist.device_for(world, resolve_device(cfg.trainer.device))
    precision = resolve_precision(cfg.trainer.precision, device)
    cuda_graph = resolve_cuda_graph(cfg.trainer.cuda_graph, device, cfg.trainer.compile, host_synced_norm(cfg),
                                    world.size)
    def probe() -> FormatChoice:  # on rank 0 alone: its models' synced BN runs on this process's images
        return resolve_memory_format(cfg, datasets.describe(cfg.data), device, precision, state, world.size)

    layout = dist.on_main(probe)  # one probe; every rank runs its choice
    return Runtime(device, precision, cuda_graph, layout, world)


def check_world(cfg: DictConfig, world: dist.World) -> None:
    """What a job on several processes needs of its config; ConfigError naming both sides."""
    if world.size == 1:
        return
    workers = effective(cfg).workers
    if workers % world.size:
        key = "batch.total" if cfg.batch.total is not None else "batch.workers"
        raise ConfigError(f"{key}: W={workers} workers cannot be split among the job's {world.size} processes "
                          f"(WORLD_SIZE={world.size}); each rank simulates W/{world.size} of them, so W must be a "
                          f"multiple of {world.size}")
    if str(cfg.trainer.device).startswith("cuda:"):
        raise ConfigError(f"trainer.device={cfg.trainer.device} names one GPU for all {world.size} processes; use "
                          "trainer.device=cuda or auto: each rank takes the GPU of its LOCAL_RANK")
    if switch(cfg.trainer.cuda_graph) == "true":
        raise ConfigError(f"trainer.cuda_graph=true is invalid for a job on {world.size} processes: DDP's gradient "
                          "all-reduce is not captured in the graph; use trainer.cuda_graph=auto (off) or false")


@dataclass
class Job:
    """What one job trains with: data, model (and its compiled forward), optimizer, schedule, step."""

    loaders: Any
    model: torch.nn.Module
    forward: Any
    optimizer: torch.optim.Optimizer
    schedule: Any
    step: Any

    @property
    def steps(self) -> int:
        return len(self.loaders.train)  # >= 1: validate checked the batch against the training set


def build(cfg: DictConfig, rt: Runtime) -> Job:
    """Data, model, optimizer, schedule and step. On several processes: this rank's share of the data and the
    workers, gradients averaged by DDP, whose buffer broadcast is off (each rank keeps its workers' BN EMAs,
    which the trainer averages before they are read)."""
    eff, world = effective(cfg), rt.world
    channels_last = rt.layout.channels_last
    loaders = datasets.build(cfg.data, eff.total_batch, rt.device, seed=cfg.seed, channels_last=channels_last,
                             shard=(world.rank, world.size))
    model = build_run_model(cfg, loaders.shape, rt.device, channels_last, world.size)
    replicated = dist.data_parallel(model, rt.device) if world.size > 1 else model
    forward = compile_model(replicated) if cfg.trainer.compile else replicated  # shares the model's parameters
    optimizer = build_optimizer(model, cfg.optim, eff.lr, capturable=rt.cuda_graph)
    schedule = build_schedule(optimizer, cfg.schedule, len(loaders.train), cfg.trainer.epochs)
    step = TrainStep(forward, optimizer, device=rt.device, precision=rt.precision,
                     label_smoothing=cfg.optim.label_smoothing, autocast_cache=not rt.cuda_graph,
                     sync_buffers=world.size > 1 and norm_spec(cfg.norm.name).trains_on_running_stats)
    return Job(loaders, model, forward, optimizer, schedule, CudaGraphStep(step) if rt.cuda_graph else step)


def train(cfg: DictConfig, run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Run one job into `run_dir`. Returns its summary, or None when it was already done.

    Bad input raises ``ConfigError`` before anything is read or written: ``validate``, a run folder that
    another process holds (``RunFolderBusy``), and one that holds another config's run or unreadable records.
    On several processes rank 0 holds the folder and decides, and every rank follows (its folder, its error).
    """
    validate(cfg)
    world = dist.init()
    check_world(cfg, world)
    if not world.main:
        logging.getLogger("normlab").setLevel(logging.ERROR)  # one rank speaks; the others only of errors
    records = RunDir(dist.broadcast(str(run_dir)))  # Hydra resolves ${now} per rank: rank 0's folder it is
    with contextlib.ExitStack() as held:
        def claim() -> bool:
            held.enter_context(records.hold())  # one process per run folder, for the job's life
            return decide(cfg, records)

        if not dist.on_main(claim):
            return None
        return run(cfg, records, world)


def run(cfg: DictConfig, records: RunDir, world: dist.World = dist.World()) -> dict[str, Any]:
    """Resume or start, build, train every epoch, and leave a summary however it ends (rank 0 writes)."""
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    eff = effective(cfg)
    state = dist.on_main(lambda: read_resume_state(records))  # None: start over; damaged files moved aside
    rows = list(state["metrics"]) if state is not None else []
    if world.main:
        write_metrics(records.metrics, rows)  # realigned with what resumes
    wall_time, start_epoch, status = (state["wall_time_s"], state["epoch"], "failed") if state else (0.0, 0, "failed")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger = build_logger(cfg.logger, records.path, resolved, run_name(cfg)) if world.main else NullLogger()
    spec = norm_spec(cfg.norm.name)
    extra: dict[str, Any] = {"batch_dependent": spec.batch_dependent,  # a batch-independent norm's modes are alike
                             "bn_stats": cfg.eval.bn_stats if spec.batch_dependent or spec.synced
                             else "n/a (batch-independent norm)"}
    try:
        rt = resolve_runtime(cfg, state, world)
        extra.update(device=rt.device.type, precision=rt.precision, compiled=bool(cfg.trainer.compile),
                     cuda_graph=rt.cuda_graph, memory_format=rt.layout.name, memory_format_reason=rt.layout.reason,
                     world_size=world.size, backend=dist.backend_for(rt.device),
                     cpu_kernel=cpu_kernel.status() if rt.device.type == "cpu" else None)
        job = build(cfg, rt)
        extra.update(train_size=job.loaders.train.num_samples, test_size=job.loaders.test.num_samples,
                     steps_per_epoch=job.steps, num_classes=job.loaders.shape.num_classes)
        if state is not None:
            restore_into(records, state, job)
            log.info("resuming %s after epoch %d", records.path, start_epoch)
        log.info("normlab: %s · norm %s · N=%d × W=%d = %d per step · protocol: %s · lr %.4g · %d steps/epoch · %s %s"
                 " · %s (%s)%s%s", cfg.model.name, run_name(cfg).rsplit("-N", 1)[0], cfg.batch.per_worker,
                 eff.workers, eff.total_batch, eff.protocol, eff.lr, job.steps, rt.device, rt.precision,
                 rt.layout.name, rt.layout.reason, " · cuda-graph" if rt.cuda_graph else "",
                 f" · {world.size} processes ({extra['backend']}), W/{world.size} workers each" if world.size > 1 else "")
        status, wall_time = run_epochs(cfg, records, rt, job, rows, start_epoch, wall_time, logger, extra)
    except BaseException as e:
        status = "failed"
        extra["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:  # every ending, a failure too, leaves its summary and closes the W&B run
        summary = summarize(cfg, rows, status, wall_time, extra)
        if world.main:
            write_json(records.summary, summary)
        logger.log_summary(summary)
        logger.finish(exit_code=int(status == "failed"))
    log.info("%s: val error %s (median of last 5: %s) in %.1fs · %s", status, summary["val_error"],
             summary["val_error_median5"], wall_time, records.summary)
    return summary


def restore_into(records: RunDir, state: dict, job: Job) -> None:
    """The checkpoint's state into the job; one that does not fit this model is moved aside, and the job fails."""
    try:
        restore_checkpoint(state, model=job.model, optimizer=job.optimizer, schedule=job.schedule)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        aside = set_aside(records.checkpoint).name if dist.current().main else "checkpoint.pt.corrupt-<time>"
        raise RuntimeError(f"{records.checkpoint.name} does not fit this job ({type(e).__name__}: "
                           f"{str(e).splitlines()[0]}); moved aside to {aside} (by rank 0). Rerun to start "
                           "over") from None


def evaluation(cfg: DictConfig, rt: Runtime, job: Job, epoch: int) -> dict[str, float]:
    """The epoch's val metrics with BN statistics of eval.bn_stats, and of every mode with eval.compare_bn_stats
    (columns val_error_<mode>, val_loss_<mode>). The running statistics training keeps are left as they were."""
    eff = effective(cfg)
    modes = bn_eval.MODES if cfg.eval.compare_bn_stats else (cfg.eval.bn_stats,)
    results, seconds = {}, {}
    for mode in modes:
        start = time.perf_counter()
        results[mode] = bn_eval.evaluate_bn(
            mode, job.model, job.loaders.test.epoch(epoch, shuffled=mode == "batch"),  # chunks that mix classes
            train_batches=job.loaders.train.epoch(PRECISE_EPOCH),
            per_worker=cfg.batch.per_worker, total_batch=eff.total_batch, precise_images=cfg.eval.precise_images,
            device=rt.device, precision=rt.precision, ema_model=job.forward)
        seconds[mode] = time.perf_counter() - start  # results are read on the host: the device is done
    val = results[cfg.eval.bn_stats]
    row = {"val_loss": val["loss"], "val_error": val["error"]}
    if job.loaders.shape.num_classes > 10:
        row["val_error_top5"] = val["error_top5"]
    if cfg.eval.compare_bn_stats:
        for mode, result in results.items():
            row.update({f"val_error_{mode}": result["error"], f"val_loss_{mode}": result["loss"],
                        f"eval_time_{mode}_s": seconds[mode]})
    return row


def run_epochs(cfg: DictConfig, records: RunDir, rt: Runtime, job: Job, rows: list[dict], start_epoch: int,
               wall_time: float, logger, extra: dict) -> tuple[str, float]:
    """Train from `start_epoch` to the end, appending to `rows`; (status, wall time). Rank 0 writes."""
    eff, main = effective(cfg), rt.world.main
    bar = ProgressBar(main and ProgressBar.wanted(cfg.trainer.progress))
    for epoch in range(start_epoch + 1, cfg.trainer.epochs + 1):
        lr = float(job.optimizer.param_groups[0]["lr"])
        train_metrics, epoch_time = train_epoch(
            job.step, job.loaders.train.epoch(epoch), job.schedule,
            progress=bar.epoch(epoch, cfg.trainer.epochs, job.steps, eff.total_batch))
        wall_time += epoch_time
        dist.average_buffers(job.model)  # the ranks' BN EMAs → the one buffer a single process keeps
        row = {"epoch": epoch, "train_loss": train_metrics["loss"], "train_error": train_metrics["error"],
               "val_loss": None, "val_error": None, "lr": lr,
               "images_per_sec": job.steps * eff.total_batch / epoch_time, "epoch_time_s": epoch_time}
        diverged = not math.isfinite(train_metrics["loss"])
        if diverged:
            extra["diverged_epoch"] = epoch
        elif epoch % cfg.trainer.eval_every == 0 or epoch == cfg.trainer.epochs:
            row.update(evaluation(cfg, rt, job, epoch))
        rows.append(row)
        if main:
            append_metrics(records.metrics, row)
        logger.log_epoch(row)
        log.info("epoch %d/%d: train loss %.4f error %.2f%% · val error %s · %.0f img/s", epoch,
                 cfg.trainer.epochs, row["train_loss"], row["train_error"],
                 "-" if row["val_error"] is None else f"{row['val_error']:.2f}%", row["images_per_sec"])
        if diverged:
            log.warning("diverged: the training loss is %s in epoch %d; ending the run", train_metrics["loss"], epoch)
            return "diverged", wall_time
        if cfg.trainer.checkpoint and main:
            save_checkpoint(records, model=job.model, optimizer=job.optimizer, schedule=job.schedule,
                            epoch=epoch, metrics=rows, wall_time_s=wall_time, memory_format=rt.layout.name)
    return "done", wall_time
