"""Bounded weight norm (parametrization) and mean-only BatchNorm against float64 reference
formulas, gradcheck, PyTorch's momentum conventions and the grouped ConvTranspose layout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from normswap.norms.bwn import (
    BoundedWeightNorm,
    MeanOnlyBatchNorm,
    MeanOnlyBatchNorm1d,
    MeanOnlyBatchNorm2d,
    MeanOnlyBatchNorm3d,
    apply_bounded_weight_norm,
    channel_norms,
    scale_channels,
    weight_layout,
)

# (layer factory, input shape): every layout, grouped ConvTranspose included
LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (3, 6)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, groups=2), (2, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 5, 3), (2, 3, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 2), (2, 2, 4, 4, 4)),
    "convT1d": (lambda: nn.ConvTranspose1d(6, 9, 3, groups=3), (2, 6, 5)),
    "convT2d": (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2, stride=2), (2, 4, 4, 4)),
    "convT3d": (lambda: nn.ConvTranspose3d(4, 6, 2, groups=2), (1, 4, 3, 3, 3)),
}
MODES = ["none", "bounded", "free"]


def _output_channel_slices(w: Tensor, layer: nn.Module) -> list[Tensor]:
    """Each output channel's weights, found by the layer's definition (a loop, no reshapes)."""
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        g, per_in, per_out = layer.groups, w.shape[0] // layer.groups, w.shape[1]
        return [w[(c // per_out) * per_in:(c // per_out + 1) * per_in, c % per_out]
                for c in range(per_out * g)]
    return [w[c] for c in range(w.shape[0])]


def _reference_weight(v: Tensor, layer: nn.Module, rho: float, gain: Tensor | None,
                      mode: str) -> Tensor:
    """float64 ``w_c = ρ·m_c·v_c/‖v_c‖`` channel by channel, written from the definition."""
    v = v.double()
    w = torch.empty_like(v)
    out = _output_channel_slices(w, layer)
    ins = _output_channel_slices(v, layer)
    c_total = len(ins)
    for c, (dst, src) in enumerate(zip(out, ins)):
        if mode == "none":
            m = 1.0
        elif mode == "free":
            m = float(gain[c])
        else:
            m = math.sqrt(c_total) * float(gain[c]) / float(gain.double().norm())
        dst.copy_(rho * m * src / src.norm())
    return w


def _random_gain(c: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(c, generator=g) + 0.3) * torch.where(torch.rand(c, generator=g) < 0.3,
                                                            -1.0, 1.0)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layout_is_the_output_channels(kind: str) -> None:
    """Scaling "channel c" of the weight scales output channel c of the layer (dim 1 of its
    output): the grouped ConvTranspose layout is right."""
    make, shape = LAYERS[kind]
    torch.manual_seed(7)
    layer = make().double()
    nn.init.zeros_(layer.bias)
    x = torch.randn(*shape, dtype=torch.float64)
    ref = layer(x)
    dim, groups = weight_layout(layer)
    factor = torch.randn(ref.shape[1], dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(scale_channels(layer.weight, factor, dim, groups))
    torch.testing.assert_close(layer(x), ref * _view(factor, ref))
    assert channel_norms(layer.weight, dim, groups).numel() == ref.shape[1]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_parametrization_matches_reference(kind: str, mode: str) -> None:
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = make().double()
    dim, groups = weight_layout(layer)
    v = layer.weight.detach().clone()
    c = channel_norms(v, dim, groups).numel()
    p = BoundedWeightNorm(0.7, c, dim=dim, learn_gain=mode, groups=groups, dtype=torch.float64)
    gain = None
    if p.gain is not None:
        gain = _random_gain(c).double()  # signed: negative magnitudes must work
        with torch.no_grad():
            p.gain.copy_(gain)
    expected = _reference_weight(v, layer, 0.7, gain, mode)
    torch.testing.assert_close(p(v), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p.exact_value(v), expected, rtol=1e-12, atol=1e-12)
    parametrize.register_parametrization(layer, "weight", p)
    x = torch.randn(*shape, dtype=torch.float64)
    plain = make().double()
    plain.load_state_dict({"weight": expected, "bias": layer.bias.detach()})
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["linear", "conv2d", "convT2d", "convT3d"])
def test_parametrization_gradcheck(kind: str, mode: str) -> None:
    make, _ = LAYERS[kind]
    torch.manual_seed(1)
    layer = make().double()
    dim, groups = weight_layout(layer)
    c = channel_norms(layer.weight, dim, groups).numel()
    p = BoundedWeightNorm(1.3, c, dim=dim, learn_gain=mode, groups=groups, dtype=torch.float64)
    v = layer.weight.detach().clone().requires_grad_()
    if p.gain is None:
        assert torch.autograd.gradcheck(lambda v_: p(v_), (v,))
        return
    g = _random_gain(c).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda v_, g_: functional_call(p, {"gain": g_}, (v_,)), (v, g))


@pytest.mark.parametrize("kind", ["conv1d", "convT1d", "convT2d", "linear"])
def test_norm_bounds(kind: str) -> None:
    """No gain: every output channel has norm ρ; bounded gain: ‖w‖_F = ρ·sqrt(C)."""
    make, _ = LAYERS[kind]
    for mode in ("none", "bounded"):
        layer = apply_bounded_weight_norm(make(), rho=0.6, learn_gain=mode)
        if mode == "bounded":
            with torch.no_grad():
                layer.parametrizations.weight[0].gain.uniform_(-2.0, 2.0)
        dim, groups = weight_layout(layer)
        w = layer.weight.detach().double()
        norms = channel_norms(w, dim, groups)
        if mode == "none":
            torch.testing.assert_close(norms, torch.full_like(norms, 0.6))
        else:
            torch.testing.assert_close(w.norm(), torch.tensor(0.6 * math.sqrt(norms.numel()),
                                                              dtype=torch.float64))


@pytest.mark.parametrize("mode", ["bounded", "free"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_apply_keeps_the_current_weight_and_folds(kind: str, mode: str) -> None:
    make, shape = LAYERS[kind]
    torch.manual_seed(2)
    layer = make()
    before = layer.weight.detach().clone()
    x = torch.randn(*shape)
    ref = layer(x).detach()
    apply_bounded_weight_norm(layer, learn_gain=mode)
    assert parametrize.is_parametrized(layer, "weight")
    torch.testing.assert_close(layer.weight, before, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)
    # it composes with PyTorch: removing the parametrization leaves the same plain weight
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    assert not parametrize.is_parametrized(layer)
    torch.testing.assert_close(layer.weight.detach(), before, rtol=1e-6, atol=1e-7)


def test_training_reaches_direction_and_gain() -> None:
    layer = apply_bounded_weight_norm(nn.ConvTranspose2d(4, 6, 3, groups=2), learn_gain="free")
    layer(torch.randn(2, 4, 5, 5)).square().mean().backward()
    plist = layer.parametrizations.weight
    assert plist.original.grad is not None and plist.original.grad.abs().sum() > 0
    assert plist[0].gain.grad is not None and plist[0].gain.grad.abs().sum() > 0
    assert plist[0].rho.requires_grad is False  # rho is a fixed buffer
    keys = set(layer.state_dict())
    assert {"parametrizations.weight.original", "parametrizations.weight.0.gain",
            "parametrizations.weight.0.rho"} <= keys


def test_fp16_direction_does_not_overflow() -> None:
    """‖v‖² of |v| ~ 300 is beyond fp16's range; the norm is computed in float32."""
    torch.manual_seed(3)
    v32 = torch.randn(8, 16, 3, 3) * 300
    p = BoundedWeightNorm(0.5, 8, learn_gain="free")
    with torch.no_grad():
        p.gain.copy_(_random_gain(8))
    ref = p(v32)
    out = p.half()(v32.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3)


def test_nan_reasons_and_bad_arguments() -> None:
    v = torch.randn(4, 3)
    v[2] = 0
    p = BoundedWeightNorm(1.0, 4, learn_gain="bounded")
    assert "zero norm in slice(s) [2]" in str(p.nan_reason(v))
    with torch.no_grad():
        p.gain.zero_()
    assert "gain g has zero norm" in str(p.nan_reason(torch.randn(4, 3)))
    assert BoundedWeightNorm(1.0, 4, learn_gain="free").nan_reason(torch.randn(4, 3)) is None
    with pytest.raises(ValueError, match="rho"):
        BoundedWeightNorm(float("nan"), 4)
    with pytest.raises(ValueError, match="learn_gain"):
        BoundedWeightNorm(1.0, 4, learn_gain="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="groups"):
        BoundedWeightNorm(1.0, 5, dim=1, groups=2)
    with pytest.raises(ValueError, match="got a weight of shape"):
        BoundedWeightNorm(1.0, 5)(torch.randn(4, 3))
    with pytest.raises(TypeError, match="pass dim"):
        weight_layout(nn.ReLU())


# -- mean-only BN -----------------------------------------------------------------------------
MEAN_ONLY = [
    (MeanOnlyBatchNorm1d, (8, 5)),
    (MeanOnlyBatchNorm1d, (4, 5, 7)),
    (MeanOnlyBatchNorm2d, (4, 5, 3, 3)),
    (MeanOnlyBatchNorm3d, (2, 5, 2, 3, 3)),
    (MeanOnlyBatchNorm, (3, 5, 2, 2, 2, 2)),
]


def _batch_mean(x: Tensor) -> Tensor:
    """float64 per-channel mean over every dim but 1 (the reference)."""
    return x.double().transpose(0, 1).reshape(x.shape[1], -1).mean(dim=1)


def _view(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape([1, -1] + [1] * (x.dim() - 2))


@pytest.mark.parametrize("cls, shape", MEAN_ONLY)
def test_mean_only_train_and_eval_match_reference(cls: type[MeanOnlyBatchNorm],
                                                  shape: tuple[int, ...]) -> None:
    torch.manual_seed(4)
    m = cls(5, momentum=0.3)
    with torch.no_grad():
        m.bias.normal_()
        m.running_mean.normal_()
    r0 = m.running_mean.clone().double()
    x = torch.randn(*shape) * 3 + 2
    y = m(x)
    mean = _batch_mean(x)
    torch.testing.assert_close(y.double(), x.double() - _view(mean, x) + _view(m.bias.double(), x),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.running_mean.double(), 0.7 * r0 + 0.3 * mean,
                               rtol=1e-6, atol=1e-6)
    assert int(m.num_batches_tracked) == 1
    m.eval()
    x2 = torch.randn(*shape)
    torch.testing.assert_close(m(x2).double(), x2.double() - _view(m.running_mean.double(), x2)
                               + _view(m.bias.double(), x2), rtol=1e-6, atol=1e-6)
    assert int(m.num_batches_tracked) == 1  # eval does not count


def test_mean_only_running_mean_follows_batchnorm_conventions() -> None:
    """The same running_mean as nn.BatchNorm2d, for momentum 0.1 and momentum=None
    (cumulative average over num_batches_tracked)."""
    torch.manual_seed(5)
    for momentum in (0.1, None):
        ours, bn = MeanOnlyBatchNorm2d(3, momentum=momentum), nn.BatchNorm2d(3, momentum=momentum)
        batches = [torch.randn(4, 3, 5, 5) * (i + 1) + i for i in range(5)]
        for x in batches:
            ours(x)
            bn(x)
        torch.testing.assert_close(ours.running_mean, bn.running_mean)
        assert int(ours.num_batches_tracked) == int(bn.num_batches_tracked) == 5
    cumulative = MeanOnlyBatchNorm2d(3, momentum=None)
    for x in batches:
        cumulative(x)
    expected = torch.stack([_batch_mean(x) for x in batches]).mean(0)
    torch.testing.assert_close(cumulative.running_mean.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls, shape", MEAN_ONLY[:4])
def test_mean_only_gradcheck(cls: type[MeanOnlyBatchNorm], shape: tuple[int, ...]) -> None:
    torch.manual_seed(6)
    m = cls(5, dtype=torch.float64)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    running = m.running_mean.clone()

    def train_forward(x_: Tensor, b_: Tensor) -> Tensor:
        return functional_call(m, {"bias": b_, "running_mean": running.clone()}, (x_,))

    assert torch.autograd.gradcheck(train_forward, (x, bias))
    # and the analytic gradient is the reference one: dx = g - mean_c(g), dbias = sum_c(g)
    g = torch.randn(*shape, dtype=torch.float64)
    dx, db = torch.autograd.grad(train_forward(x, bias), (x, bias), g)
    torch.testing.assert_close(dx, g - _view(_batch_mean(g), g))
    torch.testing.assert_close(db, g.transpose(0, 1).reshape(5, -1).sum(1))
    m.eval()
    assert torch.autograd.gradcheck(lambda x_, b_: functional_call(m, {"bias": b_}, (x_,)),
                                    (x, bias))


def test_mean_only_options_and_state() -> None:
    m = MeanOnlyBatchNorm2d(4, affine=False)
    assert m.bias is None and m.weight is None
    assert set(m.state_dict()) == {"running_mean", "num_batches_tracked"}
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(m(x), x - x.mean(dim=(0, 2, 3), keepdim=True))
    no_stats = MeanOnlyBatchNorm2d(4, track_running_stats=False).eval()
    assert no_stats.running_mean is None
    torch.testing.assert_close(no_stats(x), x - x.mean(dim=(0, 2, 3), keepdim=True))
    with pytest.raises(ValueError, match="no running statistics"):
        no_stats.eval_scale_shift()
    frozen = MeanOnlyBatchNorm2d(4)
    frozen.frozen = True
    with torch.no_grad():
        frozen.running_mean.fill_(0.5)
    torch.testing.assert_close(frozen.train()(x), x - 0.5)  # frozen: running stats, no update
    assert int(frozen.num_batches_tracked) == 0
    with pytest.raises(ValueError, match="MeanOnlyBatchNorm2d expected 4D input"):
        MeanOnlyBatchNorm2d(4)(torch.randn(3, 4))
    with pytest.raises(ValueError, match="expected 4 channels"):
        MeanOnlyBatchNorm1d(4)(torch.randn(3, 5))
    # old checkpoints without num_batches_tracked still load (as for BatchNorm)
    fresh = MeanOnlyBatchNorm2d(4)
    fresh.load_state_dict({"running_mean": torch.ones(4), "bias": torch.zeros(4)})
    torch.testing.assert_close(fresh.running_mean, torch.ones(4))
    fresh.reset_parameters()
    assert float(fresh.running_mean.abs().sum()) == 0.0
    assert "momentum=0.1" in repr(fresh)


def test_mean_only_eval_scale_shift_and_fp16() -> None:
    m = MeanOnlyBatchNorm2d(3)
    with torch.no_grad():
        m.bias.copy_(torch.tensor([1.0, -2.0, 0.5]))
        m.running_mean.copy_(torch.tensor([0.25, 3.0, -1.0]))
    scale, shift = m.eval_scale_shift()
    assert scale.dtype == torch.float64
    torch.testing.assert_close(scale, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(shift, torch.tensor([0.75, -5.0, 1.5], dtype=torch.float64))
    # fp16 activations of magnitude ~1e4: the batch mean accumulates in float32, stays finite
    x = (torch.randn(64, 3, 8, 8) * 3000 + 10000).half()
    y = m.half().train()(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    ref = x.double() - _view(_batch_mean(x), x) + _view(m.bias.double(), x)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=16.0)  # fp16 spacing at 1e4 is 8
    assert torch.isfinite(m.running_mean).all()
