"""Every norm against an independent reference: torch's own ops, or the paper's formula written out."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.norms import NORMS, REGISTRY, WSConv2d, build_norm, cpu_kernel, standardize_convs, to_process_local_bn

pytestmark = pytest.mark.usefixtures("float64")

BATCH_INDEPENDENT = [n for n in NORMS if not (REGISTRY[n].batch_dependent or REGISTRY[n].synced)]
BATCH_DEPENDENT = [n for n in NORMS if REGISTRY[n].batch_dependent]


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(params=["kernel", "torch_ops"])
def cpu_path(request, monkeypatch):
    """Per-worker BN's two implementations on the CPU: normlab's kernel, and the portable path in torch's ops."""
    if request.param == "kernel" and not cpu_kernel.usable(torch.zeros(1)):
        pytest.skip(f"the CPU kernel is not built here: {cpu_kernel.status()}")
    if request.param == "torch_ops":
        monkeypatch.setattr(cpu_kernel, "usable", lambda x: False)
    return request.param


def randomize_affine(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter a random value, so that tests see γ, β, τ and v at work."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return layer


def forward_backward(layer, x, grad):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def assert_matches(layer, reference, x, atol=1e-10):
    """Outputs and every gradient of `layer` match those of `reference` on the same input."""
    grad = torch.randn_like(x)
    y, gx, gp = forward_backward(layer, x, grad)
    y_ref, gx_ref, gp_ref = forward_backward(reference, x, grad)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=1e-8)
    torch.testing.assert_close(gx, gx_ref, atol=atol, rtol=1e-8)
    for name in gp_ref:
        torch.testing.assert_close(gp[name], gp_ref[name], atol=atol, rtol=1e-8, msg=name)


def assert_matches_in_bf16(layer, reference, x, grad, *, param_tol):
    """`layer` on bf16 `x` (float32 parameters, as under autocast) against a float64 `reference` on the same values:
    output and input gradient keep x's dtype and memory format and agree within a few bf16 ulps of their scale."""
    y, gx, gp = forward_backward(layer, x, grad)
    y_ref, gx_ref, gp_ref = forward_backward(reference, x.double(), grad.double())
    assert y.dtype == gx.dtype == torch.bfloat16 and y.is_contiguous(memory_format=x_format(x))
    torch.testing.assert_close(y.double(), y_ref, atol=0.03, rtol=0.01)
    torch.testing.assert_close(gx.double(), gx_ref, atol=0.03, rtol=0.01)
    for name in gp_ref:
        torch.testing.assert_close(gp[name].double(), gp_ref[name], atol=param_tol, rtol=param_tol, msg=name)


class Affine(nn.Module):
    """A reference module: `normalize(x)` followed by a per-channel γ, β copied from `layer`."""

    def __init__(self, layer, normalize):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone())
        self.normalize = normalize

    def forward(self, x):
        return self.normalize(x) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


# ---------------------------------------------------------------- GroupNorm, LayerNorm, InstanceNorm

def group_norm_formula(x, groups, eps):
    n, c, h, w = x.shape
    xg = x.reshape(n, groups, c // groups * h * w)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    return ((xg - mean) / torch.sqrt(var + eps)).reshape(n, c, h, w)


def x_format(x: torch.Tensor) -> torch.memory_format:
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


def as_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("options, groups", [({}, 32), ({"groups": 8}, 8), ({"group_size": 4}, 16),
                                             ({"groups": 1}, 1), ({"group_size": 1}, 64)])
def test_gn_matches_torch_groupnorm_and_the_formula(options, groups, channels_last):
    x = as_format(torch.randn(3, 64, 5, 4) * 3 + 2, channels_last)
    gn = randomize_affine(build_norm("gn", 64, **options))
    ref = nn.GroupNorm(groups, 64)
    ref.load_state_dict(gn.state_dict())
    assert_matches(gn, ref, x)
    assert_matches(gn, Affine(gn, lambda t: group_norm_formula(t, groups, 1e-5)), x)


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_ln_matches_layer_norm_over_chw_with_per_channel_affine(channels_last):
    x = as_format(torch.randn(3, 6, 5, 4), channels_last)
    ln = randomize_affine(build_norm("ln", 6, eps=1e-3))
    assert_matches(ln, Affine(ln, lambda t: F.layer_norm(t, t.shape[1:], eps=1e-3)), x)


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_in_matches_instance_norm(channels_last):
    x = as_format(torch.randn(3, 6, 5, 4), channels_last)
    inorm = randomize_affine(build_norm("in", 6))
    assert_matches(inorm, Affine(inorm, lambda t: F.instance_norm(t, eps=1e-5)), x)


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gn_in_bf16_matches_the_float64_formula_within_bf16_rounding(channels_last):
    """bf16 activations with float32 parameters, as under autocast; the output keeps x's dtype and format."""
    torch.manual_seed(0)
    gn = randomize_affine(build_norm("gn", 32, groups=8)).float()
    ref = Affine(gn, lambda t: group_norm_formula(t, 8, 1e-5)).double()
    x = as_format((torch.randn(4, 32, 6, 5) * 3 + 1).bfloat16(), channels_last)
    assert_matches_in_bf16(gn, ref, x, as_format(torch.randn_like(x), channels_last), param_tol=1e-2)


def test_gn_ws_layer_is_group_norm():
    gn_ws = build_norm("gn_ws", 64, group_size=16)
    assert isinstance(gn_ws, nn.GroupNorm) and gn_ws.num_groups == 4


# ---------------------------------------------------------------- per-worker BatchNorm

class SlowPerWorkerBN(nn.Module):
    """W real workers: a plain BatchNorm2d per worker on its own chunk; running stats averaged after."""

    def __init__(self, layer, workers):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone())
        self.workers = [nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum)
                        for _ in range(workers)]

    def forward(self, x):
        chunks = x.chunk(len(self.workers))
        return torch.cat([F.batch_norm(c, bn.running_mean, bn.running_var, self.weight, self.bias,
                                       training=True, momentum=bn.momentum or 0.0, eps=bn.eps)
                          for c, bn in zip(chunks, self.workers)])

    def averaged(self, buffer):
        return torch.stack([getattr(bn, buffer) for bn in self.workers]).mean(0)


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("workers, per_worker", [(2, 3), (4, 2), (8, 1)])
def test_bn_with_workers_matches_a_loop_of_batch_norms_per_chunk(workers, per_worker, channels_last):
    bn = randomize_affine(build_norm("bn", 5, workers=workers))
    slow = SlowPerWorkerBN(bn, workers)
    for step in range(3):
        x = torch.randn(workers * per_worker, 5, 4, 3) * 3 + step
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        assert_matches(bn, slow, x)
    torch.testing.assert_close(bn.running_mean, slow.averaged("running_mean"))
    torch.testing.assert_close(bn.running_var, slow.averaged("running_var"))
    assert int(bn.num_batches_tracked) == 3


@pytest.mark.usefixtures("cpu_path")
def test_bn_cumulative_average_with_workers():
    bn = build_norm("bn", 3, workers=2, momentum=None)
    batches = [torch.randn(4, 3, 2, 2) + i for i in range(3)]
    for x in batches:
        bn(x)
    chunk_stats = [(c.mean((0, 2, 3)), c.var((0, 2, 3), correction=1)) for x in batches for c in x.chunk(2)]
    torch.testing.assert_close(bn.running_mean, torch.stack([m for m, _ in chunk_stats]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([v for _, v in chunk_stats]).mean(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bn_with_one_worker_is_batchnorm2d_bit_for_bit(dtype):
    torch.manual_seed(0)
    bn = randomize_affine(build_norm("bn", 8)).to(dtype)
    ref = nn.BatchNorm2d(8).to(dtype)
    ref.load_state_dict(bn.state_dict())
    for _ in range(3):
        x = torch.randn(6, 8, 5, 5, dtype=dtype)
        grad = torch.randn_like(x)
        y, gx, gp = forward_backward(bn, x, grad)
        y_ref, gx_ref, gp_ref = forward_backward(ref, x, grad)
        assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
        assert all(torch.equal(gp[k], gp_ref[k]) for k in gp)
    for k, v in ref.state_dict().items():
        assert torch.equal(bn.state_dict()[k], v), k
    bn.eval(), ref.eval()
    x = torch.randn(4, 8, 5, 5, dtype=dtype)
    assert torch.equal(bn(x), ref(x))


def test_bn_eval_uses_running_stats_for_any_batch_size():
    bn = randomize_affine(build_norm("bn", 4, workers=4))
    for _ in range(5):
        bn(torch.randn(8, 4, 3, 3) * 2 + 1)
    bn.eval()
    x = torch.randn(3, 4, 3, 3)  # not a multiple of workers: fine in eval
    expected = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
    torch.testing.assert_close(bn(x), expected)


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("workers", [4, 16])
def test_bn_with_workers_in_bf16_matches_the_chunk_loop_within_bf16_rounding(workers, channels_last):
    """bf16 activations with float32 parameters, as under autocast: output and every gradient against the
    float64 chunk loop on the same bf16 values, within a few bf16 ulps of the output's scale."""
    torch.manual_seed(0)
    bn = randomize_affine(build_norm("bn", 6, workers=workers)).float()
    slow = SlowPerWorkerBN(bn, workers).double()
    x = as_format((torch.randn(workers * 2, 6, 5, 5) * 3 + 1).bfloat16(), channels_last)
    assert_matches_in_bf16(bn, slow, x, as_format(torch.randn_like(x), channels_last), param_tol=1e-3)
    torch.testing.assert_close(bn.running_mean.double(), slow.averaged("running_mean"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), slow.averaged("running_var"), atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_bn_with_workers_without_affine_matches_the_chunk_loop(channels_last):
    bn = build_norm("bn", 3, workers=2, affine=False)
    x = torch.randn(4, 3, 3, 3, requires_grad=True)
    grad = torch.randn_like(x)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    bn(x).backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    torch.cat([F.batch_norm(c, None, None, training=True) for c in x_ref.chunk(2)]).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_bn_with_workers_output_takes_an_in_place_relu(channels_last):
    """A ResNet applies ReLU in place after BN: the output must be a tensor of its own, and the gradient right."""
    bn = randomize_affine(build_norm("bn", 3, workers=2))
    x = torch.randn(4, 3, 3, 3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    bn(x).relu_().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    torch.cat([F.batch_norm(c, None, None, bn.weight, bn.bias, training=True) for c in x_ref.chunk(2)]).relu().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.usefixtures("cpu_path")
def test_bn_with_workers_is_memory_format_agnostic():
    bn = build_norm("bn", 8, workers=4)
    x = torch.randn(8, 8, 5, 5)
    y = bn(x)
    y_cl = bn(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y, y_cl)


@pytest.mark.usefixtures("cpu_path")
@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_with_workers_under_bf16_autocast_stays_close_to_float32(channels_last):
    torch.manual_seed(0)
    bn = randomize_affine(build_norm("bn", 8, workers=4)).float()
    x = (torch.randn(16, 8, 6, 6) * 3 + 5).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bn(x.bfloat16())
    assert y.dtype == torch.bfloat16
    expected = torch.cat([F.batch_norm(c, None, None, bn.weight, bn.bias, training=True) for c in x.chunk(4)])
    torch.testing.assert_close(y.float(), expected.detach(), atol=0.05, rtol=0.02)
    y.float().square().sum().backward()
    assert torch.isfinite(bn.weight.grad).all()


@pytest.mark.usefixtures("cpu_path")
def test_bn_statistics_hold_for_a_channel_whose_mean_is_far_from_zero():
    bn = build_norm("bn", 2, workers=2).float()
    offset = torch.tensor([30.0, -30.0], dtype=torch.float32).view(1, 2, 1, 1)
    x = torch.randn(8, 2, 16, 16, dtype=torch.float32) + offset
    expected = torch.cat([F.batch_norm(c.double(), None, None, training=True) for c in x.chunk(2)]).float()
    torch.testing.assert_close(bn(x), expected, atol=2e-4, rtol=1e-4)


def test_bn_rejects_batch_not_divisible_by_workers():
    bn = build_norm("bn", 4, workers=8)
    with pytest.raises(ValueError, match=r"bn: a batch of 12 images cannot be split among workers=8"):
        bn(torch.randn(12, 4, 3, 3))


def test_bn_rejects_a_single_value_per_channel_per_worker():
    bn = build_norm("bn", 4, workers=2)
    with pytest.raises(ValueError, match="single value per channel"):
        bn(torch.randn(2, 4, 1, 1))


# ---------------------------------------------------------------- Batch Renormalization

def brn_formula(x, workers, weight, bias, mu, sigma, r_max, d_max, eps):
    """Ioffe 2017, Algorithm 1, applied to each worker's chunk; r and d are constants for the gradient."""
    outs, means, stds = [], [], []
    for chunk in x.chunk(workers):
        mean_b = chunk.mean(dim=(0, 2, 3))
        std_b = torch.sqrt(chunk.var(dim=(0, 2, 3), correction=0) + eps)
        r = torch.clamp(std_b / sigma, 1 / r_max, r_max).detach()
        d = torch.clamp((mean_b - mu) / sigma, -d_max, d_max).detach()
        x_hat = (chunk - mean_b.view(1, -1, 1, 1)) / std_b.view(1, -1, 1, 1) * r.view(1, -1, 1, 1) + d.view(1, -1, 1, 1)
        outs.append(weight.view(1, -1, 1, 1) * x_hat + bias.view(1, -1, 1, 1))
        means.append(mean_b.detach())
        stds.append(std_b.detach())
    return torch.cat(outs), torch.stack(means).mean(0), torch.stack(stds).mean(0)


@pytest.mark.parametrize("workers", [1, 2])
def test_brn_matches_the_paper_formula_with_clipping_active(workers):
    brn = randomize_affine(build_norm("brn", 4, workers=workers, r_max=1.5, d_max=0.5, warmup_steps=0,
                                      ramp_steps=0, momentum=0.3))
    with torch.no_grad():
        brn.running_mean.copy_(torch.tensor([0.0, 5.0, -5.0, 1.0]))
        brn.running_std.copy_(torch.tensor([1.0, 0.2, 9.0, 2.0]))
    mu, sigma = brn.running_mean.clone(), brn.running_std.clone()
    x = torch.randn(4, 4, 3, 3) * 2 + 1
    grad = torch.randn_like(x)

    y, gx, gp = forward_backward(brn, x, grad)

    weight = brn.weight.detach().clone().requires_grad_(True)
    bias = brn.bias.detach().clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    y_ref, mean_b, std_b = brn_formula(xr, workers, weight, bias, mu, sigma, 1.5, 0.5, brn.eps)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref.detach())
    torch.testing.assert_close(gx, xr.grad)
    torch.testing.assert_close(gp["weight"], weight.grad)
    torch.testing.assert_close(gp["bias"], bias.grad)
    torch.testing.assert_close(brn.running_mean, mu + 0.3 * (mean_b - mu))
    torch.testing.assert_close(brn.running_std, sigma + 0.3 * (std_b - sigma))


def test_brn_eval_uses_running_mean_and_std():
    brn = randomize_affine(build_norm("brn", 3))
    with torch.no_grad():
        brn.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        brn.running_std.copy_(torch.tensor([0.5, 2.0, 4.0]))
    brn.eval()
    x = torch.randn(2, 3, 4, 4)
    expected = (brn.weight.view(1, -1, 1, 1) * (x - brn.running_mean.view(1, -1, 1, 1))
                / brn.running_std.view(1, -1, 1, 1) + brn.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(brn(x), expected)


def test_brn_warmup_holds_plain_bn_then_ramps_linearly():
    brn = build_norm("brn", 2, r_max=3.0, d_max=5.0, warmup_steps=2, ramp_steps=4)
    seen = []
    for _ in range(8):
        seen.append(tuple(round(float(v), 6) for v in brn.limits()))
        brn(torch.randn(4, 2, 2, 2))
    assert seen == [(1.0, 0.0), (1.0, 0.0), (1.5, 1.25), (2.0, 2.5), (2.5, 3.75), (3.0, 5.0), (3.0, 5.0), (3.0, 5.0)]


def test_brn_during_warmup_equals_per_worker_bn():
    brn = randomize_affine(build_norm("brn", 3, workers=2, warmup_steps=100))
    bn = build_norm("bn", 3, workers=2)
    bn.load_state_dict({"weight": brn.weight, "bias": brn.bias}, strict=False)
    x = torch.randn(6, 3, 4, 4) * 3 - 1
    torch.testing.assert_close(brn(x), bn(x))


# ---------------------------------------------------------------- FRN

@pytest.mark.parametrize("learnable_eps", [False, True])
def test_frn_matches_the_paper_formula(learnable_eps):
    frn = randomize_affine(build_norm("frn", 4, eps=1e-3, learnable_eps=learnable_eps))
    with torch.no_grad():
        frn.tau.sub_(1.0)  # straddle zero so that TLU clips some values and passes others

    def formula(x):
        eps = 1e-3 + (frn.learned_eps.abs().view(1, -1, 1, 1) if learnable_eps else 0)
        nu2 = (x ** 2).mean(dim=(2, 3), keepdim=True)
        y = frn.weight.view(1, -1, 1, 1) * x / torch.sqrt(nu2 + eps) + frn.bias.view(1, -1, 1, 1)
        return torch.max(y, frn.tau.view(1, -1, 1, 1))

    x = torch.randn(3, 4, 5, 5)
    y = frn(x)
    torch.testing.assert_close(y, formula(x))
    assert (y == frn.tau.view(1, -1, 1, 1)).any() and (y > frn.tau.view(1, -1, 1, 1)).any()


def test_frn_without_activation_has_no_tlu():
    frn = randomize_affine(build_norm("frn", 4, apply_act=False))
    assert frn.tau is None
    x = torch.randn(3, 4, 5, 5)
    expected = frn.weight.view(1, -1, 1, 1) * x / torch.sqrt((x ** 2).mean((2, 3), keepdim=True) + 1e-6)
    torch.testing.assert_close(frn(x), expected + frn.bias.view(1, -1, 1, 1))


# ---------------------------------------------------------------- EvoNorm

def test_evonorm_b0_matches_the_paper_formula_in_train_and_eval():
    evo = randomize_affine(build_norm("evonorm_b0", 4, workers=2, momentum=0.5))
    x = torch.randn(6, 4, 3, 3) * 2 + 1
    g, b, v = (p.view(1, -1, 1, 1) for p in (evo.weight, evo.bias, evo.v))
    inst_std = torch.sqrt(x.var(dim=(2, 3), keepdim=True, correction=0) + 1e-5)
    outs, variances = [], []
    for chunk, chunk_inst_std in zip(x.chunk(2), inst_std.chunk(2)):
        batch_var = chunk.var(dim=(0, 2, 3), keepdim=True, correction=0)
        variances.append(batch_var.flatten())
        outs.append(chunk / torch.max(torch.sqrt(batch_var + 1e-5), v * chunk + chunk_inst_std) * g + b)
    torch.testing.assert_close(evo(x), torch.cat(outs))
    expected_running = 0.5 * torch.ones(4) + 0.5 * torch.stack(variances).mean(0)
    torch.testing.assert_close(evo.running_var, expected_running)

    evo.eval()
    running_std = torch.sqrt(evo.running_var.view(1, -1, 1, 1) + 1e-5)
    torch.testing.assert_close(evo(x), x / torch.max(running_std, v * x + inst_std) * g + b)


def test_evonorm_s0_matches_the_paper_formula():
    evo = randomize_affine(build_norm("evonorm_s0", 8, groups=2))
    x = torch.randn(3, 8, 4, 4)
    g, b, v = (p.view(1, -1, 1, 1) for p in (evo.weight, evo.bias, evo.v))
    group_std = torch.sqrt(x.reshape(3, 2, -1).var(-1, correction=0) + 1e-5).repeat_interleave(4, dim=1)
    expected = x * torch.sigmoid(v * x) / group_std.view(3, 8, 1, 1) * g + b
    torch.testing.assert_close(evo(x), expected)


@pytest.mark.parametrize("name", ["evonorm_b0", "evonorm_s0"])
def test_evonorm_without_activation_is_the_affine_only(name):
    evo = randomize_affine(build_norm(name, 32, apply_act=False))
    x = torch.randn(2, 32, 3, 3)
    torch.testing.assert_close(evo(x), x * evo.weight.view(1, -1, 1, 1) + evo.bias.view(1, -1, 1, 1))


# ---------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("name, options", [
    ("bn", {"workers": 2}), ("gn", {"groups": 2}), ("brn", {"workers": 2, "warmup_steps": 10**9}),
    ("frn", {"learnable_eps": True}), ("evonorm_b0", {"workers": 2}), ("evonorm_s0", {"groups": 2}),
])
def test_gradcheck(name, options):
    layer = randomize_affine(build_norm(name, 4, **options))
    x = torch.randn(4, 4, 3, 2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, *params: layer(t), (x, *layer.parameters()))


def test_gradcheck_brn_with_r_and_d_clipped():
    """Where r and d are clipped they are locally constant, so finite differences see what autograd sees."""
    brn = randomize_affine(build_norm("brn", 4, workers=2, r_max=1.2, d_max=0.1, warmup_steps=0, ramp_steps=0,
                                      momentum=0.0))
    with torch.no_grad():
        brn.running_mean.fill_(-100.0)
        brn.running_std.fill_(100.0)
    x = torch.randn(4, 4, 3, 2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, *params: brn(t), (x, *brn.parameters()))


# ---------------------------------------------------------------- batch (in)dependence, train vs eval

def build_for_test(name, channels=8, workers=1):
    options = {"workers": workers} if REGISTRY[name].batch_dependent else {}
    if "groups" in REGISTRY[name].options:
        options["groups"] = 4
    return randomize_affine(build_norm(name, channels, **options))


@pytest.mark.parametrize("name", BATCH_INDEPENDENT)
def test_batch_independent_norms_see_each_sample_alone(name):
    layer = build_for_test(name)
    x = torch.randn(6, 8, 4, 4)
    other = x.clone()
    other[1:] = torch.randn(5, 8, 4, 4) * 5
    torch.testing.assert_close(layer(x)[0], layer(other)[0])


def test_syncbn_in_one_process_is_torchs_bn_over_the_whole_batch():
    layer = randomize_affine(build_norm("syncbn", 8, momentum=0.3))
    reference = randomize_affine(torch.nn.BatchNorm2d(8, momentum=0.3))
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(12, 8, 4, 4, dtype=torch.float64) * 2 + 1
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer.double(), reference.double()
    ya, yb = layer(a), reference(b)
    torch.testing.assert_close(ya, yb)
    (ya * torch.arange(ya.numel(), dtype=ya.dtype).view_as(ya)).sum().backward()
    (yb * torch.arange(yb.numel(), dtype=yb.dtype).view_as(yb)).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(layer.running_var, reference.running_var)
    assert "workers" not in REGISTRY["syncbn"].options  # W does not split its statistics


@pytest.mark.parametrize("name", BATCH_DEPENDENT)
def test_batch_dependent_norms_see_only_their_own_worker_chunk(name):
    layer = build_for_test(name, workers=3)
    if name == "brn":
        layer.warmup_steps, layer.ramp_steps, layer.momentum = 0, 0, 0.0  # r, d at work; fixed running stats
    x = torch.randn(6, 8, 4, 4)  # three workers of two images each: sample 0 is in chunk {0, 1}
    in_other_chunks = x.clone()
    in_other_chunks[2:] = torch.randn(4, 8, 4, 4) * 5
    in_own_chunk = x.clone()
    in_own_chunk[1] = torch.randn(8, 4, 4) * 5
    y0 = layer(x)[0]
    torch.testing.assert_close(layer(in_other_chunks)[0], y0)
    assert not torch.allclose(layer(in_own_chunk)[0], y0)


@pytest.mark.parametrize("name", BATCH_INDEPENDENT)
def test_batch_independent_norms_are_the_same_in_train_and_eval(name):
    layer = build_for_test(name)
    x = torch.randn(4, 8, 4, 4)
    y_train = layer(x)
    torch.testing.assert_close(layer.eval()(x), y_train)


@pytest.mark.parametrize("name", ["bn", "brn", "evonorm_b0"])
def test_batch_norms_use_running_statistics_in_eval(name):
    layer = build_for_test(name, workers=2)
    for _ in range(3):
        layer(torch.randn(4, 8, 4, 4) * 3 + 2)
    layer.eval()
    x = torch.randn(4, 8, 4, 4)
    single = layer(x[:1])
    torch.testing.assert_close(layer(x)[:1], single)  # no batch statistics: the rest of the batch is irrelevant
    layer.train()
    assert not torch.allclose(layer(x)[:1], single)


def test_process_local_bn_is_torchs_bn_on_the_same_parameters_and_buffers():
    """The memory-format probe's stand-in for SyncBN on rank 0 alone: plain BN, sharing what the layer holds."""
    sync = randomize_affine(build_norm("syncbn", 3))
    model = to_process_local_bn(nn.Sequential(sync, nn.ReLU()))
    local = model[0]
    assert type(local) is nn.BatchNorm2d and local.weight is sync.weight and local.running_mean is sync.running_mean
    x = torch.randn(4, 3, 5, 5)
    expected = F.batch_norm(x, sync.running_mean.clone(), sync.running_var.clone(), sync.weight, sync.bias,
                            training=True)
    torch.testing.assert_close(local(x), expected)
    assert sync.num_batches_tracked.item() == 1


def test_gns_default_group_count_is_the_protocols():
    """norms know nothing of config or the protocol: the paper's G is written in both; they must agree."""
    from normlab.norms import group
    from normlab.protocol import DEFAULT_GROUPS

    assert group.DEFAULT_GROUPS == DEFAULT_GROUPS == build_norm("gn", 64).num_groups


# ---------------------------------------------------------------- Weight Standardization

def test_ws_conv_standardizes_each_filter_as_the_paper_code_does():
    conv = WSConv2d(3, 5, 3, padding=1)
    w = conv.weight.detach()
    flat = w.reshape(5, -1)
    expected_w = (flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-5)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(conv(x), F.conv2d(x, expected_w.view_as(w), conv.bias, padding=1))


def test_standardize_convs_converts_every_conv_and_keeps_weights():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 1, bias=False)), nn.Linear(2, 2))
    original = copy.deepcopy(net)
    net = standardize_convs(net)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and all(isinstance(m, WSConv2d) for m in convs)
    assert type(net[3]) is nn.Linear
    for key, value in original.state_dict().items():
        assert torch.equal(net.state_dict()[key], value)


@pytest.mark.parametrize("padding, mode", [(1, "zeros"), (1, "reflect"), ((2, 1), "circular"),
                                           ("same", "replicate"), ("valid", "reflect"), ("same", "zeros")])
def test_ws_conv_pads_as_nn_conv2d_does_in_every_padding_mode(padding, mode):
    """Against nn.Conv2d itself, given the standardized weight: the same padding, stride and dilation."""
    conv = WSConv2d(3, 4, (3, 5), padding=padding, padding_mode=mode, dilation=(1, 2))
    reference = nn.Conv2d(3, 4, (3, 5), padding=padding, padding_mode=mode, dilation=(1, 2))
    with torch.no_grad():
        reference.weight.copy_(conv.standardized_weight())
        reference.bias.copy_(conv.bias)
    x = torch.randn(2, 3, 9, 11)
    torch.testing.assert_close(conv(x), reference(x))


# ---------------------------------------------------------------- errors at build time

@pytest.mark.parametrize("name, channels, options, message", [
    ("batchnorm", 8, {}, r"unknown norm 'batchnorm'; valid norms: bn, gn, ln, in, none, brn, frn, "),
    ("gn", 48, {"groups": 32}, r"gn: groups=32 does not divide num_channels=48; valid group counts for 48 "
                               r"channels: \[1, 2, 3, 4, 6, 8, 12, 16, 24, 48\]"),
    ("evonorm_s0", 12, {}, r"evonorm_s0: groups=32 does not divide num_channels=12"),
    ("gn", 16, {"group_size": 3}, r"gn: group_size=3 does not divide num_channels=16; valid group sizes"),
    ("gn_ws", 16, {"group_size": 5}, r"gn_ws: group_size=5 does not divide num_channels=16"),
    ("gn", 16, {"groups": 4, "group_size": 4}, r"gn: give either groups or group_size, not both "
                                               r"\(got groups=4, group_size=4\)"),
    ("gn", 16, {"groups": 0}, r"gn: groups=0 is invalid; groups must be an integer >= 1"),
    ("bn", 16, {"workers": 0}, r"bn: workers=0 is invalid; workers must be an integer >= 1"),
    ("brn", 16, {"workers": -2}, r"brn: workers=-2 is invalid"),
    ("bn", 16, {"eps": 0.0}, r"bn: eps=0.0 is invalid; eps must be a number > 0"),
    ("frn", 16, {"eps": -1e-6}, r"frn: eps=-1e-06 is invalid"),
    ("gn", 16, {"workers": 8}, r"gn: unknown option\(s\) workers=8; gn takes: affine, eps, group_size, groups"),
    ("ln", 16, {"groups": 2}, r"ln: unknown option\(s\) groups=2; ln takes: affine, eps"),
    ("none", 16, {"eps": 1e-5}, r"none: unknown option\(s\) eps=1e-05; none takes: no options"),
    ("brn", 16, {"r_max": 0.5}, r"brn: need r_max >= 1"),
])
def test_bad_options_raise_clear_errors(name, channels, options, message):
    with pytest.raises(ValueError, match=message):
        build_norm(name, channels, **options)
