"""Read runs back from W&B into the same table as ``collect``: ``normlab-report --wandb ENTITY/PROJECT``.

Each normlab job logs its ``summary.json`` as the W&B run summary and the resolved config as the
run config, so a W&B run becomes the same record as its run directory. Runs without a normlab
summary (crashed, still running) are listed by their W&B state, as unfinished runs are on disk.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from normlab.analysis.collect import config_problem, tidy
from normlab.protocol import identity

WANDB_STATES = {"finished": "unfinished", "running": "unfinished", "crashed": "failed", "failed": "failed",
                "killed": "failed"}


def _plain(mapping: Any) -> dict[str, Any]:
    """A W&B summary or config as a plain dict (the API's objects wrap their values)."""
    data = getattr(mapping, "_json_dict", mapping)
    return {k: v for k, v in dict(data).items() if not str(k).startswith("_")}


def wandb_record(run: Any) -> dict[str, Any]:
    summary, config = _plain(run.summary), _plain(run.config)
    config = {k: (v.get("value", v) if isinstance(v, dict) and set(v) <= {"value", "desc"} else v)
              for k, v in config.items()}
    record: dict[str, Any] = {"run_dir": "wandb:" + "/".join(run.path)}
    if "status" in summary:
        return {**summary, **record}  # the run's own W&B path, whatever its summary says
    record["status"] = WANDB_STATES.get(getattr(run, "state", ""), "unfinished")
    if config_problem(config) is None:  # else the run stays listed without its identity, as before
        try:
            record.update(identity(config))
        except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError):
            pass
    return record


def collect_wandb(path: str, api: Any = None) -> pd.DataFrame:
    """Every run of the W&B project `path` (``ENTITY/PROJECT``) as one tidy table."""
    if api is None:
        import wandb

        api = wandb.Api()
    records = [wandb_record(run) for run in api.runs(path)
               if getattr(run, "job_type", None) != "summary"]  # the sweep's own summary runs are not runs
    return tidy(pd.DataFrame.from_records(records))
