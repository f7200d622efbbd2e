"""Norms whose statistics come from the batch: per-worker BatchNorm and Batch Renormalization.

The paper's "batch size" is images per GPU: 8 GPUs each normalize their own N images, with
BN statistics not synchronized. Here one device simulates W such workers: a batch of W·N
images is normalized as W chunks of N, each by its own statistics, as W GPUs running plain BN would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from normlab.norms import cpu_kernel


def check_workers(x: torch.Tensor, workers: int, kind: str) -> None:
    """A (W·N, C, H, W) batch must split evenly among W workers, with more than one value per channel each."""
    if x.dim() != 4:
        raise ValueError(f"{kind}: expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] % workers:
        raise ValueError(
            f"{kind}: a batch of {x.shape[0]} images cannot be split among workers={workers}; "
            f"the batch must be a multiple of {workers} (per-worker batch × workers)"
        )
    per_worker = x.shape[0] // workers
    if per_worker * x.shape[2] * x.shape[3] < 2:
        raise ValueError(
            f"{kind}: each worker sees a single value per channel (per-worker batch "
            f"{per_worker} of {x.shape[2]}×{x.shape[3]} maps), so batch statistics are undefined; "
            f"use a larger per-worker batch or a batch-independent norm (gn, ln, in, frn, evonorm_s0)"
        )


def for_statistics(x: torch.Tensor) -> torch.Tensor:
    """`x` in a precision fit for sums of squares: half precision is raised to float32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def worker_moments(x: torch.Tensor, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased variance and mean per worker and channel of a (W·N, C, H, W) batch, at least in float32.

    Taken per sample over (H, W), one fast reduction over contiguous memory, then pooled over each
    worker's N samples by the law of total variance (every sample has the same H·W values).
    """
    var, mean = torch.var_mean(for_statistics(x), dim=(2, 3), correction=0)
    var, mean = var.unflatten(0, (workers, -1)), mean.unflatten(0, (workers, -1))
    pooled_mean = mean.mean(1)
    return var.mean(1) + (mean - pooled_mean[:, None]).square().mean(1), pooled_mean


def per_sample(stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (W, C) per-worker statistic as (W·N, C, 1, 1), to broadcast over a (W·N, C, H, W) batch."""
    return stat.repeat_interleave(x.shape[0] // stat.shape[0], dim=0)[:, :, None, None].to(x.dtype)


_aten = torch.ops.aten


def _per_sample_view(x: torch.Tensor) -> torch.Tensor:
    """A contiguous (W·N, C, H, W) tensor as (1, W·N·C, H·W): one 'channel' per sample and channel."""
    return x.view(1, x.shape[0] * x.shape[1], -1)


def _sample_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ a·b, Σ a) over (H, W), per sample and channel, in one pass of torch's native BN backward kernel.

    With mean 0 and invstd 1, its grad_weight is Σ a·b and its grad_bias Σ a, accumulated in float32
    (float64 for float64 input) whatever the input precision.
    """
    n = a.shape[0] * a.shape[1]
    zero, one = a.new_zeros(n, dtype=cpu_kernel.stat_dtype(a)), a.new_ones(n, dtype=cpu_kernel.stat_dtype(a))
    _, ab, total = _aten.native_batch_norm_backward(_per_sample_view(a), _per_sample_view(b), None, None, None,
                                                    zero, one, True, 0.0, [False, True, True])
    return ab.view(a.shape[:2]), total.view(a.shape[:2])


def _sample_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x·scale + shift with one (scale, shift) per sample and channel, in one pass of torch's BN eval kernel.

    Written into a fresh tensor of x's shape (not returned as a view), so that an in-place ReLU may follow.
    """
    n = x.shape[0] * x.shape[1]
    zero, one = scale.new_zeros(n), scale.new_ones(n)
    out = torch.empty_like(x)
    _aten.native_batch_norm.out(_per_sample_view(x), scale.reshape(n), shift.reshape(n), zero, one, False, 0.0, 0.0,
                                out=_per_sample_view(out), save_mean=scale.new_empty(0), save_invstd=scale.new_empty(0))
    return out


def _worker_rows(x: torch.Tensor, workers: int) -> tuple[torch.Tensor, ...]:
    """Each worker's chunk of a channels_last (W·N, C, H, W) tensor as its (N·H·W, C) rows: views, no copy."""
    return x.permute(0, 2, 3, 1).reshape(workers, -1, x.shape[1]).unbind(0)


def _cpu_forward(x, weight, bias, workers, eps):
    """(y, mean, var, invstd) on the CPU, each statistic (W, C); torch's native BN kernels make every pass.

    NCHW: per-sample sums of x and x² in one pass, pooled per worker (E[x²] − E[x]² in float32: it loses
    precision only where a channel's mean exceeds its std ~100-fold, which conv outputs in a ResNet do not
    approach), then the affine in one pass. channels_last: each worker's (N·H·W, C) rows are contiguous,
    the layout torch's BN kernel reads fastest, so each worker is one native BN call writing its slice.
    """
    count = x.shape[0] // workers * x.shape[2] * x.shape[3]
    if cpu_kernel.is_channels_last(x):
        y = torch.empty_like(x)
        mean = x.new_empty(workers, x.shape[1], dtype=cpu_kernel.stat_dtype(x))
        invstd = torch.empty_like(mean)
        for w, (rows, out) in enumerate(zip(_worker_rows(x, workers), _worker_rows(y, workers))):
            _aten.native_batch_norm.out(rows, weight, bias, None, None, True, 0.0, eps,
                                        out=out, save_mean=mean[w], save_invstd=invstd[w])
        return y, mean, (invstd.square().reciprocal() - eps).clamp_min(0.0), invstd
    x = x.contiguous()
    squares, sums = _sample_sums(x, x)
    mean = sums.unflatten(0, (workers, -1)).sum(1) / count
    var = (squares.unflatten(0, (workers, -1)).sum(1) / count - mean.square()).clamp_min(0.0)
    invstd = torch.rsqrt(var + eps)
    scale = invstd * weight
    y = _sample_affine(x, _per_sample_rows(scale, x), _per_sample_rows(bias - mean * scale, x))
    return y, mean, var, invstd


def _cpu_backward(grad_y, x, weight, mean, invstd, workers, eps):
    """(grad_x, Σ grad·x̂, Σ grad) on the CPU, the sums per worker and channel; see :func:`_cpu_forward`."""
    if cpu_kernel.is_channels_last(x):
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
        grad_x = torch.empty_like(x)
        sum_g_xhat, sum_g = torch.empty_like(mean), torch.empty_like(mean)
        chunks = zip(_worker_rows(grad_y, workers), _worker_rows(x, workers), _worker_rows(grad_x, workers))
        for w, (g, rows, out) in enumerate(chunks):
            _aten.native_batch_norm_backward.out(g, rows, weight, None, None, mean[w], invstd[w], True, eps,
                                                 [True, True, True], out0=out, out1=sum_g_xhat[w], out2=sum_g[w])
        return grad_x, sum_g_xhat, sum_g
    count = x.shape[0] // workers * x.shape[2] * x.shape[3]
    x, grad_y = x.contiguous(), grad_y.contiguous()
    sum_gx, sum_g = (s.unflatten(0, (workers, -1)).sum(1) for s in _sample_sums(grad_y, x))
    sum_g_xhat = invstd * (sum_gx - mean * sum_g)
    a = invstd * weight
    b = -a * invstd * sum_g_xhat / count
    c = -a * sum_g / count - b * mean
    grad_x = _sample_affine(x, _per_sample_rows(b, x), _per_sample_rows(c, x))  # b·x + c, then + a·grad
    grad_x.addcmul_(grad_y, per_sample(a, x))
    return grad_x, sum_g_xhat, sum_g


def _cuda_forward(x, weight, bias, workers, eps):
    """(y, mean, var, invstd): pooled per-sample Welford moments, one fused elementwise pass for y."""
    var, mean = worker_moments(x, workers)
    invstd = torch.rsqrt(var + eps)
    scale = invstd * weight
    y = torch.addcmul(per_sample(bias - mean * scale, x), x, per_sample(scale, x))
    return y, mean, var, invstd


def _cuda_backward(grad_y, x, weight, mean, invstd, workers, eps):
    """(grad_x, Σ grad·x̂, Σ grad): reductions per sample, pooled; one fused pass for grad_x."""
    count = x.shape[0] // workers * x.shape[2] * x.shape[3]
    sum_g = grad_y.sum((2, 3), dtype=mean.dtype).unflatten(0, (workers, -1)).sum(1)
    sum_gx = (grad_y * x).sum((2, 3), dtype=mean.dtype).unflatten(0, (workers, -1)).sum(1)
    sum_g_xhat = invstd * (sum_gx - mean * sum_g)
    a = invstd * weight
    b = -a * invstd * sum_g_xhat / count
    c = -a * sum_g / count - b * mean
    grad_x = torch.mul(x, per_sample(b, x))  # grad_x = a·grad + b·x + c, in place after one allocation
    grad_x.add_(per_sample(c, x)).addcmul_(grad_y, per_sample(a, x))
    return grad_x, sum_g_xhat, sum_g


def _per_sample_rows(stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (W, C) per-worker statistic repeated for each of the worker's samples: (W·N, C)."""
    return stat.repeat_interleave(x.shape[0] // stat.shape[0], dim=0)


def per_worker_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, workers: int,
                          eps: float, running: nn.BatchNorm2d | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, biased var) of `x` normalized per worker chunk, the statistics (W, C); `running`: a layer whose
    running statistics take this batch's (:func:`update_running_stats`). normlab's CPU kernel where it is
    built (:mod:`normlab.norms.cpu_kernel`), else :class:`_PerWorkerBatchNormFn`."""
    if cpu_kernel.usable(x):
        buffers = None
        if running is not None:  # torch's factor for this batch: the momentum, or 1/batches for momentum=None
            momentum = running.momentum
            factor = momentum if momentum is not None else 1.0 / (int(running.num_batches_tracked) + 1)
            buffers = (running.running_mean, running.running_var, factor)
        out = cpu_kernel.normalize(x, weight, bias, unit_samples=x.shape[0] // workers, unit_channels=1, eps=eps,
                                   running=buffers)
        if running is not None:
            running.num_batches_tracked.add_(1)
        return out
    y, mean, var = _PerWorkerBatchNormFn.apply(x, weight, bias, workers, eps)
    if running is not None:
        update_running_stats(running, mean, var, count=x.shape[0] // workers * x.shape[2] * x.shape[3])
    return y, mean, var


class _PerWorkerBatchNormFn(torch.autograd.Function):
    """BN with per-worker statistics in torch's ops: ``F.batch_norm``'s formulas applied to each worker's chunk at once.

    On CUDA, pooled Welford moments and one fused elementwise pass each for the output and the input
    gradient (:func:`_cuda_forward`). On a CPU without normlab's kernel, and under torch.compile, every pass
    in torch's own BN kernels (:func:`_cpu_forward`), since small reductions and broadcasting elementwise ops
    are slow there.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, workers: int, eps: float):
        dtype = cpu_kernel.stat_dtype(x)  # torch's kernels take bf16 input with float32 parameters, not bf16 ones
        w = x.new_ones(x.shape[1], dtype=dtype) if weight is None else weight.to(dtype)
        b = x.new_zeros(x.shape[1], dtype=dtype) if bias is None else bias.to(dtype)
        forward = _cpu_forward if x.device.type == "cpu" else _cuda_forward
        y, mean, var, invstd = forward(x, w, b, workers, eps)
        ctx.save_for_backward(x, w, mean, invstd)
        ctx.workers, ctx.eps, ctx.param_dtype = workers, eps, dtype if weight is None else weight.dtype
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, mean, invstd = ctx.saved_tensors
        backward = _cpu_backward if x.device.type == "cpu" else _cuda_backward
        grad_x, sum_g_xhat, sum_g = backward(grad_y, x, weight, mean, invstd, ctx.workers, ctx.eps)
        grad_weight = sum_g_xhat.sum(0).to(ctx.param_dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_g.sum(0).to(ctx.param_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None


@torch.no_grad()
def update_running_stats(layer: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count) -> None:
    """torch's BN update of `layer`'s running statistics, from (W, C) per-worker batch means and biased variances
    over `count` values each (averaged over the workers; see PerWorkerBatchNorm2d). ``momentum=None``: the
    cumulative average, its factor kept as a tensor, so the step never syncs with the host."""
    layer.num_batches_tracked.add_(1)
    factor = layer.momentum
    if factor is None:
        factor = layer.num_batches_tracked.to(layer.running_mean.dtype).reciprocal()
    unbiased = var * (count / (count - 1))
    layer.running_mean.lerp_(mean.mean(0).to(layer.running_mean.dtype), factor)
    layer.running_var.lerp_(unbiased.mean(0).to(layer.running_var.dtype), factor)


class PerWorkerBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with statistics per worker batch: the paper's multi-GPU BN, statistics not synced.

    In training, a batch of W·N images is normalized as W independent groups of N, each by its
    own mean and (biased) variance over (N, H, W), exactly as W GPUs running plain BN would.

    Running statistics: each real worker would keep its own exponential moving average,
    ``r_w ← (1 − m)·r_w + m·s_w``, with ``s_w`` its batch mean and its *unbiased* batch variance
    (N·H·W/(N·H·W − 1) times the biased one), as ``nn.BatchNorm2d`` does. Averaging the W
    buffers at the end, which is how the worker models are merged into one, gives the same
    result as keeping a single buffer updated with the average of the W statistics,
    ``r ← (1 − m)·r + m·mean_w(s_w)``, because the update is linear and all workers start equal.
    That single buffer is what this layer keeps. ``momentum=None`` (cumulative average) is
    linear too and is handled the same way.

    With ``workers=1``, and whenever running statistics are used (eval mode), this is
    ``nn.BatchNorm2d`` itself, bit for bit.
    """

    def __init__(
        self,
        num_features: int,
        *,
        workers: int = 1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.workers = workers

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, workers={self.workers}"

    eval_chunk: int | None = None  # set (engine.bn_eval): in eval mode, each chunk of this many images by its own stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.eval_chunk:
            return self._chunk_statistics(x, self.eval_chunk)
        uses_batch_stats = self.training or not self.track_running_stats
        if not uses_batch_stats:
            return super().forward(x)
        check_workers(x, self.workers, "bn")  # checks the shape, before torch's terser check
        if self.workers == 1:
            return super().forward(x)
        running = self if self.training and self.track_running_stats else None
        return per_worker_batch_norm(x, self.weight, self.bias, self.workers, self.eps, running)[0]

    def _chunk_statistics(self, x: torch.Tensor, per_chunk: int) -> torch.Tensor:
        """Each chunk of `per_chunk` images normalized by its own statistics (a last, smaller chunk by its own);
        the running statistics are neither read nor updated."""
        full = x.shape[0] // per_chunk * per_chunk
        parts = [(x[:full], full // per_chunk)] * bool(full) + [(x[full:], 1)] * (full < x.shape[0])
        outs = [per_worker_batch_norm(part, self.weight, self.bias, chunks, self.eps)[0]
                for part, chunks in parts]
        return outs[0] if len(outs) == 1 else torch.cat(outs)



class BatchRenorm2d(nn.Module):
    """Batch Renormalization (Ioffe, NeurIPS 2017), with per-worker batch statistics.

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


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BN whose statistics cover every image of the step (N·W): the paper's "BN at large batch" reference.

    One process: BN over the whole batch, whatever W. A job on several processes: statistics over every
    rank's images. On CUDA, DDP runs torch's ``nn.SyncBatchNorm`` in its place (:meth:`use_torch_sync`); on
    the CPU, which torch's does not take, the sums cross the ranks here in a differentiable all-reduce, so each
    rank's gradient holds every rank's share, as torch's backward arranges on CUDA.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)

    across_processes = True  # False (:meth:`within_process`): this process's images only, e.g. for a probe on one rank

    @classmethod
    @contextlib.contextmanager
    def within_process(cls) -> Iterator[None]:
        """While inside, every SyncBatchNorm2d normalizes over this process's batch alone (no collective)."""
        before, cls.across_processes = cls.across_processes, False
        try:
            yield
        finally:
            cls.across_processes = before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if (self.training and self.across_processes and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return self._all_reduced(x)
        return super().forward(x)

    def _all_reduced(self, x: torch.Tensor) -> torch.Tensor:
        """Two all-reduces: the global mean, then the sum of squares around it (no E[x²] − E[x]² cancellation)."""
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(x)
        xs = for_statistics(x)
        count = xs.new_tensor([x.numel() // x.shape[1]])
        sums = all_reduce(torch.cat([xs.sum((0, 2, 3)), count]))
        c, total = x.shape[1], sums[-1]
        mean = sums[:c] / total
        var = all_reduce((xs - mean[None, :, None, None]).square().sum((0, 2, 3))) / total
        if self.track_running_stats:
            update_running_stats(self, mean.detach()[None], var.detach()[None], total.detach())
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        return torch.addcmul(shift.to(x.dtype)[None, :, None, None], x, scale.to(x.dtype)[None, :, None, None])

    @staticmethod
    def use_torch_sync(model: nn.Module) -> nn.Module:
        """`model` with each SyncBatchNorm2d replaced, in place, by an ``nn.SyncBatchNorm`` sharing its
        parameters and buffers (torch's fused CUDA kernels); other BN layers (per-worker BN) are left alone."""
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is SyncBatchNorm2d:
                    synced = nn.SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                              child.track_running_stats)
                    synced.weight, synced.bias = child.weight, child.bias
                    for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                        setattr(synced, buffer, getattr(child, buffer))
                    synced.train(child.training)
                    setattr(parent, name, synced)
        return model
