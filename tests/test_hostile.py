"""Hostile input at the API: every case works or fails with a clear, named error; the user's
model and its state are never changed."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normswap
from normswap.errors import (
    MethodOptionError,
    NumericalMismatchError,
    SpecialisedGraphError,
    UnsupportedModelError,
    UnsupportedNodeError,
)
from normswap.passes._match import batchnorm_like_modules

from .conftest import assert_same_state, randomize_bn, rel_err, state_snapshot


def _net() -> nn.Module:
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))).eval()


X = torch.randn(2, 3, 8, 8)


def test_torchscript_module_is_refused_with_the_remedy() -> None:
    scripted = torch.jit.script(_net())
    with pytest.raises(UnsupportedModelError, match="TorchScript module.*unscripted"):
        normswap.swap(scripted, "l1")
    with pytest.raises(UnsupportedModelError, match="TorchScript"):
        normswap.fold(scripted)


def test_meta_device_model_is_refused_naming_a_tensor() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(UnsupportedModelError, match="meta device.*'0.weight'.*assign=True"):
        normswap.swap(model, "l1")


@pytest.mark.parametrize("bad", ["nan", "inf", "negative"])
def test_invalid_statistics_are_refused_naming_the_layer(bad: str) -> None:
    model = _net()
    value = {"nan": float("nan"), "inf": float("inf"), "negative": -1.0}[bad]
    with torch.no_grad():
        model[4].running_var[1] = value
    before = state_snapshot(model)
    with pytest.raises(UnsupportedNodeError, match="'4' \\(BatchNorm2d\\)"):
        normswap.swap(model, "l1", example_inputs=X)
    assert_same_state(state_snapshot(model), before)
    kept = normswap.swap(model, "l1", example_inputs=X, strict=False, verify=False)
    assert isinstance(kept[4], nn.BatchNorm2d) and [s.node for s in
                                                    kept.normswap_report.skips] == ["4"]


def test_nan_output_is_never_reported_as_equal() -> None:
    @normswap.register_norm("_test_nan", summary="writes NaN into the running mean")
    def _nan(bn: nn.Module) -> nn.Module:
        from normswap.norms.lp_batchnorm import l1_from_batchnorm

        new = l1_from_batchnorm(bn)
        with torch.no_grad():
            new.running_mean.fill_(float("nan"))
        return new

    with pytest.raises(NumericalMismatchError, match="NaN|non-finite"):
        normswap.swap(_net(), "_test_nan", example_inputs=X)


def test_model_with_batchnorms_but_nothing_swapped_is_an_error() -> None:
    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _net()

    # a BN subclass that calls batch_norm twice cannot be grafted: nothing is swapped
    class Twice(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias)
            return F.batch_norm(y, self.running_mean, self.running_var)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), randomize_bn(Twice(4))).eval()
    with pytest.raises(UnsupportedNodeError, match="batch_norm 2 times"):
        normswap.swap(model, "l1", example_inputs=X)
    out = normswap.swap(model, "l1", example_inputs=X, strict=False)
    assert out.normswap_report.skips and isinstance(out[1], Twice)


def test_frozen_parameters_and_hooks_survive_the_swap() -> None:
    model = _net()
    model[1].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    seen: list[tuple[int, ...]] = []
    model[4].register_forward_hook(
        lambda m, i, o: seen.append(tuple((o[0] if isinstance(o, tuple) else o).shape)))
    for method in ("l1", "linf", "kalman"):
        out = normswap.swap(model, method, example_inputs=X)
        bn1, bn4 = out.get_submodule("1"), out.get_submodule("4")
        assert not bn1.weight.requires_grad and not bn1.bias.requires_grad, method
        assert bn4.weight.requires_grad, method
        seen.clear()
        with torch.no_grad():
            out(X)
        assert seen == [(2, 4, 4, 4)], method


def test_legacy_weight_norm_model_swaps_and_folds() -> None:
    model = nn.Sequential(nn.utils.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4))
    model = randomize_bn(model).eval()
    with torch.no_grad():
        model(X)  # the legacy hook leaves a non-leaf 'weight' tensor that deepcopy refuses
    out = normswap.swap(model, "l1", example_inputs=X)
    assert not batchnorm_like_modules(out)
    folded = normswap.fold(out, example_inputs=X)
    with torch.no_grad():
        assert rel_err(folded(X), model(X)) < 1e-5


class WithMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.net(x)
        if mask is not None:
            y = y * mask
        return y


@pytest.mark.parametrize("method", ["l1", "kalman", "normprop", "bwn"])
def test_forward_with_an_optional_argument(method: str) -> None:
    model = WithMask().eval()
    out = normswap.swap(model, method, example_inputs=X,
                        **({"strict": False} if method == "normprop" else {}))
    with torch.no_grad():
        assert rel_err(out(X), model(X)) < 1e-5


def test_untracked_statistics_mismatch_says_why() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(NumericalMismatchError,
                       match=r"'1': track_running_stats=False.*recalibrate"):
        normswap.swap(model, "l1", example_inputs=X)


def test_fold_of_an_fp16_model_never_makes_inf() -> None:
    # outputs stay small (the conv's output sits at the running mean), but scale·W > 65504
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[0].weight.fill_(0.5)
        model[1].running_mean.copy_(model[0].bias)
        model[1].running_var.fill_(1e-12)
        model[1].weight.fill_(1e3)  # scale = 1e3 / sqrt(1e-5) = 3.2e5: scale·W = 1.6e5
    model = model.half()
    x = (torch.randn(2, 3, 8, 8) * 1e-4).half()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    folded = normswap.fold(model, example_inputs=x, verify=False)
    with torch.no_grad():
        assert torch.isfinite(folded(x)).all()
    assert any("inf" in s.reason and "kept unfolded" in s.reason
               for s in folded.normswap_report.skips)


def test_option_errors() -> None:
    with pytest.raises(MethodOptionError, match="'kapa'.*accepted options: kappa"):
        normswap.swap(_net(), "normprop", kapa=2.0)
    with pytest.raises(MethodOptionError, match="'mommentum'.*momentum"):
        normswap.swap(_net(), "l1", mommentum=0.1)


def test_the_users_model_is_never_modified() -> None:
    model = _net()
    flags = [m.training for m in model.modules()]
    before = state_snapshot(model)
    ids = [id(m) for m in model.modules()]
    for method in ("l1", "linf", "kalman", "normprop", "bwn", "selu"):
        normswap.swap(model, method, example_inputs=X, strict=False)
    normswap.fold(model, example_inputs=X)
    assert_same_state(state_snapshot(model), before)
    assert [id(m) for m in model.modules()] == ids
    assert [m.training for m in model.modules()] == flags
    assert isinstance(model[1], nn.BatchNorm2d) and copy.deepcopy(model) is not None


class _CachingBlock(nn.Module):
    """Checks its input size (plain fx cannot trace it) and caches a tensor in a dict on the
    first forward, as timm's attention layers cache their biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 8:
            raise ValueError("8x8 inputs only")
        key = str(x.device)  # under a trace: the name of a Proxy
        if key not in self.cache:
            self.cache[key] = self.conv.bias.view(1, -1, 1, 1) * 2
        return self.bn(self.conv(x)) + self.cache[key]


@pytest.mark.parametrize("method", ["l1", "kalman"])
def test_a_trace_leaves_no_proxy_in_a_cache(method: str) -> None:
    torch.manual_seed(0)
    model = randomize_bn(_CachingBlock()).eval()
    x = torch.randn(2, 3, 8, 8)
    out = normswap.swap(model, method, example_inputs=x)
    assert out.normswap_report.metrics["capture"]["strategy"] == "fx-shape"
    assert list(model.cache) == []  # the caller's model never ran
    for m in out.modules():
        for v in vars(m).values():
            if isinstance(v, dict):
                assert not any(isinstance(t, torch.fx.Proxy) for t in v.values()), v
    with torch.no_grad():
        assert rel_err(out(x), model(x)) < 1e-5
        assert rel_err(out(x), model(x)) < 1e-5  # and again, from the filled cache


# -- graphs specialised to the example's shapes guard themselves ---------------------------
class _PerSample(nn.Module):
    """Iterates over the batch and branches on the width: shape-aware tracing unrolls both."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        if y.shape[-1] > 12:
            y = y * 2
        return torch.stack([t.mean() for t in y])


def _guarded_kalman() -> tuple[nn.Module, torch.Tensor, nn.Module]:
    """(model, example, kalman conversion): a graph with priors, guarded (batch 2, 16x16)."""
    torch.manual_seed(0)
    model = randomize_bn(_PerSample()).eval()
    x = torch.randn(2, 3, 16, 16)
    return model, x, normswap.swap(model, "kalman", example_inputs=x)


def test_a_specialised_graph_refuses_inputs_that_take_another_branch() -> None:
    model, x, out = _guarded_kalman()  # graph priors: a GraphModule
    rep = out.normswap_report
    assert isinstance(out, torch.fx.GraphModule) and rep.metrics["capture"]["strategy"] == "fx-shape"
    assert any("checks, once per new input shape" in e.message for e in rep.notes), rep.table()
    with torch.no_grad():
        assert rel_err(out(x), model(x)) < 1e-5
        # same branches (another height, another batch content): runs and is right
        x2 = torch.randn(2, 3, 8, 16)
        assert rel_err(out(x2), model(x2)) < 1e-5
        # another batch size: the unrolled loop would be wrong; a clear error instead
        with pytest.raises(SpecialisedGraphError, match=r"iteration at .*test_hostile\.py:\d+ "
                           r"\(_PerSample\.forward\): traced with 2, these inputs give 3"):
            out(torch.randn(3, 3, 16, 16))
        # another width: the branch flips
        with pytest.raises(SpecialisedGraphError, match="control flow at .*traced with True"):
            out(torch.randn(2, 3, 16, 8))
    # the model's own class takes any shape
    plain = normswap.swap(model, "kalman", example_inputs=x, priors=False)
    assert not isinstance(plain, torch.fx.GraphModule)
    with torch.no_grad():
        x3 = torch.randn(3, 3, 16, 8)
        assert rel_err(plain(x3), model(x3)) < 1e-5


def test_a_guarded_graph_still_saves_copies_and_traces() -> None:
    import pickle

    model, x, out = _guarded_kalman()
    for clone in (copy.deepcopy(out), pickle.loads(pickle.dumps(out))):
        with torch.no_grad():
            assert rel_err(clone(x), model(x)) < 1e-5
        with pytest.raises(SpecialisedGraphError):
            clone(torch.randn(3, 3, 16, 16))
    # torch.export traces through the hook on fake tensors without checking
    ep = torch.export.export(out, (x,))
    assert rel_err(ep.module()(x), model(x)) < 1e-5


class _RootBreaks(nn.Module):
    """Capture breaks in the model's own forward (data-dependent flow), not in a submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if y.mean() > 0:  # data-dependent: no strategy captures this forward
            return y
        return -y


def test_a_capture_failure_in_the_root_forward_names_its_line() -> None:
    torch.manual_seed(0)
    model = randomize_bn(_RootBreaks()).eval()
    out = normswap.swap(model, "l1", example_inputs=X)
    rep = out.normswap_report
    cap = rep.metrics["capture"]
    assert cap["strategy"] == "regions" and cap["culprits"] == [], cap
    msg = next(w.message for w in rep.warnings if "could not capture the whole model" in w.message)
    assert re.search(r"in the model's own forward, not in a submodule, at .*test_hostile\.py:\d+ "
                     r"\(_RootBreaks\.forward\)", msg), msg
    with torch.no_grad():
        assert rel_err(out(X), model(X)) < 1e-5


def test_a_guard_survives_a_second_conversion() -> None:
    model, x, swapped_model = _guarded_kalman()
    folded = normswap.fold(swapped_model, example_inputs=x)  # re-captured by plain fx
    assert any(isinstance(m, type(swapped_model.normswap_guard)) for m in folded.modules())
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-4
        with pytest.raises(SpecialisedGraphError):
            folded(torch.randn(3, 3, 16, 16))


class _DataDecides(nn.Module):
    """Control flow on values that come from tensor data, not shapes."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        if self.how == "item":
            if y.mean().item() > 0:  # a Python number from data
                return y
            return -y
        keep = torch.nonzero(y.flatten(1).mean(1) > 0)  # how many: data
        return y.sum() * (len(keep) + 1)


@pytest.mark.parametrize("how", ["item", "nonzero"])
def test_data_never_decides_the_captured_graph(how: str) -> None:
    """A value computed from tensor data (``.item()``, the length of a ``nonzero``) must not
    be frozen into the graph as if it were a shape: the graph would hold for the example's
    data only. Shape-aware tracing refuses it like plain fx; kalman (graph priors) then keeps
    to what can be captured, and the result is right on other data."""
    torch.manual_seed(0)
    model = randomize_bn(_DataDecides(how)).eval()
    x = torch.randn(2, 3, 8, 8)
    out = normswap.swap(model, "kalman", example_inputs=x)
    cap = out.normswap_report.metrics["capture"]
    assert cap["strategy"] != "fx-shape", cap
    assert any(a.startswith("fx-shape on '<model>'") for a in cap["failed_attempts"]), cap
    with torch.no_grad():
        for _ in range(4):  # other data: the sign of the mean and the count both vary
            x2 = torch.randn(2, 3, 8, 8) * 3 + torch.randn(()) * 2
            assert rel_err(out(x2), model(x2)) < 1e-4
