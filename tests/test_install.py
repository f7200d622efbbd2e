"""The package as a user installs it: a wheel built from the checkout, installed (not editable) into a fresh
virtual environment, run from a folder outside the checkout, with the wheel's own code and configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY

SOURCES = ["pyproject.toml", "README.md", "LICENSE", "normlab", "conf", "experiments"]


def build_wheel(dest: Path) -> Path:
    """``pip wheel`` on a copy of the sources (links kept as links), so the checkout gets no build/ folder."""
    src = dest / "src"
    for name in SOURCES:
        path = REPO / name
        if path.is_dir() and not path.is_symlink():
            shutil.copytree(path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name, follow_symlinks=False)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(dest / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (dest / "dist").glob("normlab-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtual environment with the wheel installed; torch and the other dependencies come from the
    system's site-packages, not from a registry."""
    root = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(root)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=120)
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return venv


def run_in(venv: Path, cwd: Path, *command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the checkout must not be importable
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(list(command), cwd=cwd, env={**env, "WANDB_MODE": "offline"}, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_the_wheel_has_the_configs_and_experiments(tmp_path):
    import zipfile

    names = set(zipfile.ZipFile(build_wheel(tmp_path)).namelist())
    configs = {f"normlab/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    experiments = {f"normlab/conf/experiment/{p.name}" for p in (REPO / "experiments").glob("*.yaml")}
    assert "normlab/conf/train.yaml" in configs and "normlab/conf/experiment/demo.yaml" in experiments
    assert configs | experiments <= names, sorted((configs | experiments) - names)


@pytest.mark.slow
def test_an_installed_wheel_trains_and_reports_from_anywhere_with_its_own_code_and_configs(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run_in(installed, elsewhere, "python", "-c",
                   "import normlab, normlab.train; print(normlab.__file__); print(normlab.train.CONFIG_DIR)")
    assert where.returncode == 0, where.stderr
    for path in where.stdout.split():
        assert Path(path).resolve().is_relative_to(installed.resolve()), path

    helped = run_in(installed, elsewhere, "normlab-train", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "experiment: demo," in helped.stdout

    sweep = run_in(installed, elsewhere, "normlab-train", "-m", "experiment=demo", *TINY, "norm=bn,gn",
                   "batch.per_worker=4")
    assert sweep.returncode == 0, sweep.stderr
    runs = sorted((elsewhere / "results" / "demo").rglob("summary.json"))
    assert len(runs) == 2
    hydra_cfg = yaml.safe_load((runs[0].parent / ".hydra" / "hydra.yaml").read_text())["hydra"]
    main = next(s for s in hydra_cfg["runtime"]["config_sources"] if s["provider"] == "main")
    assert Path(main["path"]).resolve().is_relative_to(installed.resolve())
    assert hydra_cfg["runtime"]["choices"]["experiment"] == "demo"

    report = run_in(installed, elsewhere, "normlab-report", "results/demo")
    assert report.returncode == 0, report.stderr
    assert any((elsewhere / "results" / "demo" / "report").iterdir())
