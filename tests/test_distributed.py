"""One job on several processes (torchrun, submitit tasks), on the CPU with gloo, against a single-process run.

The reference is always the simulation: one process training the same W workers. Two runs are equal up to
the order in which floats are summed (DDP averages per-rank gradients; one process sums one batch), which
is ~1e-7 after a couple of epochs and grows as training amplifies it, so the comparisons are kept short.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from normlab.data.device_loader import DeviceLoader, Normalize
from normlab.data.stream_loader import StreamLoader
from normlab.engine import dist
from normlab.protocol import effective
from normlab.validation import check_world
from normlab.errors import ConfigError
from normlab.norms import PerWorkerBatchNorm2d, SyncBatchNorm2d, to_process_local_bn
from normlab.records import read_metrics
from normlab.train import train as train_in_this_process
from tests.conftest import REPO, compose_config

JOB = ["data=digits", "data.train_subset=512", "model=resnet8", "batch.per_worker=4", "batch.workers=4",
       "trainer.epochs=2", "trainer.device=cpu", "trainer.precision=fp32", "trainer.channels_last=false",
       "trainer.progress=false", "optim.lr=0.1"]
TORCHRUN = shutil.which("torchrun") is not None


def run_job(run_dir: Path, *overrides: str, ranks: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """The job in one process, or under ``torchrun --standalone --nproc_per_node=ranks``."""
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
              if ranks > 1 else [sys.executable])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([*launch, "-m", "normlab.train", *JOB, *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**env, "PYTHONUNBUFFERED": "1"})


def train_alone(run_dir: Path, *overrides: str) -> None:
    """The single-process reference, in this process: the same job as ``run_job`` without a second start-up."""
    assert train_in_this_process(compose_config([*JOB, *overrides]), run_dir)["status"] == "done"


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def assert_same_training(a: Path, b: Path, atol: float = 1e-5) -> None:
    """The same model (parameters and BN buffers) and the same per-epoch metrics, up to float summation order."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key].double(), wb[key].double(), atol=atol, rtol=atol, msg=key)
    ra, rb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb]
    for x, y in zip(ra, rb):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-5)
        assert x["val_error"] == pytest.approx(y["val_error"], abs=0.3)  # one test image of 360 may flip


# ---------------------------------------------------------------- alone, every collective is a no-op

def test_collectives_are_no_ops_in_one_process():
    assert dist.init() == dist.World() and dist.current().main
    t = torch.arange(3.0)
    assert dist.all_reduce_sum(t) is t and t.tolist() == [0.0, 1.0, 2.0]
    assert dist.broadcast({"a": 1}) == {"a": 1}
    assert dist.on_main(lambda: 7) == 7
    bn = PerWorkerBatchNorm2d(3)
    bn.running_mean.fill_(2.0)
    dist.average_buffers(bn)
    assert bn.running_mean.tolist() == [2.0] * 3
    assert dist.backend_for(torch.device("cpu")) is None
    assert dist.any_rank(True, torch.device("cpu")) and not dist.any_rank(False, torch.device("cpu"))


def test_ranks_check_for_a_signal_every_eighth_step_and_at_an_epochs_last(monkeypatch):
    """The steps at which ranks may stop: multiples of AGREE_EVERY and the epoch's last (an epoch of 5 steps too);
    alone, every step. The collective is replaced by its single-rank answer: which steps ask is what is tested."""
    from normlab.engine import loop, preemption

    asked = []
    monkeypatch.setattr(preemption, "requested", lambda: True)
    monkeypatch.setattr(dist, "any_rank", lambda flag, device: asked.append(flag) or flag)
    cpu = torch.device("cpu")
    assert all(loop.stop_after(done, 20, cpu) for done in range(1, 21)) and asked == []  # alone: at once
    monkeypatch.setattr(dist, "current", lambda: dist.World(rank=0, size=2))
    assert [done for done in range(1, 21) if loop.stop_after(done, 20, cpu)] == [8, 16, 20]
    assert [done for done in range(1, 6) if loop.stop_after(done, 5, cpu)] == [5]
    assert len(asked) == 4  # the collective runs only at those steps, on every rank alike


def planned(cfg):
    return cfg, effective(cfg)


def test_workers_must_split_among_the_ranks(tiny):
    check_world(*planned(tiny("batch.workers=4")), dist.World(0, 2))
    with pytest.raises(ConfigError, match=r"batch.workers: W=3 workers cannot be split among the job's 2 processes"):
        check_world(*planned(tiny("batch.workers=3")), dist.World(0, 2))
    with pytest.raises(ConfigError, match=r"batch.total: W=3"):
        check_world(*planned(tiny("batch.workers=null", "batch.total=12")), dist.World(1, 2))
    with pytest.raises(ConfigError, match="trainer.cuda_graph=true is invalid for a job on 2 processes"):
        check_world(*planned(tiny("trainer.cuda_graph=true")), dist.World(0, 2))
    cfg = tiny()
    cfg.trainer.device = "cuda:1"  # set after composing: validate would refuse it on a machine without CUDA
    with pytest.raises(ConfigError, match="trainer.device=cuda:1 names one GPU for all 2 processes"):
        check_world(*planned(cfg), dist.World(0, 2))


# ---------------------------------------------------------------- each rank's share of the data

def test_rank_slices_of_each_global_batch_make_the_single_process_batch():
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(40)

    def loader(train, shard):
        return DeviceLoader(images, labels, 8, Normalize(torch.zeros(3), torch.ones(3), torch.device("cpu")),
                            train=train, padding=2, seed=3, shard=shard)

    for train in (True, False):
        whole = list(loader(train, (0, 1)).epoch(2, shuffled=True))
        ranks = [list(loader(train, (r, 2)).epoch(2, shuffled=True)) for r in range(2)]
        if train:  # every step: rank 0's images, then rank 1's, augmentation included
            assert all(len(r) == len(whole) for r in ranks)
            for step, (x, y) in enumerate(whole):
                torch.testing.assert_close(torch.cat([ranks[0][step][0], ranks[1][step][0]]), x, rtol=0, atol=0)
                assert torch.cat([ranks[0][step][1], ranks[1][step][1]]).tolist() == y.tolist()
        else:  # evaluation: every other batch, so that the totals add up to the whole test set's
            assert [b[1].tolist() for b in ranks[0]] == [b[1].tolist() for b in whole[0::2]]
            assert [b[1].tolist() for b in ranks[1]] == [b[1].tolist() for b in whole[1::2]]


def test_streamed_batches_are_sliced_the_same_way():
    def loader(train, shard):
        stream = StreamLoader.__new__(StreamLoader)  # the sampling alone: no image files needed
        stream.dataset, stream.batch_size, stream.train, stream.seed, stream.shard = range(50), 8, train, 1, shard
        return stream

    whole = loader(True, (0, 1)).batches(3, shuffled=False)
    r0, r1 = (loader(True, (r, 2)).batches(3, shuffled=False) for r in range(2))
    assert [a + b for a, b in zip(r0, r1)] == whole and len(whole) == 50 // 8
    test = loader(False, (0, 1)).batches(0, shuffled=True)
    assert loader(False, (1, 2)).batches(0, shuffled=True) == test[1::2]


# ---------------------------------------------------------------- layers across two gloo processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    world = dist.init()
    assert world == dist.World(rank, 2, rank) and dist.backend_for(torch.device("cpu")) == "gloo"
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
    share = x[rank * 4:(rank + 1) * 4].clone().requires_grad_()
    sync = SyncBatchNorm2d(3, momentum=0.5).double().train()
    with torch.no_grad():
        sync.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    y = sync(share)
    (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum().backward()  # same on each rank
    grad_weight = dist.all_reduce_sum(sync.weight.grad.clone())
    local = to_process_local_bn(nn.Sequential(SyncBatchNorm2d(3))).double().train()
    if rank == 0:  # rank 0 alone, as in the memory-format probe: no collective, no wait
        torch.testing.assert_close(local(x[:4]), F.batch_norm(x[:4], None, None, training=True))
    failures = []
    for error in (ConfigError("bad key"), ZeroDivisionError("boom")):  # rank 0's failure reaches every rank
        def fail(error=error):
            raise error
        try:
            dist.on_main(fail)
        except Exception as e:  # noqa: BLE001
            failures.append(f"{type(e).__name__}: {e}")
    bn = PerWorkerBatchNorm2d(3, workers=2).double().train()  # this rank simulates 2 of the 4 workers
    bn(x[rank * 4:(rank + 1) * 4])
    dist.average_buffers(bn)
    torch.save({"y": y.detach(), "grad": share.grad, "grad_weight": grad_weight, "running": sync.running_var,
                "ema": (bn.running_mean, bn.running_var), "failures": failures}, f"{out}/rank{rank}.pt")
    dist.finish()


@pytest.mark.skipif(not tdist.is_available(), reason="torch.distributed is not built")
def test_syncbn_buffer_averaging_and_rank_0s_errors_across_two_processes(tmp_path):
    mp.spawn(_two_ranks, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
    x.requires_grad_()
    weight = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64, requires_grad=True)
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y = F.batch_norm(x, mean, var, weight, None, training=True, momentum=0.5)  # torch's BN over all 8 images
    signs = torch.linspace(-1, 1, y[:4].numel(), dtype=torch.float64).view_as(y[:4])
    (torch.cat([y[:4] * signs, y[4:] * signs])).sum().backward()
    torch.testing.assert_close(torch.cat([g["y"] for g in got]), y.detach())
    torch.testing.assert_close(torch.cat([g["grad"] for g in got]), x.grad)
    torch.testing.assert_close(got[0]["grad_weight"], weight.grad)
    torch.testing.assert_close(got[0]["running"], var)
    simulated = PerWorkerBatchNorm2d(3, workers=4).double().train()  # one process, all 4 workers
    simulated(x.detach())
    assert got[0]["failures"] == ["ConfigError: bad key", "ZeroDivisionError: boom"]
    assert got[1]["failures"] == ["ConfigError: bad key", "RuntimeError: rank 0 failed: ZeroDivisionError: boom"]
    for g in got:  # both ranks hold the simulation's one buffer after averaging
        torch.testing.assert_close(g["ema"][0], simulated.running_mean)
        torch.testing.assert_close(g["ema"][1], simulated.running_var)


# ---------------------------------------------------------------- whole jobs under torchrun

@pytest.mark.skipif(not TORCHRUN, reason="torchrun is not installed")
def test_two_ranks_train_the_model_one_process_trains(tmp_path):
    alone, ranks = tmp_path / "alone", tmp_path / "ranks"
    assert run_job(alone).returncode == 0  # a Hydra run, so that both folders hold the same files
    proc = run_job(ranks, ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(alone, ranks)
    summary = json.loads((ranks / "summary.json").read_text())
    assert summary["status"] == "done" and summary["world_size"] == 2 and summary["backend"] == "gloo"
    assert sorted(p.name for p in ranks.iterdir() if p.is_file()) == sorted(
        p.name for p in alone.iterdir() if p.is_file())  # one writer: no file of a second rank's
    assert (proc.stdout + proc.stderr).count("epoch 2/2") == 1  # rank 1 logs only errors


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN, reason="torchrun is not installed")
@pytest.mark.parametrize("norm", [["norm=syncbn"], ["norm=brn", "norm.warmup_steps=2", "norm.ramp_steps=4"],
                                  ["norm=gn", "norm.groups=8"], ["eval.compare_bn_stats=true"], ["trainer.compile=true"]])
def test_every_kind_of_norm_and_eval_mode_matches_one_process(tmp_path, norm):
    alone, ranks = tmp_path / "alone", tmp_path / "ranks"
    train_alone(alone, *norm)
    proc = run_job(ranks, *norm, ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(alone, ranks)
    if "eval.compare_bn_stats=true" in norm:
        for x, y in zip(read_metrics(alone / "metrics.jsonl"), read_metrics(ranks / "metrics.jsonl")):
            for mode in ("ema", "precise", "batch"):
                assert x[f"val_error_{mode}"] == pytest.approx(y[f"val_error_{mode}"], abs=0.3)


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN, reason="torchrun is not installed")
def test_bad_world_is_refused_once_and_a_done_run_is_skipped_by_every_rank(tmp_path):
    proc = run_job(tmp_path / "bad", "batch.workers=3", ranks=2)
    assert proc.returncode != 0
    assert proc.stderr.count("normlab-train: error: batch.workers: W=3 workers cannot be split") == 1
    assert not (tmp_path / "bad" / "config.yaml").exists()
    done = tmp_path / "done"
    train_alone(done, "trainer.epochs=1")
    before = (done / "summary.json").read_bytes()
    proc = run_job(done, "trainer.epochs=1", ranks=2)
    assert proc.returncode == 0 and "skipping" in proc.stdout + proc.stderr
    assert (done / "summary.json").read_bytes() == before


def _rank_pids(parent: int, rank: int) -> list[int]:
    """PIDs of the normlab processes (other than `parent`) whose environment says RANK=`rank`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == parent:
            continue
        try:
            env, cmdline = (entry / "environ").read_bytes().split(b"\0"), (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"normlab.train" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN or not Path("/proc").exists(), reason="torchrun and /proc are needed")
def test_a_killed_rank_fails_the_job_at_once_and_a_rerun_on_one_process_resumes(tmp_path):
    epochs = ["trainer.epochs=4"]
    killed, alone = tmp_path / "killed", tmp_path / "alone"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "normlab.train", *JOB, *epochs, f"hydra.run.dir={killed}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(read_metrics(killed / "metrics.jsonl")) < 2:
            time.sleep(0.05)
        pids = _rank_pids(proc.pid, 1)
        assert pids, "rank 1 not found"
        os.kill(pids[0], signal.SIGKILL)
        start = time.time()
        assert proc.wait(timeout=60) != 0
        assert time.time() - start < 60  # rank 0 does not hang in a collective
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done_before = len(read_metrics(killed / "metrics.jsonl"))
    assert 2 <= done_before < 4
    resumed = run_job(killed, *epochs)  # the same W on one process: the runs are equivalent
    assert resumed.returncode == 0 and f"resuming {killed} after epoch" in resumed.stdout + resumed.stderr
    train_alone(alone, *epochs)
    assert_same_training(alone, killed, atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN or not Path("/proc").exists(), reason="torchrun and /proc are needed")
@pytest.mark.parametrize("signalled", ["torchrun", "rank 1"])
def test_a_preempted_torchrun_job_stops_every_rank_at_one_step_and_resumes_there_to_one_process_training(
        tmp_path, signalled):
    """SIGTERM to torchrun, which hands it to every rank, or to one rank alone: the ranks agree on a step (every
    AGREE_EVERY), rank 0 checkpoints it with every rank's totals, and a rerun on two ranks goes on from the next
    step."""
    from normlab.engine.checkpoint import read_checkpoint
    from normlab.engine.loop import AGREE_EVERY

    epochs, run, alone = ["trainer.epochs=4"], tmp_path / "run", tmp_path / "alone"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "normlab.train", *JOB, *epochs, f"hydra.run.dir={run}"], cwd=REPO,
                            env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not read_metrics(run / "metrics.jsonl"):
            time.sleep(0.05)
        os.kill(proc.pid if signalled == "torchrun" else _rank_pids(proc.pid, 1)[0], signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    rows, summary = read_metrics(run / "metrics.jsonl"), json.loads((run / "summary.json").read_text())
    assert summary["status"] == "preempted", output[-3000:]
    at = summary["preempted_at"]
    assert at["epoch"] == len(rows) + 1 < 5 and at["step"] % AGREE_EVERY == 0 and at["steps"] == 512 // 16
    stopped = read_checkpoint(run / "checkpoint.pt")["stopped_epoch"]
    assert stopped["steps"] == at["step"] and stopped["count"] == 16 * at["step"]  # both ranks' images
    resumed = run_job(run, *epochs, ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"in epoch {at['epoch']} at step {at['step'] + 1} of" in resumed.stdout + resumed.stderr
    train_alone(alone, *epochs)
    assert_same_training(alone, run, atol=1e-4)


@pytest.mark.slow
def test_a_submitit_job_with_two_tasks_is_one_job_on_two_ranks(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    alone = tmp_path / "alone"
    train_alone(alone)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "normlab.train", "-m", "hydra/launcher=submitit_local",
                           "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1",
                           "hydra.launcher.timeout_min=5", *JOB, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p.parent for p in (tmp_path / "sweep").rglob("summary.json")]
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    assert "1 of 1 jobs reported · 1 done" in proc.stderr + proc.stdout
    assert_same_training(alone, run_dir)
