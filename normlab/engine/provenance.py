"""What a run's summary says besides its metrics: which code ran it, and the run's identifying keys."""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path
from typing import Any

import normlab
from normlab.engine import bn_eval
from normlab.run_spec import RunSpec


def git_commit() -> str | None:
    try:
        root = Path(normlab.__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def median_of_last(rows: list[dict], key: str, n: int = 5) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None][-n:]
    return statistics.median(values) if values else None


def summarize(spec: RunSpec, rows: list[dict], status: str, wall_time_s: float,
              facts: dict[str, Any]) -> dict[str, Any]:
    """summary.json: the final metrics, the run's identity, `facts` (what it ran on, how it ended) and the code."""
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
        **spec.identity, "dataset": spec.dataset, **facts,
        "normlab_version": normlab.__version__, "git_commit": git_commit(),
    }
