"""The fused CPU library (normswap.norms._cpu_kernels): every kernel against a float64 formula,
the layers with it against the layers without it, and its build, cache and fallback."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from normswap.norms import _cpu_kernels as fused
from normswap.norms import _functional as F
from normswap.norms import _topk
from normswap.norms._layout import channel_view
from normswap.norms.lp_batchnorm import (
    L1BatchNorm1d,
    L1BatchNorm2d,
    L1BatchNorm3d,
    LinfBatchNorm1d,
    LinfBatchNorm2d,
    LinfBatchNorm3d,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (shape, memory format): channel counts that are and are not multiples of the 8-wide vectors,
# positions with a scalar tail, (N, C) inputs, 3-d and channels_last_3d
CASES = [
    ((6, 13, 17, 19), torch.contiguous_format),
    ((6, 13, 17, 19), torch.channels_last),
    ((3, 64, 9, 10), torch.channels_last),
    ((5, 16, 33), torch.contiguous_format),
    ((300, 37), torch.contiguous_format),
    ((2, 5, 3, 7, 11), torch.channels_last_3d),
    ((2, 5, 3, 7, 11), torch.contiguous_format),
    ((40, 20, 2, 2), torch.channels_last),
]
ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


@pytest.fixture
def kernels(monkeypatch: pytest.MonkeyPatch):
    """The library, on for tensors of every size; skipped (with the reason) where it cannot be
    built here."""
    monkeypatch.setattr(fused, "_ENABLED", True)
    if not fused.available():
        pytest.skip(f"fused CPU kernels: {fused.status()}")
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)
    return fused


def _input(shape, fmt, dtype, seed=0, scale=3.0, shift=1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift
    # per-channel statistics that differ: a channel's mean and spread come from the seed
    C = shape[1]
    view = (1, C) + (1,) * (len(shape) - 2)
    x = x * torch.rand(C, generator=g, dtype=torch.float64).add(0.2).reshape(view) \
        + torch.randn(C, generator=g, dtype=torch.float64).reshape(view)
    return x.to(dtype).contiguous(memory_format=fmt)


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1).reshape(t.shape[1], -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,fmt", CASES, ids=str)
def test_reductions_match_float64_formulas(kernels, shape, fmt, dtype) -> None:
    x = _input(shape, fmt, dtype)
    assert kernels.usable(x)
    xd = _per_channel(x.double())
    n = xd.shape[1]
    mean = kernels.channel_mean(x)
    torch.testing.assert_close(mean.double(), xd.mean(1), rtol=1e-6, atol=1e-6)
    mu = mean                                     # float32, as the layers pass it
    d = xd - mu.double()[:, None]
    sign_sum, abs_sum = kernels.l1_sums(x, mu)
    assert torch.equal(sign_sum.double(), torch.sign(d).sum(1))   # comparisons: exact
    torch.testing.assert_close(abs_sum.double(), d.abs().sum(1), rtol=1e-5, atol=1e-4)
    g = _input(shape, fmt, dtype, seed=1, shift=0.0)
    g_sum, gd_sum = kernels.gradient_sums(g, x, mu)
    gd = _per_channel(g.double())
    torch.testing.assert_close(g_sum.double(), gd.sum(1), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(gd_sum.double(), (gd * d).sum(1), rtol=1e-5, atol=1e-3 * n ** 0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,fmt", CASES, ids=str)
def test_elementwise_passes_match_float64_formulas(kernels, shape, fmt, dtype) -> None:
    x = _input(shape, fmt, dtype)
    g = _input(shape, fmt, dtype, seed=1, shift=0.0)
    C = shape[1]
    gen = torch.Generator().manual_seed(2)
    mu, a, b, k = (torch.randn(C, generator=gen) for _ in range(4))
    view = (1, C) + (1,) * (len(shape) - 2)
    y = kernels.affine(x, mu, a, b)
    assert y.dtype == dtype and y.stride() == x.stride()
    ref = (x.double() - mu.double().reshape(view)) * a.double().reshape(view) \
        + b.double().reshape(view)
    # float32 arithmetic then one rounding to dtype: within one ulp of dtype plus float32 error
    tol = ULP[dtype] * ref.abs() + 1e-5 * (1 + x.double().abs() * a.double().abs().reshape(view))
    assert ((y.double() - ref).abs() <= tol).all()
    dx = kernels.l1_input_gradient(g, x, mu, a, b, k)
    assert dx.dtype == dtype and dx.stride() == x.stride()
    sign = torch.sign(x.double() - mu.double().reshape(view))
    ref = a.double().reshape(view) * g.double() + b.double().reshape(view) \
        - k.double().reshape(view) * sign
    tol = ULP[dtype] * ref.abs() + 1e-5 * (1 + g.double().abs())
    assert ((dx.double() - ref).abs() <= tol).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,fmt", CASES, ids=str)
@pytest.mark.parametrize("by_rows", [False, True])
def test_group_extrema_equal_amax_amin(kernels, shape, fmt, dtype, by_rows) -> None:
    x = _input(shape, fmt, dtype)
    xw, cdim = channel_view(x)
    mu, gmax, gmin = _topk.group_extrema(xw, cdim, by_rows)
    rdim = 2 if cdim == 1 else 1
    if by_rows:
        ref_max, ref_min = xw.amax(rdim).t(), xw.amin(rdim).t()
    else:
        ref_max, ref_min = ((xw.amax(0), xw.amin(0)) if cdim == 1
                            else (xw.amax(0).t(), xw.amin(0).t()))
    assert gmax.shape == ref_max.shape
    assert torch.equal(gmax, ref_max.float()) and torch.equal(gmin, ref_min.float())
    torch.testing.assert_close(mu.double(), _per_channel(x.double()).mean(1), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 3, 10, 37])
@pytest.mark.parametrize("C", [5, 16, 70])
def test_topk_rows_matches_torch_topk(kernels, dtype, k, C) -> None:
    x = _input((37, C), torch.contiguous_format, dtype)
    mu = kernels.channel_mean(x)
    vals, rows = kernels.topk_rows(x, mu, k)
    dabs = (x.float() - mu).abs().t()                              # (C, N)
    ref = dabs.topk(k, dim=1)
    assert torch.equal(vals, ref.values)                           # same values, descending
    assert torch.equal(dabs.gather(1, rows), vals)                 # the indices point at them
    assert all(len(set(r.tolist())) == k for r in rows)            # k distinct rows


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,fmt", [c for c in CASES if len(c[0]) > 2], ids=str)
@pytest.mark.parametrize("k", [1, 4])
def test_topk_members_matches_torch_topk(kernels, shape, fmt, dtype, k) -> None:
    x = _input(shape, fmt, dtype)
    N, C = shape[0], shape[1]
    R = x[0, 0].numel()
    mu = kernels.channel_mean(x)
    gen = torch.Generator().manual_seed(5)
    kg = min(R, 3)
    groups = torch.stack([torch.randperm(R, generator=gen)[:kg] for _ in range(C)])   # (C, kg)
    vals, flat = kernels.topk_members(x, mu, groups, min(k, N * kg))
    dabs = (_per_channel(x.float()) - mu[:, None]).abs().reshape(C, N, R)    # (C, N, R)
    members = dabs.gather(2, groups[:, None, :].expand(C, N, kg)).reshape(C, -1)
    ref = members.topk(min(k, N * kg), dim=1)
    assert torch.equal(vals, ref.values)
    assert torch.equal(dabs.reshape(C, -1).gather(1, flat), vals)    # flat = n*R + r
    assert torch.isin(flat % R, groups).all() and all(
        set((flat[c] % R).tolist()) <= set(groups[c].tolist()) for c in range(C))
    with pytest.raises(ValueError, match="positions must lie"):
        kernels.topk_members(x, mu, groups + R, 1)


def test_linf_selection_with_and_without_the_library_is_the_same_set(kernels, monkeypatch
                                                                       ) -> None:
    """The fused selection picks the same top-k values as the native one (no ties here)."""
    for shape, fmt in [((8, 16, 12, 12), torch.channels_last), ((8, 16, 12, 12),
                                                                 torch.contiguous_format),
                       ((1, 16, 30, 30), torch.channels_last), ((64, 24), torch.contiguous_format)]:
        x = _input(shape, fmt, torch.float32)
        got = []
        for on in (True, False):
            monkeypatch.setattr(fused, "_ENABLED", on)
            mu, vals, flat = F._local_selection(x, None, 7, False, False)
            got.append((vals, flat.sort(1).values))
        monkeypatch.setattr(fused, "_ENABLED", True)
        torch.testing.assert_close(got[0][0], got[1][0], rtol=1e-6, atol=1e-6)
        assert torch.equal(got[0][1], got[1][1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,fmt", CASES, ids=str)
@pytest.mark.parametrize("k", [1, 6])
def test_topk_abs_matches_torch_topk(kernels, shape, fmt, dtype, k) -> None:
    x = _input(shape, fmt, dtype)
    mu = kernels.channel_mean(x)
    vals, flat = kernels.topk_abs(x, mu, k)
    dabs = (_per_channel(x.float()) - mu[:, None]).abs()          # (C, n), n = N*R
    ref = dabs.topk(k, dim=1)
    assert torch.equal(vals, ref.values)
    assert torch.equal(dabs.gather(1, flat), vals)
    assert all(len(set(r.tolist())) == k for r in flat)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_topk_abs_on_a_ramp_inserts_every_element_and_stays_exact(kernels, fmt) -> None:
    """|x - mu| growing along memory: every element is a new candidate (the worst case)."""
    x = torch.arange(2 * 3 * 40 * 40, dtype=torch.float32).reshape(2, 3, 40, 40)
    x = x.contiguous(memory_format=fmt)
    mu = torch.full((3,), -1.0)
    vals, flat = kernels.topk_abs(x, mu, 9)
    dabs = (_per_channel(x) + 1.0).abs()
    assert torch.equal(vals, dabs.topk(9, dim=1).values)
    assert torch.equal(dabs.gather(1, flat), vals)


def test_topk_rows_ties_nan_and_bad_arguments(kernels) -> None:
    x = torch.zeros(12, 8)
    x[3:6] = 2.0                     # mean 0.5: |d| = 1.5 on rows 3-5, 0.5 elsewhere (ties)
    mu = kernels.channel_mean(x)
    vals, rows = kernels.topk_rows(x, mu, 5)
    assert torch.equal(rows[0], torch.tensor([3, 4, 5, 0, 1]))    # ties: the lower row first
    assert torch.equal(vals[0], torch.tensor([1.5, 1.5, 1.5, 0.5, 0.5]))
    x[7, 2] = float("nan")           # channel 2: mean nan, every |d| nan
    x[7, 3] = float("inf")           # channel 3: mean inf, |d| nan at row 7, inf elsewhere
    vals, rows = kernels.topk_rows(x, kernels.channel_mean(x), 2)
    assert vals[2].isnan().all()                                   # NaN reaches the scale
    assert not vals[3].isfinite().any() and torch.equal(vals[[0, 1, 4]], vals[[5, 6, 7]])
    with pytest.raises(ValueError, match="1 <= k <= N"):
        kernels.topk_rows(x, mu, 13)
    with pytest.raises(ValueError, match=r"\(N, C\) tensor"):
        kernels.topk_rows(torch.zeros(4, 8, 3), torch.zeros(8), 2)


def test_bfloat16_and_float16_stores_round_to_nearest_even(kernels) -> None:
    """The affine's store of float32 results: ties to even, overflow to inf, NaN stays NaN."""
    C = 8
    vals = torch.tensor([1.0, 1.00390625, 1.01171875, 70000.0, -70000.0, float("inf"),
                         float("nan"), -0.0] * 64, dtype=torch.float32).reshape(64, C)
    ones, zeros = torch.ones(C), torch.zeros(C)
    for dtype in (torch.bfloat16, torch.float16):
        # y = (x - 0) * 1 + 0 in float32: exactly the float32 value, then one rounding
        y = kernels.affine(vals, zeros, ones, zeros)
        assert torch.equal(y.isnan(), vals.isnan())           # float32: unchanged
        assert torch.equal(y[~vals.isnan()], vals[~vals.isnan()])
        xh = vals.to(dtype)
        yh = kernels.affine(xh, zeros, ones, zeros)
        assert torch.equal(yh.isnan(), xh.isnan())
        assert torch.equal(yh[~xh.isnan()], xh[~xh.isnan()])
        # values off the dtype's grid round like torch's own conversion (ties to even)
        off = (torch.arange(64 * C, dtype=torch.float32).reshape(64, C) / 7 + 1) * 1.0001
        scale = torch.full((C,), 3.0)
        y_off = kernels.affine(off.to(dtype), zeros, scale, zeros)
        assert torch.equal(y_off, (off.to(dtype).float() * 3.0).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,fmt", CASES, ids=str)
@pytest.mark.parametrize("layer", ["l1", "linf1", "linf5"])
def test_layers_with_and_without_the_library_agree(kernels, monkeypatch, shape, fmt, dtype,
                                                   layer) -> None:
    """Forward, input and parameter gradients and running statistics: the same up to rounding."""
    dims = len(shape) - 2
    cls = {"l1": (L1BatchNorm1d, L1BatchNorm2d, L1BatchNorm3d),
           "linf1": (LinfBatchNorm1d, LinfBatchNorm2d, LinfBatchNorm3d),
           "linf5": (LinfBatchNorm1d, LinfBatchNorm2d, LinfBatchNorm3d)}[layer][max(dims, 1) - 1]
    kw = {"k": 5} if layer == "linf5" else {}
    x = _input(shape, fmt, dtype)
    g = _input(shape, fmt, dtype, seed=1, shift=0.0)
    results = []
    for on in (True, False):
        monkeypatch.setattr(fused, "_ENABLED", on)
        torch.manual_seed(3)
        m = cls(shape[1], **kw).to(dtype)
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
        xx = x.clone().requires_grad_(True)
        y = m(xx)
        y.backward(g)
        results.append((y.detach(), xx.grad, m.weight.grad, m.bias.grad, m.running_mean.clone()))
        assert y.stride() == x.stride() and xx.grad.stride() == x.stride()
    rtol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    keep = torch.ones(shape, dtype=torch.bool)
    if layer != "l1":
        # elements tied with the k-th largest |x - mu| may be selected by either path (both
        # are valid subgradients): the input gradients are compared everywhere else
        dabs = (x.double() - _per_channel(x.double()).mean(1).reshape(
            (1, shape[1]) + (1,) * (len(shape) - 2))).abs()
        kth = _per_channel(dabs).topk(kw.get("k", 1), dim=1).values[:, -1]
        keep = dabs < kth.reshape((1, shape[1]) + (1,) * (len(shape) - 2)) * (1 - 2 * rtol)
    for i, (got, want) in enumerate(zip(*results)):
        scale = want.double().abs().max().item() + 1e-3
        if i == 1:
            got, want = got[keep], want[keep]
        assert (got.double() - want.double()).abs().max().item() <= rtol * scale


def test_nan_propagates_like_the_native_passes(kernels) -> None:
    x = _input((4, 16, 12, 12), torch.channels_last, torch.float32)
    x[1, 3, 5, 5] = float("nan")
    for cls in (L1BatchNorm2d, LinfBatchNorm2d):
        y = cls(16)(x)
        assert y[:, 3].isnan().all()
        assert not y[:, [0, 1, 2, 4]].isnan().any()


def test_half_inputs_near_a_large_mean_keep_exact_signs(kernels) -> None:
    """x - mu where mu sits between two fp16 neighbours: comparisons in float32 are exact, so
    the sign sum equals the float64 count (the half path of the native passes needs a scale
    trick for this)."""
    base = torch.full((64, 8, 16), 2048.0)
    base[:, :, ::2] += 2.0                        # fp16 spacing at 2048 is 2
    x = base.to(torch.float16)
    mu = kernels.channel_mean(x)
    assert torch.allclose(mu, torch.full((8,), 2049.0))
    sign_sum, abs_sum = kernels.l1_sums(x, mu)
    assert torch.equal(sign_sum, torch.zeros(8))
    assert torch.equal(abs_sum, torch.full((8,), 64 * 16 * 1.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_elements_equal_to_the_mean_have_sign_zero(kernels, dtype, fmt) -> None:
    """Ties: sign(0) = 0 in the sums and in the gradient's sign term."""
    levels = torch.tensor([0.0, 1.0, 1.0, 2.0, 0.5, 1.5])       # mean exactly 1
    x = torch.stack([levels.roll(c).repeat(120) for c in range(12)])   # (C, N*R), N*R = 720
    x = x.reshape(12, 8, 9, 10).transpose(0, 1).to(dtype).contiguous(memory_format=fmt)
    mu = kernels.channel_mean(x)
    assert torch.equal(mu, torch.ones(12))
    sign_sum, abs_sum = kernels.l1_sums(x, mu)
    ref = torch.sign(_per_channel(x.double()) - 1.0)
    assert torch.equal(sign_sum.double(), ref.sum(1))
    ones, zeros = torch.ones(12), torch.zeros(12)
    dx = kernels.l1_input_gradient(torch.zeros_like(x), x, mu, ones, zeros, ones)
    assert torch.equal(dx.double(), -torch.sign(x.double() - 1.0))


def test_unusable_inputs_take_the_native_passes(kernels) -> None:
    x = torch.randn(4, 8, 6, 6)
    assert kernels.usable(x) and kernels.usable(x.to(memory_format=torch.channels_last))
    assert not kernels.usable(x.double())                       # float64: reference path
    assert not kernels.usable(x[:, :, ::2])                     # not dense
    assert not kernels.usable(x.permute(0, 1, 3, 2))            # another dense layout
    assert not kernels.usable(x, x.to(memory_format=torch.channels_last))  # mixed layouts
    assert not kernels.usable(x, x.half())
    assert not kernels.usable(torch.randn(8))


def test_small_tensors_stay_on_the_native_passes(monkeypatch) -> None:
    monkeypatch.setattr(fused, "_ENABLED", True)
    assert not fused.usable(torch.randn(2, 4, 8, 8))            # 512 < MIN_ELEMENTS


def test_disabled_means_never_used(monkeypatch) -> None:
    monkeypatch.setattr(fused, "_ENABLED", False)
    assert not fused.usable(torch.randn(64, 64, 16, 16))
    assert "disabled" in fused.status()
    with pytest.raises(RuntimeError, match="disabled"):
        fused.channel_mean(torch.randn(64, 64, 16, 16))


def test_build_is_cached_and_reused(tmp_path, monkeypatch) -> None:
    if fused._compiler() is None:
        pytest.skip("no C++ compiler here")
    monkeypatch.setenv("NORMSWAP_KERNEL_CACHE", str(tmp_path))
    lib = fused._build()
    built = list(tmp_path.glob("normswap_cpu_*.so"))
    assert len(built) == 1 and lib.ns_openmp() in (0, 1)
    stamp = built[0].stat().st_mtime_ns
    fused._build()
    assert [p.stat().st_mtime_ns for p in tmp_path.glob("normswap_cpu_*.so")] == [stamp]
    assert not list(tmp_path.glob("*.tmp*")) and len(list(tmp_path.iterdir())) == 1


def test_a_library_others_can_write_is_never_loaded(tmp_path, monkeypatch) -> None:
    """Loading a shared library runs its code: a cache directory or file that another user can
    write is refused, with the reason."""
    if fused._compiler() is None:
        pytest.skip("no C++ compiler here")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("NORMSWAP_KERNEL_CACHE", str(shared))
    assert fused._cache_dir() != shared            # falls through to a private directory
    own = tmp_path / "own"
    monkeypatch.setenv("NORMSWAP_KERNEL_CACHE", str(own))
    fused._build()
    (built,) = own.glob("normswap_cpu_*.so")
    assert built.stat().st_mode & 0o777 == 0o755
    built.chmod(0o777)
    with pytest.raises(OSError, match="writable by others"):
        fused._build()


def test_a_failed_build_warns_once_and_the_layers_still_run(tmp_path, monkeypatch, caplog
                                                            ) -> None:
    monkeypatch.setenv("NORMSWAP_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(fused, "_ENABLED", True)
    monkeypatch.setattr(fused, "_TRIED", False)
    monkeypatch.setattr(fused, "_LIB", None)
    monkeypatch.setattr(fused, "_STATUS", "not built yet")
    monkeypatch.setattr(fused, "_compiler", lambda: "/bin/false")
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)
    x = _input((8, 16, 10, 10), torch.channels_last, torch.float32)
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        y = L1BatchNorm2d(16)(x)
        L1BatchNorm2d(16)(x)
    warnings = [r for r in caplog.records if "fused CPU kernels" in r.getMessage()]
    assert len(warnings) == 1 and "/bin/false failed" in warnings[0].getMessage()
    assert fused.status().startswith("unavailable")
    assert not fused.usable(x)
    want = F.l1_batch_norm(x.double())[0]
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.iterdir())     # the failed build left nothing behind


def test_a_compiler_without_openmp_builds_a_single_threaded_library(tmp_path, monkeypatch
                                                                    ) -> None:
    cxx = fused._compiler()
    if cxx is None:
        pytest.skip("no C++ compiler here")
    wrapper = tmp_path / "cxx-no-openmp"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && '
                       f'{{ echo "unsupported option -fopenmp" >&2; exit 1; }}; done\n'
                       f'exec {cxx} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setattr(fused, "_compiler", lambda: str(wrapper))
    monkeypatch.setenv("NORMSWAP_KERNEL_CACHE", str(tmp_path / "cache"))
    lib = fused._build()
    assert lib.ns_openmp() == 0 and lib.ns_simd() in (0, 1)


def test_library_threads_follow_torch(kernels) -> None:
    """The same sums at one thread and at torch's default."""
    x = _input((16, 24, 20, 20), torch.channels_last, torch.float32)
    mu = kernels.channel_mean(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.l1_sums(x, mu)
    finally:
        torch.set_num_threads(threads)
    many = kernels.l1_sums(x, mu)
    assert torch.equal(one[0], many[0])
    assert math.isclose(one[1].sum().item(), many[1].sum().item(), rel_tol=1e-6)


@pytest.mark.parametrize("method", ["l1", "linf"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_a_converted_resnet_trains_like_its_float64_self(kernels, monkeypatch, method, fmt
                                                         ) -> None:
    """A whole converted torchvision ResNet-18 in train mode (channel counts 64-512, spatial
    sizes down to 2x2), float32 with and without the library, against the same model in
    float64: the loss to float32 rounding, every gradient (input and parameters) to a cosine
    similarity of 0.9999. Not elementwise: the L1 gradient is that sensitive. An element within
    rounding of its channel's mean may take the other sign (both are subgradients of
    |x - mu|), which moves the gradients upstream of it; in float64 alone, scaling the input by
    1 + 1e-6 noise moves the input gradient by 0.5% of its largest value. Here one such element
    moves conv1's weight gradient by 4.9% of its largest value in one of the four float32 runs
    (cosine 0.99995); the others agree to 1e-5. A wrong layout or statistic gives a cosine far
    below 0.999."""
    torchvision = pytest.importorskip("torchvision")
    import normswap

    monkeypatch.setattr(fused, "MIN_ELEMENTS", 1 << 12)      # the 2x2 stages too
    torch.manual_seed(0)
    model = normswap.swap(torchvision.models.resnet18(num_classes=10), method).train()
    x = torch.randn(4, 3, 64, 64)
    y = torch.randint(0, 10, (4,))

    def run(dtype: torch.dtype, on: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(fused, "_ENABLED", on)
        m = copy.deepcopy(model).to(dtype).to(memory_format=fmt)
        xx = x.to(dtype).clone().contiguous(memory_format=fmt).requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(m(xx), y)
        loss.backward()
        return [loss.detach(), xx.grad] + [p.grad for p in m.parameters()]

    ref = run(torch.float64, False)
    for on in (True, False):
        got = run(torch.float32, on)
        torch.testing.assert_close(got[0].double(), ref[0], rtol=1e-5, atol=0)
        for a, b in zip(got[1:], ref[1:]):
            cos = torch.nn.functional.cosine_similarity(a.double().flatten(), b.flatten(), dim=0)
            assert cos.item() >= 0.9999, (on, tuple(b.shape), cos.item())


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_shapes_layouts_and_k_agree_with_the_native_passes(kernels, monkeypatch, data
                                                                  ) -> None:
    """Hypothesis: any (N, C, *) shape, layout, dtype and k (N = 1, C = 1, one position, k = n
    included): the layers with the library give the native passes' forward, the same scale
    and, away from elements tied at the k-th value, the same input gradient."""
    dims = data.draw(st.integers(0, 3), label="spatial dims")
    N = data.draw(st.integers(1, 9), label="N")
    C = data.draw(st.integers(1, 19), label="C")
    spatial = [data.draw(st.integers(1, 7), label=f"s{i}") for i in range(dims)]
    shape = (N, C, *spatial)
    n = N * math.prod(spatial)
    if n < 2:
        return
    fmt = torch.contiguous_format
    if dims in (2, 3) and data.draw(st.booleans(), label="channels_last"):
        fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    layer = data.draw(st.sampled_from(["l1", "linf"]), label="layer")
    k = data.draw(st.integers(1, min(n, 12)), label="k")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    x = _input(shape, fmt, dtype, seed=seed)
    g = _input(shape, fmt, dtype, seed=seed + 1, shift=0.0)
    results = []
    for on in (True, False):
        monkeypatch.setattr(fused, "_ENABLED", on)
        xx = x.clone().requires_grad_(True)
        if layer == "l1":
            y, mu, s_raw = F.l1_batch_norm(xx)
        else:
            y, mu, s_raw = F.linf_batch_norm(xx, k=k)
        y.backward(g)
        results.append((y.detach().double(), s_raw.double(), xx.grad.double()))
    (y1, s1, g1), (y0, s0, g0) = results
    # a channel whose spread is tiny next to its values (two nearly equal elements) is
    # ill-conditioned for both paths alike: x - mu loses its digits to the mean's rounding
    assume(s0.min().item() > 1e-3 * x.double().abs().max().item())
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(s1, s0, rtol=tol, atol=tol)
    assert (y1 - y0).abs().max().item() <= tol * (y0.abs().max().item() + 1)
    # elements whose sign or selection may legitimately differ: within rounding of the mean
    # (L1: the sign) or of the k-th largest |x - mu| (L-inf: the tie set)
    view = (1, C) + (1,) * dims
    d = (x.double() - _per_channel(x.double()).mean(1).reshape(view)).abs()
    if layer == "l1":
        keep = d > tol * (1 + d.amax())
    else:
        kth = _per_channel(d).topk(min(k, n), dim=1).values[:, -1].reshape(view)
        keep = (d - kth).abs() > tol * (1 + kth)
    # a flip moves the per-channel constant of the gradient by O(kappa/n): compare loosely
    # (the alpha * grad term sets the rounding scale: a gradient that cancels to ~0, as for
    # n = 2, is compared at that scale)
    alpha_g = (g.double().abs().max() / s0.min().clamp_min(1e-30)).item()
    scale = g0.abs().max().item()
    assert ((g1 - g0).abs()[keep] <= 0.05 * scale + tol * alpha_g).all()
