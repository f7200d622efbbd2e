"""How a study is read: the metric its tables use, and why. A published study carries its reading in a small file
beside its ``runs.csv`` (``reading.yaml``), so that ``normlab-report <study>/runs.csv`` rebuilds the published tables
with no flag. Without one, and without ``--metric``, the metric is chosen from the runs' own learning-rate records.

The paper's metric, the median of the last 5 evaluations, assumes at least 5 evaluations at the final learning rate
(100 epochs, the last drop at 90). Under a schedule that decays to zero, or with fewer evaluations after the last
drop, it mixes in evaluations of a less trained model: the report then uses the final evaluation, or says why not.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from normlab.analysis.metrics_info import METRICS, RUN_METRICS
from normlab.analysis.untrusted import PERCENT, finite_number
from normlab.records import READ_ERRORS, read_yaml

READING = "reading.yaml"
KEYS = {"metric": "one of " + ", ".join(RUN_METRICS), "why": "a sentence: why this metric",
        "dataset": "the data config's name, for runs that predate the dataset column (e.g. cifar10_jpeg)"}
MEDIAN5, FINAL = "val_error_median5", "val_error"
MEDIAN_NEEDS = 5  # evaluations at the final lr


class ReadingError(ValueError):
    """A reading file that cannot be used: names the file, the key and the value."""


@dataclass(frozen=True)
class Reading:
    metric: str
    why: str
    chosen_by: str  # "reading.yaml beside …", "--metric", "the runs' lr records"
    caveat: str | None = None
    dataset: str | None = None


def load_reading(path: Path) -> dict[str, str]:
    """The reading file's keys, checked: a mapping of known keys to strings, the metric one the report knows."""
    try:
        data = read_yaml(path)
    except READ_ERRORS as e:
        raise ReadingError(f"{path}: cannot be read ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ReadingError(f"{path}: expected a mapping of {', '.join(KEYS)}, got {type(data).__name__}")
    for key, value in data.items():
        if key not in KEYS:
            raise ReadingError(f"{path}: unknown key {key!r}; valid keys: {', '.join(KEYS)}")
        if not isinstance(value, str) or not value.strip():
            raise ReadingError(f"{path}: {key}={value!r} must be {KEYS[key]}")
    if "metric" in data and data["metric"] not in RUN_METRICS:
        raise ReadingError(f"{path}: metric={data['metric']!r} is not a metric the report knows; valid: "
                           f"{', '.join(RUN_METRICS)}")
    if "metric" in data and "why" not in data:
        raise ReadingError(f"{path}: metric={data['metric']!r} needs a 'why' (a sentence a reader sees)")
    return data


def reading_files(paths: Iterable[Path]) -> list[Path]:
    """The reading files beside the runs.csv files, or in the folders, that `paths` name."""
    found = []
    for path in map(Path, paths):
        candidate = (path.parent if path.suffix == ".csv" else path) / READING
        if candidate.is_file() and candidate not in found:
            found.append(candidate)
    return found


def find_reading(paths: Iterable[Path]) -> tuple[dict[str, str], Path | None]:
    """The one reading the given studies share ({} and None without one); two that differ are an error."""
    files = reading_files(paths)
    readings = [load_reading(f) for f in files]
    if any(r != readings[0] for r in readings[1:]):
        raise ReadingError(f"the studies are read differently ({', '.join(map(str, files))}): report them apart, "
                           "or give --metric")
    return (readings[0], files[0]) if readings else ({}, None)


def evaluations_at_final_lr(rows: list[dict]) -> int | None:
    """How many evaluations were made at the run's final learning rate (the lr an epoch started with); None if the
    rows do not record the lr (a value that is not a finite number is not a record). A schedule that decays every
    epoch (cosine) gives 1."""
    lrs = [finite_number(r.get("lr")) for r in rows]
    if not rows or None in lrs:
        return None
    final = lrs[-1]
    count = 0
    for row, lr in zip(reversed(rows), reversed(lrs)):
        if abs(lr - final) > 1e-9 * max(abs(final), 1e-12):
            break
        count += finite_number(row.get("val_error"), PERCENT) is not None
    return count


def _median_caveat(runs: pd.DataFrame) -> tuple[str | None, bool]:
    """(what a reader must know about the median of the last 5 in these runs, whether it is unfit)."""
    done = runs[runs["status"] == "done"]
    counts = pd.to_numeric(done.get("evals_at_final_lr", pd.Series(index=done.index, dtype=float)), errors="coerce")
    if done.empty:
        return None, False
    if counts.isna().any():
        return ("the runs do not record their learning rate per evaluation (a runs.csv that predates it), so "
                f"whether {MEDIAN_NEEDS} evaluations follow the last lr drop is not checked"), False
    short = counts < MEDIAN_NEEDS
    if short.any():
        return (f"{int(short.sum())} of {len(counts)} runs have fewer than {MEDIAN_NEEDS} evaluations at their final "
                f"learning rate (fewest: {int(counts.min())}; a schedule that decays to zero has 1), so the median of "
                f"the last {MEDIAN_NEEDS} would mix in evaluations before the last drop"), True
    return None, False


def choose(runs: pd.DataFrame, flag: str | None, reading: dict[str, str], source: Path | None) -> Reading:
    """The metric the report uses, who chose it, why, and what to beware of. A metric asked for (--metric, a
    reading file) that no run records is refused (ReadingError): its tables would be empty."""
    caveat, unfit = _median_caveat(runs)
    dataset = reading.get("dataset")
    if flag is not None:
        metric, why, chosen_by = flag, f"{METRICS[flag].label}, as asked", "--metric"
    elif "metric" in reading:
        metric, why = reading["metric"], reading["why"].strip()
        chosen_by = f"the study's reading file ({source.name if source else READING})"
    elif unfit:
        metric, chosen_by = FINAL, "the runs' lr records"
        why = f"{caveat}; the final evaluation is used instead"
        caveat = None
    else:
        metric, chosen_by = MEDIAN5, "the default"
        why = (f"the paper's metric; every run has at least {MEDIAN_NEEDS} evaluations at its final learning rate"
               if caveat is None else "the paper's metric")
    if metric not in runs:
        asked = f"--metric {flag}" if flag is not None else f"{source or READING}: metric={metric!r}"
        raise ReadingError(f"{asked}: no run records this metric; the runs record "
                           f"{', '.join(m for m in RUN_METRICS if m in runs)}")
    if not metric.endswith("_median5"):
        caveat = None
    return Reading(metric, why, chosen_by, caveat, dataset)


def reading_markdown(reading: Reading) -> str:
    text = f"**Metric**: {METRICS[reading.metric].label} (`{reading.metric}`), chosen by {reading.chosen_by}: " \
           f"{reading.why.rstrip('.')}.\n"
    if reading.caveat:
        text += f"\n**Beware**: {reading.caveat}.\n"
    return text
