"""The pure tensor maths of the passes, tested alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normswap.passes._math import (
    activation_moments,
    fold_bn_into_weights,
    norm_scale_shift,
    relu_moments,
)

M = torch.tensor([-2.0, -0.5, 0.0, 0.7, 3.0], dtype=torch.float64)
V = torch.tensor([0.1, 1.0, 2.0, 0.5, 4.0], dtype=torch.float64)


def test_activation_moments_match_the_closed_form_for_relu() -> None:
    em, ev = activation_moments(M, V, F.relu)
    rm, rv = relu_moments(M, V)
    assert (em - rm).abs().max() < 3e-3 * V.sqrt().max()
    assert ((ev - rv).abs() / V).max() < 5e-3


@pytest.mark.parametrize("fn", [F.silu, F.gelu, torch.sigmoid, torch.tanh, F.hardswish,
                                F.relu6, lambda x: F.leaky_relu(x, 0.1)])
def test_activation_moments_match_monte_carlo(fn: object) -> None:
    g = torch.Generator().manual_seed(0)
    x = M + V.sqrt() * torch.randn(400_000, 5, generator=g, dtype=torch.float64)
    y = fn(x)  # type: ignore[operator]
    em, ev = activation_moments(M, V, fn)  # type: ignore[arg-type]
    sd = y.std(0)
    assert ((em - y.mean(0)).abs() / sd.clamp_min(1e-3)).max() < 0.01
    assert ((ev - y.var(0)).abs() / y.var(0).clamp_min(1e-4)).max() < 0.03


def test_activation_moments_gradcheck() -> None:
    m = M.clone().requires_grad_()
    v = V.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: activation_moments(a, b, F.silu), (m, v))


def test_fold_matches_bn_after_conv() -> None:
    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(3, 4, 3).double()
    bn = torch.nn.BatchNorm2d(4).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_(generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
        bn.weight.normal_(generator=g)
        bn.bias.normal_(generator=g)
    s, t = norm_scale_shift(bn)
    w, b = fold_bn_into_weights(conv.weight, conv.bias, s, t)
    x = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(F.conv2d(x, w, b), bn(conv(x)))
