"""scripts/gpu_regime_runs.py, on a CPU at a tiny size: the timed epoch, the three long runs side by side, and
one archive whose run folders are named and laid out as the study's runs/ (the study driver's names)."""

import importlib.util
import json
import subprocess
import sys
import tarfile

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # six small training processes

spec = importlib.util.spec_from_file_location("study_driver", REPO / "scripts" / "reproduce_cifar10_resnet20.py")
driver = importlib.util.module_from_spec(spec)
spec.loader.exec_module(driver)
TINY_SET = ["data=synthetic", "data.num_train=256", "data.num_test=32", "data.size=8", "model=resnet8",
            "model.width=8", "trainer.checkpoint=false"]


def test_the_gpu_script_times_an_epoch_runs_the_three_settings_and_packs_them_as_runs(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "scripts/gpu_regime_runs.py", "--out", str(out), "--device", "cpu",
                             "--epochs", "2", "--seconds", "400", "--work", str(tmp_path / "work"), *TINY_SET],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("card: cpu") and "one epoch, the three settings side by side" in summary
    with tarfile.open(out / "gpu_runs.tar.gz") as archive:
        names = archive.getnames()
        archive.extractall(tmp_path / "back", filter="data")
    expected = {driver.folder_name(j["overrides"]) for j in driver.plan(extend=False, grid_epochs=None)
                if j["overrides"]["seed"] == 0 and j["epochs"] == 5}
    expected = {name.replace("trainer.epochs=5", "trainer.epochs=2") for name in expected}
    runs = tmp_path / "back" / "runs"
    assert {p.name for p in runs.iterdir()} == expected and "card.txt" in names
    for folder in runs.iterdir():
        assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "metrics.jsonl", "summary.json"]
        done = json.loads((folder / "summary.json").read_text())
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert done["status"] == "done" and done["epochs"] == 2 and config["trainer"]["epochs"] == 2
        assert config["name"] == "gn_regime" and config["batch"]["total"] == 128
        assert f"{folder.name}: done" in summary
