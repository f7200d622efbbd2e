"""CUDA numerics check: every norm's forward and backward on the GPU against the same layer on the CPU,
and per-worker BN against a loop of F.batch_norm per chunk, in fp32 and under bf16 autocast,
contiguous and channels_last. Prints one line per check and exits non-zero on any mismatch."""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F

from normlab.norms import NORMS, REGISTRY, build_norm


def options(name: str) -> dict:
    opts = {"workers": 4} if REGISTRY[name].batch_dependent else {}
    if "groups" in REGISTRY[name].options:
        opts["groups"] = 8
    return opts


def run(layer, x, grad):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad.to(y.dtype))
    return y.detach().float().cpu(), x.grad.float().cpu()


def main(device: str = "cuda") -> int:
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    torch.manual_seed(0)
    failures = 0
    for name in NORMS:
        for channels_last in (False, True):
            cpu = build_norm(name, 32, **options(name))
            gpu = copy.deepcopy(cpu).to(device)
            x = torch.randn(16, 32, 8, 8) * 2 + 1
            grad = torch.randn_like(x)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            y_ref, g_ref = run(cpu, x, grad)
            y, g = run(gpu, x.to(device).contiguous(memory_format=fmt), grad.to(device).contiguous(memory_format=fmt))
            ok = torch.allclose(y, y_ref, atol=1e-4, rtol=1e-4) and torch.allclose(g, g_ref, atol=1e-3, rtol=1e-3)
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} fp32 {device} vs cpu  {name:11s} channels_last={channels_last}")
    for workers, per_worker in ((8, 2), (8, 32), (64, 2)):
        bn = build_norm("bn", 64, workers=workers).to(device)
        x = torch.randn(workers * per_worker, 64, 16, 16, device=device) * 3 + 2
        grad = torch.randn_like(x)
        for precision in ("fp32", "bf16"):
            xin = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
                y, g = run(bn, xin.to(torch.bfloat16) if precision == "bf16" else xin, grad)
            ref = lambda t: torch.cat([F.batch_norm(c, None, None, bn.weight, bn.bias, training=True)  # noqa: E731
                                       for c in t.chunk(workers)])
            y_ref, g_ref = run(ref, x, grad)
            tol = 2e-2 if precision == "bf16" else 1e-4
            ok = torch.allclose(y, y_ref, atol=tol * 5, rtol=tol) and torch.allclose(g, g_ref, atol=tol * 5, rtol=tol)
            failures += not ok
            verdict = "ok  " if ok else "FAIL"
            print(f"{verdict} per-worker bn vs loop W={workers} N={per_worker} {precision} channels_last")
    print(f"{failures} failures")
    return int(failures > 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
