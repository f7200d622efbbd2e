"""One training run, start to finish: skip or resume, build, train, evaluate, record.

``train(cfg, run_dir)`` is what the Hydra app calls for each job. Its results are the files of
``records.RunDir``; loggers only watch. A NaN/inf loss ends the run as ``diverged``; an exception
ends it as ``failed`` (and is re-raised). Either way, what was recorded before stays.
"""

from __future__ import annotations

import logging
import math
import os
import random
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import normlab
from normlab import data as datasets
from normlab.config import host_synced_norm, model_options, norm_options, validate
from normlab.engine.checkpoint import read_checkpoint, restore_checkpoint, save_checkpoint
from normlab.engine.loop import evaluate, train_epoch
from normlab.engine.memory_format import FORMATS, FormatChoice, cache_key, choose_memory_format
from normlab.engine.step import CudaGraphStep, TrainStep
from normlab.engine.optim import build_optimizer, build_schedule
from normlab.engine.rerun import job_changes, refuse_another_job
from normlab.loggers import build_logger
from normlab.loggers.progress import ProgressBar
from normlab.models import build_model
from normlab.norms import norm_spec
from normlab.protocol import effective, identity
from normlab.records import RunDir, append_metrics, write_json, write_metrics

log = logging.getLogger("normlab")


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


def build_run_model(cfg: DictConfig, shape, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """The job's model on its device, in its memory format."""
    model = build_model(cfg.model.name, shape.num_classes, norm_options(cfg), workers=effective(cfg).workers,
                        zero_init_last=cfg.model.zero_init_last, in_chans=shape.channels,
                        **model_options(cfg)).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def resolve_memory_format(cfg: DictConfig, shape, device: torch.device, precision: str,
                          state: dict | None) -> FormatChoice:
    """A resumed run keeps the format it started in; otherwise trainer.channels_last, probed when auto."""
    if state is not None and state.get("memory_format") in FORMATS.values():
        return FormatChoice(state["memory_format"] == FORMATS[True], "resumed in the format the run started in")
    eff = effective(cfg)

    def make_step(channels_last: bool) -> TrainStep:
        model = build_run_model(cfg, shape, device, channels_last)
        return TrainStep(model, build_optimizer(model, cfg.optim, eff.lr), device=device, precision=precision)

    job_steps = shape.train_size // eff.total_batch * cfg.trainer.epochs if shape.train_size else None
    key = cache_key(device, model=cfg.model.name, model_options=model_options(cfg), norm=norm_options(cfg),
                    per_worker=cfg.batch.per_worker, workers=eff.workers, precision=precision,
                    image=(shape.channels, shape.size))
    return choose_memory_format(cfg.trainer.channels_last, make_step, classes=shape.num_classes, device=device,
                                shape=(eff.total_batch, shape.channels, shape.size, shape.size), key=key,
                                job_steps=job_steps)


def resolve_cuda_graph(setting: Any, device: torch.device, compile: bool, host_synced: bool = False) -> bool:
    """auto: on CUDA, unless the model is compiled or the norm reads a value on the host (`host_synced`).
    A graph replays the whole step with one launch: 12× the eager step for resnet20 at 2 × 8 on an H100,
    and no slower at large batches (README "Performance")."""
    if str(setting).lower() == "auto":
        return device.type == "cuda" and not compile and not host_synced
    return str(setting).lower() == "true"


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
        "epochs": len(rows), "wall_time_s": round(wall_time_s, 3),
        **identity(cfg), **extra,
        "normlab_version": normlab.__version__, "git_commit": git_commit(),
    }


def train(cfg: DictConfig, run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Run one job into `run_dir`. Returns its summary, or None when it was already done.

    Bad input raises ``ConfigError`` before anything is read or written: ``validate``, and a run
    directory that holds another config's run.
    """
    validate(cfg)
    records = RunDir(run_dir)
    records.path.mkdir(parents=True, exist_ok=True)
    changes = job_changes(cfg, records)
    if changes and not cfg.trainer.force:
        refuse_another_job(records, changes)
    if records.is_final() and not cfg.trainer.force:
        log.info("skipping %s: summary.json says %s (trainer.force=true reruns it)", records.path,
                 records.read_summary()["status"])
        return None
    if cfg.trainer.force and (records.is_final() or changes):  # a requeued job of the same config resumes
        for path in (records.summary, records.metrics, records.checkpoint):
            path.unlink(missing_ok=True)
    OmegaConf.save(cfg, records.config, resolve=True)

    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    device = resolve_device(cfg.trainer.device)
    precision = resolve_precision(cfg.trainer.precision, device)
    cuda_graph = resolve_cuda_graph(cfg.trainer.cuda_graph, device, cfg.trainer.compile, host_synced_norm(cfg))
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    eff = effective(cfg)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger = build_logger(cfg.logger, records.path, resolved, run_name(cfg))
    status, rows, wall_time = "failed", [], 0.0
    extra: dict[str, Any] = {"device": device.type, "precision": precision, "compiled": bool(cfg.trainer.compile),
                             "cuda_graph": cuda_graph, "batch_dependent": norm_spec(cfg.norm.name).batch_dependent}
    try:
        state = read_checkpoint(records.checkpoint) if records.checkpoint.exists() else None
        layout = resolve_memory_format(cfg, datasets.describe(cfg.data), device, precision, state)
        channels_last = layout.channels_last
        extra.update(memory_format=layout.name, memory_format_reason=layout.reason)
        loaders = datasets.build(cfg.data, eff.total_batch, device, seed=cfg.seed, channels_last=channels_last)
        model = build_run_model(cfg, loaders.shape, device, channels_last)
        forward = torch.compile(model) if cfg.trainer.compile else model  # shares the model's parameters
        steps = len(loaders.train)  # >= 1: validate checked the batch against the training set
        optimizer = build_optimizer(model, cfg.optim, eff.lr, capturable=cuda_graph)
        schedule = build_schedule(optimizer, cfg.schedule, steps, cfg.trainer.epochs)
        extra.update(train_size=loaders.train.num_samples, test_size=loaders.test.num_samples,
                     steps_per_epoch=steps, num_classes=loaders.shape.num_classes)

        start_epoch = 0
        if state is not None:
            resumed = restore_checkpoint(state, model=model, optimizer=optimizer, schedule=schedule)
            start_epoch, rows, wall_time = resumed["epoch"], resumed["metrics"], resumed["wall_time_s"]
            write_metrics(records.metrics, rows)  # drop any epoch logged after the checkpoint
            log.info("resuming %s after epoch %d", records.path, start_epoch)
        else:
            records.metrics.unlink(missing_ok=True)

        log.info("normlab: %s · norm %s · N=%d × W=%d = %d per step · protocol: %s · lr %.4g · %d steps/epoch · %s %s%s",
                 cfg.model.name, run_name(cfg).rsplit("-N", 1)[0], cfg.batch.per_worker, eff.workers,
                 eff.total_batch, eff.protocol, eff.lr, steps, device, precision,
                 f" {layout.name} ({layout.reason})" + (" cuda-graph" if cuda_graph else ""))

        step = TrainStep(forward, optimizer, device=device, precision=precision,
                         label_smoothing=cfg.optim.label_smoothing, autocast_cache=not cuda_graph)
        if cuda_graph:
            step = CudaGraphStep(step)
        bar = ProgressBar(ProgressBar.wanted(cfg.trainer.progress))
        status = "done"
        for epoch in range(start_epoch + 1, cfg.trainer.epochs + 1):
            lr = float(optimizer.param_groups[0]["lr"])
            train_metrics, epoch_time = train_epoch(
                step, loaders.train.epoch(epoch), schedule,
                progress=bar.epoch(epoch, cfg.trainer.epochs, steps, eff.total_batch))
            wall_time += epoch_time
            row = {"epoch": epoch, "train_loss": train_metrics["loss"], "train_error": train_metrics["error"],
                   "val_loss": None, "val_error": None, "lr": lr,
                   "images_per_sec": steps * eff.total_batch / epoch_time, "epoch_time_s": epoch_time}
            if not math.isfinite(train_metrics["loss"]):
                status = "diverged"
                extra["diverged_epoch"] = epoch
            elif epoch % cfg.trainer.eval_every == 0 or epoch == cfg.trainer.epochs:
                val = evaluate(forward, loaders.test.epoch(epoch), device=device, precision=precision)
                row.update(val_loss=val["loss"], val_error=val["error"])
                if loaders.shape.num_classes > 10:
                    row["val_error_top5"] = val["error_top5"]
            rows.append(row)
            append_metrics(records.metrics, row)
            logger.log_epoch(row)
            log.info("epoch %d/%d: train loss %.4f error %.2f%% · val error %s · %.0f img/s", epoch,
                     cfg.trainer.epochs, row["train_loss"], row["train_error"],
                     "-" if row["val_error"] is None else f"{row['val_error']:.2f}%", row["images_per_sec"])
            if status == "diverged":
                log.warning("diverged: the training loss is %s in epoch %d; ending the run", train_metrics["loss"],
                            epoch)
                break
            if cfg.trainer.checkpoint:
                save_checkpoint(records.checkpoint, model=model, optimizer=optimizer, schedule=schedule,
                                epoch=epoch, metrics=rows, wall_time_s=wall_time, memory_format=layout.name)
    except BaseException as e:
        status = "failed"
        extra["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:  # every ending, a failure too, leaves its summary and closes the W&B run
        summary = summarize(cfg, rows, status, wall_time, extra)
        write_json(records.summary, summary)
        logger.log_summary(summary)
        logger.finish(exit_code=int(status == "failed"))
    log.info("%s: val error %s (median of last 5: %s) in %.1fs · %s", status, summary["val_error"],
             summary["val_error_median5"], wall_time, records.summary)
    return summary
