"""Collect runs into one tidy table: one row per run, identity columns plus results and status.

A run directory is any folder with normlab's ``config.yaml`` (written when a job starts),
``metrics.jsonl`` or ``summary.json``. A run without a summary is ``unfinished``: listed, never dropped.
A published ``runs.csv`` can stand in for the run directories.

Beside the summary, each row says which data set the run read (``dataset``: the data config Hydra chose, next to
``data``, the source kind such as ``imagefolder``) and how many evaluations it made at its final learning rate
(``evals_at_final_lr``, what the choice of metric rests on: see ``reading``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from normlab.analysis.metrics_info import RUN_METRICS
from normlab.analysis.reading import evaluations_at_final_lr
from normlab.analysis.untrusted import (COUNT, INDEX, PERCENT, REAL, Range, finite_number, is_missing, is_name,
                                        shown)
from normlab.protocol import FIXED_TOTAL, PAPER, flatten, identity, is_runtime_key
from normlab.records import (CONFIG, METRIC_KEYS, METRICS, READ_ERRORS, SUMMARY, RunDir, read_metrics, read_yaml,
                             unreadable_reason)

IDENTITY = ["experiment", "dataset", "data", "model", "norm", "groups", "group_size", "per_worker_batch", "workers",
            "total_batch", "protocol", "lr", "seed"]
RESULTS = ["status", "val_error", "val_error_median5", "best_val_error", "epochs", "epochs_planned", "wall_time_s",
           "evals_at_final_lr"]
REQUIRED_CSV_COLUMNS = ("norm", "per_worker_batch", "status")
UNREADABLE, INVALID = "unreadable", "invalid"
STATUSES = ("done", "diverged", "failed", "preempted", "unfinished", UNREADABLE, INVALID)
PROTOCOLS = (PAPER, FIXED_TOTAL)
RUNS_CSV = "runs.csv"
# What a known column's values must be, else the run is invalid: whole-number columns become nullable integers.
NUMBERS = {"val_error": PERCENT, "val_error_median5": PERCENT, "best_val_error": PERCENT, "wall_time_s": Range(0),
           "lr": REAL, "groups": COUNT, "group_size": COUNT, "per_worker_batch": COUNT, "workers": COUNT,
           "total_batch": COUNT, "seed": INDEX, "epochs": INDEX, "epochs_planned": COUNT, "evals_at_final_lr": INDEX}
# the same for columns only some runs have: every error a table can show, the sizes intervals and budgets read
SOME_NUMBERS = {**{metric: PERCENT for metric in RUN_METRICS}, "test_size": COUNT, "train_size": COUNT,
                "steps_per_epoch": COUNT}
TEXTS = {"norm": (is_name, "a norm's name (letters, digits, '_' and '-', at most 64)"),
         "protocol": (PROTOCOLS.__contains__, f"one of {', '.join(PROTOCOLS)}"),
         "status": (STATUSES.__contains__, f"one of {', '.join(STATUSES)}"),
         "batch_dependent": (lambda v: isinstance(v, (bool, np.bool_)), "true or false")}
# the config values protocol.identity computes with: numbers, and batch sizes small enough to list divisors of
BATCH = Range(1, 2 ** 20, whole=True)
CONFIG_NUMBERS = {("batch", "per_worker"): BATCH, ("batch", "workers"): BATCH, ("batch", "total"): BATCH,
                  ("optim", "base_batch"): BATCH, ("optim", "base_lr"): REAL, ("optim", "lr"): REAL}


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
        return read_yaml(run.config)
    except READ_ERRORS:
        return None


def setting_differences(run_dirs: Iterable[str]) -> list[str]:
    """The settings in which these runs' config.yaml files differ, each as "key a / b" ("optim.weight_decay
    0.0001 / 0.0005"). A run whose config cannot be read, and a key a run's config does not have (one written
    before the key existed), are no difference."""
    configs = []
    for path in run_dirs:
        try:  # a config nested past Python's recursion limit is unreadable (RecursionError)
            config = flatten(read_yaml(RunDir(Path(path)).config))
        except READ_ERRORS:
            continue
        configs.append({key: shown(value) for key, value in config.items()
                        if key and key != "seed" and not is_runtime_key(key)})  # "": a config that is no mapping
    keys = sorted({key for config in configs for key in config})
    differing = []
    for key in keys:
        values = sorted({config[key] for config in configs if key in config})
        if len(values) > 1:
            differing.append(f"{key} {' / '.join(values[:4])}{' / …' if len(values) > 4 else ''}")
    return differing


def config_problem(config: Any) -> str | None:
    """Why protocol.identity cannot read this config safely (None: it can): a batch size or lr that is not a
    number, or so large that its divisors would take long to list."""
    if not isinstance(config, dict):
        return f"not a mapping ({type(config).__name__})"
    for (node, key), valid in CONFIG_NUMBERS.items():
        value = config[node].get(key) if isinstance(config.get(node), dict) else None
        if value is not None and finite_number(value, valid) is None:
            return f"{node}.{key}={shown(value)} is not {valid}"
    return None


def dataset_choice(path: Path) -> str | None:
    """The data config Hydra composed for the run (``cifar10_jpeg``), from its ``.hydra/hydra.yaml``; None without."""
    hydra_yaml = path / ".hydra" / "hydra.yaml"
    if unreadable_reason(hydra_yaml) is not None:
        return None
    try:
        hydra = read_yaml(hydra_yaml)
        choice = hydra["hydra"]["runtime"]["choices"]["data"]
    except (*READ_ERRORS, KeyError, TypeError):
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
    cannot be read (the summary; the config of a run without one), or metrics that repeat an epoch (two writers),
    make the row unreadable or invalid, with why. Metrics values that are not numbers count as missing."""
    run = RunDir(path)
    rows = read_metrics(run.metrics)
    epochs = [finite_number(r.get("epoch"), INDEX) for r in rows]  # an epoch that is not one is no repeat
    repeated = sorted({int(e) for e in epochs if e is not None and epochs.count(e) > 1})
    problem = unreadable_reason(run.summary)
    if problem is not None:
        return {"run_dir": str(path), "status": UNREADABLE, "problem": f"{SUMMARY}: {problem}"}
    summary = run.read_summary()
    found = {"dataset": dataset_choice(path), "evals_at_final_lr": evaluations_at_final_lr(rows)}
    if summary is not None:  # the folder read is the run's folder, whatever the summary says
        record = {**flat(summary), **{k: v for k, v in found.items() if summary.get(k) is None}, "run_dir": str(path)}
        if repeated:
            record.update(status=INVALID, problem=f"{METRICS} repeats epoch(s) {', '.join(map(str, repeated))}")
        return record
    record: dict[str, Any] = {"run_dir": str(path), "status": "unfinished", "epochs": len(rows),
                              "dataset": found["dataset"]}
    problem = unreadable_reason(run.config)
    config = _read_config(run) if problem is None else None
    problem = problem or (None if config is None else config_problem(config))
    if problem is None and config is not None:
        try:
            record.update(identity(config))
        except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as e:
            problem = f"{type(e).__name__}: {e}"
    if problem is not None:
        record.update(status=UNREADABLE, problem=f"{CONFIG}: {problem}")
    evaluated = [e for r in rows if (e := finite_number(r.get("val_error"), PERCENT)) is not None]
    if evaluated:
        record["val_error"] = evaluated[-1]
    return record


def _as_number(value: Any) -> Any:
    """A number written as text ("12.5": a runs.csv column with one bad cell is read as text) as the number."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """Known columns first, in a fixed order; whole-number columns as nullable integers. A value that is not what
    its column holds (NUMBERS, TEXTS: text for a number, a bool, a fraction of a worker, an error of 250%, a norm
    that is no name) makes its run invalid, and a done run without a finite val_error too, saying why: every
    table and tally then leaves it out alike, and the value is dropped, so no later step sees it."""
    for column in IDENTITY + RESULTS + ["problem"]:
        if column not in frame:
            frame[column] = pd.NA
    found: list[list[str]] = [[] for _ in range(len(frame))]  # each run's problems, in column order
    numbers = {**NUMBERS, **{column: valid for column, valid in SOME_NUMBERS.items() if column in frame}}
    for column, valid in numbers.items():
        kept = []
        for problems, value in zip(found, frame[column].tolist()):
            number = finite_number(_as_number(value), valid)
            if number is None and not is_missing(value):
                problems.append(f"{column}={shown(value)} is not {valid}")
            kept.append(math.nan if number is None else number)
        frame[column] = pd.Series(kept, index=frame.index, dtype=float).astype("Int64" if valid.whole else float)
    for column, (fits, what) in TEXTS.items():
        if column in frame:
            fit = [is_missing(value) or fits(value) for value in frame[column].tolist()]
            for problems, value, ok in zip(found, frame[column].tolist(), fit):
                problems.extend([] if ok else [f"{column}={shown(value)} is not {what}"])
            frame[column] = frame[column].where(pd.Series(fit, index=frame.index, dtype=bool), None)
    earlier = [None if is_missing(p) else str(p) for p in frame["problem"].tolist()]
    frame["problem"] = pd.Series(["; ".join(filter(None, [p, *new])) or None for p, new in zip(earlier, found)],
                                 index=frame.index, dtype="object")
    frame.loc[pd.Series([bool(p) for p in found], index=frame.index, dtype=bool), "status"] = INVALID
    no_result = (frame["status"] == "done") & frame["val_error"].isna()
    frame.loc[no_result, "problem"] = "done, but no finite val_error"
    frame.loc[no_result, "status"] = INVALID
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


def curve_row(row: dict[str, Any]) -> dict[str, float | None] | None:
    """A metrics row as the curves read it: each of METRIC_KEYS a finite number (an error in [0, 100], an epoch
    a whole number) or missing; None without an epoch."""
    ranges = {"epoch": INDEX, "train_error": PERCENT, "val_error": PERCENT}
    curve = {key: finite_number(row.get(key), ranges.get(key, REAL)) for key in METRIC_KEYS}
    return curve if curve["epoch"] is not None else None


def collect_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch metrics (METRIC_KEYS, ``curve_row``) of every run that has a run directory, with its identity
    columns."""
    frames = []
    for _, run in runs.iterrows():
        run_dir = run.get("run_dir")
        rows = read_metrics(Path(run_dir) / METRICS) if isinstance(run_dir, str) else []
        rows = [curve for row in rows if (curve := curve_row(row)) is not None]
        if rows:
            frame = pd.DataFrame.from_records(rows, columns=list(METRIC_KEYS)).astype(float)
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
    except (ImportError, ValueError, TypeError, NotImplementedError):  # pyarrow's errors on a column of mixed values
        pass
    return written
