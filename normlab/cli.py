"""``normlab-report PATH…``: collect runs and write the paper's figures and tables.

    normlab-report results/demo                       # → results/demo/report/
    normlab-report results/a results/b --out report/
    normlab-report results/reference/cifar10_small/runs.csv
    normlab-report --wandb ENTITY/PROJECT --out report/
    normlab-report results/my_sweep --attach ENTITY/PROJECT/RUN_ID   # also onto that W&B run (the sweep's summary)

The metric: --metric, else the study's reading.yaml beside its runs.csv (or in its folder), else the median of
the last 5 evaluations where every run has 5 at its final learning rate, else the final evaluation. The report
says which and why (docs/reports.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from normlab.analysis.collect import collect
from normlab.analysis.metrics_info import RUN_METRICS
from normlab.analysis.reading import ReadingError, choose, find_reading
from normlab.analysis.report import build_report
from normlab.records import CONFIG, METRICS, SUMMARY, WRITE_FAILED_EXIT, WriteFailed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="normlab-report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", type=Path, help="run or sweep directories, or runs.csv files")
    parser.add_argument("--out", type=Path, help="output folder (default: FIRST_PATH/report)")
    parser.add_argument("--metric", choices=list(RUN_METRICS),
                        help="the error to tabulate (default: the study's reading.yaml, else chosen from the runs)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read runs back from W&B")
    parser.add_argument("--attach", metavar="ENTITY/PROJECT/RUN_ID",
                        help="log the report's figures and files to this W&B run (WANDB_MODE applies)")
    args = parser.parse_args(argv)
    if args.attach is not None and (len(args.attach.split("/")) != 3 or not all(args.attach.split("/"))):
        parser.error(f"--attach {args.attach!r}: expected ENTITY/PROJECT/RUN_ID, as in the run's W&B URL")
    if not args.paths and not args.wandb:
        parser.error("give at least one PATH, or --wandb ENTITY/PROJECT")
    for path in args.paths:
        if not path.exists():
            parser.error(f"PATH {str(path)!r} does not exist")
    if args.out is None:
        if not args.paths:
            parser.error("--out is required with --wandb alone")
        first = args.paths[0]
        args.out = (first.parent if first.suffix == ".csv" else first) / "report"
    blocking = next(path for path in (args.out, *args.out.absolute().parents) if os.path.lexists(path))
    if not os.path.isdir(blocking):  # else a write into it fails, read as a disk error (exit 74)
        where = "" if blocking == args.out else f" cannot be made: {str(blocking)!r}"
        parser.error(f"--out {str(args.out)!r}{where} is a file, not a folder; give a folder (it is made if missing)")
    if any(os.path.lexists(args.out / name) for name in (SUMMARY, METRICS, CONFIG)):  # its files would sit among a run's
        parser.error(f"--out {str(args.out)!r} is a run's folder (it holds {SUMMARY}, {METRICS} or {CONFIG}); "
                     "give a folder of its own, such as its report/")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        reading, reading_path = find_reading(args.paths)
    except ReadingError as e:
        print(f"normlab-report: {e}", file=sys.stderr)
        return 2
    runs = collect(args.paths)
    if args.wandb:
        import pandas as pd

        from normlab.analysis.wandb_source import collect_wandb

        runs = pd.concat([runs, collect_wandb(args.wandb)], ignore_index=True) if len(runs) else collect_wandb(
            args.wandb)
    if runs.empty:
        print(f"normlab-report: no runs found under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 1
    try:
        chosen = choose(runs, args.metric, reading, reading_path)
    except ReadingError as e:
        print(f"normlab-report: {e}", file=sys.stderr)
        return 2
    try:
        written = build_report(runs, args.out, sources=[str(p) for p in args.paths] +
                               ([f"wandb:{args.wandb}"] if args.wandb else []), reading=chosen)
    except OSError as e:  # a full disk, a read-only --out: one line, the runs read are untouched
        failed = e if isinstance(e, WriteFailed) else WriteFailed(e.filename or args.out, e, "pass another --out")
        print(f"normlab-report: error: {failed}", file=sys.stderr)
        return WRITE_FAILED_EXIT
    counts = runs["status"].fillna("unknown").value_counts().to_dict()
    print(f"{len(runs)} runs ({', '.join(f'{n} {s}' for s, n in counts.items())}) → {args.out}")
    print(f"  metric: {chosen.metric} ({chosen.chosen_by})" + (f"; beware: {chosen.caveat}" if chosen.caveat else ""))
    files = sorted({p for files in written.values() for p in files})
    for path in files:
        print(f"  {path}")
    return attach(args.attach, files, args.out) if args.attach else 0


def attach(run_path: str, files: list[Path], out: Path) -> int:
    """The report's files onto the W&B run of that id (resumed: the sweep's summary run, say); the report on disk
    stays either way."""
    entity, project, run_id = run_path.split("/")
    try:
        import wandb

        from normlab.loggers.wandb_sweep import attach_files

        run = wandb.init(entity=entity, project=project, id=run_id, resume="allow", dir=str(out),
                         job_type="summary", reinit="finish_previous")
        try:
            attach_files(run, files)
        finally:
            run.finish()
    except Exception as e:  # noqa: BLE001 - any W&B failure: one line, the report is written
        print(f"normlab-report: could not attach the report to W&B run {run_path} ({type(e).__name__}: {e}); "
              f"the report is in {out}", file=sys.stderr)
        return 1
    print(f"  attached to W&B run {run_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
