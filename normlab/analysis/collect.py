"""Collect runs into one tidy table: one row per run, identity columns plus results and status.

A run directory is any folder with normlab's ``config.yaml`` (written when a job starts),
``metrics.jsonl`` or ``summary.json``. A run without a summary is ``unfinished``: listed, never dropped.
A published ``runs.csv`` can stand in for the run directories.

Beside the summary, each row says which data set the run read (``dataset``: the data config Hydra chose, next to
``data``, the source kind such as ``imagefolder``) and how many evaluations it made at its final learning rate
(``evals_at_final_lr``, what the choice of metric rests on: see ``reading``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from normlab.analysis.reading import evaluations_at_final_lr
from normlab.protocol import PAPER, identity
from normlab.records import CONFIG, METRICS, SUMMARY, RunDir, read_metrics, unreadable_reason

IDENTITY = ["experiment", "dataset", "data", "model", "norm", "groups", "group_size", "per_worker_batch", "workers",
            "total_batch", "protocol", "lr", "seed"]
RESULTS = ["status", "val_error", "val_error_median5", "best_val_error", "epochs", "epochs_planned", "wall_time_s",
           "evals_at_final_lr"]
NUMERIC = ["val_error", "val_error_median5", "best_val_error", "wall_time_s", "lr"]
REQUIRED_CSV_COLUMNS = ("norm", "per_worker_batch", "status")
UNREADABLE, INVALID = "unreadable", "invalid"
RUNS_CSV = "runs.csv"


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    found: set[Path] = set()
    for root in map(Path, paths):
        for name in (CONFIG, METRICS, SUMMARY):
            for path in root.rglob(name):
                inside = path.relative_to(root).parts
                if not {".hydra", "wandb", "report"} & set(inside):
                    found.add(path.parent)
    return sorted(found)


def _read_config(run: RunDir) -> dict[str, Any] | None:
    try:
        return yaml.safe_load(run.config.read_text())
    except (OSError, yaml.YAMLError):
        return None


def dataset_choice(path: Path) -> str | None:
    """The data config Hydra composed for the run (``cifar10_jpeg``), from its ``.hydra/hydra.yaml``; None without."""
    try:
        hydra = yaml.safe_load((path / ".hydra" / "hydra.yaml").read_text())
        choice = hydra["hydra"]["runtime"]["choices"]["data"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
        return None
    return choice if isinstance(choice, str) else None


def flat(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary as one table row: a nested record (``preempted_at``: epoch, step, steps) becomes columns of its
    own (``preempted_at_epoch``, ...), so a CSV holds numbers rather than a dict's text."""
    row: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            row.update(flat({f"{key}_{inner}": v for inner, v in value.items()}))
        else:
            row[key] = value
    return row


def run_record(path: Path) -> dict[str, Any]:
    """One row: the summary if the run finished, else what its config and metrics say so far. A record that
    cannot be read, or metrics that repeat an epoch (two writers), make the row unreadable or invalid, with why."""
    run = RunDir(path)
    rows = read_metrics(run.metrics)
    epochs = [r.get("epoch") for r in rows]
    repeated = sorted({e for e in epochs if epochs.count(e) > 1}, key=str)
    problem = unreadable_reason(run.summary)
    if problem is not None:
        return {"run_dir": str(path), "status": UNREADABLE, "problem": f"{SUMMARY}: {problem}"}
    summary = run.read_summary()
    found = {"dataset": dataset_choice(path), "evals_at_final_lr": evaluations_at_final_lr(rows)}
    if summary is not None:
        record = {"run_dir": str(path), **flat(summary), **{k: v for k, v in found.items() if summary.get(k) is None}}
        if repeated:
            record.update(status=INVALID, problem=f"{METRICS} repeats epoch(s) {', '.join(map(str, repeated))}")
        return record
    config = _read_config(run)
    record: dict[str, Any] = {"run_dir": str(path), "status": "unfinished", "epochs": len(rows),
                              "dataset": found["dataset"]}
    if config is not None:
        try:
            record.update(identity(config))
        except (KeyError, TypeError, ValueError) as e:
            record.update(status=UNREADABLE, problem=f"{CONFIG}: {type(e).__name__}: {e}")
    evaluated = [r["val_error"] for r in rows if r.get("val_error") is not None]
    if evaluated:
        record["val_error"] = evaluated[-1]
    return record


def tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """Known columns first, in a fixed order; integer columns as nullable integers. A value that is not a number
    where one belongs makes its run invalid, and a done run without a finite val_error too, saying why: every
    table and tally then leaves it out alike."""
    for column in IDENTITY + RESULTS + ["problem"]:
        if column not in frame:
            frame[column] = pd.NA
    frame["problem"] = frame["problem"].astype("object")
    for column in NUMERIC + ["groups", "group_size", "per_worker_batch", "workers", "total_batch", "seed", "epochs",
                             "epochs_planned", "evals_at_final_lr"]:
        number = pd.to_numeric(frame[column], errors="coerce")
        bad = number.isna() & frame[column].notna()
        frame.loc[bad, "problem"] = [f"{column}={v!r} is not a number" for v in frame.loc[bad, column]]
        frame.loc[bad, "status"] = INVALID
        frame[column] = number.where(~number.isin([float("inf"), float("-inf")]))
    no_result = (frame["status"] == "done") & frame["val_error"].isna()
    frame.loc[no_result, "problem"] = "done, but no finite val_error"
    frame.loc[no_result, "status"] = INVALID
    for column in ("groups", "group_size", "per_worker_batch", "workers", "total_batch", "seed", "epochs",
                   "epochs_planned", "evals_at_final_lr"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    # runs recorded before batch.total existed all followed the paper's protocol
    frame["protocol"] = frame["protocol"].astype("string").mask(frame["per_worker_batch"].notna()
                                                                & frame["protocol"].isna(), PAPER)
    rest = [c for c in frame.columns if c not in IDENTITY + RESULTS + ["run_dir", "problem"]]
    return frame[IDENTITY + RESULTS + ["problem"] + ["run_dir"] * ("run_dir" in frame) + rest]


def collect(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Every run under `paths` (run directories, sweep folders, or published runs.csv files)."""
    frames, records = [], []
    for path in map(Path, paths):
        csv = path if path.suffix == ".csv" else path / RUNS_CSV
        if csv.is_file() and not find_run_dirs([path if path.is_dir() else path.parent]):
            frame, problem = read_runs_csv(csv)
            frames.append(frame) if problem is None else records.append(
                {"run_dir": str(csv), "status": UNREADABLE, "problem": problem})
    records += [run_record(d) for d in find_run_dirs(p for p in map(Path, paths) if p.is_dir())]
    if records:
        frames.append(pd.DataFrame.from_records(records))
    if not frames:
        return tidy(pd.DataFrame())
    return tidy(pd.concat(frames, ignore_index=True))


def read_runs_csv(path: Path) -> tuple[pd.DataFrame | None, str | None]:
    """A published runs table, or why it cannot be used."""
    try:
        frame = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as e:
        return None, f"{path.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    missing = [c for c in REQUIRED_CSV_COLUMNS if c not in frame]
    if missing:
        return None, f"{path.name}: no column {', '.join(missing)}"
    return frame, None


def collect_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch metrics of every run that has a run directory, with its identity columns."""
    frames = []
    for _, run in runs.iterrows():
        run_dir = run.get("run_dir")
        rows = read_metrics(Path(run_dir) / METRICS) if isinstance(run_dir, str) else []
        if rows:
            frame = pd.DataFrame.from_records(rows)
            for column in IDENTITY + ["status", "run_dir"]:
                frame[column] = run.get(column)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_runs(runs: pd.DataFrame, out: Path) -> list[Path]:
    """runs.csv, and runs.parquet when pyarrow is there."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / RUNS_CSV]
    runs.to_csv(written[0], index=False)
    try:
        runs.to_parquet(out / "runs.parquet", index=False)
        written.append(out / "runs.parquet")
    except (ImportError, ValueError):
        pass
    return written
