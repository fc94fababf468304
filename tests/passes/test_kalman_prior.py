"""Tests for normswap.passes.kalman_prior: moment functions against Monte-Carlo moments, graph
wiring (sources, cuts, eval equivalence), and a Kalman ResNet-18 training at batch size 2.

Monte-Carlo tolerances: means within 0.03 (absolute, in units of max(1, std)) and variances
within 4% (relative) with >= 30k samples per channel, for every rule (each is exact for
independent Gaussian inputs, the max-pool rule included). Seeds are fixed.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import normswap
from normswap.capture import capture, trace
from normswap.norms.kalman import KalmanBatchNorm, kalman_from_batchnorm
from normswap.passes._infra import PassStep, run_passes
from normswap.passes._math import (
    add_moments,
    avgpool_moments,
    cat_moments,
    conv_moments,
    dropout_moments,
    linear_moments,
    maxpool_moments,
    normalised_moments,
    relu_maxpool_moments,
    relu_moments,
)
from normswap.passes.kalman_prior import propagate_kalman_priors, remove_kalman_priors
from normswap.passes.swap_norm import swap_norm
from normswap.report import PassReport
from tests.conftest import randomize_bn

MEAN_ATOL = 0.03
VAR_RTOL = 0.04


def _channel_moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) mean and biased variance."""
    dims = [0, *range(2, y.dim())]
    return y.mean(dims), y.var(dims, correction=0)


def _gaussian(gen: torch.Generator, n: int, mean: torch.Tensor, var: torch.Tensor,
              spatial: tuple[int, ...] = ()) -> torch.Tensor:
    """Independent N(mean_c, var_c) samples of shape (n, C, *spatial), float64."""
    shape = (1, -1, *[1] * len(spatial))
    z = torch.randn(n, mean.numel(), *spatial, generator=gen, dtype=torch.float64)
    return z * var.sqrt().reshape(shape) + mean.reshape(shape)


def _check(mc: tuple[torch.Tensor, torch.Tensor], analytic: tuple[torch.Tensor, torch.Tensor],
           mean_atol: float = MEAN_ATOL, var_rtol: float = VAR_RTOL) -> None:
    scale = analytic[1].sqrt().clamp_min(1.0)
    assert_close(mc[0] / scale, analytic[0] / scale, rtol=0, atol=mean_atol)
    assert_close(mc[1], analytic[1], rtol=var_rtol, atol=1e-3)


# -- pure functions vs Monte Carlo --------------------------------------------------------------
def test_relu_moments_monte_carlo() -> None:
    gen = torch.Generator().manual_seed(0)
    m = torch.tensor([-2.0, -0.5, 0.0, 0.7, 3.0, 20.0], dtype=torch.float64)
    v = torch.tensor([0.5, 1.0, 2.0, 0.1, 4.0, 1.0], dtype=torch.float64)
    x = _gaussian(gen, 200_000, m, v)
    _check(_channel_moments(F.relu(x)), relu_moments(m, v))
    # degenerate variance: relu of a constant
    mean0, var0 = relu_moments(torch.tensor([-1.0, 2.0]), torch.zeros(2))
    assert_close(mean0, torch.tensor([0.0, 2.0]))
    assert_close(var0, torch.zeros(2))


@pytest.mark.parametrize("groups,stride,padding,aware", [
    (1, 1, 0, False),   # interior formula, no border
    (2, 2, 0, False),   # groups and stride: stride does not change interior moments
    (1, 1, 1, True),    # zero padding: padding-aware mixture moments
    (2, 1, 2, True),
])
def test_relu_conv_block_monte_carlo(groups: int, stride: int, padding: int,
                                     aware: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    m = torch.tensor([0.3, -0.4, 1.0, 0.0], dtype=torch.float64)
    v = torch.tensor([1.0, 0.5, 2.0, 0.3], dtype=torch.float64)
    w = torch.randn(6, 4 // groups, 3, 3, generator=gen, dtype=torch.float64) * 0.4
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    x = _gaussian(gen, 2048, m, v, (10, 10))
    y = F.conv2d(F.relu(x), w, b, stride, padding, 1, groups)
    rm, rv = relu_moments(m, v)
    analytic = conv_moments(rm, rv, w, b, stride, padding, 1, groups,
                            input_size=(10, 10) if aware else None)
    _check(_channel_moments(y), analytic)


def test_conv_interior_formula_is_explicit_sum() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)
    m, v = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    mean, var = conv_moments(m, v, w, None, groups=2)
    for o in range(4):
        g = o // 2
        assert_close(mean[o], (w[o].sum((1, 2)) * m[2 * g:2 * g + 2]).sum())
        assert_close(var[o], ((w[o] ** 2).sum((1, 2)) * v[2 * g:2 * g + 2]).sum())


def test_linear_add_cat_monte_carlo() -> None:
    gen = torch.Generator().manual_seed(3)
    m1 = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    v1 = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    m2 = torch.tensor([1.0, 0.0, -2.0, 0.3], dtype=torch.float64)
    v2 = torch.tensor([0.2, 1.0, 3.0, 0.7], dtype=torch.float64)
    w = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(4, generator=gen, dtype=torch.float64)
    x1, x2 = _gaussian(gen, 100_000, m1, v1), _gaussian(gen, 100_000, m2, v2)
    y = F.linear(F.relu(x1), w, b) + x2   # residual add of independent branches
    analytic = add_moments(linear_moments(*relu_moments(m1, v1), w, b), (m2, v2))
    _check(_channel_moments(y), analytic)
    z = F.linear(F.relu(x1), w, b) - 0.5 * x2
    _check(_channel_moments(z), add_moments(linear_moments(*relu_moments(m1, v1), w, b),
                                            (m2, v2), alpha=-0.5))
    cat = cat_moments([(m1, v1), (m2, v2)])
    _check(_channel_moments(torch.cat([x1, x2], 1)), cat)


def test_avgpool_dropout_normalised_monte_carlo() -> None:
    gen = torch.Generator().manual_seed(4)
    m = torch.tensor([0.5, -1.0], dtype=torch.float64)
    v = torch.tensor([1.0, 3.0], dtype=torch.float64)
    x = _gaussian(gen, 4000, m, v, (8, 8))
    _check(_channel_moments(F.avg_pool2d(x, 2)), avgpool_moments(m, v, 4))
    _check(_channel_moments(F.adaptive_avg_pool2d(x, 1)), avgpool_moments(m, v, 64))
    _check(_channel_moments(F.avg_pool2d(x, 2, divisor_override=3)),
           avgpool_moments(m, v, 4, divisor=3))
    torch.manual_seed(5)
    _check(_channel_moments(F.dropout(x, 0.3, training=True)), dropout_moments(m, v, 0.3))
    gamma, beta, eps = torch.tensor([2.0, -0.5]), torch.tensor([0.3, 1.0]), 0.5
    y = gamma.double().reshape(1, 2, 1, 1) * (x - m.reshape(1, 2, 1, 1)) / torch.sqrt(
        v.reshape(1, 2, 1, 1) + eps) + beta.double().reshape(1, 2, 1, 1)
    _check(_channel_moments(y), normalised_moments(m, v, gamma, beta, eps))


def test_maxpool_moments_monte_carlo() -> None:
    gen = torch.Generator().manual_seed(6)
    m = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    v = torch.tensor([1.0, 0.3, 4.0], dtype=torch.float64)
    x = _gaussian(gen, 2000, m, v, (12, 12))
    _check(_channel_moments(F.max_pool2d(x, (1, 2))), maxpool_moments(m, v, 2))
    _check(_channel_moments(F.max_pool2d(x, 3)), maxpool_moments(m, v, 9))
    _check(_channel_moments(F.max_pool2d(F.relu(x), 3)), relu_maxpool_moments(m, v, 9))
    # window 1 is the identity
    assert_close(maxpool_moments(m, v, 1)[1], v)


def test_moment_functions_gradcheck() -> None:
    gen = torch.Generator().manual_seed(7)
    m = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    v = (torch.rand(4, generator=gen, dtype=torch.float64) + 0.2).requires_grad_()
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: torch.cat(relu_moments(a, b)), (m, v))
    assert torch.autograd.gradcheck(lambda a, b: torch.cat(maxpool_moments(a, b, 4)), (m, v))
    assert torch.autograd.gradcheck(lambda a, b: torch.cat(relu_maxpool_moments(a, b, 4)),
                                    (m, v))
    w2 = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: torch.cat(conv_moments(a, b, c, groups=2)), (m, v, w2))
    assert torch.autograd.gradcheck(
        lambda a, b, c: torch.cat(conv_moments(a[:2], b[:2], c, padding=1, input_size=(4, 4))),
        (m, v, w))


# -- graph wiring -------------------------------------------------------------------------------
class _Block(nn.Module):
    """conv-bn-relu-conv-bn + residual, relu, pool, flatten, linear-bn1d."""

    def __init__(self, act: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(4)
        self.act = act if act is not None else nn.ReLU()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)
        self.bn3 = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn0(self.stem(x)))
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(h)))))
        y = F.relu(y + h)
        return self.bn3(self.fc(torch.flatten(self.pool(y), 1)))


def _kalmanise(model: nn.Module, **options: object) -> nn.Module:
    """Replace every BatchNorm by its Kalman layer in a module walk."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, kalman_from_batchnorm(child, **options))
        else:
            _kalmanise(child, **options)
    return model


def _randomise_stats(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, KalmanBatchNorm)):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.2)


def _record_priors(gm: nn.Module) -> dict[str, object]:
    """Forward pre-hooks recording the prior each Kalman layer receives."""
    seen: dict[str, object] = {}
    for name, m in gm.named_modules():
        if isinstance(m, KalmanBatchNorm):
            def hook(mod: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
                seen[name] = kwargs.get("prior")
            m.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_block_wiring_matches_analytic_chain() -> None:
    torch.manual_seed(0)
    model = _kalmanise(_Block())
    _randomise_stats(model, 1)
    gm = trace(model)
    before = copy.deepcopy(gm)
    x = torch.randn(2, 3, 6, 6)
    gm, report = propagate_kalman_priors(gm, gain=0.9)
    # report: sources named per layer; bn0 is the first of its chain
    changes = {c.node: c.detail for c in report.changes}
    assert set(changes) == {"bn1", "bn2", "bn3"}
    assert "prior from bn0" in changes["bn1"] and "prior from bn1" in changes["bn2"]
    assert "prior from bn0, bn2" in changes["bn3"]
    assert not report.skips and any(n.node == "bn0" for n in report.notes)
    # eval: same computation as before, bit for bit; priors never reach the layers
    gm.eval()
    before.eval()
    seen = _record_priors(gm)
    assert torch.equal(gm(x), before(x))
    assert all(p is None for p in seen.values())
    # train: bn2's prior is the analytic chain relu -> 1x1 conv from bn1's combined moments
    gm.train()
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    gm.bn1.register_forward_hook(lambda mod, a, out: stats.__setitem__("bn1", out[1]))
    out = gm(x)
    assert seen["bn0"] is None and all(seen[k] is not None for k in ("bn1", "bn2", "bn3"))
    bn1 = gm.bn1
    expect = conv_moments(*relu_moments(*normalised_moments(*stats["bn1"], bn1.weight,
                                                               bn1.bias, bn1.eps)),
                          gm.conv2.weight, gm.conv2.bias)
    assert_close(seen["bn2"][0], expect[0])
    assert_close(seen["bn2"][1], expect[1])
    # gradients flow through the prior path
    assert seen["bn2"][0].requires_grad and seen["bn2"][1].grad_fn is not None
    out.sum().backward()
    assert gm.conv2.weight.grad is not None
    # undo: plain layer calls again, same eval output
    trained = gm.eval()(x)
    gm, undo = remove_kalman_priors(gm)
    assert len(undo.changes) == 4 and "prior" not in gm.code
    assert torch.equal(gm.eval()(x), trained)


def test_unsupported_op_cuts_chain() -> None:
    torch.manual_seed(1)
    gm = trace(_kalmanise(_Block(act=nn.Softmax(dim=1))))
    gm, report = propagate_kalman_priors(gm)
    skips = {s.node: s for s in report.skips}
    # bn1 follows the softmax; bn3's input mixes bn2's chain with the cut softmax branch
    assert set(skips) == {"bn1", "bn3"} and {s.op for s in skips.values()} == {"Softmax"}
    assert "'act'" in skips["bn1"].reason and "'act'" in skips["bn3"].reason
    assert {c.node for c in report.changes} == {"bn2"}
    seen = _record_priors(gm)
    gm.train()(torch.randn(2, 3, 6, 6))
    assert seen["bn1"] is None and seen["bn2"] is not None and seen["bn3"] is None


def test_options_maxpool_refusal_and_errors() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    gm, report = propagate_kalman_priors(trace(_kalmanise(copy.deepcopy(model))))
    assert [c.node for c in report.changes] == ["5"]
    gm, report = propagate_kalman_priors(trace(_kalmanise(copy.deepcopy(model))),
                                         approximate_maxpool=False, gain="auto",
                                         fallback_ratio=10.0)
    assert [(s.node, s.op) for s in report.skips] == [("5", "MaxPool2d")]
    assert gm.get_submodule("1").gain == "auto" and gm.get_submodule("5").fallback_ratio == 10
    with pytest.raises(normswap.MethodOptionError, match="'unrelated'.*accepted options:.*gain"):
        normswap.swap(model, "kalman", unrelated=1)
    with pytest.raises(ValueError, match="prior_moments"):
        propagate_kalman_priors(trace(_kalmanise(copy.deepcopy(model))), prior_moments="mc")
    with pytest.raises(ValueError, match="gain must be"):
        propagate_kalman_priors(trace(_kalmanise(copy.deepcopy(model))), gain=2.0)
    # raw mode (authors' code): the prior is the previous layer's combined moments pushed on
    gm, _ = propagate_kalman_priors(trace(_kalmanise(copy.deepcopy(model))),
                                    prior_moments="raw", padding_aware=True)
    seen = _record_priors(gm)
    gm.train()(torch.randn(2, 3, 12, 12))
    assert seen["5"] is not None and torch.isfinite(seen["5"][1]).all()


def test_kalman_resnet18_trains_at_batch_two() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _kalmanise(torchvision.models.resnet18(num_classes=10), gain=0.9)
    _randomise_stats(model, 3)
    gm = trace(model)
    names = [n for n, m in gm.named_modules() if isinstance(m, KalmanBatchNorm)]
    keys_before = set(gm.state_dict())
    reference = copy.deepcopy(gm).eval()
    gm, report = propagate_kalman_priors(gm)
    assert len(names) == 20 and set(gm.state_dict()) == keys_before
    changes = {c.node: c.detail for c in report.changes}
    assert set(changes) == set(names) - {"bn1"} and not report.skips
    assert "prior from bn1" in changes["layer1.0.bn1"]
    assert "prior from layer1.0.bn1" in changes["layer1.0.bn2"]
    assert "prior from bn1, layer1.0.bn2" in changes["layer1.1.bn1"]
    assert "layer2.0.bn2" in changes["layer2.1.bn1"]
    assert "layer2.0.downsample.1" in changes["layer2.1.bn1"]
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(gm.eval()(x), reference(x))
    seen = _record_priors(gm)
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
    for step in range(3):
        seen.clear()
        xb, yb = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
        loss = F.cross_entropy(gm(xb), yb)
        assert torch.isfinite(loss), f"step {step}: loss {loss}"
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert seen["bn1"] is None
        assert all(seen[n] is not None for n in names if n != "bn1")
    assert all(torch.isfinite(p).all() for p in gm.parameters())
    assert all(torch.isfinite(b).all() for b in gm.buffers())


# -- graphs captured by torch.export (ATen ops between lifted modules) ---------------------------
class _FunctionalResidual(nn.Module):
    """A residual CNN written with functional ops: F.relu, x + y, torch.cat, F.max_pool2d,
    an in-place relu, a spatial mean, a functional dropout and a view."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(16, 8, 1)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        self.bn4 = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn0(self.stem(x)))
        y = self.bn2(self.c2(F.relu(self.bn1(self.c1(h)))))
        y = F.relu(y + h)
        z = F.max_pool2d(torch.cat([y, h * 0.5], 1), 2)
        z = torch.relu_(self.bn3(self.c3(z)))
        z = F.dropout(z.mean((2, 3)), 0.1, training=self.training)
        return self.bn4(self.fc(z.view(z.shape[0], -1)))


_KALMAN = PassStep(swap_norm, {"factory": lambda bn: kalman_from_batchnorm(bn, gain=0.9)})


def _kalman_region(model: nn.Module, x: torch.Tensor, strategy: str
                   ) -> tuple[torch.fx.GraphModule, PassReport]:
    """Capture with one strategy, then swap to Kalman and wire the priors with the runner."""
    cap = capture(copy.deepcopy(model), (x,), strategies=(strategy,), bn_subclasses="inline")
    assert cap.strategy == strategy, cap.attempts
    report = PassReport()
    gm = run_passes(cap.regions[0].gm, [_KALMAN, PassStep(propagate_kalman_priors)],
                    context={"strict": True}, report=report)
    return gm, report


def test_export_capture_gets_the_same_priors_as_fx() -> None:
    torch.manual_seed(0)
    model = randomize_bn(_FunctionalResidual(), seed=4).eval()
    x = torch.randn(4, 3, 8, 8)
    graphs, reports = {}, {}
    for strategy in ("fx", "export"):
        graphs[strategy], reports[strategy] = _kalman_region(model, x, strategy)
    exported = graphs["export"]
    aten_ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"aten.relu.default", "aten.relu_.default", "aten.add.Tensor", "aten.mul.Tensor",
            "aten.cat.default", "aten.max_pool2d.default", "aten.mean.dim",
            "aten.dropout.default", "aten.view.default"} <= aten_ops
    wired = {s: {c.node: c.detail.split(" (node")[0] for c in r.changes
                 if c.after.endswith("(Kalman prior)")} for s, r in reports.items()}
    assert wired["export"] == wired["fx"] == {
        "bn1": "prior from bn0", "bn2": "prior from bn1", "bn3": "prior from bn0, bn2",
        "bn4": "prior from bn3"}
    for r in reports.values():
        assert not r.skips
        assert r.metrics["kalman_layers"] == 5 and r.metrics["kalman_layers_with_prior"] == 4
    # eval: exactly the BN model; train: fx and export compute the same thing, priors included
    with torch.no_grad():
        assert_close(exported.eval()(x), model(x))
    seen = {s: _record_priors(g) for s, g in graphs.items()}
    outs = {s: g.train()(x) for s, g in graphs.items()}
    assert_close(outs["export"], outs["fx"], rtol=1e-6, atol=1e-6)
    for name in ("bn1", "bn2", "bn3", "bn4"):
        assert seen["export"][name] is not None
        assert_close(seen["export"][name][0], seen["fx"][name][0])
        assert_close(seen["export"][name][1], seen["fx"][name][1])
    assert seen["export"]["bn0"] is None
    # the export-captured result also trains and undoes its priors
    outs["export"].sum().backward()
    assert exported.get_submodule("c2").weight.grad is not None
    exported, undo = remove_kalman_priors(exported)
    assert len(undo.changes) == 5 and "prior" not in exported.code


def test_swap_api_matches_the_export_captured_kalman_model() -> None:
    torch.manual_seed(1)
    model = randomize_bn(_FunctionalResidual(), seed=5).eval()
    x = torch.randn(4, 3, 8, 8)
    swapped = normswap.swap(model, "kalman", example_inputs=x, gain=0.9)
    report = swapped.normswap_report
    assert {c.node for c in report.changes if c.after.endswith("(Kalman prior)")} == {
        "bn1", "bn2", "bn3", "bn4"}
    exported, _ = _kalman_region(model, x, "export")
    with torch.no_grad():
        assert_close(swapped.train()(x), exported.train()(x), rtol=1e-6, atol=1e-6)


class _AtenCuts(nn.Module):
    """Ops without a moment rule between Kalman layers, as ATen after export."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(4)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(8, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn0(self.c0(x))
        y = self.bn1(self.c1(F.softmax(h, dim=1)))   # softmax: no per-channel rule
        z = torch.cat([F.relu(y), F.relu(h)], dim=-1)  # cat along width: cut
        return self.bn2(self.c2(torch.cat([z[..., :8], z[..., 8:]], 1)))


def test_export_capture_cuts_name_the_aten_op() -> None:
    model = randomize_bn(_AtenCuts(), seed=2).eval()
    x = torch.randn(2, 3, 8, 8)
    gm, report = _kalman_region(model, x, "export")
    skips = {s.node: s for s in report.skips}
    assert set(skips) == {"bn1", "bn2"}
    assert skips["bn1"].op == "aten.softmax.int" and "softmax" in skips["bn1"].reason
    assert skips["bn2"].op == "aten.cat.default" and "dim -1" in skips["bn2"].reason
    seen = _record_priors(gm)
    gm.train()(x)
    assert seen["bn1"] is None and seen["bn2"] is None


class _MoreOps(nn.Module):
    """rsub, neg, a cast, a max-pool with indices, a flatten and a mean over the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(4)
        self.c1 = nn.Conv2d(4, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(16, 4)
        self.bn2 = nn.BatchNorm1d(4)
        self.bn3 = nn.BatchNorm2d(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.bn0(self.c0(x)))
        h = (1.0 - (-h)).float()
        p, _ = F.max_pool2d(h, 2, return_indices=True)
        y = self.bn1(self.c1(p))
        z = self.bn2(self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 2), 1)))
        return z, self.bn3(y.mean(1, keepdim=True))


@pytest.mark.parametrize("strategy", ["fx", "export"])
def test_more_rules_on_both_captures(strategy: str) -> None:
    model = randomize_bn(_MoreOps(), seed=3).eval()
    x = torch.randn(4, 3, 8, 8)
    gm, report = _kalman_region(model, x, strategy)
    changes = {c.node: c.detail for c in report.changes if c.after.endswith("(Kalman prior)")}
    assert set(changes) == {"bn1", "bn2"}
    skips = {s.node: s.reason for s in report.skips}
    assert set(skips) == {"bn3"} and "includes the batch or channel dim" in skips["bn3"]
    seen = _record_priors(gm)
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    gm.bn0.register_forward_hook(lambda mod, a, out: stats.__setitem__("bn0", out[1]))
    gm.train()(x)
    # bn1's prior: relu -> neg -> 1 - (.) -> max of 4 (the ReLU is hidden by the affine ops)
    # -> 1x1 conv, from bn0's combined moments
    bn0 = gm.bn0
    mean, var = relu_moments(*normalised_moments(*stats["bn0"], bn0.weight, bn0.bias, bn0.eps))
    expect = conv_moments(*maxpool_moments(mean + 1.0, var, 4), gm.c1.weight, gm.c1.bias)
    assert_close(seen["bn1"][0], expect[0])
    assert_close(seen["bn1"][1], expect[1])
    assert seen["bn2"] is not None and seen["bn2"][0].shape == (4,) and seen["bn3"] is None


class _BNReLU(nn.BatchNorm2d):
    """A BN subclass with its own forward (as timm's BatchNormAct2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


def test_grafted_kalman_layer_gets_no_prior_and_is_reported() -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), _BNReLU(4), nn.Conv2d(4, 4, 3),
                                       nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 9, 9)
    cap = capture(copy.deepcopy(model), (x,), strategies=("fx",), bn_subclasses="leaf")
    report = PassReport()
    gm = run_passes(cap.regions[0].gm, [_KALMAN, PassStep(propagate_kalman_priors)],
                    context={"strict": True}, report=report)
    skips = {s.node: s for s in report.skips}
    assert set(skips) == {"1", "3"}
    assert "grafted" in skips["1"].reason and "takes no prior" in skips["1"].reason
    assert "prior chain cut at node" in skips["3"].reason
    assert report.metrics["kalman_layers"] == 2
    assert report.metrics["kalman_layers_with_prior"] == 0
    with torch.no_grad():
        assert_close(gm.eval()(x), model(x))
    seen = _record_priors(gm)
    out = gm.train()(x)   # the grafted layer is called as before: no prior argument
    assert torch.isfinite(out).all() and seen["3"] is None


@pytest.mark.parametrize("act", [nn.GELU(), nn.SiLU(), nn.ReLU6(), nn.Hardswish(),
                                 nn.LeakyReLU(0.2)])
def test_any_elementwise_activation_passes_moments(act: nn.Module) -> None:
    # moments through a smooth or kinked activation by quadrature, checked by Monte Carlo
    from normswap.passes.kalman_prior import _mom_activation

    torch.manual_seed(4)
    gm = trace(_kalmanise(_Block(act=act)))
    gm, report = propagate_kalman_priors(gm)
    assert not report.skips and {c.node for c in report.changes} == {"bn1", "bn2", "bn3"}
    mean, var = torch.randn(6) * 0.5, torch.rand(6) + 0.5
    x = mean + var.sqrt() * torch.randn(200_000, 6)
    em, ev = _mom_activation((mean, var), act)
    y = act(x)
    assert torch.allclose(em, y.mean(0), atol=0.01) and torch.allclose(ev, y.var(0), rtol=0.03)
    gm.train()(torch.randn(4, 3, 6, 6)).sum().backward()


class _SE(nn.Module):
    """A squeeze-excitation gate, a layer scale and a channel slice between Kalman layers."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.c1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.bn0(self.c0(x)))
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(h, 1)))))
        h = h * g * self.gamma.view(-1, 1, 1)
        return self.bn1(self.c1(h[:, 2:6]))


def test_gates_layer_scales_and_channel_slices_pass_moments() -> None:
    torch.manual_seed(5)
    gm = trace(_kalmanise(_SE()))
    gm, report = propagate_kalman_priors(gm)
    assert not report.skips and {c.node for c in report.changes} == {"bn1"}
    seen = _record_priors(gm)
    gm.train()(torch.randn(4, 3, 6, 6)).sum().backward()
    assert seen["bn1"] is not None and seen["bn1"][0].shape == (4,)


# -- padding, interpolation, stochastic depth, learnt shifts -------------------------------
def _exact(empirical: tuple[torch.Tensor, torch.Tensor],
           rule: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    assert rule is not None
    assert_close(rule[0], empirical[0], rtol=1e-12, atol=1e-12)
    assert_close(rule[1], empirical[1], rtol=1e-12, atol=1e-12)


def test_pad_upsample_and_shift_moments_are_the_empirical_ones() -> None:
    """On a batch, the rules map the batch's own per-channel moments to those of the output
    exactly (float64)."""
    from normswap.passes import kalman_prior as kp

    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64) * 2 + 1
    mom = _channel_moments(x)
    y = F.pad(x, (1, 2, 0, 3), value=0.7)
    _exact(_channel_moments(y), kp._mom_pad(mom, x, y, 0.7))
    for y in (F.interpolate(x, scale_factor=2, mode="nearest"),
              F.interpolate(x, scale_factor=(3, 1), mode="nearest-exact")):
        _exact(_channel_moments(y), kp._mom_upsample(mom, x, y, True))
    one = x.mean((2, 3), keepdim=True)  # a 1x1 map broadcast by any interpolation
    y = F.interpolate(one, size=(7, 9), mode="bilinear", align_corners=False)
    _exact(_channel_moments(y), kp._mom_upsample(_channel_moments(one), one, y, False))
    assert kp._mom_upsample(mom, x, F.interpolate(x, scale_factor=2, mode="bilinear"),
                            False) is None
    assert kp._mom_pad(mom, x, F.pad(x, (-1, 0)), 0.0) is None  # cropping
    b = torch.randn(4, 1, 1, dtype=torch.float64)
    _exact(_channel_moments(x - 2 * b), kp._mom_channel_shift(mom, x, b, -2.0))
    assert kp._mom_channel_shift(mom, x, torch.randn(4, 5, 6), 1.0) is None  # positional


class _PadUpShift(nn.Module):
    """The ops of EfficientNet (stochastic depth), HRNet (nearest upsampling), DeepLab's ASPP
    pooling (a 1x1 map interpolated), TResNet (padding) and HGNetV2 (a learnt scalar shift)."""

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        self.c0, self.bn0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.drop = torchvision.ops.StochasticDepth(0.2, "row")
        self.c1, self.bn1 = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.c2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.c3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.shift = nn.Parameter(torch.tensor([0.3]))
        self.c4, self.bn4 = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn0(self.c0(x)))
        y = y + self.drop(y)
        y = F.relu(self.bn1(self.c1(F.pad(y, (1, 1, 1, 1)))))
        y = F.relu(self.bn2(self.c2(self.up(y))))
        g = F.relu(self.bn3(self.c3(self.pool(y))))
        g = F.interpolate(g, size=y.shape[-2:], mode="bilinear", align_corners=False)
        return self.bn4(self.c4(torch.cat([y + self.shift, g], 1)))


@pytest.mark.parametrize("strategy", ["fx", "export"])
def test_padding_interpolation_stochastic_depth_and_shifts_pass_moments(strategy: str) -> None:
    pytest.importorskip("torchvision")
    model = randomize_bn(_PadUpShift(), seed=2).eval()
    x = torch.randn(4, 3, 8, 8)
    gm, report = _kalman_region(model, x, strategy)
    wired = {c.node for c in report.changes if c.after.endswith("(Kalman prior)")}
    assert wired == {"bn1", "bn2", "bn3", "bn4"}, report.table()
    assert not report.skips, report.table()
    seen = _record_priors(gm)
    gm.train()(x)
    assert all(seen[n] is not None and seen[n][0].shape == (4,) for n in wired), seen


class _BilinearCrop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0, self.bn0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c1, self.bn1 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.c2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn0(self.c0(x)))
        a = self.bn1(self.c1(F.interpolate(y, scale_factor=2, mode="bilinear")))
        return a, self.bn2(self.c2(F.pad(y, (-1, 0, 0, -1))))


@pytest.mark.parametrize("strategy", ["fx", "export"])
def test_interpolation_and_cropping_without_a_rule_are_cut_in_the_report(strategy: str) -> None:
    model = randomize_bn(_BilinearCrop(), seed=4).eval()
    gm, report = _kalman_region(model, torch.randn(4, 3, 8, 8), strategy)
    skips = {s.node: s.reason for s in report.skips}
    assert set(skips) == {"bn1", "bn2"}, report.table()
    assert "interpolation from (8, 8) to (16, 16) changes the moments" in skips["bn1"]
    assert "negative padding crops" in skips["bn2"]
