"""One training run, start to finish, from its ``RunSpec``: skip or resume, build, train, evaluate, record.

``run_job(spec, run_dir)`` is what the app (normlab/train.py) calls for each job once it has resolved the
config. Its results are the files of ``records.RunDir``; loggers only watch. A NaN/inf loss ends the run as
``diverged``; an exception ends it as ``failed`` (and is re-raised). Either way, what was recorded before stays.

Under torchrun (or a SLURM job's tasks) every rank runs this, each simulating W/K of the W workers on its
slice of every global batch (engine/dist.py). Rank 0 decides, holds the folder and writes every record.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from normlab.engine import dist, preemption
from normlab.engine.build import Job, build_job, choose_job_memory_format
from normlab.engine.checkpoint import read_resume_state, restore_checkpoint, save_checkpoint, set_aside
from normlab.engine.evaluation import evaluate_epoch
from normlab.engine.loop import StoppedEpoch, train_epoch
from normlab.engine.memory_format import FormatChoice
from normlab.engine.runtime import emulated_bf16
from normlab.engine.provenance import summarize
from normlab.engine.rerun import job_is_done
from normlab.loggers import NullLogger, build_logger
from normlab.loggers.progress import ProgressBar
from normlab.norms import cpu_kernel, norm_entry
from normlab.records import RunDir, append_metrics, atomic_write, read_metrics, write_metrics
from normlab.run_spec import RunSpec, Runtime

log = logging.getLogger("normlab")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def use_threads(runtime: Runtime) -> None:
    """torch's CPU threads for this process, when the job sets them (trainer.threads or the launcher's share)."""
    if runtime.threads:
        torch.set_num_threads(runtime.threads)


def run_job(spec: RunSpec, run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Run one job into `run_dir`. Returns its summary, or None when it was already done.

    A run folder that another process holds (``RunFolderBusy``), or one that holds another config's run or
    unreadable records, is a ``ConfigError`` before anything is written. On several processes rank 0 holds the
    folder and decides, and every rank follows (its folder, its error).
    """
    world = spec.runtime.world
    if not world.main:
        logging.getLogger("normlab").setLevel(logging.ERROR)  # one rank speaks; the others only of errors
    records = RunDir(dist.broadcast(str(run_dir)))  # Hydra resolves ${now} per rank: rank 0's folder it is
    with contextlib.ExitStack() as held:
        def claim() -> bool:
            held.enter_context(records.hold())  # one process per run folder, for the job's life
            if job_is_done(spec, records):
                return False
            atomic_write(records.config, lambda f: f.write(spec.config_yaml.encode()))
            return True

        if not dist.on_main(claim):
            return None
        return run(spec, records)


@dataclass(frozen=True)
class EpochsOutcome:
    """How the epochs ended: done or diverged (in which epoch)."""

    status: str
    diverged_epoch: int | None = None


@dataclass
class TrainingTime:
    """Seconds of training the run's records keep: recorded epochs, and a stopped epoch's steps. It lives outside
    the epoch loop so that a run that fails or is stopped part-way still reports it."""

    seconds: float


def run(spec: RunSpec, records: RunDir) -> dict[str, Any]:
    """Resume or start, build, train every epoch, and leave a summary however it ends (rank 0 writes)."""
    runtime, plan, world = spec.runtime, spec.batch, spec.runtime.world
    seed_everything(spec.seed, runtime.deterministic)
    state = dist.on_main(lambda: read_resume_state(records))  # None: start over; damaged files moved aside
    rows = list(state["metrics"]) if state is not None else []
    if world.main:
        if state is None and read_metrics(records.metrics):  # epochs no checkpoint resumes: kept, not overwritten
            aside = set_aside(records.metrics, "unresumed")
            log.warning("%s holds epochs that no checkpoint resumes; kept as %s, and the run starts over",
                        records.metrics, aside.name)
        write_metrics(records.metrics, rows)  # realigned with what resumes
    start_epoch, status = (state["epoch"], "failed") if state else (0, "failed")
    trained = TrainingTime(state["wall_time_s"] if state else 0.0)
    logger = (build_logger(spec, records.path, resuming=state is not None)
              if world.main else NullLogger())
    norm = norm_entry(spec.norm.name)
    facts: dict[str, Any] = {"batch_dependent": norm.batch_dependent,  # a batch-independent norm's modes are alike
                             "bn_stats": str(spec.eval.bn_stats) if norm.batch_dependent or norm.synced
                             else "n/a (batch-independent norm)"}
    try:
        use_threads(runtime)
        memory_format = choose_job_memory_format(spec, state)
        facts.update(device=runtime.device.type, precision=str(runtime.precision), compiled=runtime.compile,
                     cuda_graph=runtime.cuda_graph, memory_format=memory_format.name,
                     memory_format_reason=memory_format.reason, world_size=world.size,
                     backend=dist.backend_for(runtime.device),
                     cpu_kernel=cpu_kernel.status() if runtime.device.type == "cpu" else None)
        job = build_job(spec, memory_format)
        facts.update(train_size=job.loaders.train.num_samples, test_size=job.loaders.test.num_samples,
                     steps_per_epoch=job.steps, num_classes=job.loaders.shape.num_classes)
        stopped = restore_into(records, state, job, spec.length.epochs) if state is not None else None
        if state is not None:
            log.info("resuming %s after epoch %d%s", records.path, start_epoch,
                     f", in epoch {start_epoch + 1} at step {stopped.steps + 1} of {job.steps}" if stopped else "")
        log.info("normlab: %s · norm %s · N=%d × W=%d = %d per step · protocol: %s · lr %.4g · %d steps/epoch · %s %s"
                 " · %s (%s)%s%s", spec.model.name, spec.run_name.rsplit("-N", 1)[0], plan.per_worker,
                 plan.workers, plan.total_batch, plan.protocol, plan.lr, job.steps, runtime.device, runtime.precision,
                 memory_format.name, memory_format.reason, " · cuda-graph" if runtime.cuda_graph else "",
                 f" · {world.size} processes ({facts['backend']}), W/{world.size} workers each" if world.size > 1
                 else "")
        if warning := emulated_bf16(runtime.precision, runtime.device):
            log.warning(warning)
        outcome = run_epochs(spec, records, memory_format, job, rows, start_epoch, trained, logger, stopped)
        status = outcome.status
        if outcome.diverged_epoch is not None:
            facts["diverged_epoch"] = outcome.diverged_epoch
    except BaseException as e:
        status = "preempted" if isinstance(e, preemption.Preempted) else "failed"
        if isinstance(e, preemption.Preempted) and e.at is not None:
            facts["preempted_at"] = e.at
        facts["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:  # every ending, a failure too, leaves its summary and closes the W&B run
        summary = summarize(spec, rows, status, trained.seconds, facts)
        if world.main:
            records.write_summary(summary)
        logger.log_summary(summary)
        logger.finish(exit_code=int(status == "failed"))
    log.info("%s: val error %s (median of last 5: %s) in %.1fs · %s", status, summary["val_error"],
             summary["val_error_median5"], trained.seconds, records.summary)
    return summary


def restore_into(records: RunDir, state: dict, job: Job, epochs: int) -> StoppedEpoch | None:
    """The checkpoint's state into the job, and the epoch it stopped in, if it did; one that does not fit this
    model is moved aside, and the job fails."""
    try:
        if state["epoch"] > epochs:
            raise ValueError(f"it has {state['epoch']} epochs done; this job has {epochs}")
        stopped = restore_checkpoint(state, model=job.model, optimizer=job.optimizer, schedule=job.schedule)
        if stopped is not None and stopped.steps > job.steps:
            raise ValueError(f"it stopped an epoch after step {stopped.steps}; this job's epochs have {job.steps}")
        return stopped
    except (RuntimeError, KeyError, ValueError, TypeError, OverflowError) as e:
        read = records.checkpoint if records.checkpoint.exists() else records.previous_checkpoint  # the one read
        aside = set_aside(read).name if dist.current().main else f"{read.name}.corrupt-<time>"
        raise RuntimeError(f"{read.name} does not fit this job ({type(e).__name__}: "
                           f"{str(e).splitlines()[0]}); moved aside to {aside} (by rank 0). Rerun: it resumes "
                           f"from {records.previous_checkpoint.name} if there is one, else starts over") from None


def run_epochs(spec: RunSpec, records: RunDir, memory_format: FormatChoice, job: Job, rows: list[dict],
               start_epoch: int, trained: TrainingTime, logger, stopped: StoppedEpoch | None = None) -> EpochsOutcome:
    """Train from `start_epoch` (or from where `stopped`, its next epoch, stopped) to the end, appending to
    `rows`. A preemption signal stops the epoch after its step: the checkpoint keeps that step. Rank 0 writes."""
    plan, length, main = spec.batch, spec.length, spec.runtime.world.main
    bar = ProgressBar(main and length.progress)

    def checkpoint(epochs_done: int, stopped_next: StoppedEpoch | None = None) -> None:
        if length.checkpoint and main:
            save_checkpoint(records, model=job.model, optimizer=job.optimizer, schedule=job.schedule,
                            epoch=epochs_done, metrics=rows, wall_time_s=trained.seconds, memory_format=memory_format.name,
                            stopped=stopped_next)

    for epoch in range(start_epoch + 1, length.epochs + 1):
        resume, stopped = stopped, None
        result = train_epoch(job.step, job.loaders.train.epoch(epoch, start=resume.steps if resume else 0),
                             job.schedule, steps=job.steps, resume=resume,
                             progress=bar.epoch(epoch, length.epochs, job.steps, plan.total_batch,
                                                first=resume.steps if resume else 0))
        if result.stopped is not None:  # a preemption signal: this step's checkpoint, then the job stops
            dist.average_buffers(job.model)  # linear EMAs: averaged now and at the epoch's end, the same
            dist.on_main(lambda: checkpoint(epoch - 1, result.stopped))  # every rank waits for it
            trained.seconds += result.stopped.time_s  # the summary's; the checkpoint keeps it in the stopped epoch
            raise preemption.Preempted(preemption.received(), {"epoch": epoch, "step": result.stopped.steps,
                                                               "steps": job.steps})
        train_metrics, epoch_time = result.metrics, result.time_s
        dist.average_buffers(job.model)  # the ranks' BN EMAs → the one buffer a single process keeps
        row = {"epoch": epoch, "train_loss": train_metrics["loss"], "train_error": train_metrics["error"],
               "val_loss": None, "val_error": None, "lr": job.schedule.lr_at((epoch - 1) * job.steps),
               "images_per_sec": job.steps * plan.total_batch / epoch_time, "epoch_time_s": epoch_time}
        diverged = not math.isfinite(train_metrics["loss"])
        if not diverged and (epoch % length.eval_every == 0 or epoch == length.epochs):
            row.update(evaluate_epoch(spec, job, epoch))
        rows.append(row)
        trained.seconds += epoch_time  # counted with its row: an epoch that fails before it is recorded is redone
        if main:
            append_metrics(records.metrics, row)
        logger.log_epoch(row)
        log.info("epoch %d/%d: train loss %.4f error %.2f%% · val error %s · %.0f img/s", epoch,
                 length.epochs, row["train_loss"], row["train_error"],
                 "-" if row["val_error"] is None else f"{row['val_error']:.2f}%", row["images_per_sec"])
        if diverged:
            log.warning("diverged: the training loss is %s in epoch %d; ending the run", train_metrics["loss"], epoch)
            return EpochsOutcome("diverged", diverged_epoch=epoch)
        checkpoint(epoch)
    return EpochsOutcome("done")
