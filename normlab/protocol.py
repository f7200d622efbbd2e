"""The batch protocol, as plain arithmetic on a config mapping (no torch, no Hydra).

N images per worker, W workers, a total batch of N·W per step and the linear scaling rule
lr = base_lr · N·W / base_batch (0.1 at 32 × 8 in the paper). Two protocols set W:

- ``paper``: W fixed (``batch.workers``), so the total batch and the lr change with N, as in the paper;
- ``fixed_total``: the total batch B fixed (``batch.total``) and W = B/N, so every N gets the same steps,
  lr and data order and only the normalization batch changes (Hoffer et al. 2017's "ghost batch").

Training and analysis both read runs through these functions, so a run's identity means the same on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_GROUPS = 32  # the paper's G


PAPER, FIXED_TOTAL = "paper", "fixed_total"


class ProtocolError(ValueError):
    """batch.* keys that do not fit together; the message names them and what would be valid."""


@dataclass(frozen=True)
class BatchPlan:
    """The batch protocol of a job: N, W, B = N·W and the lr, resolved once; logged and recorded with the results."""

    per_worker: int  # N
    workers: int  # W
    total_batch: int  # B
    lr: float
    protocol: str  # PAPER or FIXED_TOTAL


# Config keys that change how a job runs or reports, not what it trains: a run may be picked up again with others
# (engine/rerun.py), and two runs that differ only in them are runs of one setting (the report). The keys that
# conf/train.yaml leaves out of run folder names must be among them (tested).
RUNTIME_KEYS = ("name", "logger", "experiment", "trainer.threads", "trainer.force", "trainer.progress",
                "trainer.checkpoint", "trainer.device", "data.root", "data.download", "data.cache_dir",
                "data.loader_workers", "data.eval_batch", "data.in_memory_max_gb", "data.max_image_pixels")


def is_runtime_key(key: str) -> bool:
    return any(key == r or key.startswith(r + ".") for r in RUNTIME_KEYS)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted key: leaf value}."""
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}{key}.").items()}


def divisors(total: int) -> list[int]:
    return [n for n in range(1, total + 1) if total % n == 0]


def resolve_workers(batch: Any) -> tuple[int, str]:
    """(W, protocol) from the batch node: ``batch.workers``, or ``batch.total / batch.per_worker``."""
    per_worker, workers, total = batch["per_worker"], batch.get("workers"), batch.get("total")
    if total is None:
        if workers is None:
            raise ProtocolError("batch.workers=None is invalid: set batch.workers (W, the paper's protocol) or "
                                "batch.total (B, a fixed total batch split among B/N workers)")
        return workers, PAPER
    if total < per_worker:
        raise ProtocolError(f"batch.total={total} is invalid with batch.per_worker={per_worker}: the total batch "
                            f"must be at least one worker's batch")
    if total % per_worker:
        raise ProtocolError(f"batch.total={total} is not divisible by batch.per_worker={per_worker}; for "
                            f"batch.total={total} valid per-worker batches are {', '.join(map(str, divisors(total)))}")
    if workers is not None and workers != total // per_worker:
        raise ProtocolError(f"batch.workers={workers} disagrees with batch.total / batch.per_worker = {total}/"
                            f"{per_worker} = {total // per_worker}; set batch.workers=null with batch.total "
                            f"(W follows from B/N), or drop batch.total")
    return total // per_worker, FIXED_TOTAL


def effective(cfg: Any) -> BatchPlan:
    """The batch plan of a config mapping (a composed config, or one read back from a run's config.yaml)."""
    workers, protocol = resolve_workers(cfg["batch"])
    per_worker = cfg["batch"]["per_worker"]
    total = per_worker * workers
    optim = cfg["optim"]
    lr = optim["lr"] if optim.get("lr") is not None else optim["base_lr"] * total / optim["base_batch"]
    return BatchPlan(per_worker=per_worker, workers=workers, total_batch=total, lr=float(lr), protocol=protocol)


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
    plan = effective(cfg)
    return {
        "experiment": cfg["name"], "model": cfg["model"]["name"], "norm": norm["name"],
        "groups": groups, "group_size": group_size,
        "per_worker_batch": plan.per_worker, "workers": plan.workers, "total_batch": plan.total_batch,
        "protocol": plan.protocol, "lr": plan.lr, "data": cfg["data"]["name"], "seed": cfg["seed"],
        "epochs_planned": cfg["trainer"]["epochs"],
    }
