"""Batch Renormalization (Ioffe, NeurIPS 2017), with per-worker batch statistics."""

from __future__ import annotations

import torch
from torch import nn

from normlab.norms.worker_stats import check_workers, per_sample, worker_moments


class BatchRenorm2d(nn.Module):
    """Batch Renormalization with per-worker batch statistics.

    Training: ``x̂ = (x − μ_B)/σ_B · r + d`` with ``σ_B = sqrt(var_B + eps)``,
    ``r = clip(σ_B/σ, 1/r_max, r_max)`` and ``d = clip((μ_B − μ)/σ, −d_max, d_max)``, both
    treated as constants by the gradient; then ``y = γ·x̂ + β``. The moving averages follow the
    paper's Algorithm 1, ``μ += momentum·(μ_B − μ)`` and ``σ += momentum·(σ_B − σ)``, with
    μ_B and σ_B averaged over workers as in :class:`PerWorkerBatchNorm2d`. Eval: ``y = γ(x − μ)/σ + β``.

    Warm-up, as in the paper: for the first ``warmup_steps`` training steps r_max = 1 and
    d_max = 0 (plain BN); over the next ``ramp_steps`` steps both limits grow linearly to
    ``r_max`` and ``d_max``. The step count is ``num_batches_tracked``, saved with the model.
    """

    def __init__(
        self,
        num_features: int,
        *,
        workers: int = 1,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        ramp_steps: int = 20000,
        eps: float = 1e-5,
        momentum: float = 0.01,
    ) -> None:
        super().__init__()
        if r_max < 1 or d_max < 0 or warmup_steps < 0 or ramp_steps < 0:
            raise ValueError(
                f"brn: need r_max >= 1, d_max >= 0, warmup_steps >= 0 and ramp_steps >= 0; got "
                f"r_max={r_max}, d_max={d_max}, warmup_steps={warmup_steps}, ramp_steps={ramp_steps}"
            )
        self.num_features, self.workers, self.eps, self.momentum = num_features, workers, eps, momentum
        self.r_max, self.d_max, self.warmup_steps, self.ramp_steps = r_max, d_max, warmup_steps, ramp_steps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, workers={self.workers}, r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup_steps={self.warmup_steps}, ramp_steps={self.ramp_steps}, eps={self.eps}, "
                f"momentum={self.momentum}")

    def limits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_max, d_max) at the current training step, as tensors: no host sync in the step."""
        ramped = self.num_batches_tracked.float() - self.warmup_steps + 1  # steps into the ramp, this one included
        frac = (ramped / self.ramp_steps).clamp(0.0, 1.0) if self.ramp_steps else (ramped > 0).float()
        return 1.0 + (self.r_max - 1.0) * frac, self.d_max * frac

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            scale = self.weight / self.running_std
            shift = self.bias - self.running_mean * scale
            return torch.addcmul(shift.to(x.dtype).view(1, -1, 1, 1), x, scale.to(x.dtype).view(1, -1, 1, 1))
        check_workers(x, self.workers, "brn")
        var, mean = worker_moments(x, self.workers)
        std = torch.sqrt(var + self.eps)
        r_max, d_max = self.limits()
        with torch.no_grad():
            r = torch.minimum(torch.maximum(std / self.running_std, 1.0 / r_max), r_max)
            d = torch.minimum(torch.maximum((mean - self.running_mean) / self.running_std, -d_max), d_max)
            self.running_mean.lerp_(mean.mean(0), self.momentum)
            self.running_std.lerp_(std.mean(0), self.momentum)
            self.num_batches_tracked.add_(1)
        scale = self.weight * r / std
        shift = self.bias + self.weight * d - mean * scale
        return torch.addcmul(per_sample(shift, x), x, per_sample(scale, x))
