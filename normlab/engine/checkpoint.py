"""Atomic checkpoints: everything needed to continue a run exactly where it stopped, and nothing that runs code.

Saved as tensors and plain containers and read with ``weights_only=True``, so a planted checkpoint cannot
execute anything. Written at the end of every epoch and, when a preemption signal stops an epoch, at that
step: then it also holds the stopped epoch (its steps, totals and time), and the run goes on from there. The
one before the latest is kept: a checkpoint that cannot be read is moved aside (``checkpoint.pt.corrupt-<time>``),
with a warning, and the run resumes from the previous one, or starts over.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from normlab.engine.loop import StoppedEpoch, checked_number
from normlab.records import RunDir, atomic_write

log = logging.getLogger("normlab")
STATE_KEYS = ("model", "optimizer", "schedule", "epoch", "metrics", "wall_time_s", "rng")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(records: RunDir, *, model, optimizer, schedule, epoch: int, metrics: list[dict],
                    wall_time_s: float, memory_format: str = "contiguous", stopped: StoppedEpoch | None = None) -> None:
    """The latest state into checkpoint.pt (atomically), the one it replaces kept as checkpoint.prev.pt.
    `epoch`: the epochs done; `stopped`: how far the next one got. A write that fails (WriteFailed) leaves both
    as they were."""
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
        "epoch": epoch, "metrics": metrics, "wall_time_s": wall_time_s, "rng": rng_state(),
        "memory_format": memory_format, "stopped_epoch": stopped.state() if stopped else None,
    }
    atomic_write(records.checkpoint, lambda f: torch.save(state, f), keep_previous=records.previous_checkpoint)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The saved state, read with ``weights_only=True``: tensors and plain containers only, no code runs. Its
    bookkeeping is data from disk, checked here (ValueError naming the key): the epochs done, a count; the
    metrics, one object per epoch done, numbered 1, 2, ...; the time, a finite number of seconds."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"not a normlab checkpoint: no {', '.join(missing)}")
    epoch = checked_number("epoch", state["epoch"], int, owner="its")
    checked_number("wall_time_s", state["wall_time_s"], float, owner="its")
    metrics = state["metrics"]
    if not isinstance(metrics, list) or len(metrics) != epoch or any(
            not isinstance(row, dict) or row.get("epoch") != n for n, row in enumerate(metrics, start=1)):
        raise ValueError(f"its metrics are not the rows of epochs 1 to {epoch}")
    return state


def set_aside(path: Path, why: str = "corrupt") -> Path:
    """Rename a file out of the way (``NAME.corrupt-<time>``), keeping it for inspection; its new path."""
    aside = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    return aside


def read_resume_state(records: RunDir) -> dict[str, Any] | None:
    """The latest checkpoint that reads, else None (start over). Damaged ones are moved aside, with a warning."""
    for path in (records.checkpoint, records.previous_checkpoint):
        if not path.exists():
            continue
        try:
            return read_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - whatever a damaged or foreign file raises, the run goes on
            reason = str(e).splitlines()[0] if str(e) else ""
            aside = set_aside(path)
            log.warning("%s cannot be read (%s: %s); moved aside to %s", path, type(e).__name__, reason[:200],
                        aside.name)
    return None


def restore_checkpoint(state: dict[str, Any], *, model, optimizer, schedule) -> StoppedEpoch | None:
    """Restore model, optimizer, schedule and RNG from `state`; return the stopped epoch it holds, if any."""
    stopped = StoppedEpoch.from_state(state["stopped_epoch"]) if state.get("stopped_epoch") is not None else None
    model.load_state_dict(state["model"])
    built = [dict(group) for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, before in zip(optimizer.param_groups, built):
        for key in ("fused", "foreach"):  # how this run steps (a checkpoint from another device or version)
            group[key] = before.get(key)
        if isinstance(before["lr"], torch.Tensor):  # the device tensor a CUDA graph reads; the schedule sets it
            group["lr"] = before["lr"]
    schedule.load_state_dict(state["schedule"])
    set_rng_state(state["rng"])
    return stopped
