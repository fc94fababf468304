"""State that BatchNorm tooling understands (docs/layers.md, "State"), conversion checks, and the
accelerator hook of the L1/L-inf batch path."""

from __future__ import annotations

import copy
import logging
import sys
import types

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from normswap.errors import NormswapError
from normswap.norms import lp_batchnorm
from normswap.norms._common import InvalidBatchNormError
from normswap.norms.kalman import KalmanBatchNorm2d, kalman_from_batchnorm
from normswap.norms.lp_batchnorm import (
    L1BatchNorm1d,
    L1BatchNorm2d,
    LinfBatchNorm2d,
    l1_from_batchnorm,
    linf_from_batchnorm,
)

from ..conftest import randomize_bn

CONVERTERS = {"l1": l1_from_batchnorm, "linf": linf_from_batchnorm,
              "kalman": kalman_from_batchnorm}


def _net(dims: int = 2) -> nn.Sequential:
    torch.manual_seed(0)
    if dims == 1:
        return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4),
                             nn.BatchNorm1d(4, eps=1e-3))
    conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    return nn.Sequential(conv(3, 6, 3, padding=1), bn(6), nn.ReLU(), conv(6, 4, 1),
                         bn(4, eps=1e-3, affine=False))


def _input(dims: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(dims)
    shape = {1: (7, 5), 2: (2, 3, 5, 6), 3: (2, 3, 3, 4, 4)}[dims]
    return torch.randn(shape, generator=g) * 2 + 0.5


def _convert(model: nn.Module, convert) -> nn.Module:  # type: ignore[no-untyped-def]
    out = copy.deepcopy(model)
    for i, m in enumerate(out):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[i] = convert(m)
    return out


# ---------------------------------------------------------------------------------------------
# strict loading both ways
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["l1", "linf", "kalman"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_converted_state_dict_loads_strict_into_the_batchnorm_model(method: str, dims: int
                                                                     ) -> None:
    original = randomize_bn(_net(dims), seed=dims).eval()
    converted = _convert(original, CONVERTERS[method]).eval()
    sd = converted.state_dict()
    assert list(sd) == list(original.state_dict())     # same keys, same order: empty key map
    fresh = randomize_bn(_net(dims), seed=99).eval()   # other statistics, overwritten by the load
    fresh.load_state_dict(sd, strict=True)
    x = _input(dims)
    with torch.no_grad():
        y_conv, y_fresh, y_orig = converted(x), fresh(x), original(x)
    assert_close(y_fresh, y_conv, rtol=1e-6, atol=1e-6)
    assert_close(y_fresh, y_orig, rtol=1e-5, atol=1e-5)
    # and the BatchNorm model's state loads strict into the converted architecture
    back = _convert(_net(dims), CONVERTERS[method]).eval()
    back.load_state_dict(original.state_dict(), strict=True)
    with torch.no_grad():
        assert_close(back(x), y_orig, rtol=1e-5, atol=1e-5)


def test_running_var_is_the_eval_scale_and_has_a_setter() -> None:
    bn = randomize_bn(nn.BatchNorm2d(5, eps=1e-3), seed=4)
    with torch.no_grad():
        bn.running_var[0] = 0.0                        # a dead channel: var 0 round-trips as 0
    layer = l1_from_batchnorm(bn)
    assert_close(layer.running_scale.double(), (bn.running_var.double() + 1e-3).sqrt(),
                 rtol=1e-7, atol=0)
    assert_close(layer.running_var, bn.running_var, rtol=1e-6, atol=1e-9)
    assert float(layer.running_var[0]) == 0.0
    layer.running_var = torch.full((5,), 3.0)
    assert_close(layer.running_scale, torch.full((5,), 3.001).sqrt())
    assert "running_var" not in dict(layer.named_buffers())   # a view, not a second buffer
    assert L1BatchNorm2d(3, track_running_stats=False).running_var is None


def test_scale_below_sqrt_eps_gives_negative_running_var_that_bn_reproduces(caplog) -> None:
    layer = L1BatchNorm2d(2).eval()
    with torch.no_grad():
        layer.running_scale.copy_(torch.tensor([1e-5, 2.0]))  # dead channel: scale = eps
    var = layer.running_var
    assert float(var[0]) < 0 and float(var[1]) == pytest.approx(4.0 - 1e-5)
    x = torch.randn(3, 2, 4, 4) * 1e-4
    with caplog.at_level(logging.WARNING):
        bn = layer.to_batchnorm()
    assert "running_var < 0" in caplog.text
    assert_close(bn.eval()(x), layer(x), rtol=2e-2, atol=1e-3)  # float32 var+eps near 1e-10
    with pytest.raises(InvalidBatchNormError, match="negative"):
        l1_from_batchnorm(bn)


def test_legacy_running_scale_checkpoint_loads() -> None:
    layer = LinfBatchNorm2d(4, k=2)
    g = torch.Generator().manual_seed(1)
    scale = torch.rand(4, generator=g) + 0.5
    legacy = {"weight": torch.rand(4, generator=g), "bias": torch.randn(4, generator=g),
              "running_mean": torch.randn(4, generator=g), "running_scale": scale,
              "num_batches_tracked": torch.tensor(5)}
    result = layer.load_state_dict(legacy, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(layer.running_scale, scale)
    assert int(layer.num_batches_tracked) == 5
    assert "running_var" in layer.state_dict()                 # written in the current format
    assert "running_scale" not in layer.state_dict()


def test_missing_and_misshaped_running_var() -> None:
    sd = nn.BatchNorm2d(4).state_dict()
    del sd["running_var"]
    with pytest.raises(RuntimeError, match="running_var"):
        L1BatchNorm2d(4).load_state_dict(sd)
    assert L1BatchNorm2d(4).load_state_dict(sd, strict=False).missing_keys == ["running_var"]
    bad = nn.BatchNorm2d(5).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for running_var"):
        L1BatchNorm2d(4).load_state_dict(bad)
    # without running statistics the keys are unexpected, as for BatchNorm
    with pytest.raises(RuntimeError, match="Unexpected key"):
        L1BatchNorm2d(4, track_running_stats=False).load_state_dict(
            nn.BatchNorm2d(4).state_dict())


# ---------------------------------------------------------------------------------------------
# BatchNorm tooling
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["l1", "linf", "kalman"])
def test_torch_fuse_conv_bn_eval_is_exact(method: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1).eval()
    bn = randomize_bn(nn.BatchNorm2d(5, eps=1e-4), seed=2).eval()
    layer = CONVERTERS[method](bn).eval()
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, layer)
    reference = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
    assert_close(fused.weight, reference.weight, rtol=1e-6, atol=1e-7)
    assert_close(fused.bias, reference.bias, rtol=1e-6, atol=1e-7)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_close(fused(x), layer(conv(x)), rtol=1e-5, atol=1e-5)


def test_ultralytics_model_fuse_on_swapped_yolo() -> None:
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    modules = pytest.importorskip("ultralytics.nn.modules")
    model = tasks.DetectionModel("yolov8n.yaml", verbose=False)
    randomize_bn(model, seed=3)
    swapped = 0
    for m in model.modules():
        if isinstance(m, modules.Conv) and isinstance(getattr(m, "bn", None), nn.BatchNorm2d):
            m.bn = l1_from_batchnorm(m.bn)
            swapped += 1
    assert swapped > 50
    model.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)[0]
        model.fuse(verbose=False)                    # reads bn.running_var / eps / weight / bias
        after = model(x)[0]
    assert not any(isinstance(m, L1BatchNorm2d) for m in model.modules())
    assert_close(after, before, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# pure float16 training (model.half())
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [L1BatchNorm2d, LinfBatchNorm2d])
def test_pure_fp16_training_with_large_inputs_stays_finite(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(cls(4), nn.ReLU(), nn.Conv2d(4, 4, 1), cls(4)).half()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(4):
        x = (torch.randn(8, 4, 6, 6) * 1e3 + 200).half()   # sigma ~ 1e3: sigma**2 overflows fp16
        y = model(x)
        loss = y.float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(y).all() and torch.isfinite(loss)
    for p in model.parameters():
        assert p.dtype == torch.float16 and torch.isfinite(p).all()
    norm = model[0]
    assert norm.running_scale.dtype == torch.float16
    assert torch.isfinite(norm.running_scale).all() and float(norm.running_scale.max()) > 300
    sd = model.state_dict()
    assert sd["0.running_var"].dtype == torch.float32          # a float16 variance would be inf
    assert torch.isfinite(sd["0.running_var"]).all() and float(sd["0.running_var"].max()) > 9e4
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all()
    # the float16 checkpoint loads into a float32 BatchNorm architecture, finite
    bn_model = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    bn_model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert_close(bn_model.eval()(x.float()), out.float(), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# from_batchnorm: refusals and requires_grad
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["l1", "linf", "kalman"])
@pytest.mark.parametrize("field,value,words", [
    ("running_mean", float("nan"), "running_mean has 1 non-finite value(s) (NaN)"),
    ("running_var", float("inf"), "running_var has 1 non-finite value(s) (inf)"),
    ("running_var", -0.5, "running_var has 1 negative value(s)"),
    ("weight", float("nan"), "weight has 1 non-finite value(s) (NaN)"),
    ("bias", float("-inf"), "bias has 1 non-finite value(s) (inf)"),
])
def test_from_batchnorm_refuses_bad_state(method: str, field: str, value: float,
                                          words: str) -> None:
    bn = randomize_bn(nn.BatchNorm2d(3), seed=1)
    with torch.no_grad():
        getattr(bn, field)[1] = value
    with pytest.raises(InvalidBatchNormError) as info:
        CONVERTERS[method](bn, name="layer1.0.bn1")
    message = str(info.value)
    assert message.startswith("layer1.0.bn1 (BatchNorm2d): cannot convert")
    assert words in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, NormswapError)
    with pytest.raises(ValueError, match=r"^BatchNorm2d: cannot convert"):  # without a name
        CONVERTERS[method](bn)


@pytest.mark.parametrize("method", ["l1", "linf", "kalman"])
def test_from_batchnorm_keeps_requires_grad(method: str) -> None:
    bn = randomize_bn(nn.BatchNorm2d(3), seed=1)
    bn.weight.requires_grad_(False)
    bn.bias.requires_grad_(False)
    layer = CONVERTERS[method](bn)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    bn.bias.requires_grad_(True)
    layer = CONVERTERS[method](bn)
    assert not layer.weight.requires_grad and layer.bias.requires_grad


@pytest.mark.parametrize("method", ["l1", "linf", "kalman"])
def test_from_batchnorm_without_bias_and_unknown_option(method: str) -> None:
    bn = randomize_bn(nn.BatchNorm2d(3, bias=False), seed=5).eval()
    layer = CONVERTERS[method](bn)
    assert layer.bias is None and layer.weight is not None
    x = torch.randn(2, 3, 4, 4)
    assert_close(layer(x), bn(x), rtol=1e-5, atol=1e-5)
    assert layer.to_batchnorm().bias is None
    with pytest.raises(TypeError, match="unknown option"):
        CONVERTERS[method](bn, momentun=0.3)


# ---------------------------------------------------------------------------------------------
# the accelerator (Triton) hook
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fake_accelerator(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """A stand-in ``normswap.norms._triton`` that records calls, active for CPU tensors."""
    calls: list[str] = []

    def l1(x, weight, bias, eps):  # type: ignore[no-untyped-def]
        calls.append("l1")
        c = x.shape[1]
        return x * 2.0, torch.full((c,), 7.0), torch.full((c,), 3.0)

    def linf(x, weight, bias, eps, k):  # type: ignore[no-untyped-def]
        calls.append(f"linf{k}")
        c = x.shape[1]
        return x * 3.0, torch.full((c,), 5.0), torch.full((c,), 2.0)

    fake = types.SimpleNamespace(available=lambda x: True, l1_batch_norm=l1,
                                 linf_batch_norm=linf, calls=calls)
    monkeypatch.setitem(sys.modules, "normswap.norms._triton", fake)
    monkeypatch.setattr(lp_batchnorm, "_CPU_DEVICES", ())
    monkeypatch.setattr(lp_batchnorm, "_accelerator_cache", {})
    return fake


def test_accelerator_is_used_for_the_batch_path(fake_accelerator: types.SimpleNamespace
                                                ) -> None:
    x = torch.randn(4, 3, 2, 2)
    l1 = L1BatchNorm2d(3, momentum=1.0)
    assert torch.equal(l1(x), x * 2.0)
    assert torch.equal(l1.running_mean, torch.full((3,), 7.0))     # stats from the accelerator
    assert_close(l1.running_scale, torch.full((3,), 3.0 * (16 / 15) ** 0.5 + 1e-5))
    assert torch.equal(LinfBatchNorm2d(3, k=4)(x), x * 3.0)
    l1.eval()
    assert_close(l1(x), (x - 7.0) / l1.running_scale.view(1, 3, 1, 1))  # eval: native path
    assert fake_accelerator.calls == ["l1", "linf4"]
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        L1BatchNorm1d(3)(torch.randn(1, 3))


def test_accelerator_failures_fall_back_to_the_native_path(
        fake_accelerator: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    x = torch.randn(4, 3, 2, 2)
    monkeypatch.setattr(lp_batchnorm, "_CPU_DEVICES", ("cpu",))     # the default: CPU is native
    want_l1, want_linf = L1BatchNorm2d(3)(x), LinfBatchNorm2d(3)(x)
    assert not torch.equal(want_l1, x * 2.0) and not torch.equal(want_linf, x * 3.0)
    monkeypatch.setattr(lp_batchnorm, "_CPU_DEVICES", ())

    def broken(_x: torch.Tensor) -> bool:
        raise RuntimeError("no GPU")

    monkeypatch.setattr(fake_accelerator, "available", broken)
    with caplog.at_level(logging.WARNING):
        assert_close(L1BatchNorm2d(3)(x), want_l1)
    assert "no GPU" in caplog.text
    monkeypatch.setitem(sys.modules, "normswap.norms._triton", None)  # import fails
    monkeypatch.setattr(lp_batchnorm, "_accelerator_cache", {})
    assert_close(LinfBatchNorm2d(3)(x), want_linf)
    assert lp_batchnorm.accelerated_kernels(x) is None
    assert fake_accelerator.calls == []


def test_kalman_state_dict_is_batchnorm_and_frozen_repr() -> None:
    layer = KalmanBatchNorm2d(3)
    assert list(layer.state_dict()) == list(nn.BatchNorm2d(3).state_dict())
    layer.frozen = True
    assert "frozen=True" in repr(layer)
