"""Weight-norm folding: legacy hooks, parametrizations, bounded weight norm, zero-norm v."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from normswap._modules import safe_deepcopy
from normswap.errors import UnsupportedNodeError
from normswap.passes.fold_weight_norm import (
    BoundedWeightNorm,
    apply_bounded_weight_norm,
    fold_weight_norm,
    weight_norm_value,
)
from tests.conftest import fold_model

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _legacy(m: nn.Module, **kw: object) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.weight_norm(m, **kw)


@torch.no_grad()
def _perturb_gain(m: nn.Module) -> None:
    """Make g differ from ‖v‖ so that the test sees the magnitude."""
    for name, p in m.named_parameters():
        if name.endswith("weight_g") or name.endswith("original0"):
            p.mul_(torch.rand_like(p) + 0.5)


def _is_plain(m: nn.Module) -> bool:
    return not parametrize.is_parametrized(m) and not any(
        "weight_g" in n for n, _ in m.named_parameters())


def _fold_and_compare(model: nn.Module, x: Tensor) -> tuple[nn.Module, object]:
    ref = safe_deepcopy(model).eval()
    folded, report = fold_weight_norm(model)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ref(x), **TOL)
    assert all(_is_plain(m) for m in folded.modules())
    return folded, report


@pytest.mark.parametrize("dim", [0, 1, None])
def test_legacy_weight_norm(dim: int | None) -> None:
    model = nn.Sequential(_legacy(nn.Conv2d(3, 4, 3), dim=dim), nn.ReLU())
    _perturb_gain(model)
    model(torch.randn(1, 3, 6, 6))  # a forward leaves a non-leaf weight (deepcopy trap)
    folded, report = _fold_and_compare(model, torch.randn(2, 3, 6, 6))
    assert report.changes[0].node == "0.weight"
    assert report.key_map["0.weight_g"] is None


def test_legacy_weight_norm_on_linear() -> None:
    model = nn.Sequential(_legacy(nn.Linear(6, 5)))
    _perturb_gain(model)
    _fold_and_compare(model, torch.randn(3, 6))


@pytest.mark.parametrize("dim", [0, 1])
def test_parametrization_weight_norm(dim: int) -> None:
    model = nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Conv1d(3, 4, 3), dim=dim),
                          torch.nn.utils.parametrizations.weight_norm(nn.Linear(4 * 5, 2)))
    model = nn.Sequential(model[0], nn.Flatten(), model[1])
    _perturb_gain(model)
    _, report = _fold_and_compare(model, torch.randn(2, 3, 7))
    assert len(report.changes) == 2


class _Scale(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return 2.0 * w


def test_other_parametrization_and_chain() -> None:
    conv = nn.Conv2d(3, 4, 3)
    parametrize.register_parametrization(conv, "weight", _Scale())
    parametrize.register_parametrization(conv, "bias", _Scale())
    lin = torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
    parametrize.register_parametrization(lin, "weight", _Scale())  # a chain of two
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin)
    _, report = _fold_and_compare(model, torch.randn(2, 3, 5, 5))
    assert len(report.changes) == 3


@pytest.mark.parametrize("learn_gain", [False, True])
def test_bounded_weight_norm(learn_gain: bool) -> None:
    conv = apply_bounded_weight_norm(nn.Conv2d(3, 6, 3), rho=0.7, learn_gain=learn_gain)
    if learn_gain:
        with torch.no_grad():
            conv.parametrizations.weight[0].gain.uniform_(0.5, 2.0)
    w = conv.weight.detach()
    norms = torch.linalg.vector_norm(w, dim=(1, 2, 3))
    if learn_gain:  # fixed total norm rho*sqrt(C)
        torch.testing.assert_close(torch.linalg.vector_norm(w), torch.tensor(0.7 * 6 ** 0.5))
    else:
        torch.testing.assert_close(norms, torch.full((6,), 0.7))
    model = nn.Sequential(conv, nn.ReLU())
    _, report = _fold_and_compare(model, torch.randn(2, 3, 6, 6))
    assert "bounded_weight_norm" in report.changes[0].before


def test_bounded_weight_norm_rejects_bad_rho() -> None:
    with pytest.raises(ValueError, match="rho"):
        BoundedWeightNorm(0.0, 4)


def test_weight_norm_value_float64() -> None:
    v, g = torch.randn(4, 3), torch.rand(4, 1)
    expected = (g.double() * v.double() / v.double().norm(dim=1, keepdim=True)).float()
    torch.testing.assert_close(weight_norm_value(g, v, 0), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["legacy", "parametrization", "bounded"])
def test_zero_norm_v_is_reported_not_nan(kind: str) -> None:
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight[2].zero_()
    if kind == "legacy":
        _legacy(conv)
    elif kind == "parametrization":
        torch.nn.utils.parametrizations.weight_norm(conv)
    else:
        apply_bounded_weight_norm(conv, rho=1.0)
    model = nn.Sequential(nn.Identity(), conv)
    with pytest.raises(UnsupportedNodeError, match=r"1\.weight.*zero norm.*\[2\]"):
        fold_weight_norm(safe_deepcopy(model))
    folded, report = fold_weight_norm(model, on_zero_norm="skip")
    (skip,) = report.skips
    assert skip.node == "1.weight" and "zero norm" in skip.reason
    assert not _is_plain(folded[1])  # left as it was, not turned into NaN


def test_fold_model_folds_weight_norm_then_bn_without_touching_caller() -> None:
    conv = _legacy(nn.Conv2d(3, 4, 3))
    conv2 = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 3))
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 2)
        bn.weight.normal_()
    model = nn.Sequential(conv, bn, nn.ReLU(), conv2).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x).detach()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, report = fold_model(model)
    torch.testing.assert_close(folded(x), expected, **TOL)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    assert parametrize.is_parametrized(model[3])  # the caller's model still parametrized
    torch.testing.assert_close(model(x), expected)  # and still works
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert {c.before for c in report.changes} >= {"weight_norm (legacy hook)", "BatchNorm2d"}
