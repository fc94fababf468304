"""The native-kernel passes of the L1/L-inf layers against float64 formulas."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from normswap.norms._kernels import (
    channel_affine,
    channel_mean,
    channel_sums,
    deviation_sign,
)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def _data(dtype: torch.dtype, layout: torch.memory_format, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 4, 3, 6, generator=g, dtype=torch.float64)
    x = x * torch.tensor([1e-3, 1.0, 300.0, 2e4], dtype=torch.float64).view(1, 4, 1, 1) + 7.0
    return x.to(dtype).contiguous(memory_format=layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_deviation_sign_is_exact_with_ties_and_extremes(dtype: torch.dtype,
                                                        layout: torch.memory_format) -> None:
    x = _data(dtype, layout)
    mu = channel_mean(x)
    x[0, 1, 0, :2] = mu[1].to(dtype)            # elements equal to the (rounded) mean
    mu[1] = x[0, 1, 0, 0].to(mu.dtype)          # ... and a mean that hits them exactly
    big = 1e30 if dtype in (torch.bfloat16, torch.float32, torch.float64) else 6e4
    x[1, 2, 1, 1] = big
    x[1, 2, 1, 2] = -big
    x[2, 3, 2, 3] = 0.0
    want = torch.sign(x.double() - mu.double().view(1, 4, 1, 1))
    got = deviation_sign(x, mu)
    assert got.dtype == dtype and got.stride() == x.stride()
    assert torch.equal(got.double(), want)
    assert int((got[0, 1, 0, :2] == 0).sum()) == 2
    out = torch.empty_like(x)
    assert deviation_sign(x, mu, out=out) is out and torch.equal(out, got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_channel_mean_sums_and_affine_match_float64(dtype: torch.dtype,
                                                    layout: torch.memory_format) -> None:
    x = _data(dtype, layout, seed=1)
    g = _data(dtype, layout, seed=2)
    x64, g64 = x.double(), g.double()
    dims = (0, 2, 3)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-5)
    mu = channel_mean(x)
    assert mu.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(mu.double(), x64.mean(dims), rtol=tol, atol=0)
    sum_g, sum_gd = channel_sums(g, x, mu)
    d = x64 - mu.double().view(1, 4, 1, 1)
    assert_close(sum_g.double(), g64.sum(dims), rtol=tol, atol=tol * g64.abs().sum(dims).max())
    scale = (g64.abs() * d.abs()).sum(dims)
    assert_close(sum_gd.double(), (g64 * d).sum(dims), rtol=0, atol=float(tol * scale.max()))
    a = torch.tensor([0.5, -2.0, 1e-3, 3e-5], dtype=mu.dtype)
    b = torch.tensor([1.0, 0.0, -0.5, 2.0], dtype=mu.dtype)
    y = channel_affine(x, mu, a, b)
    want = d * a.double().view(1, 4, 1, 1) + b.double().view(1, 4, 1, 1)
    out_tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3}.get(dtype, 8e-3)
    assert y.dtype == dtype and y.stride() == x.stride()
    assert_close(y.double(), want, rtol=out_tol, atol=out_tol)
    assert_close(channel_affine(g, None, a, b).double(),
                 g64 * a.double().view(1, 4, 1, 1) + b.double().view(1, 4, 1, 1),
                 rtol=out_tol, atol=out_tol)


def test_empty_batch() -> None:
    x = torch.empty(0, 3, 4)
    mu = torch.zeros(3)
    assert torch.equal(channel_sums(x, x, mu)[0], torch.zeros(3))
    assert channel_affine(x, mu, mu, mu).shape == (0, 3, 4)
    assert deviation_sign(x, mu).shape == (0, 3, 4)
