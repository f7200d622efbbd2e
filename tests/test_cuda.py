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


def test_a_cuda_training_run_uses_bf16_and_records_its_memory_format(tiny, tmp_path):
    from normlab.train import train

    summary = train(tiny("trainer.device=cuda"), tmp_path)
    assert summary["status"] == "done" and summary["device"] == "cuda"
    assert summary["precision"] == "bf16" and summary["memory_format"] in ("contiguous", "channels_last")
    assert summary["memory_format_reason"].startswith("auto")
    assert summary["cuda_graph"] is True  # auto: on CUDA


def test_every_bn_evaluation_mode_runs_beside_the_cuda_graph_and_leaves_its_training_alone(tiny, tmp_path):
    """precise and batch evaluations run the eager model and restore the running statistics in place, so the
    graph, which reads those very tensors, trains on exactly as without them."""
    from normlab.train import train
    from normlab.records import read_metrics

    common = ("trainer.device=cuda", "trainer.epochs=2", "eval.precise_images=16")
    train(tiny(*common), tmp_path / "plain")
    summary = train(tiny(*common, "eval.compare_bn_stats=true"), tmp_path / "compared")
    assert summary["cuda_graph"] is True
    plain, compared = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("plain", "compared"))
    assert [r["train_loss"] for r in plain] == [r["train_loss"] for r in compared]
    assert all(r["val_error_ema"] == r["val_error"] for r in compared)


def graph_and_eager_runs(norm, workers, precision, steps=8):
    """The same model, data and lr schedule trained `steps` steps eagerly and through a CUDA graph."""
    from normlab.engine.optim import Schedule
    from normlab.engine.step import CudaGraphStep, TrainStep
    from normlab.models import build_model

    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 16, 16, generator=g).to(device).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (16,), generator=g).to(device)) for _ in range(steps)]
    results = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = build_model("resnet8", 10, norm, workers=workers).to(device).to(memory_format=torch.channels_last)
        groups = [{"params": list(model.parameters()), "lr": torch.tensor(0.1, device=device)}]
        optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)
        schedule = Schedule(optimizer, lambda s: 1.0 / (1 + s))  # the lr changes every step
        step = TrainStep(model, optimizer, device=device, precision=precision, autocast_cache=False)
        step = CudaGraphStep(step) if graphed else step
        model.train()
        losses = []
        for images, labels in batches:
            logits, loss = step(images, labels)
            losses.append(loss.detach().clone())
            schedule.step()
        torch.cuda.synchronize()
        results.append((model.state_dict(), torch.stack(losses), step))
    return results


@pytest.mark.parametrize("norm, workers", [("bn", 1), ("bn", 4), ("gn", 1), ("brn", 4), ("frn", 1)])
def test_a_cuda_graph_step_trains_like_the_eager_step(norm, workers):
    (eager, eager_losses, _), (graphed, graphed_losses, step) = graph_and_eager_runs(
        {"name": norm, "groups": 8} if norm == "gn" else norm, workers, "fp32")
    assert step.graph is not None and step.eager_steps == step.warmup  # 3 eager, then captured and replayed
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=1e-4, atol=1e-4)
    for key, value in eager.items():  # weights, momentum-updated; BN running stats and batch counts
        torch.testing.assert_close(graphed[key], value, rtol=1e-4, atol=1e-4, msg=key)
    if norm == "bn":
        assert int(graphed["bn1.num_batches_tracked"]) == 8


def test_a_cuda_graph_step_under_bf16_autocast():
    (eager, eager_losses, _), (graphed, graphed_losses, _) = graph_and_eager_runs("bn", 4, "bf16")
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=2e-2, atol=2e-2)


def test_a_cuda_graph_training_run(tiny, tmp_path):
    from normlab.train import train

    graphed = train(tiny("trainer.device=cuda", "trainer.cuda_graph=true"), tmp_path / "graph")
    eager = train(tiny("trainer.device=cuda", "trainer.cuda_graph=false"), tmp_path / "eager")
    assert graphed["status"] == "done" and graphed["cuda_graph"] is True
    assert abs(graphed["val_error"] - eager["val_error"]) < 15  # same run up to bf16 rounding; tiny data
