"""CUDA paths: every norm on the GPU against the CPU, per-worker BN under bf16 autocast, a CUDA training step.
Skipped cleanly where there is no GPU; scripts/gpu_check.sh runs them on a GPU machine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))


def test_every_norm_on_cuda_matches_the_cpu_and_per_worker_bn_matches_a_loop():
    import cuda_norm_check

    assert cuda_norm_check.main("cuda") == 0


def test_a_cuda_training_run_uses_bf16_and_channels_last(tiny, tmp_path):
    from normlab.engine.trainer import train

    summary = train(tiny("trainer.device=cuda"), tmp_path)
    assert summary["status"] == "done" and summary["device"] == "cuda"
    assert summary["precision"] == "bf16" and summary["memory_format"] == "channels_last"
