"""The paper's batch protocol, as plain arithmetic on a config mapping (no torch, no Hydra).

N images per worker, W workers, a total batch of N·W per step and the linear scaling rule
lr = base_lr · N·W / base_batch (0.1 at 32 × 8 in the paper). Training and analysis both read
runs through these functions, so a run's identity means the same on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_GROUPS = 32  # the paper's G


@dataclass(frozen=True)
class Effective:
    """Values derived from the config, logged at start and recorded with the results."""

    total_batch: int
    lr: float


def effective(cfg: Any) -> Effective:
    total = cfg["batch"]["per_worker"] * cfg["batch"]["workers"]
    optim = cfg["optim"]
    lr = optim["lr"] if optim.get("lr") is not None else optim["base_lr"] * total / optim["base_batch"]
    return Effective(total_batch=total, lr=float(lr))


def identity(cfg: Any) -> dict[str, Any]:
    """The flat keys that identify a run in its summary, the report and W&B.

    ``groups``/``group_size`` are the values in effect: 32 groups for a group norm left at its
    default, and the paper's reading of LN (G=1) and IN (one channel per group).
    """
    norm = cfg["norm"]
    groups, group_size = norm.get("groups"), norm.get("group_size")
    if "groups" in norm and groups is None and group_size is None:
        groups = DEFAULT_GROUPS
    groups, group_size = {"ln": (1, None), "in": (None, 1)}.get(norm["name"], (groups, group_size))
    eff = effective(cfg)
    return {
        "experiment": cfg["name"], "model": cfg["model"]["name"], "norm": norm["name"],
        "groups": groups, "group_size": group_size,
        "per_worker_batch": cfg["batch"]["per_worker"], "workers": cfg["batch"]["workers"],
        "total_batch": eff.total_batch, "lr": eff.lr, "data": cfg["data"]["name"], "seed": cfg["seed"],
        "epochs_planned": cfg["trainer"]["epochs"],
    }
