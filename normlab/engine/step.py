"""The training step (forward, loss, backward, optimizer) as one call: eager, or replayed as a CUDA graph.

At small batches a GPU step is bound by kernel launches, not arithmetic: a ResNet-20 step with
per-worker BN issues many tiny kernels. ``CudaGraphStep`` records the whole step once and
replays it with a single launch per batch (``trainer.cuda_graph=true``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from normlab.engine import dist
from normlab.norms import cpu_kernel


def autocast(device: torch.device, precision: str, *, cache: bool = True):
    """bf16 autocast, or nothing. A captured graph needs ``cache=False`` (the CUDA-graph docs' rule)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def compile_model(module: nn.Module, mode: str | None = None) -> nn.Module:
    """``torch.compile`` as training uses it (``trainer.compile``): static shapes. With dynamic shapes, which Dynamo
    switches to once a process has seen a second shape, per-worker BN's view arithmetic sends Inductor's symbolic
    simplification into a very long search; a job's few shapes (train, eval, a last partial batch) compile once each.
    The CPU kernel is looked up first, so that the compiled graph calls it when it is there."""
    cpu_kernel.available()
    return torch.compile(module, mode=mode, dynamic=False)


class TrainStep:
    """One eager step; returns the logits and the mean loss, both still on the device."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device,
                 precision: str, label_smoothing: float = 0.0, autocast_cache: bool = True,
                 sync_buffers: bool = False) -> None:
        self.model, self.optimizer = model, optimizer
        self.device, self.precision, self.label_smoothing = device, precision, label_smoothing
        self.autocast_cache = autocast_cache
        self.sync_buffers = sync_buffers  # average running statistics over the ranks after every step

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device, self.precision, cache=self.autocast_cache):
            logits = self.model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)  # backward then writes fresh grads (inside a graph: its pool)
        loss.backward()
        self.optimizer.step()
        if self.sync_buffers:  # a norm that trains on its running statistics (brn) must read the same ones
            dist.average_buffers(self.model)
        return logits, loss


class CudaGraphStep:
    """A ``TrainStep`` captured once as a CUDA graph and replayed for every later batch.

    The first ``warmup`` batches train eagerly on a side stream, as the docs require (they create the
    momentum buffers and pick the cuDNN kernels); the next batch is captured, and every batch from then
    on is copied into the graph's static input and replayed. Captured work is only recorded, so each
    batch still trains exactly once. BN running statistics are buffers updated in place: the graph
    keeps updating the same tensors. The optimizer must read a device-tensor lr (``capturable``).
    The logits and loss it returns are the graph's own outputs, which the next replay overwrites: read
    or clone them before the next call, as ``train_epoch`` does.
    """

    def __init__(self, step: TrainStep, warmup: int = 3) -> None:
        for group in step.optimizer.param_groups:
            if not (isinstance(group["lr"], torch.Tensor) and group["lr"].is_cuda):
                raise ValueError("CudaGraphStep needs an optimizer built with capturable=True (a CUDA-tensor lr)")
        if step.autocast_cache:
            raise ValueError("CudaGraphStep needs a TrainStep built with autocast_cache=False")
        self.step, self.warmup = step, warmup
        self.model, self.device = step.model, step.device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0
        self.side = torch.cuda.Stream(device=step.device)  # the warm-up steps' stream

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is None and self.eager_steps < self.warmup:
            self.eager_steps += 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self.step(images, labels)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if self.graph is None:
            self.images, self.labels = images.clone(), labels.clone()  # static inputs, same memory format
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits, self.loss = self.step(self.images, self.labels)
        else:
            self.images.copy_(images)
            self.labels.copy_(labels)
        self.graph.replay()
        return self.logits, self.loss
