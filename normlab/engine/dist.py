"""One job on several processes: which rank this is, and the few collectives a job needs.

``torchrun`` (or SLURM tasks started by submitit) starts K copies of the job. Each finds its rank in the
environment, joins one process group, and simulates W/K of the paper's W workers. Every function here is a
no-op, or returns its input, in a single process (``data_parallel`` aside: it is only called with several),
so the trainer calls them unconditionally (as pycls's ``core/distributed.py`` does).
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from normlab.errors import ConfigError

T = TypeVar("T")
TIMEOUT = datetime.timedelta(minutes=10)  # a collective that waits longer (a rank died) fails every rank


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank of size, and its local rank on the node (the backend a job's
    collectives use depends on its device: :func:`backend_for`)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _from_submitit() -> tuple[int, int, int] | None:
    """(rank, size, local rank) of a submitit task of a job with several tasks; exports torch's variables."""
    try:
        import submitit
        env = submitit.JobEnvironment()
    except (ImportError, RuntimeError):  # not in a submitit job
        return None
    if env.num_tasks <= 1:
        return None
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return env.global_rank, env.num_tasks, env.local_rank


def launched() -> tuple[int, int, int] | None:
    """(rank, size, local rank) when this process is one of several ranks (torchrun's variables, or a
    submitit job's tasks); None when it runs alone."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        size = int(os.environ["WORLD_SIZE"])
        return (int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", 0))) if size > 1 else None
    return _from_submitit()


def launched_rank() -> int:
    """This process's rank among the job's processes, before any group is joined: 0 when it runs alone."""
    where = launched()
    return 0 if where is None else where[0]


def init() -> World:
    """Join the job's process group (once) and say where this process stands; World() when it runs alone.

    One group carries both backends: gloo for CPU tensors, nccl for CUDA ones, so the training device (a
    config value, read later) decides which one a job's collectives use. Each rank's GPU is its local rank's.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    where = launched()
    if where is None:
        return World()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(where[2] % torch.cuda.device_count())
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=TIMEOUT)
    atexit.register(finish)
    return current()


def current() -> World:
    """The process group this process joined, or World() if none."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def device_for(world: World, device: torch.device) -> torch.device:
    """A rank's device: its own GPU (its local rank's) when the job trains on CUDA."""
    if world.size > 1 and device.type == "cuda" and device.index is None:
        return torch.device("cuda", world.local_rank % torch.cuda.device_count())
    return device


def backend_for(device: torch.device) -> str | None:
    """The backend this job's collectives run on: nccl for CUDA tensors, gloo for CPU ones; None alone."""
    if current().size == 1:
        return None
    return "nccl" if device.type == "cuda" else "gloo"


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` under DDP: gradients averaged over the ranks, buffers never broadcast from rank 0 in forward
    (each rank's BN keeps its own workers' EMAs; :func:`average_buffers` merges them when they are read).
    On CUDA, norm=syncbn's layers become torch's ``nn.SyncBatchNorm``, in place."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    from normlab.norms import to_torch_sync_bn

    if device.type == "cuda":
        to_torch_sync_bn(model)
    no_sync = ({"forward_sync_buffers": False}  # torch >= 2.14's name; broadcast_buffers before it
               if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def broadcast(value: T) -> T:
    """Rank 0's `value` on every rank (any picklable object: these are the job's own processes)."""
    if current().size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


def on_main(compute: Callable[[], T]) -> T:
    """`compute()` run on rank 0 alone, its result on every rank. Whatever it raises is raised on every rank too
    (a ConfigError as itself, anything else as a RuntimeError naming it), so no rank is left waiting."""
    if current().size == 1:
        return compute()
    if not current().main:
        kind, payload = broadcast(None)
        if kind == "error":
            raise payload
        return payload
    try:
        value = compute()
    except BaseException as e:
        told = e if isinstance(e, ConfigError) else RuntimeError(f"rank 0 failed: {type(e).__name__}: {e}")
        broadcast(("error", told))
        raise
    broadcast(("value", value))
    return value


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the ranks, in place."""
    if current().size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is set on some rank (every rank gets the same answer); alone, `flag`."""
    if current().size == 1:
        return flag
    box = torch.tensor([int(flag)], device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


@torch.no_grad()
def average_buffers(model: nn.Module) -> None:
    """Every floating-point buffer (BN's running statistics) replaced by its mean over the ranks.

    Each rank keeps the EMA of its own workers' statistics; the update is linear, so their mean is the one
    buffer a single process simulating all W workers keeps (norms/per_worker_bn.py). Step counts agree already.
    """
    size = current().size
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if size == 1 or not buffers:
        return
    flat = torch.cat([b.reshape(-1).double() for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= size
    for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers])):
        buffer.copy_(value.view_as(buffer))


def finish() -> None:
    """Leave the process group (at the end of the job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
