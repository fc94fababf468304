"""NormProp layers: forward against a float64 reference formula, gradcheck, constants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normswap.norms.normprop import (
    KAPPA,
    POST_RELU_SCALE,
    POST_RELU_SHIFT,
    RELU_MEAN,
    RELU_STD,
    NormPropConv1d,
    NormPropConv2d,
    NormPropConv3d,
    NormPropCorrection,
    NormPropLinear,
    normprop_correction,
)


def _randomise(layer: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=layer.weight.dtype))
        layer.gamma.copy_(torch.rand(layer.gamma.shape, generator=g, dtype=layer.gamma.dtype) + 0.5)
        layer.beta.copy_(torch.randn(layer.beta.shape, generator=g, dtype=layer.beta.dtype))


def _reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Direct float64 formula: gamma_i * (W_i * x) / (kappa * ||W_i||) + beta_i, unit by unit."""
    w = layer.weight.detach().double()
    x = x.double()
    norms = torch.stack([torch.sqrt((w[i] ** 2).sum()) for i in range(w.shape[0])])
    if isinstance(layer, NormPropLinear):
        raw = x @ w.t()
        return layer.gamma.double() * raw / (layer.kappa * norms) + layer.beta.double()
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
    padded = F.pad(x, layer.padding, value=layer.padding_value) if any(layer.padding) else x
    raw = conv(padded, w, None, layer.stride, 0, layer.dilation, layer.groups)
    shape = [1, -1] + [1] * (raw.dim() - 2)
    g = layer.gamma.detach().double().reshape(shape)
    b = layer.beta.detach().double().reshape(shape)
    return g * raw / (layer.kappa * norms.reshape(shape)) + b


LAYERS = {
    "linear": (lambda: NormPropLinear(6, 5), (4, 6)),
    "conv1d": (lambda: NormPropConv1d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 9)),
    "conv2d": (lambda: NormPropConv2d(3, 4, 3, padding=1, padding_value=-0.7), (1, 3, 5, 4)),
    "conv2d_dil": (lambda: NormPropConv2d(4, 4, (3, 1), padding=(2, 0), dilation=(2, 1),
                                          groups=4), (1, 4, 6, 3)),
    "conv3d": (lambda: NormPropConv3d(2, 3, 2, padding=1), (1, 2, 2, 3, 2)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_forward_matches_reference_formula(name: str) -> None:
    make, shape = LAYERS[name]
    layer = make()
    _randomise(layer)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out = layer(x)
    torch.testing.assert_close(out.double(), _reference(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_same_forward_in_train_and_eval(name: str) -> None:
    make, shape = LAYERS[name]
    layer = make()
    _randomise(layer)
    x = torch.randn(shape)
    train_out = layer.train()(x)
    eval_out = layer.eval()(x)
    torch.testing.assert_close(train_out, eval_out, rtol=0, atol=0)
    assert len(list(layer.buffers())) == 0


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_gradcheck(name: str) -> None:
    make, shape = LAYERS[name]
    layer = make().double()
    _randomise(layer, seed=3)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def fn(inp: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor,
           beta: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, {"weight": weight, "gamma": gamma,
                                                  "beta": beta}, (inp,))

    params = [layer.weight.detach().clone().requires_grad_(),
              layer.gamma.detach().clone().requires_grad_(),
              layer.beta.detach().clone().requires_grad_()]
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


def test_gradient_flows_through_the_weight_norm() -> None:
    # The output is invariant to rescaling W_i, so d(loss)/dW_i must be orthogonal to W_i.
    # With a detached norm it would not be.
    layer = NormPropConv2d(3, 5, 3, padding=1).double()
    _randomise(layer, seed=5)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    grad = layer.weight.grad
    assert grad is not None and grad.abs().max() > 0
    dots = (grad * layer.weight.detach()).flatten(1).sum(1)
    torch.testing.assert_close(dots, torch.zeros_like(dots), atol=1e-9, rtol=0)


def test_constants_and_precedence_bug() -> None:
    assert RELU_MEAN == pytest.approx(0.3989422804014327, abs=1e-15)
    assert RELU_STD == pytest.approx(0.5838193701035489, abs=1e-15)
    assert POST_RELU_SCALE == pytest.approx(1.712858550449663, abs=1e-12)
    assert POST_RELU_SHIFT == pytest.approx(-0.683331696121481, abs=1e-12)
    assert RELU_MEAN != pytest.approx(math.sqrt(1 / 2 * math.pi))  # the third-party bug: 1.2533
    assert KAPPA == 1.21


def test_correction_standardises_rectified_gaussian() -> None:
    g = torch.Generator().manual_seed(0)
    r = torch.relu(torch.randn(400_000, generator=g, dtype=torch.float64))
    o = NormPropCorrection()(r)
    assert abs(o.mean().item()) < 5e-3
    assert abs(o.var().item() - 1.0) < 1e-2
    torch.testing.assert_close(normprop_correction(r), POST_RELU_SCALE * r + POST_RELU_SHIFT)


def test_zero_filter_gives_beta_not_nan() -> None:
    layer = NormPropLinear(3, 2)
    with torch.no_grad():
        layer.weight[0].zero_()
        layer.beta.fill_(0.25)
    out = layer(torch.randn(4, 3))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 0], torch.full((4,), 0.25))


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="kappa"):
        NormPropLinear(2, 2, kappa=0.0)
    with pytest.raises(ValueError, match="groups"):
        NormPropConv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode"):
        NormPropConv2d(2, 2, 3, padding_mode="bogus")


def test_reflect_padding_mode() -> None:
    layer = NormPropConv2d(2, 3, 3, padding=1, padding_mode="reflect")
    _randomise(layer)
    x = torch.randn(1, 2, 5, 5)
    ref_conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", bias=False)
    with torch.no_grad():
        ref_conv.weight.copy_(layer.effective_weight())
    expected = ref_conv(x) + layer.beta.reshape(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
