"""The Hydra app ``normlab-train`` (also ``python -m normlab.train``): compose, validate, train one job.

    normlab-train norm=gn norm.groups=8 batch.per_worker=4 data=digits
    normlab-train -m experiment=demo

Jobs that a launcher runs side by side (``hydra/launcher=joblib``, ``submitit_local``) each get a share of
the machine: CPU threads, and a GPU of their own on a multi-GPU machine (normlab/sweep.py).

Bad input stops a single run with a one-paragraph message and exit code 2, before any data is
read. In a multirun, a job that is invalid or fails is reported and skipped, so the rest of the
sweep goes on; its run directory says what happened.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from normlab import search_path, sweep
from normlab.config import register_configs
from normlab.errors import ConfigError, RunFolderBusy

log = logging.getLogger("normlab")
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

register_configs()
search_path.register()


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> str:
    """One job. Returns its outcome for the sweep's callbacks: the summary's status, "skipped" (already
    done), "invalid" or "failed" (a multirun goes on past both)."""
    from normlab.engine.trainer import train

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        with sweep.share_machine(cfg):  # parallel jobs: a CPU-threads budget each, a GPU each
            summary = train(cfg, run_dir)  # validates first: ConfigError before anything is read
    except RunFolderBusy as e:
        if in_multirun():
            log.warning("job skipped: %s", e)
            return "busy"
        print(f"normlab-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    except ConfigError as e:
        if in_multirun():
            log.error("invalid job, skipped: %s", e)
            return "invalid"
        print(f"normlab-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - recorded in summary.json by train()
        if not in_multirun():
            raise
        log.exception("job failed, the sweep goes on: %s", e)
        return "failed"
    return "skipped" if summary is None else summary["status"]


if __name__ == "__main__":
    main()
