"""The Hydra app ``normlab-train`` (also ``python -m normlab.train``): compose, validate, train one job.

    normlab-train norm=gn norm.groups=8 batch.per_worker=4 data=digits
    normlab-train -m experiment=demo

Jobs that a launcher runs side by side (``hydra/launcher=joblib``, ``submitit_local``) each get a share of
the machine: CPU threads, and a GPU of their own on a multi-GPU machine (normlab/machine_share.py).

``torchrun --nproc_per_node=K -m normlab.train ARGS`` runs one job on K processes (normlab/engine/dist.py).

Bad input stops a single run with a one-paragraph message and exit code 2, before any data is
read. In a multirun, a job that is invalid or fails is reported and skipped, so the rest of the
sweep goes on; its run directory says what happened, and the sweep exits 1 (normlab/sweep_outcome.py).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from normlab import run_folder, sweep_outcome
from normlab.machine_share import MachineShare, share_machine
from normlab.config import register_configs
from normlab.engine import dist, preemption
from normlab.errors import ConfigError, RunFolderBusy
from normlab.records import DISK_FULL_OR_READ_ONLY, WRITE_FAILED_EXIT, WriteFailed
from normlab.validation import resolve_run, validate

log = logging.getLogger("normlab")
# normlab/conf links to the checkout's conf/, whose experiment/ links to experiments/; a wheel holds their files
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")

register_configs()


def config_groups() -> str:
    """'group: option, ...' per user-facing group (conf/ and experiments/), for --help: no schema names."""
    root = Path(CONFIG_DIR)
    groups = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in root.iterdir()
              if d.is_dir() and d.name != "hydra"}
    return "\n".join(f"{group}: {', '.join(options)}" for group, options in sorted(groups.items()))


OmegaConf.register_new_resolver("normlab_config_groups", config_groups, replace=True)


def one_line(error: BaseException) -> str:
    """Hydra's or OmegaConf's composition error as one line: what was asked, why it failed, what is valid."""
    text = str(error)
    cause = error.__cause__ if error.__cause__ is not None else None
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    text = text.split("\nConfig search path:")[0]
    text = re.sub(r"\n\s*Available options in '([^']+)':\s*", r"; valid options for \1: ", text)
    text = re.sub(r"\n\s*(full_key|object_type|reference_type)=.*", "", text)
    options = re.sub(r"\s*\n\s*", ", ", text.strip())
    options = re.sub(r"(valid options for [^:]+): , ", r"\1: ", options)
    return options.replace("., ", ". ").replace("In 'train': ", "")


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def train(cfg: DictConfig, run_dir: str | os.PathLike, share: MachineShare = MachineShare()) -> dict[str, Any] | None:
    """Validate `cfg`, resolve it into the job's ``RunSpec`` and run the job into `run_dir`: its summary, or None
    when it was done already. Bad input raises ``ConfigError`` before anything is read or written. `share`: what
    the launcher leaves this job of a sweep (threads, a GPU)."""
    from normlab.engine.trainer import run_job

    data = validate(cfg)
    world = dist.init()
    dataset = HydraConfig.get().runtime.choices.get("data") if HydraConfig.initialized() else None
    spec = resolve_run(cfg, data, world, threads=share.threads, device=share.device, dataset=dataset)
    return run_job(spec, run_dir)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> str:
    """One job. Returns its outcome for the sweep's callbacks: the summary's status, "skipped" (already
    done), "invalid", "busy" (another process holds its folder) or "failed" (a multirun goes on past all three)."""
    run_dir = HydraConfig.get().runtime.output_dir
    try:  # parallel jobs: a CPU-threads budget each, a GPU each; SIGTERM/USR1/USR2: stop after the step
        with (share_machine(cfg.trainer.threads, cfg.trainer.device) as share,
              preemption.deferred()):
            summary = train(cfg, run_dir, share)  # validates first: ConfigError before anything is read
    except preemption.Preempted as e:  # recorded as preempted, folder released: now the handler before ours
        log.warning("%s; rerun the same command to go on from there", e)
        preemption.hand_on(e.signum)
    except ConfigError as e:  # RunFolderBusy too: another process has the folder
        if in_multirun():
            busy = isinstance(e, RunFolderBusy)
            log.log(logging.WARNING if busy else logging.ERROR, "%s job, skipped: %s", "busy" if busy else "invalid", e)
            return "busy" if busy else "invalid"
        if dist.launched_rank() == 0:  # every rank stops alike; rank 0 says why
            print(f"normlab-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    except WriteFailed as e:  # a full disk, a read-only file system: what was written before stays
        if in_multirun():
            log.error("job failed, the sweep goes on: %s", e)
            return "failed"
        print(f"normlab-train: error: {e}", file=sys.stderr)
        sys.exit(WRITE_FAILED_EXIT)
    except Exception as e:  # noqa: BLE001 - recorded in summary.json by the trainer
        if not in_multirun():
            raise
        log.exception("job failed, the sweep goes on: %s", e)
        return "failed"
    if (signum := preemption.received()) is not None:  # it came after the last epoch: the job is done
        preemption.hand_on(signum)
    return "skipped" if summary is None else summary["status"]


def cli() -> None:
    """``normlab-train``: the app, with Hydra's own errors (an unknown option, a wrong type, a misspelt key)
    as one line and exit code 2, like normlab's."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra raises instead of printing; said here once, plainly
    logging.raiseExceptions = False  # a log file on a full disk: normlab's own message says so, not a traceback
    if dist.launched_rank() > 0:  # under torchrun, rank 0 alone writes Hydra's files and the log
        quiet = [f"{group}=none" for group in ("hydra/job_logging", "hydra/hydra_logging")
                 if not any(arg.lstrip("+~").startswith(group) for arg in sys.argv)]  # a user's own choice stands
        sys.argv += ["hydra.output_subdir=null", *quiet]
    refusal = run_folder.check(sys.argv[1:])  # before Hydra makes the folder and writes into it
    if refusal is not None:
        print(f"normlab-train: error: {refusal}", file=sys.stderr)
        sys.exit(2)
    try:
        if "--dry-run" in sys.argv[1:]:  # the sweep's jobs and what a run would do with each; nothing runs
            from normlab import sweep_plan

            args = [a for a in sys.argv[1:] if a not in ("--dry-run", "-m", "--multirun")]
            sys.exit(sweep_plan.main(args, CONFIG_DIR))
        main()
    except (HydraException, OmegaConfBaseException) as e:
        print(f"normlab-train: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # Hydra's own notes, written before a job starts (a sweep stops there): a full disk
        if e.errno == errno.ENAMETOOLONG:  # a folder named by many overrides: bad input, said before training
            print(f"normlab-train: error: a run folder's name is longer than the file system allows ({e.filename}): "
                  "a job's folder is named by the overrides that differ; give hydra.run.dir (hydra.sweep.subdir "
                  "in a sweep) a shorter name", file=sys.stderr)
            sys.exit(2)
        if e.errno not in DISK_FULL_OR_READ_ONLY:
            raise
        where = e.filename or run_folder.hydra_notes(sys.argv[1:])
        print(f"normlab-train: error: {WriteFailed(where, e)}", file=sys.stderr)
        sys.exit(WRITE_FAILED_EXIT)
    sys.exit(sweep_outcome.exit_code())  # a multirun with a job that did not finish: 1, after its tally


if __name__ == "__main__":
    cli()
