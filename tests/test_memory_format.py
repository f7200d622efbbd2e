"""trainer.channels_last=auto: a probe that times both formats, picks the faster, caches it, and changes nothing else."""

from __future__ import annotations

import json
import time

import pytest
import torch

from normlab.engine import memory_format
from normlab.engine.memory_format import CACHE_FILE, PROBE_STEPS, cache_key, choose_memory_format
from normlab.train import train
from normlab.norms import cpu_kernel
from normlab.records import read_metrics

CPU = torch.device("cpu")


def sleeping_steps(seconds: dict[bool, float], built: list[bool]):
    """A step factory whose channels_last step takes seconds[True] and contiguous one seconds[False]."""
    def make_step(channels_last: bool):
        built.append(channels_last)
        return lambda images, labels: time.sleep(seconds[channels_last])
    return make_step


def probe(make_step, tmp_path, key="k", job_steps=10**6):
    return choose_memory_format("auto", make_step, shape=(4, 3, 8, 8), classes=10, device=CPU, key=key,
                                job_steps=job_steps, cache_dir=tmp_path)


@pytest.mark.parametrize("faster", [True, False])
def test_auto_picks_the_faster_format_and_says_why(faster, tmp_path):
    built = []
    choice = probe(sleeping_steps({faster: 0.001, not faster: 0.006}, built), tmp_path)
    assert choice.channels_last is faster and sorted(built) == [False, True]
    assert choice.reason.startswith("auto, probed: contiguous") and "channels_last" in choice.reason
    cached = json.loads((tmp_path / CACHE_FILE).read_text())["k"]
    assert cached["format"] == choice.name


def test_the_cache_answers_the_same_setting_and_another_setting_probes_again(tmp_path):
    first = []
    probe(sleeping_steps({True: 0.001, False: 0.006}, first), tmp_path)
    again = []
    choice = probe(sleeping_steps({True: 0.006, False: 0.001}, again), tmp_path)
    assert again == [] and choice.channels_last and choice.reason.startswith("auto, cached probe")
    other = []
    key = cache_key(CPU, model="resnet20", batch=(2, 8), precision="bf16")
    assert key != cache_key(CPU, model="resnet8", batch=(2, 8), precision="bf16")
    assert key != cache_key(CPU, model="resnet20", batch=(4, 8), precision="bf16")
    with pytest.MonkeyPatch.context() as patch:  # BN and GN on torch's kernels instead of normlab's: probe again
        patch.setattr(cpu_kernel, "status", lambda: "torch (no C++ compiler)")
        assert key != cache_key(CPU, model="resnet20", batch=(2, 8), precision="bf16")
    assert probe(sleeping_steps({True: 0.006, False: 0.001}, other), tmp_path, key=key).channels_last is False
    assert sorted(other) == [False, True]


def test_explicit_settings_and_short_jobs_are_not_probed(tmp_path):
    built = []
    make_step = sleeping_steps({True: 0.0, False: 0.0}, built)
    for setting, expected in (("true", True), ("false", False)):
        choice = choose_memory_format(setting, make_step, shape=(4, 3, 8, 8), classes=10, device=CPU, key="k",
                                      job_steps=10**6, cache_dir=tmp_path)
        assert choice.channels_last is expected and choice.reason == f"trainer.channels_last={setting}"
    short = probe(make_step, tmp_path, job_steps=PROBE_STEPS * 10)  # the probe would be 10% of the job
    assert short.channels_last is False and "too short to probe" in short.reason
    assert built == [] and not (tmp_path / CACHE_FILE).exists()


def test_a_probed_run_trains_exactly_as_a_run_set_to_the_format_it_picked(tiny, tmp_path, monkeypatch):
    """The probe trains throw-away copies on random data inside a forked RNG: the job's numbers are untouched."""
    monkeypatch.setattr(memory_format, "MAX_PROBE_SHARE", 100.0)  # probe this tiny job too
    common = ("trainer.epochs=2", "trainer.precision=fp32")
    probed = train(tiny("trainer.channels_last=auto", *common), tmp_path / "auto")
    assert probed["memory_format_reason"].startswith("auto, probed")
    assert probed["cpu_kernel"] == cpu_kernel.status()  # what BN and GN ran on, beside the format it favoured
    explicit = train(tiny(f"trainer.channels_last={probed['memory_format'] == 'channels_last'}", *common),
                     tmp_path / "set")
    assert explicit["memory_format"] == probed["memory_format"]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("images_per_sec", "epoch_time_s")} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "auto" / "metrics.jsonl")) == strip(read_metrics(tmp_path / "set" / "metrics.jsonl"))


def test_the_two_formats_train_the_same_model_within_float_tolerance(tiny, tmp_path):
    runs = {fmt: train(tiny(f"trainer.channels_last={fmt}", "trainer.epochs=2", "trainer.precision=fp32"),
                       tmp_path / fmt) for fmt in ("true", "false")}
    assert runs["true"]["memory_format"] == "channels_last" and runs["false"]["memory_format"] == "contiguous"
    losses = {fmt: [r["train_loss"] for r in read_metrics(tmp_path / fmt / "metrics.jsonl")] for fmt in runs}
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)


def test_a_batch_independent_norm_shares_one_probe_across_n_under_a_fixed_total_batch(tiny, tmp_path, monkeypatch):
    """GN at N=8 and N=2 of B=8 must train in one format, or the invariance check would compare two formats."""
    monkeypatch.setattr(memory_format, "MAX_PROBE_SHARE", 100.0)
    reasons = [train(tiny("norm=gn", "norm.groups=8", "batch.total=8", "batch.workers=null", f"batch.per_worker={n}"),
                     tmp_path / f"N{n}")["memory_format_reason"] for n in (8, 2)]
    assert reasons[0].startswith("auto, probed") and reasons[1].startswith("auto, cached probe")
