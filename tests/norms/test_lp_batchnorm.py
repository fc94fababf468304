"""L1 and L-inf/top-k batch-norm layers: math, gradients, running stats, conversion, fp16."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from normswap.errors import UnsupportedNodeError
from normswap.norms import _compile
from normswap.norms import _functional as lpf
from normswap.norms._layout import channel_view
from normswap.norms._topk import full_topk, topk_abs_deviation
from normswap.norms.lp_batchnorm import (
    C_L1,
    L1BatchNorm,
    L1BatchNorm1d,
    L1BatchNorm2d,
    L1BatchNorm3d,
    LinfBatchNorm,
    LinfBatchNorm1d,
    LinfBatchNorm2d,
    LinfBatchNorm3d,
    calibrate_linf,
    l1_from_batchnorm,
    linf_constant,
    linf_from_batchnorm,
)

from .reference import l1_reference, linf_reference

F64 = torch.float64
KS = [1, 3]


def _rand(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = F64, scale: float = 2.0,
          shift: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * scale + shift).to(dtype)


def _affine(c: int, seed: int = 1, dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(c, generator=g, dtype=F64) + 0.5).to(dtype)
    b = (torch.randn(c, generator=g, dtype=F64) * 0.3).to(dtype)
    return w, b


def _layer_fn(kind: str, k: int = 1):
    """(fast functional returning y, direct reference formula)."""
    if kind == "l1":
        return (lambda x, w, b: lpf.l1_batch_norm(x, w, b, 1e-5)[0],
                lambda x, w, b: l1_reference(x, w, b, 1e-5))
    return (lambda x, w, b: lpf.linf_batch_norm(x, w, b, 1e-5, k)[0],
            lambda x, w, b: linf_reference(x, w, b, 1e-5, k))


def _set_running(layer: nn.Module, seed: int = 3) -> None:
    """Randomise running statistics and affine parameters of an L1/Linf layer."""
    g = torch.Generator().manual_seed(seed)
    c = layer.num_features
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
        layer.running_scale.copy_(torch.rand(c, generator=g) + 0.5)
        if layer.affine:
            layer.weight.copy_(torch.rand(c, generator=g) + 0.5)
            layer.bias.copy_(torch.randn(c, generator=g) * 0.3)


def _randomize_bn(bn: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c = bn.running_mean.numel()
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
        if getattr(bn, "weight", None) is not None:
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g) * 0.3)
        if getattr(bn, "num_batches_tracked", None) is not None:
            bn.num_batches_tracked.fill_(17)
    return bn


# ---------------------------------------------------------------------------------------------
# train-mode forward and backward against the direct float64 formula
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,k", [("l1", 1), ("linf", 1), ("linf", 3), ("linf", 10_000)])
@pytest.mark.parametrize("shape,channels_last", [((6, 4, 5, 3), False), ((6, 4, 5, 3), True),
                                                 ((9, 4), False), ((3, 4, 7), False),
                                                 ((2, 4, 2, 3, 3), False)])
def test_train_forward_backward_match_reference(kind: str, k: int, shape: tuple[int, ...],
                                                channels_last: bool) -> None:
    x = _rand(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = _affine(shape[1])
    fast, ref = _layer_fn(kind, k)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    ps = [(w.clone().requires_grad_(), b.clone().requires_grad_()) for _ in range(2)]
    y = fast(xs[0], *ps[0])
    y_ref = ref(xs[1], *ps[1])
    assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    g = _rand(shape, seed=5)
    grads = torch.autograd.grad(y, [xs[0], *ps[0]], g)
    grads_ref = torch.autograd.grad(y_ref, [xs[1], *ps[1]], g)
    for got, want in zip(grads, grads_ref):
        assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_module_train_output_is_the_formula() -> None:
    x = _rand((8, 3, 4, 4), dtype=torch.float32)
    for layer, kind, k in [(L1BatchNorm2d(3), "l1", 1), (LinfBatchNorm2d(3, k=4), "linf", 4)]:
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        y = layer(x)
        want = _layer_fn(kind, k)[1](x.double(), layer.weight.double(), layer.bias.double())
        assert y.dtype == torch.float32
        assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


def test_l1_scale_constant_and_linf_constant() -> None:
    assert C_L1 == pytest.approx(1.2533141373155003, abs=1e-15)
    n = 1000
    assert linf_constant(n) == pytest.approx(
        0.5 * (1 + math.sqrt(math.pi * math.log(4))) / math.sqrt(2 * math.log(n)), rel=1e-15)
    with pytest.raises(ValueError, match="n >= 2"):
        linf_constant(1)


@pytest.mark.parametrize("kind,k", [("l1", 1), ("linf", 1), ("linf", 4)])
@pytest.mark.parametrize("shape", [(3, 2, 4), (5, 3)])
def test_gradcheck_custom_function(kind: str, k: int, shape: tuple[int, ...]) -> None:
    x = _rand(shape, seed=11).requires_grad_()
    w, b = _affine(shape[1], seed=12)
    w.requires_grad_()
    b.requires_grad_()
    fast, _ = _layer_fn(kind, k)
    assert torch.autograd.gradcheck(fast, (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind", ["l1", "linf"])
def test_gradcheck_without_affine(kind: str) -> None:
    x = _rand((4, 3, 3), seed=2).requires_grad_()
    fast, _ = _layer_fn(kind, 2)
    assert torch.autograd.gradcheck(lambda t: fast(t, None, None), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 2, 7, 40])
def test_topk_selection_matches_full_topk(seed: int, k: int) -> None:
    # quantised values create many ties; the selected values (not indices) must agree exactly
    x = (_rand((5, 3, 17), seed=seed, dtype=torch.float32) * 4).round() / 4
    if seed == 3:
        x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.transpose(
            1, 2).contiguous().transpose(1, 2)
    mu = x.mean((0, 2))
    vals, flat = topk_abs_deviation(x, mu, k)
    want, _ = full_topk(*channel_view(x), mu, k)
    assert_close(vals, want, rtol=0, atol=0)
    n_i, r_i = flat // x.shape[2], flat % x.shape[2]
    c_i = torch.arange(3).unsqueeze(1).expand_as(flat)
    assert_close((x[n_i, c_i, r_i] - mu[:, None]).abs(), vals, rtol=0, atol=0)
    assert all(len(set(row.tolist())) == k for row in flat)  # distinct elements


def test_linf_fast_selection_equals_exact_topk_path() -> None:
    x = _rand((16, 4, 6, 6), seed=4, dtype=torch.float32).requires_grad_()
    g = _rand((16, 4, 6, 6), seed=6, dtype=torch.float32)
    for k in (1, 5, 20):
        outs = []
        for exact in (False, True):
            xx = x.detach().clone().requires_grad_()
            y, mu, s = lpf.linf_batch_norm(xx, None, None, 1e-5, k, exact)
            (dx,) = torch.autograd.grad(y, xx, g)
            outs.append((y, s, dx))
        for got, want in zip(*outs):
            assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_linf_k_larger_than_n_clamps_to_n() -> None:
    x = _rand((3, 2, 2))  # n = 6 per channel
    y_big = lpf.linf_batch_norm(x, None, None, 1e-5, 50)[0]
    y_n = lpf.linf_batch_norm(x, None, None, 1e-5, 6)[0]
    assert_close(y_big, y_n, rtol=0, atol=0)
    assert_close(y_big, linf_reference(x, None, None, 1e-5, 6))


def test_constant_channel_is_finite() -> None:
    x = _rand((4, 3, 5), dtype=torch.float32)
    x[:, 1] = 2.5
    for layer in (L1BatchNorm1d(3), LinfBatchNorm1d(3, k=3)):
        xx = x.clone().requires_grad_()
        y = layer(xx)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(xx.grad).all()
        assert_close(y[:, 1], torch.zeros_like(y[:, 1]))


@pytest.mark.parametrize("kind,k", [("l1", 1), ("linf", 1), ("linf", 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_with_other_layout_or_expanded_grad(kind: str, k: int, dtype: torch.dtype) -> None:
    x = _rand((6, 5, 4, 3), seed=9, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w, b = _affine(5, dtype=torch.float32)
    fast, ref = _layer_fn(kind, k)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for g in (_rand((6, 5, 4, 3), seed=2, dtype=dtype),             # contiguous vs NHWC input
              torch.ones((), dtype=dtype).expand(6, 5, 4, 3)):     # stride-0 grad of .sum()
        xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
        grads = torch.autograd.grad(fast(xx, ww, bb), (xx, ww, bb), g)
        xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
        want = torch.autograd.grad(ref(xr, wr, br), (xr, wr, br), g.double())
        for got, exp in zip(grads, want):
            scale = exp.abs().max().clamp_min(1.0)
            assert_close(got.double() / scale, exp / scale, rtol=0, atol=tol)


# ---------------------------------------------------------------------------------------------
# running statistics
# ---------------------------------------------------------------------------------------------
def _batch_scale(kind: str, x: torch.Tensor, k: int) -> torch.Tensor:
    c = x.shape[1]
    d = x.double().transpose(0, 1).reshape(c, -1)
    d = d - d.mean(1, keepdim=True)
    n = d.shape[1]
    if kind == "l1":
        return C_L1 * d.abs().mean(1) * math.sqrt(n / (n - 1))
    return linf_constant(n) * d.abs().topk(min(k, n), dim=1).values.mean(1)


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("kind", ["l1", "linf"])
def test_running_statistics_update(kind: str, momentum: float | None) -> None:
    k = 3
    layer = (L1BatchNorm2d(3, momentum=momentum) if kind == "l1"
             else LinfBatchNorm2d(3, momentum=momentum, k=k))
    mean = torch.zeros(3, dtype=F64)
    scale = torch.ones(3, dtype=F64)
    for step in range(1, 4):
        x = _rand((4, 3, 3, 5), seed=step, dtype=torch.float32, scale=step, shift=step)
        layer(x)
        f = 1.0 / step if momentum is None else momentum
        mean = (1 - f) * mean + f * x.double().mean((0, 2, 3))
        scale = (1 - f) * scale + f * (_batch_scale(kind, x, k) + layer.eps)
    assert int(layer.num_batches_tracked) == 3
    assert_close(layer.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    assert_close(layer.running_scale.double(), scale, rtol=1e-5, atol=1e-6)


def test_eval_uses_running_statistics_and_stored_scale_as_is() -> None:
    x = _rand((5, 3, 4, 4), dtype=torch.float32)
    for layer in (L1BatchNorm2d(3), LinfBatchNorm2d(3, k=2)):
        _set_running(layer)
        layer.eval()
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        y = layer(x)
        s = (1, 3, 1, 1)
        want = ((x - layer.running_mean.view(s)) / layer.running_scale.view(s)
                * layer.weight.view(s) + layer.bias.view(s))
        assert_close(y, want, rtol=1e-6, atol=1e-6)
        scale, shift = layer.eval_scale_shift()
        assert scale.dtype == F64
        assert_close(y.double(), x.double() * scale.view(s) + shift.view(s), rtol=1e-6,
                     atol=1e-6)
        for key, v in layer.state_dict().items():
            assert torch.equal(v, before[key]), key


def test_eval_without_running_stats_uses_batch_statistics() -> None:
    x = _rand((6, 3, 4), dtype=torch.float32)
    layer = L1BatchNorm1d(3, track_running_stats=False).eval()
    assert layer.running_mean is None and layer.running_scale is None
    assert_close(layer(x), lpf.l1_batch_norm(x, layer.weight, layer.bias, layer.eps)[0])
    with pytest.raises(ValueError, match="no running statistics"):
        layer.eval_scale_shift()


def test_frozen_uses_running_stats_in_train_and_never_updates() -> None:
    layer = LinfBatchNorm2d(3)
    _set_running(layer)
    layer.frozen = True
    layer.train()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = _rand((4, 3, 3, 3), dtype=torch.float32).requires_grad_()
    y = layer(x)
    y.sum().backward()
    for key, v in layer.state_dict().items():
        assert torch.equal(v, before[key]), key
    scale, shift = layer.eval_scale_shift()
    assert_close(y.detach().double(), x.detach().double() * scale.view(1, 3, 1, 1)
                 + shift.view(1, 3, 1, 1), rtol=1e-6, atol=1e-6)
    assert_close(x.grad.double(), scale.view(1, 3, 1, 1).expand_as(x), rtol=1e-6, atol=1e-6)
    assert layer.weight.grad is not None and layer.bias.grad is not None
    assert "frozen=True" in repr(layer)


def test_train_needs_more_than_one_value_per_channel() -> None:
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        L1BatchNorm1d(3)(torch.randn(1, 3))
    assert L1BatchNorm1d(3).eval()(torch.randn(1, 3)).shape == (1, 3)


# ---------------------------------------------------------------------------------------------
# conversion from BatchNorm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("convert", [l1_from_batchnorm, linf_from_batchnorm])
@pytest.mark.parametrize("bn_cls,shape,want", [
    (nn.BatchNorm1d, (7, 5), (L1BatchNorm1d, LinfBatchNorm1d)),
    (nn.BatchNorm1d, (7, 5, 4), (L1BatchNorm1d, LinfBatchNorm1d)),
    (nn.BatchNorm2d, (3, 5, 4, 6), (L1BatchNorm2d, LinfBatchNorm2d)),
    (nn.BatchNorm3d, (2, 5, 3, 2, 4), (L1BatchNorm3d, LinfBatchNorm3d)),
])
@pytest.mark.parametrize("affine", [True, False])
def test_from_batchnorm_eval_equivalence(convert, bn_cls, shape, want, affine) -> None:
    bn = _randomize_bn(bn_cls(5, eps=1e-3, momentum=0.2, affine=affine), seed=len(shape))
    bn.eval()
    layer = convert(bn)
    assert type(layer) is want[convert is linf_from_batchnorm]
    assert not layer.training and layer.momentum == 0.2 and layer.eps == 1e-3
    assert int(layer.num_batches_tracked) == 17
    x = _rand(shape, dtype=torch.float32, scale=3.0)
    assert_close(layer(x), bn(x), rtol=1e-5, atol=1e-5)
    assert_close(layer.running_scale.double(),
                 (bn.running_var.double() + bn.eps).sqrt(), rtol=1e-7, atol=0)


def test_from_batchnorm_keeps_dtype_momentum_none_and_train_mode() -> None:
    bn = _randomize_bn(nn.BatchNorm2d(4, momentum=None).double())
    layer = L1BatchNorm2d.from_batchnorm(bn)
    assert layer.training and layer.momentum is None
    assert layer.weight.dtype == F64 and layer.running_scale.dtype == F64
    bn.eval()
    layer.eval()
    x = _rand((2, 4, 3, 3))
    assert_close(layer(x), bn(x), rtol=1e-12, atol=1e-12)
    # options override the BN's hyperparameters
    assert LinfBatchNorm2d.from_batchnorm(bn, k=7, momentum=0.5).k == 7


def test_from_batchnorm_without_running_stats_just_builds() -> None:
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    for convert in (l1_from_batchnorm, linf_from_batchnorm):
        layer = convert(bn)
        assert layer.running_mean is None and layer.running_scale is None
        assert layer(torch.randn(3, 4, 2, 2)).shape == (3, 4, 2, 2)


def test_from_syncbatchnorm_gives_generic_class() -> None:
    bn = _randomize_bn(nn.SyncBatchNorm(4)).eval()
    x = _rand((3, 4, 2, 5), dtype=torch.float32)
    for convert, cls in ((l1_from_batchnorm, L1BatchNorm), (linf_from_batchnorm, LinfBatchNorm)):
        layer = convert(bn)
        assert type(layer) is cls
        assert_close(layer(x), bn(x), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="dimension-generic"):
            layer.to_batchnorm()


def test_from_frozen_batchnorm() -> None:
    misc = pytest.importorskip("torchvision.ops.misc")
    fbn = misc.FrozenBatchNorm2d(4, eps=1e-4)
    _randomize_bn(fbn, seed=9)
    x = _rand((2, 4, 3, 3), dtype=torch.float32, scale=3.0)
    for convert, cls in ((l1_from_batchnorm, L1BatchNorm2d),
                         (linf_from_batchnorm, LinfBatchNorm2d)):
        layer = convert(fbn)
        assert type(layer) is cls and layer.frozen
        layer.train()  # frozen: train mode still uses the running statistics
        assert_close(layer(x), fbn(x), rtol=1e-5, atol=1e-5)
        assert int(layer.num_batches_tracked) == 0


def test_from_batchnorm_of_subclass_that_overrides_forward(caplog) -> None:
    # the swap pass grafts the subclass's extra behaviour and reports it; the conversion itself
    # converts the BatchNorm state without a (misleading) warning
    class BatchNormAct2d(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(super().forward(x))

    bn = _randomize_bn(BatchNormAct2d(3)).eval()
    with caplog.at_level("WARNING"):
        layer = l1_from_batchnorm(bn)
    assert type(layer) is L1BatchNorm2d  # a BatchNorm2d subclass keeps the 2d class
    assert "overrides forward" not in caplog.text
    x = _rand((2, 3, 4, 4), dtype=torch.float32)
    assert_close(torch.relu(layer(x)), bn(x), rtol=1e-5, atol=1e-5)


def test_from_batchnorm_rejects_other_modules() -> None:
    with pytest.raises(UnsupportedNodeError, match="LayerNorm"):
        L1BatchNorm.from_batchnorm(nn.LayerNorm(4))


@pytest.mark.parametrize("cls", [L1BatchNorm2d, LinfBatchNorm2d])
def test_to_batchnorm_round_trip(cls) -> None:
    layer = cls(4, eps=1e-4)
    _set_running(layer)
    layer.eval()
    bn = layer.to_batchnorm()
    assert type(bn) is nn.BatchNorm2d and not bn.training
    x = _rand((2, 4, 3, 3), dtype=torch.float32)
    assert_close(bn(x), layer(x), rtol=1e-5, atol=1e-5)
    back = cls.from_batchnorm(bn)
    assert_close(back.running_scale, layer.running_scale, rtol=1e-6, atol=0)


def test_linf_calibration_keeps_eval_and_matches_bn_in_train() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    batches = [torch.randn(16, 3, 8, 8) * torch.tensor([0.5, 2.0, 5.0]).view(1, 3, 1, 1)
               for _ in range(4)]
    bn.momentum = None
    bn.train()
    with torch.no_grad():
        for xb in batches:
            bn(xb)
    bn.eval()
    layer = linf_from_batchnorm(bn, k=10)
    x = batches[0]
    y_eval = layer.eval()(x)
    ratio = calibrate_linf(layer, batches)
    assert ratio.shape == (3,) and ((ratio > 1.0) & (ratio < 2.0)).all()  # C(n)*topk ~ 1.3 sigma
    assert_close(layer(x), y_eval, rtol=1e-5, atol=1e-5)
    # the option on the converter does the same
    again = linf_from_batchnorm(bn, k=10, calibration_batches=batches)
    assert_close(again.weight, layer.weight)
    bn.train()
    layer.train()
    y_bn, y_linf = bn(x), layer(x)
    assert_close(y_linf.std((0, 2, 3)), y_bn.std((0, 2, 3)), rtol=0.1, atol=0)
    with pytest.raises(ValueError, match="no batches"):
        layer.calibrate_([])


# ---------------------------------------------------------------------------------------------
# fp16
# ---------------------------------------------------------------------------------------------
def test_fp16_large_inputs_finite_where_fp16_l2_bn_overflows() -> None:
    x = _rand((8, 4, 6, 6), seed=3, dtype=torch.float16, scale=1000.0, shift=0.0)
    d = x - x.mean((0, 2, 3), keepdim=True)
    l2_var = (d * d).mean((0, 2, 3))  # BN computed in fp16 arithmetic
    assert not torch.isfinite(l2_var).all()
    for layer in (L1BatchNorm2d(4), LinfBatchNorm2d(4), LinfBatchNorm2d(4, k=5)):
        layer = layer.half()  # pure fp16 model, as Hoffer trained
        xx = x.clone().requires_grad_()
        y = layer(xx)
        assert y.dtype == torch.float16
        y.float().square().sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(xx.grad).all()
        assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.dtype == torch.float16
        assert torch.isfinite(layer.running_scale).all()


@pytest.mark.parametrize("kind,k,sigmas", [("l1", 1, (1e-3, 1.0, 1e4)),
                                           ("linf", 1, (1e-2, 1.0, 1e4)),
                                           ("linf", 10, (1e-2, 1.0, 1e4))])
def test_fp16_relative_error_within_reference_bounds(kind: str, k: int, sigmas) -> None:
    fast, ref = _layer_fn(kind, k)
    for sigma in sigmas:
        x16 = _rand((8, 4, 8, 8), seed=7, dtype=torch.float16, scale=sigma, shift=sigma)
        g16 = _rand((8, 4, 8, 8), seed=8, dtype=torch.float16, scale=1.0, shift=0.0)
        w, b = _affine(4)
        x = x16.clone().requires_grad_()
        y = fast(x, w.float(), b.float())
        (dx,) = torch.autograd.grad(y, x, g16)
        xr = x16.double().requires_grad_()
        yr = ref(xr, w, b)
        (dxr,) = torch.autograd.grad(yr, xr, g16.double())

        def rel(a: torch.Tensor, r: torch.Tensor) -> float:
            return float((a.detach().double() - r.detach()).abs().max() / r.detach().abs().max())

        assert rel(y, yr) <= 1.5e-3, (sigma, rel(y, yr))
        assert rel(dx, dxr) <= 1.5e-3, (sigma, rel(dx, dxr))


# ---------------------------------------------------------------------------------------------
# input checks, repr, state dict
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,bad", [(L1BatchNorm1d, (2, 3, 4, 4)), (L1BatchNorm2d, (4, 3)),
                                     (L1BatchNorm3d, (2, 3, 4, 4)), (LinfBatchNorm1d, (2, 3, 4, 4)),
                                     (LinfBatchNorm2d, (2, 3, 4)), (LinfBatchNorm3d, (2, 3))])
def test_bad_input_dims_raise_with_class_name(cls, bad) -> None:
    with pytest.raises(ValueError, match=cls.__name__):
        cls(3)(torch.randn(bad))


def test_bad_channels_and_arguments() -> None:
    with pytest.raises(ValueError, match="L1BatchNorm2d: expected 3 channels"):
        L1BatchNorm2d(3)(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match="k must be"):
        LinfBatchNorm2d(3, k=0)
    with pytest.raises(ValueError, match="momentum"):
        L1BatchNorm(3, momentum=2.0)
    with pytest.raises(ValueError, match="num_features"):
        L1BatchNorm(0)


def test_generic_class_accepts_any_rank() -> None:
    layer = LinfBatchNorm(3, k=2)
    for shape in [(4, 3), (4, 3, 5), (2, 3, 2, 2), (2, 3, 2, 2, 2), (2, 3, 1, 2, 2, 2)]:
        assert layer(torch.randn(shape)).shape == shape


def test_extra_repr_and_parameters() -> None:
    layer = LinfBatchNorm2d(8, eps=1e-3, momentum=None, k=10)
    assert repr(layer) == ("LinfBatchNorm2d(8, eps=0.001, momentum=None, affine=True, "
                           "track_running_stats=True, k=10)")
    assert repr(L1BatchNorm1d(4, affine=False)).startswith("L1BatchNorm1d(4, eps=1e-05")
    assert torch.equal(layer.weight, torch.ones(8)) and torch.equal(layer.bias, torch.zeros(8))
    # BatchNorm's keys, in BatchNorm's order (the running scale is kept as running_var)
    assert list(layer.state_dict()) == list(nn.BatchNorm2d(8).state_dict())
    assert torch.equal(layer.running_scale, torch.ones(8))


def test_state_dict_round_trip_and_old_checkpoint_without_counter() -> None:
    a = L1BatchNorm2d(3)
    _set_running(a)
    b = L1BatchNorm2d(3)
    sd = a.state_dict()
    del sd["num_batches_tracked"]
    b.load_state_dict(sd)
    assert_close(b.running_scale, a.running_scale)
    assert int(b.num_batches_tracked) == 0


# ---------------------------------------------------------------------------------------------
# torch.compile fast path (opt-in: compile time must not land in the default test run)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(os.environ.get("NORMSWAP_TEST_COMPILE") != "1",
                    reason="compiles Inductor kernels (~1 min); set NORMSWAP_TEST_COMPILE=1")
@pytest.mark.parametrize("kind,k", [("l1", 1), ("linf", 1), ("linf", 5)])
def test_compiled_path_matches_eager(kind: str, k: int) -> None:
    x = _rand((8, 6, 5, 7), dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    g = _rand((8, 6, 5, 7), seed=3, dtype=torch.float32)
    w, b = _affine(6, dtype=torch.float32)
    fast, _ = _layer_fn(kind, k)
    results = []
    try:
        for enabled in (False, True):
            _compile.set_compile(enabled)
            xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
            y = fast(xx, ww, bb)
            results.append((y,) + torch.autograd.grad(y, (xx, ww, bb), g))
    finally:
        _compile.set_compile(False)
    assert not _compile.failed_kernels()
    for got, want in zip(results[1], results[0]):
        assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# batch tiles (the passes run tile by tile on large inputs)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_tiled_passes_match_reference(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                      channels_last: bool) -> None:
    from normswap.norms import _layout

    x = _rand((7, 3, 4, 5), seed=13, dtype=dtype)     # 7 samples: tiles of 2, 2, 2, 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert len(_layout.batch_tiles(x, tile_bytes=2 * x[0].numel() * x.element_size())) == 4
    monkeypatch.setattr(_layout, "TILE_BYTES", 2 * x[0].numel() * x.element_size())
    w, b = _affine(3)
    g = _rand((7, 3, 4, 5), seed=14, dtype=dtype)
    xx, ww, bb = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    y = lpf.l1_batch_norm(xx, ww, bb, 1e-5)[0]
    grads = torch.autograd.grad(y, (xx, ww, bb), g)
    xr, wr, br = x.double().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    yr = l1_reference(xr, wr, br, 1e-5)
    want = torch.autograd.grad(yr, (xr, wr, br), g.double())
    tol = 1e-12 if dtype == F64 else 1e-2
    assert_close(y.double(), yr.detach(), rtol=tol, atol=tol)
    for got, exp in zip(grads, want):
        scale = exp.abs().max().clamp_min(1.0)
        assert_close(got.double() / scale, exp / scale, rtol=0, atol=tol)


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes one train forward saves for backward (unique storages)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


@pytest.mark.parametrize("shape,k,limit", [
    ((256, 64), 1, 1.0), ((256, 64), 8, 1.0),            # <= 256 per channel: uint8 positions
    ((8, 64, 16, 16), 4, 1.0), ((8, 64, 16, 16), 10, 1.002),   # int16 positions
    ((256, 2048), 10, 1.003),
])
def test_linf_saves_no_more_for_backward_than_batchnorm(shape, k, limit) -> None:
    """Native BN saves x and five per-channel vectors; L-inf saves x, three, and its k selected
    positions per channel in the smallest integer type they fit in."""
    x = torch.randn(shape, requires_grad=True)
    bn = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(shape[1])
    linf = (LinfBatchNorm1d if len(shape) == 2 else LinfBatchNorm2d)(shape[1], k=k)
    ratio = _saved_bytes(linf, x) / _saved_bytes(bn, x)
    assert ratio <= limit, ratio
    y = linf(x)                                    # and the backward still matches the formula
    y.backward(torch.ones_like(y).mul_(torch.arange(y.numel()).reshape(y.shape) % 7))
    ref_x = x.detach().double().requires_grad_(True)
    ref = linf_reference(ref_x, linf.weight.double(), linf.bias.double(), linf.eps, k)
    ref.backward(torch.ones_like(ref).mul_(torch.arange(ref.numel()).reshape(ref.shape) % 7))
    assert_close(x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-5)
