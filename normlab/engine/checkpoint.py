"""Atomic checkpoints: everything needed to continue a run exactly where it stopped."""

from __future__ import annotations

import os
from typing import Any

import torch

from normlab.records import atomic_write


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, *, model, optimizer, schedule, epoch: int,
                    metrics: list[dict], wall_time_s: float, memory_format: str = "contiguous") -> None:
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
        "epoch": epoch, "metrics": metrics, "wall_time_s": wall_time_s, "rng": rng_state(),
        "memory_format": memory_format,
    }
    atomic_write(path, lambda f: torch.save(state, f))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The saved state, read with ``weights_only=True``: tensors and plain containers only, no code runs."""
    return torch.load(path, map_location="cpu", weights_only=True)


def restore_checkpoint(state: dict[str, Any], *, model, optimizer, schedule) -> dict[str, Any]:
    """Restore model, optimizer, schedule and RNG from `state`; return the rest (epoch, metrics, wall_time_s)."""
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
    return {"epoch": state["epoch"], "metrics": state["metrics"], "wall_time_s": state["wall_time_s"]}
