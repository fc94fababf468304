"""Tests for normswap.norms.kalman: train forward vs a float64 reference, gradients, running
statistics, eval-exact conversion from BatchNorm, fp16 input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from normswap.norms.kalman import (
    AUTO_GAIN_BATCH_THRESHOLD,
    GAIN_LARGE_BATCH,
    GAIN_MICRO_BATCH,
    KalmanBatchNorm,
    KalmanBatchNorm1d,
    KalmanBatchNorm2d,
    KalmanBatchNorm3d,
    kalman_from_batchnorm,
    kalman_moments,
    set_kalman_gain,
)

SHAPES = {1: (5, 3, 4), 2: (3, 3, 4, 5), 3: (2, 3, 3, 4, 2)}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
KBN = {1: KalmanBatchNorm1d, 2: KalmanBatchNorm2d, 3: KalmanBatchNorm3d}


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               prior: tuple[torch.Tensor, torch.Tensor] | None, p: float,
               ratio: float = 100.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct float64 formula (docs/layers.md, Kalman); returns (y, mean, var)."""
    x = x.double()
    dims = [0, *range(2, x.dim())]
    xbar = x.mean(dims)
    s = ((x - xbar.reshape(1, -1, *[1] * (x.dim() - 2))) ** 2).mean(dims)
    mean, var = xbar, s
    if prior is not None:
        mp, vp = prior[0].double(), prior[1].double()
        if (vp / s).mean() < ratio:
            mean = p * mp + (1 - p) * xbar
            var = p * vp + (1 - p) * s + p * (1 - p) * (xbar - mp) ** 2
    shape = (1, -1, *[1] * (x.dim() - 2))
    y = (weight.double().reshape(shape) * (x - mean.reshape(shape))
         / torch.sqrt(var.reshape(shape) + eps) + bias.double().reshape(shape))
    return y, mean, var


def _randomise(module: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random affine parameters and running statistics (a fresh BN is nearly the identity)."""
    with torch.no_grad():
        c = module.running_mean.numel()
        if getattr(module, "weight", None) is not None:
            module.weight.copy_(torch.rand(c, generator=gen) * 2 + 0.2)
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(torch.randn(c, generator=gen))
        module.running_mean.copy_(torch.randn(c, generator=gen) * 3)
        module.running_var.copy_(torch.rand(c, generator=gen) * 5 + 0.01)
    return module


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("with_prior", [False, True])
def test_train_forward_matches_reference(nd: int, with_prior: bool) -> None:
    gen = torch.Generator().manual_seed(nd)
    x = torch.randn(*SHAPES[nd], generator=gen, dtype=torch.float64) * 2 + 1
    layer = KBN[nd](3, gain=0.7).double().train()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(3, generator=gen) + 0.5)
        layer.bias.copy_(torch.randn(3, generator=gen))
    prior = (torch.randn(3, generator=gen, dtype=torch.float64),
             torch.rand(3, generator=gen, dtype=torch.float64) * 3 + 0.1) if with_prior else None
    y, (mean, var) = layer.forward_with_stats(x, prior)
    y_ref, mean_ref, var_ref = _reference(x, layer.weight, layer.bias, layer.eps, prior, 0.7)
    assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert_close(mean, mean_ref, rtol=1e-12, atol=1e-12)
    assert_close(var, var_ref, rtol=1e-12, atol=1e-12)
    if not with_prior:  # no prior: plain BatchNorm, forward and running statistics
        bn = BN[nd](3).double().train()
        bn.load_state_dict(KBN[nd](3).double().state_dict())
        with torch.no_grad():
            bn.weight.copy_(layer.weight)
            bn.bias.copy_(layer.bias)
        assert_close(y, bn(x), rtol=1e-10, atol=1e-10)
        assert_close(layer.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
        assert_close(layer.running_var, bn.running_var, rtol=1e-12, atol=1e-12)


def test_fallback_rule() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    dims = [0, 2, 3]
    s = x.var(dims, unbiased=False)
    layer = KalmanBatchNorm2d(3, gain=0.9).double()
    plain, _ = layer.forward_with_stats(x)
    # mean(var_p / S) exactly at the ratio -> fall back to the batch moments (plain BN).
    at_ratio = (torch.zeros(3, dtype=torch.float64), s * 100.0)
    y_fb, (mean_fb, var_fb) = layer.forward_with_stats(x, at_ratio)
    assert_close(y_fb, plain, rtol=0, atol=0)
    assert_close(var_fb, s, rtol=1e-12, atol=0)
    # just below the ratio -> the prior is used.
    below = (torch.zeros(3, dtype=torch.float64), s * 99.0)
    _, (_, var_used) = layer.forward_with_stats(x, below)
    assert torch.all(var_used > 50 * s)
    # a custom ratio moves the threshold; a non-finite ratio falls back.
    m, v = kalman_moments(s * 0 + 1, s, s * 0, s * 5.0, 0.5, fallback_ratio=4.0)
    assert_close(v, s)
    m, v = kalman_moments(s * 0 + 1, s * 0, s * 0, s, 0.5)
    assert_close(v, s * 0)


def test_gradcheck_input_affine_and_prior() -> None:
    gen = torch.Generator().manual_seed(1)
    layer = KalmanBatchNorm2d(2, gain=0.6).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.3, 0.7]))
        layer.bias.copy_(torch.tensor([0.2, -0.4]))
    x = torch.randn(2, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    pm = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)
    pv = (torch.rand(2, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, pm: torch.Tensor,
           pv: torch.Tensor) -> torch.Tensor:
        y, (mean, var) = torch.func.functional_call(
            layer, {"weight": w, "bias": b}, (x,), {"prior": (pm, pv), "return_stats": True})
        return torch.cat([y.reshape(-1), mean, var])

    assert torch.autograd.gradcheck(fn, (x, w, b, pm, pv), eps=1e-6, atol=1e-6)
    # gradients do reach the prior (no detach)
    y = torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,), {"prior": (pm, pv)})
    (y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    assert pm.grad is not None and pm.grad.abs().sum() > 0
    assert pv.grad is not None and pv.grad.abs().sum() > 0


def test_running_stats_track_combined_moments() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) * 3
    prior = (torch.full((3,), 0.5, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64))
    layer = KalmanBatchNorm2d(3, momentum=0.1).double()
    _, (mean, var) = layer.forward_with_stats(x, prior)
    n = 2 * 4 * 4
    assert_close(layer.running_mean, 0.1 * mean, rtol=1e-12, atol=1e-12)
    assert_close(layer.running_var, 0.9 + 0.1 * var * n / (n - 1), rtol=1e-12, atol=1e-12)
    assert int(layer.num_batches_tracked) == 1
    # momentum=None: cumulative average of the combined moments
    cum = KalmanBatchNorm2d(3, momentum=None).double()
    x2 = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    _, (m1, v1) = cum.forward_with_stats(x, prior)
    _, (m2, v2) = cum.forward_with_stats(x2, prior)
    assert_close(cum.running_mean, (m1 + m2) / 2, rtol=1e-12, atol=1e-12)
    assert_close(cum.running_var, (v1 + v2) / 2 * n / (n - 1), rtol=1e-12, atol=1e-12)
    assert int(cum.num_batches_tracked) == 2


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("affine", [True, False])
def test_eval_equivalence_from_batchnorm(nd: int, affine: bool) -> None:
    gen = torch.Generator().manual_seed(10 + nd)
    bn = _randomise(BN[nd](3, eps=1e-3, momentum=0.3, affine=affine), gen).eval()
    with torch.no_grad():
        bn.num_batches_tracked.fill_(7)
    layer = kalman_from_batchnorm(bn, gain=0.5)
    assert type(layer) is KBN[nd] and not layer.training
    x = torch.randn(*SHAPES[nd], generator=gen) * 4 + 2
    prior = (torch.randn(3), torch.rand(3) + 0.1)
    assert torch.equal(layer(x), bn(x))
    assert torch.equal(layer(x, prior), bn(x))  # priors unused in eval
    assert layer.eps == 1e-3 and layer.momentum == 0.3 and int(layer.num_batches_tracked) == 7
    # a BatchNorm state_dict loads as is (strict), and back
    fresh = KBN[nd](3, eps=1e-3, affine=affine).eval()
    fresh.load_state_dict(bn.state_dict())
    assert torch.equal(fresh(x), bn(x))
    bn2 = BN[nd](3, eps=1e-3, affine=affine).eval()
    bn2.load_state_dict(layer.state_dict())
    assert torch.equal(bn2(x), bn(x))
    back = layer.to_batchnorm()
    assert type(back) is BN[nd] and torch.equal(back(x), bn(x))
    scale, shift = layer.eval_scale_shift()
    shape = (1, -1, *[1] * (x.dim() - 2))
    assert scale.dtype == torch.float64
    assert_close(x.double() * scale.reshape(shape) + shift.reshape(shape), bn(x).double(),
                 rtol=1e-5, atol=1e-5)


def test_from_batchnorm_variants() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 5, 5, generator=gen) * 2
    # SyncBatchNorm -> generic class (works without a process group)
    sync = _randomise(nn.SyncBatchNorm(4), gen).eval()
    k = kalman_from_batchnorm(sync)
    assert type(k) is KalmanBatchNorm and torch.equal(k(x), sync(x))
    assert type(k.to_batchnorm()) is nn.SyncBatchNorm
    # track_running_stats=False: batch statistics in eval too, like BN
    nostats = nn.BatchNorm2d(4, track_running_stats=False).eval()
    k = kalman_from_batchnorm(nostats)
    assert k.running_mean is None
    assert_close(k(x), nostats(x))
    with pytest.raises(ValueError, match="no running statistics"):
        k.eval_scale_shift()

    # subclass of BatchNorm2d -> KalmanBatchNorm2d
    class MyBN(nn.BatchNorm2d):
        pass

    sub = _randomise(MyBN(4), gen).eval()
    k = kalman_from_batchnorm(sub)
    assert type(k) is KalmanBatchNorm2d and torch.equal(k(x), sub(x))
    # affine weight without bias (BatchNorm's bias=False)
    nobias = _randomise(nn.BatchNorm2d(4, bias=False), gen).eval()
    k = kalman_from_batchnorm(nobias)
    assert k.bias is None and torch.equal(k(x), nobias(x))
    assert k.to_batchnorm().bias is None
    y, _ = k.train().forward_with_stats(x, (torch.zeros(4), torch.ones(4)))
    assert torch.isfinite(y).all()
    # requires_grad flags are kept
    sub.weight.requires_grad_(False)
    assert not kalman_from_batchnorm(sub).weight.requires_grad


def test_frozen_batchnorm() -> None:
    torchvision = pytest.importorskip("torchvision")
    gen = torch.Generator().manual_seed(4)
    fbn = _randomise(torchvision.ops.misc.FrozenBatchNorm2d(4, eps=1e-4), gen)
    x = torch.randn(2, 4, 3, 3, generator=gen) * 3
    k = kalman_from_batchnorm(fbn).train()
    assert type(k) is KalmanBatchNorm2d and k.frozen and not k.weight.requires_grad
    assert_close(k(x), fbn(x), rtol=1e-5, atol=1e-5)
    # frozen: running stats in train mode, no update, prior ignored, stats = running stats
    before = k.running_mean.clone()
    y, stats = k.forward_with_stats(x, (torch.randn(4), torch.rand(4) + 1))
    assert_close(y, fbn(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(k.running_mean, before)
    assert stats is not None and torch.equal(stats[0], k.running_mean)
    back = k.to_batchnorm()
    assert type(back) is torchvision.ops.misc.FrozenBatchNorm2d
    assert torch.equal(back(x), fbn(x))
    sd = fbn.state_dict()
    fresh = KalmanBatchNorm2d(4, eps=1e-4)
    fresh.load_state_dict(sd)  # missing num_batches_tracked is filled in (BN versioning)
    assert_close(fresh.eval()(x), fbn(x), rtol=1e-5, atol=1e-5)


def test_fp16_input_stays_finite() -> None:
    gen = torch.Generator().manual_seed(5)
    x32 = torch.randn(2, 3, 16, 16, generator=gen) * 300 + 50  # d**2 overflows fp16 past 256
    x16 = x32.half()
    layer = KalmanBatchNorm2d(3).train()
    prior = (torch.full((3,), 50.0), torch.full((3,), 9e4))
    y16, (mean, var) = layer.forward_with_stats(x16, prior)
    assert y16.dtype == torch.float16 and torch.isfinite(y16).all()
    assert mean.dtype == torch.float32 and torch.isfinite(var).all()
    ref, _ = KalmanBatchNorm2d(3).train().forward_with_stats(x16.float(), prior)
    assert_close(y16.float(), ref, rtol=2e-3, atol=2e-3)
    assert torch.isfinite(layer.running_var).all()
    half_layer = KalmanBatchNorm2d(3).half().train()
    assert torch.isfinite(half_layer(x16, prior)).all()


def test_input_dim_and_prior_errors() -> None:
    with pytest.raises(ValueError, match="KalmanBatchNorm2d expected 4D input"):
        KalmanBatchNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="KalmanBatchNorm1d expected 2D or 3D"):
        KalmanBatchNorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="KalmanBatchNorm3d expected 5D"):
        KalmanBatchNorm3d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="KalmanBatchNorm expected"):
        KalmanBatchNorm(3)(torch.randn(3))
    with pytest.raises(ValueError, match="prior mean must have 3 elements"):
        KalmanBatchNorm2d(3)(torch.randn(2, 3, 2, 2), (torch.zeros(4), torch.ones(3)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        KalmanBatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(TypeError, match="unknown option"):
        kalman_from_batchnorm(nn.BatchNorm2d(3), gian=0.3)
    with pytest.raises(TypeError, match="expects a BatchNorm"):
        KalmanBatchNorm2d.from_batchnorm(nn.ReLU())


def test_gain_auto_and_setter() -> None:
    layer = KalmanBatchNorm2d(3, gain="auto")
    assert layer.gain_for(torch.zeros(AUTO_GAIN_BATCH_THRESHOLD - 1, 3, 1, 1)) == GAIN_MICRO_BATCH
    assert layer.gain_for(torch.zeros(AUTO_GAIN_BATCH_THRESHOLD, 3, 1, 1)) == GAIN_LARGE_BATCH
    model = nn.Sequential(nn.Conv2d(3, 3, 1), KalmanBatchNorm2d(3), KalmanBatchNorm2d(3))
    assert set_kalman_gain(model, 0.05) == 2
    assert all(m.gain == 0.05 for m in model if isinstance(m, KalmanBatchNorm))
    with pytest.raises(ValueError, match="gain must be"):
        set_kalman_gain(model, 1.5)
    with pytest.raises(ValueError, match="gain must be"):
        KalmanBatchNorm2d(3, gain="fast")
    # gain 0 with a prior is plain BN; gain 1 uses the prior alone
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    prior = (torch.ones(3, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64))
    zero = KalmanBatchNorm2d(3, gain=0.0).double()
    assert_close(zero(x, prior), zero(x))
    _, (m, v) = KalmanBatchNorm2d(3, gain=1.0).double().forward_with_stats(x, prior)
    assert_close(m, prior[0])
    assert_close(v, prior[1])
