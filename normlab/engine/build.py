"""What one job trains with, built from its ``RunSpec``: the memory format, data, model, optimizer, schedule, step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from normlab import data as datasets
from normlab.data import DataShape, Loaders
from normlab.engine import dist
from normlab.engine.memory_format import FORMATS, FormatChoice, cache_key, choose_memory_format
from normlab.engine.optim import Schedule, build_optimizer, build_schedule
from normlab.engine.step import CudaGraphStep, TrainStep, compile_model
from normlab.models import build_model
from normlab.norms import norm_entry, to_process_local_bn
from normlab.run_spec import RunSpec


def build_run_model(spec: RunSpec, shape: DataShape, channels_last: bool) -> torch.nn.Module:
    """The job's model on its device, in its memory format: this rank's, simulating W/ranks workers."""
    runtime = spec.runtime
    model = build_model(spec.model.name, shape.num_classes, spec.norm.options,
                        workers=spec.batch.workers // runtime.world.size, zero_init_last=spec.model.zero_init_last,
                        in_chans=shape.channels, **spec.model.options).to(runtime.device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def choose_job_memory_format(spec: RunSpec, resume_state: dict | None) -> FormatChoice:
    """A resumed run keeps the format it started in; otherwise trainer.channels_last, probed when auto (on
    one rank's step, N·W/ranks images and W/ranks workers, compiled when the job is: compiled, the faster format
    can be the other one). The probe runs on rank 0 alone, and every rank runs its choice."""
    if resume_state is not None and resume_state.get("memory_format") in FORMATS.values():
        return FormatChoice(resume_state["memory_format"] == FORMATS[True], "resumed in the format the run started in")
    runtime, plan, shape = spec.runtime, spec.batch, spec.data.shape
    ranks = runtime.world.size

    def make_step(channels_last: bool) -> TrainStep:  # the step as the job runs it: compiled too, if it is
        model = to_process_local_bn(build_run_model(spec, shape, channels_last))  # probed by rank 0 alone
        forward = compile_model(model) if runtime.compile else model
        return TrainStep(forward, build_optimizer(model, spec.optim, plan.lr), device=runtime.device,
                         precision=runtime.precision)

    job_steps = shape.train_size // plan.total_batch * spec.length.epochs if shape.train_size else None
    rank_batch = plan.total_batch // ranks
    batch = ((plan.per_worker, plan.workers // ranks) if norm_entry(spec.norm.name).batch_dependent
             else rank_batch)  # W changes a batch-dependent norm's step
    key = cache_key(runtime.device, model=spec.model.name, model_options=spec.model.options, norm=spec.norm.options,
                    batch=batch, precision=str(runtime.precision), image=(shape.channels, shape.size),
                    compiled=runtime.compile)

    def probe() -> FormatChoice:  # on rank 0 alone: its models' synced BN is process-local (make_step)
        return choose_memory_format(runtime.channels_last, make_step, classes=shape.num_classes,
                                    device=runtime.device, shape=(rank_batch, shape.channels, shape.size, shape.size),
                                    key=key, job_steps=job_steps)

    return dist.on_main(probe)


@dataclass
class Job:
    """What one job trains with: data, model (and its compiled forward), optimizer, schedule, step."""

    loaders: Loaders
    model: torch.nn.Module
    forward: Any  # the model, or its DDP wrapper and/or compiled forward, sharing its parameters
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    step: TrainStep | CudaGraphStep

    @property
    def steps(self) -> int:
        return len(self.loaders.train)  # >= 1: validate checked the batch against the training set


def build_job(spec: RunSpec, memory_format: FormatChoice) -> Job:
    """Data, model, optimizer, schedule and step. On several processes: this rank's share of the data and the
    workers, gradients averaged by DDP, whose buffer broadcast is off (each rank keeps its workers' BN EMAs,
    which the trainer averages before they are read)."""
    runtime, plan, world = spec.runtime, spec.batch, spec.runtime.world
    channels_last = memory_format.channels_last
    loaders = datasets.build(spec.data, plan.total_batch, runtime.device, seed=spec.seed, channels_last=channels_last,
                             shard=(world.rank, world.size))
    model = build_run_model(spec, loaders.shape, channels_last)
    replicated = dist.data_parallel(model, runtime.device) if world.size > 1 else model
    forward = compile_model(replicated) if runtime.compile else replicated  # shares the model's parameters
    optimizer = build_optimizer(model, spec.optim, plan.lr, capturable=runtime.cuda_graph)
    schedule = build_schedule(optimizer, spec.schedule, len(loaders.train), spec.length.epochs)
    step = TrainStep(forward, optimizer, device=runtime.device, precision=runtime.precision,
                     label_smoothing=spec.optim.label_smoothing, autocast_cache=not runtime.cuda_graph,
                     sync_buffers=world.size > 1 and norm_entry(spec.norm.name).trains_on_running_stats)
    return Job(loaders, model, forward, optimizer, schedule, CudaGraphStep(step) if runtime.cuda_graph else step)
