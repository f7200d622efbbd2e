"""torch.compile against eager, for every norm, in train and eval mode: inductor has had bugs with norm
layers, so `trainer.compile=true` is only trusted where this holds. On the CPU (C++ kernels) and, where
there is a GPU, on CUDA (Triton kernels: other code, other bugs). Slow: inductor compiles every case."""

from __future__ import annotations

import copy

import pytest
import torch

from normlab.engine.step import compile_model
from normlab.train import train
from normlab.norms import NORMS, REGISTRY, build_norm
from normlab.records import read_metrics

pytestmark = pytest.mark.slow
NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=NO_GPU)]


def options(name: str) -> dict:
    opts = {"workers": 2} if REGISTRY[name].batch_dependent else {}
    if "groups" in REGISTRY[name].options:
        opts["groups"] = 4
    if name == "brn":
        opts.update(warmup_steps=0, ramp_steps=0, r_max=1.5, d_max=0.5)
    return opts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", [n for n in NORMS if REGISTRY[n].compile_safe])
def test_compiled_norm_matches_eager_in_train_and_eval(name, device):
    torch.manual_seed(0)
    eager = build_norm(name, 8, **options(name)).to(device)
    with torch.no_grad():
        for p in eager.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    twin = copy.deepcopy(eager)
    compiled = compile_model(twin)
    for step in range(2):  # the second step sees updated running statistics
        x = torch.randn(8, 8, 6, 6, device=device) * 2 + step
        grad = torch.randn_like(x)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = eager(xa), compiled(xb)
        ya.backward(grad)
        yb.backward(grad)
        torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-5)
    for (key, a), (_, b) in zip(eager.state_dict().items(), twin.state_dict().items()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=key)
    for (key, a), (_, b) in zip(eager.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, msg=key)
    eager.eval(), twin.eval()
    x = torch.randn(4, 8, 6, 6, device=device)
    torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("settings", [("trainer.precision=fp32", "trainer.channels_last=false"),
                                      ("trainer.precision=bf16", "trainer.channels_last=true")],
                         ids=["fp32", "bf16-channels_last"])
def test_a_compiled_run_matches_an_eager_one(tiny, tmp_path, device, settings):
    """Training's own settings: per-worker BN, and bf16 autocast with channels_last as on a GPU."""
    common = (*settings, "trainer.epochs=2", f"trainer.device={device}", "trainer.cuda_graph=false")
    eager = train(tiny(*common), tmp_path / "eager")
    compiled = train(tiny(*common, "trainer.compile=true"), tmp_path / "compiled")
    assert compiled["compiled"] and not eager["compiled"]
    eager_loss, compiled_loss = ([row["train_loss"] for row in read_metrics(tmp_path / run / "metrics.jsonl")]
                                 for run in ("eager", "compiled"))
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-3)  # the same steps, differently fused
    assert compiled["val_error"] == pytest.approx(eager["val_error"], abs=7.0)  # 32 test images: 1 image is 3.1%
