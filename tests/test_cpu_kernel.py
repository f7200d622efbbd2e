"""normlab's CPU kernel: how it is built, trusted, refused and replaced (its numbers: test_norms.py)."""

from __future__ import annotations

import copy
import ctypes
import logging
import os
import stat

import pytest
import torch
import torch.nn.functional as F

from normlab.norms import build_norm, cpu_kernel, kernel_library

needs_compiler = pytest.mark.skipif(kernel_library.compiler() is None, reason="no C++ compiler on PATH")


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache folder, and the kernel forgotten before and after."""
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path))
    kernel_library.library.cache_clear()
    cpu_kernel._warn_once.cache_clear()
    yield tmp_path
    kernel_library.library.cache_clear()
    cpu_kernel._warn_once.cache_clear()


def chunk_loop(x, weight, bias, workers):
    return torch.cat([F.batch_norm(c, None, None, weight, bias, training=True) for c in x.chunk(workers)])


@needs_compiler
def test_the_kernel_is_built_into_the_cache_once_and_then_loaded(fresh):
    assert cpu_kernel.usable(torch.zeros(1))
    (built,) = (fresh / "kernels").glob("cpu_kernel-*.so")
    assert cpu_kernel.status() == built.name
    mtime = built.stat().st_mtime_ns
    kernel_library.library.cache_clear()
    assert cpu_kernel.usable(torch.zeros(1)) and built.stat().st_mtime_ns == mtime
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".")]  # no partial build left behind


@needs_compiler
def test_a_library_others_may_write_is_rebuilt_not_loaded(fresh):
    path = kernel_library.library_path(kernel_library.compiler())
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a library")
    os.chmod(path, 0o666)
    assert cpu_kernel.usable(torch.zeros(1)), cpu_kernel.status()
    assert path.read_bytes()[:4] == b"\x7fELF" and not path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)


@needs_compiler
def test_the_library_name_changes_with_the_compiler_flags(monkeypatch):
    cxx = kernel_library.compiler()
    before = kernel_library.library_path(cxx)
    monkeypatch.setattr(kernel_library, "FLAGS", (*kernel_library.FLAGS, "-DNORMLAB_TEST"))
    assert kernel_library.library_path(cxx) != before


@pytest.mark.parametrize("cxx, reason", [("/nonexistent/c++", "no C++ compiler"), ("false", "failed")])
def test_without_a_working_compiler_per_worker_bn_runs_on_torchs_ops_and_says_why(fresh, monkeypatch, caplog,
                                                                                   cxx, reason):
    monkeypatch.setenv("CXX", cxx)
    bn = build_norm("bn", 3, workers=2)
    x = torch.randn(4, 3, 5, 5)
    with caplog.at_level(logging.WARNING, logger=cpu_kernel.__name__):
        y = bn(x)
        bn(x)
    assert reason in cpu_kernel.status()
    assert len([r for r in caplog.records if "torch's ops" in r.getMessage()]) == 1
    torch.testing.assert_close(y, chunk_loop(x, bn.weight, bn.bias, 2))


def test_normlab_cpu_kernel_0_turns_it_off(fresh, monkeypatch):
    monkeypatch.setenv("NORMLAB_CPU_KERNEL", "0")
    assert not cpu_kernel.usable(torch.zeros(1)) and cpu_kernel.status() == "torch (NORMLAB_CPU_KERNEL=0)"
    assert not list(fresh.glob("kernels/*"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.int64])
def test_dtypes_the_kernel_lacks_and_other_devices_go_to_torch(dtype):
    assert not cpu_kernel.usable(torch.zeros(1, dtype=dtype))
    assert not cpu_kernel.usable(torch.zeros(1, device="meta"))


@needs_compiler
@pytest.mark.parametrize("units", [(8, 1), (1, 6)], ids=["per_worker_bn", "gn"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_the_result_does_not_depend_on_the_thread_count(channels_last, units):
    """Blocks are fixed by the shape, and pooled in one order: any thread count gives the same bits."""
    x = torch.randn(32, 24, 9, 7).bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = (torch.rand(24) + 0.5).requires_grad_(), torch.randn(24).requires_grad_()
    grad = torch.randn_like(x)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            x.grad = weight.grad = bias.grad = None
            xg = x.detach().requires_grad_()
            y, mean, var = cpu_kernel.normalize(xg, weight, bias, unit_samples=units[0], unit_channels=units[1],
                                                eps=1e-5)
            y.backward(grad)
            results.append((y, mean, var, xg.grad, weight.grad, bias.grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@needs_compiler
def test_statistics_stay_exact_where_the_mean_dwarfs_the_spread():
    """Two passes per block, pooled by Chan's formula: no E[x²] − E[x]² cancellation, even at mean/std = 1e4."""
    x = (torch.randn(8, 2, 16, 16) + 1e4).float()
    y, mean, var = cpu_kernel.normalize(x, None, None, unit_samples=4, unit_channels=1, eps=1e-5)
    chunks = x.double().chunk(2)
    expected = torch.stack([c.var((0, 2, 3), correction=0) for c in chunks]).float()
    torch.testing.assert_close(var, expected, rtol=1e-3, atol=0)
    torch.testing.assert_close(y, chunk_loop(x.double(), None, None, 2).float(), atol=2e-3, rtol=0)


@needs_compiler
def test_running_statistics_in_another_dtype_than_the_kernels_are_updated_too():
    """A float32 layer on float64 input: statistics in float64, the float32 buffers updated through a copy."""
    bn = build_norm("bn", 3, workers=2)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 1
    bn(x)
    chunks = x.chunk(2)
    mean = torch.stack([c.mean((0, 2, 3)) for c in chunks]).mean(0)
    var = torch.stack([c.var((0, 2, 3)) for c in chunks]).mean(0)
    assert bn.running_mean.dtype == torch.float32
    torch.testing.assert_close(bn.running_mean, (0.1 * mean).float())
    torch.testing.assert_close(bn.running_var, (0.9 + 0.1 * var).float())


@needs_compiler
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("groups", [1, 4, 12])
def test_units_of_channels_are_torchs_group_norm_in_both_layouts(channels_last, groups):
    """GroupNorm2d sends only channels_last here; the kernel's NCHW units of channels are checked all the same."""
    x = torch.randn(5, 12, 7, 6, dtype=torch.float64) * 2 + 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(12, dtype=torch.float64) + 0.5, torch.randn(12, dtype=torch.float64)
    grad = torch.randn_like(x)
    inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = cpu_kernel.normalize(*inputs, unit_samples=1, unit_channels=12 // groups, eps=1e-5)[0]
    y.backward(grad)
    reference = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y_ref = F.group_norm(reference[0], groups, reference[1], reference[2], eps=1e-5)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref)
    for mine, theirs in zip(inputs, reference):
        torch.testing.assert_close(mine.grad, theirs.grad)


@needs_compiler
@pytest.mark.parametrize("name, channels, build", [
    ("bn", 5, lambda: build_norm("bn", 3, workers=2)),
    ("gn", 6, lambda: build_norm("gn", 4, groups=2)),
])
def test_an_input_of_another_channel_count_is_refused_before_the_kernel_touches_memory(name, channels, build):
    layer = build()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, channels, 4, 4).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=f"elements for an input of {channels} channels"):
        layer(x)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


@needs_compiler
def test_units_that_do_not_tile_the_input_are_refused():
    with pytest.raises(ValueError, match="do not tile"):
        cpu_kernel.normalize(torch.randn(4, 6, 3, 3), None, None, unit_samples=3, unit_channels=1, eps=1e-5)
    with pytest.raises(ValueError, match="do not tile"):
        cpu_kernel.normalize(torch.randn(4, 6, 3, 3), None, None, unit_samples=1, unit_channels=0, eps=1e-5)


@needs_compiler
def test_a_second_derivative_is_refused_not_silently_wrong():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    y = cpu_kernel.normalize(x, None, None, unit_samples=2, unit_channels=1, eps=1e-5)[0]
    (grad,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


@needs_compiler
def test_running_statistics_written_by_the_kernel_count_as_in_place_changes():
    bn = build_norm("bn", 3, workers=2)
    version = bn.running_mean._version
    bn(torch.randn(4, 3, 5, 5))
    assert bn.running_mean._version > version and bn.running_var._version > version


@needs_compiler
def test_a_damaged_cached_library_is_rebuilt(fresh):
    path = kernel_library.library_path(kernel_library.compiler())
    path.parent.mkdir(mode=0o700, parents=True)
    path.write_bytes(b"\x7fELF truncated")
    os.chmod(path, 0o755)
    assert cpu_kernel.usable(torch.zeros(1)), cpu_kernel.status()


def test_a_cache_folder_it_cannot_write_leaves_torchs_kernels_at_work(fresh, monkeypatch):
    monkeypatch.setenv("NORMLAB_CACHE", "/proc/normlab-cannot-write-here")
    bn = build_norm("bn", 3, workers=2)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(bn(x), chunk_loop(x, bn.weight, bn.bias, 2))
    assert "failed" in cpu_kernel.status()


@needs_compiler
@pytest.mark.parametrize("units", [(3, 1), (1, 8)], ids=["per_worker_bn", "gn"])
def test_several_blocks_per_sample_and_a_partial_channel_chunk_match_torch(units):
    """channels_last with C=40 (two full chunks of 16 channels and one of 8) and 255 positions a sample (rows of
    204 per block, so a short second block): against torch's per-chunk BN and group norm, in float64."""
    x = (torch.randn(6, 40, 15, 17, dtype=torch.float64) * 2 + 1).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(40, dtype=torch.float64) + 0.5, torch.randn(40, dtype=torch.float64)
    grad = torch.randn_like(x)
    mine = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = cpu_kernel.normalize(*mine, unit_samples=units[0], unit_channels=units[1], eps=1e-5)[0]
    y.backward(grad)
    ref = [t.clone().requires_grad_() for t in (x, weight, bias)]
    if units[1] == 1:
        y_ref = chunk_loop(ref[0], ref[1], ref[2], 6 // units[0])
    else:
        y_ref = F.group_norm(ref[0], 40 // units[1], ref[1], ref[2], eps=1e-5)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a.grad, b.grad)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("units", [(4, 1), (1, 3)], ids=["per_worker_bn", "gn"])
def test_the_ops_pass_torchs_opcheck(units, channels_last, dtype):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch, as torch.library checks them."""
    x = torch.randn(8, 6, 5, 5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(6) + 0.5, torch.randn(6)
    torch.library.opcheck(cpu_kernel.norm_forward, (x.requires_grad_(), weight.requires_grad_(),
                                                    bias.requires_grad_(), *units, 1e-5))
    y, mean, var, invstd = cpu_kernel.norm_forward(x, weight, bias, *units, 1e-5)
    torch.library.opcheck(cpu_kernel.norm_backward, (torch.randn_like(y), x.detach(), weight.detach(), mean, invstd,
                                                     *units))
    if units[1] == 1:
        torch.library.opcheck(cpu_kernel.running_update, (torch.zeros(6), torch.ones(6), mean, var, 0.1, 100))


@needs_compiler
@pytest.mark.slow
@pytest.mark.parametrize("name, options", [("bn", {"workers": 2}), ("gn", {"groups": 2})])
def test_a_compiled_model_calls_the_kernel(monkeypatch, name, options):
    """trainer.compile's torch.compile keeps the op in its graph: the kernel runs forward and backward, and the
    compiled model matches the eager one."""
    from normlab.engine.step import compile_model

    calls = []
    call = cpu_kernel._call
    monkeypatch.setattr(cpu_kernel, "_call", lambda entry, *args: calls.append(entry) or call(entry, *args))
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), build_norm(name, 4, **options))
    twin = copy.deepcopy(eager)
    compiled = compile_model(twin)
    x = torch.randn(4, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    y = compiled(x)
    y.square().sum().backward()
    assert {"normlab_norm_forward", "normlab_norm_backward"} <= set(calls), calls
    calls.clear()
    y_eager = eager(x)
    y_eager.square().sum().backward()
    assert "normlab_norm_forward" in calls  # eager takes the same kernel
    torch.testing.assert_close(y, y_eager, atol=1e-5, rtol=1e-5)
    for a, b in zip(eager.parameters(), twin.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4)
    if name == "bn":
        torch.testing.assert_close(twin[1].running_var, eager[1].running_var)


@needs_compiler
def test_a_library_whose_argument_lists_differ_is_refused_and_torch_takes_over(fresh, monkeypatch):
    """The .cpp's normlab_kernel_abi() against the argument lists Python passes: a drift is a reason, not a call."""
    signatures = {**kernel_library.SIGNATURES}
    signatures["normlab_norm_forward"] = [*signatures["normlab_norm_forward"], ctypes.c_double]
    monkeypatch.setattr(kernel_library, "SIGNATURES", signatures)
    assert "differ from the ones normlab passes" in cpu_kernel.status()
    bn = build_norm("bn", 3, workers=2)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(bn(x), chunk_loop(x, bn.weight, bn.bias, 2))


@needs_compiler
def test_a_symlinked_library_is_not_followed(fresh, tmp_path_factory):
    """A link in the library's place, even to a good build, is not loaded through: it is replaced by a fresh build,
    and the file it pointed to is left alone."""
    path = kernel_library.library_path(kernel_library.compiler())
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "lib.so"
    kernel_library.build(kernel_library.compiler(), elsewhere)
    before = elsewhere.read_bytes()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.symlink_to(elsewhere)
    assert cpu_kernel.usable(torch.zeros(1)), cpu_kernel.status()
    assert not path.is_symlink() and elsewhere.read_bytes() == before


@pytest.mark.parametrize("where", ["root", "kernels"])
def test_a_cache_folder_others_may_write_is_refused(fresh, where):
    folder = fresh if where == "root" else fresh / "kernels"
    folder.mkdir(exist_ok=True)
    os.chmod(folder, 0o777)
    try:
        assert not cpu_kernel.usable(torch.zeros(1))
        assert "writable by others" in cpu_kernel.status() and str(folder) in cpu_kernel.status()
        assert not list(fresh.glob("kernels/*.so"))
    finally:
        os.chmod(folder, 0o755)


@pytest.mark.skipif(os.getuid() != 0, reason="giving a folder to another user takes root")
def test_a_cache_root_of_another_user_is_refused(fresh):
    os.chown(fresh, 12345, -1)
    try:
        assert "owned by uid 12345" in cpu_kernel.status()
    finally:
        os.chown(fresh, 0, -1)
