"""to_normprop: eval-exact conversion of conv/linear → BN → ReLU chains, and honest refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normswap.capture import capture
from normswap.errors import UnsupportedNodeError
from normswap.norms.normprop import (
    POST_RELU_SCALE,
    POST_RELU_SHIFT,
    NormPropBase,
    NormPropConv2d,
    NormPropCorrection,
    NormPropLinear,
)
from normswap.passes._match import module_of
from normswap.passes._math import absorb_post_relu, normprop_params
from normswap.passes.to_normprop import to_normprop
from tests.conftest import randomize_bn, rel_err

torchvision = pytest.importorskip("torchvision")


def _convert(model: nn.Module, **opts: object) -> tuple[fx.GraphModule, object]:
    """Trace a private copy in eval mode (as the API does) and convert it."""
    gm = fx.symbolic_trace(copy.deepcopy(model).eval())
    return to_normprop(gm, **opts)


def _count(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def _assert_eval_exact(model: nn.Module, gm: nn.Module, x: torch.Tensor,
                       tol: float = 1e-4) -> None:
    with torch.no_grad():
        ref, out = model.eval()(x), gm.eval()(x)
    assert rel_err(out, ref) < tol, rel_err(out, ref)


# -- pure math ---------------------------------------------------------------------------------

def test_normprop_params_reproduce_conv_bn() -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    s, t = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    gamma, beta = normprop_params(w, b, s, t, kappa=1.21)
    x = torch.randn(5, 3, dtype=torch.float64)
    expected = s * (x @ w.t() + b) + t
    got = gamma * (x @ w.t()) / (1.21 * w.norm(dim=1)) + beta
    torch.testing.assert_close(got, expected)


def test_absorb_post_relu_undoes_the_correction() -> None:
    w, b = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    r = torch.relu(torch.randn(7, 6, dtype=torch.float64))
    o = POST_RELU_SCALE * r + POST_RELU_SHIFT
    w2, b2 = absorb_post_relu(w, b)
    torch.testing.assert_close(o @ w2.t() + b2, r @ w.t() + b)


# -- torchvision -------------------------------------------------------------------------------

def test_vgg11_bn_converts_fully_and_eval_exact() -> None:
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.vgg11_bn(weights=None, num_classes=10)).eval()
    gm, report = _convert(model, strict=True)
    assert _count(gm, _BatchNorm) == 0
    assert _count(gm, NormPropConv2d) == 8
    assert _count(gm, NormPropCorrection) == 8
    assert _count(gm, nn.ReLU) == 10  # 8 kept in features + 2 in the classifier
    assert not report.skips
    assert len([c for c in report.changes if "NormPropCorrection" in c.after]) == 8
    # 7 NormProp convs and the first Linear absorb a correction
    assert len([c for c in report.changes if "corrected input" in c.after]) == 8
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    _assert_eval_exact(model, gm, x)
    assert report.key_map["features.1.running_mean"] is None


def test_resnet18_strict_raises_naming_every_residual_add() -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    with pytest.raises(UnsupportedNodeError) as info:
        _convert(model, strict=True)
    msg = str(info.value)
    for add in ["add"] + [f"add_{i}" for i in range(1, 8)]:
        assert f"residual sum '{add}'" in msg, add
    for bn in ("bn1", "layer1.0.bn2", "layer2.0.downsample.1", "layer4.1.bn2"):
        assert f"  '{bn}' (BatchNorm2d)" in msg, bn
    assert msg.count("BatchNorm2d)") == 12  # collected, raised once
    assert "strict=False" in msg


def test_resnet18_partial_conversion_is_eval_exact_and_reported() -> None:
    model = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10), seed=2).eval()
    gm, report = _convert(model, strict=False)
    assert _count(gm, NormPropConv2d) == 8  # each block's conv1/bn1/relu
    assert _count(gm, nn.BatchNorm2d) == 12
    skipped = {s.node for s in report.skips}
    assert "layer1.0.bn2" in skipped and "bn1" in skipped and len(skipped) == 12
    assert all(s.reason for s in report.skips)
    assert report.warnings
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    _assert_eval_exact(model, gm, x)


# -- small models ------------------------------------------------------------------------------

def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(16, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, 3))


def test_mlp_linear_bn1d_relu_eval_exact_and_trains() -> None:
    torch.manual_seed(0)
    model = randomize_bn(_mlp(), seed=4).eval()
    gm, report = _convert(model)
    assert _count(gm, NormPropLinear) == 2 and _count(gm, _BatchNorm) == 0
    x = torch.randn(32, 12)
    _assert_eval_exact(model, gm, x, tol=1e-5)
    # train mode: the same NormProp forward (no batch statistics), dropout active, backprop
    gm.train()
    out = gm(x)
    out.square().mean().backward()
    for name, p in gm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    layer = gm.get_submodule("0")
    assert isinstance(layer, NormPropLinear) and layer.gamma.grad.abs().sum() > 0


class _FunctionalNet(nn.Module):
    """Functional ReLUs, max-pool, a plain padded conv consumer, 'same' padding, view → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding="same", groups=2)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 6, 3, stride=2, padding=1)  # plain consumer, no BN after it
        self.c4 = nn.Conv2d(6, 6, 1)
        self.b4 = nn.BatchNorm2d(6)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.max_pool2d(x, 2)
        x = torch.relu(self.b2(self.c2(x)))
        x = self.c3(x)
        x = self.b4(self.c4(x)).relu()
        x = self.pool(x)
        return self.fc(x.view(x.size(0), -1))


def test_functional_relus_pools_and_padding_are_exact() -> None:
    torch.manual_seed(0)
    model = randomize_bn(_FunctionalNet(), seed=5).eval()
    gm, report = _convert(model)
    assert _count(gm, _BatchNorm) == 0 and _count(gm, NormPropBase) == 3
    # the plain conv c3 now pads explicitly with c
    pads = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.pad]
    assert len(pads) == 1 and pads[0].kwargs["value"] == pytest.approx(POST_RELU_SHIFT)
    assert gm.get_submodule("c3").padding == (0, 0)
    assert gm.get_submodule("c2").padding_value == pytest.approx(POST_RELU_SHIFT)
    x = torch.randn(3, 3, 16, 16)
    _assert_eval_exact(model, gm, x, tol=1e-5)


class _Refusals(nn.Module):
    """One of each refusal the pass must report."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)          # not preceded by conv
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)             # followed by ReLU6
        self.act = nn.ReLU6()
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.b2 = nn.BatchNorm2d(4)             # conv output has 2 users
        self.c3 = nn.Conv2d(4, 4, 3, padding=1)
        self.b3 = nn.BatchNorm2d(4)             # ReLU output is returned (graph output)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.bn_in(x)
        x = self.act(self.b1(self.c1(x)))
        y = self.c2(x)
        x = F.relu(self.b2(y)) * y
        return F.relu(self.b3(self.c3(x))), x


def test_every_refusal_is_collected_and_raised_once() -> None:
    model = randomize_bn(_Refusals()).eval()
    with pytest.raises(UnsupportedNodeError) as info:
        _convert(model)
    msg = str(info.value)
    assert "4 BatchNorm node(s)" in msg
    assert "'bn_in' (BatchNorm2d): BN not preceded by Conv" in msg
    assert "'b1' (BatchNorm2d): BN output feeds 'act' (ReLU6)" in msg
    assert "'b2' (BatchNorm2d): conv output 'c2' has 2 users" in msg
    assert "'b3' (BatchNorm2d): post-ReLU output is a graph output" in msg
    gm, report = _convert(model, strict=False)
    assert {s.node for s in report.skips} == {"bn_in", "b1", "b2", "b3"}
    assert _count(gm, NormPropBase) == 0
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for a, b in zip(model(x), gm(x)):
            torch.testing.assert_close(a, b)


class _AvgPad(nn.Module):
    def __init__(self, count_include_pad: bool) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 4, 3)
        self.b = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(3, padding=1, count_include_pad=count_include_pad)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.pool(torch.relu(self.b(self.c(x)))))


def test_avg_pool_counting_zero_padding_is_refused() -> None:
    model = randomize_bn(_AvgPad(count_include_pad=True)).eval()
    with pytest.raises(UnsupportedNodeError, match="count_include_pad"):
        _convert(model)
    model = randomize_bn(_AvgPad(count_include_pad=False)).eval()
    gm, _ = _convert(model)
    _assert_eval_exact(model, gm, torch.randn(2, 2, 9, 9), tol=1e-5)


class _SharedNext(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Linear(4, 4)
        self.b = nn.BatchNorm1d(4)
        self.shared = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(torch.relu(self.b(self.c(x)))) + self.shared(x)


def test_shared_next_layer_is_refused() -> None:
    model = randomize_bn(_SharedNext()).eval()
    with pytest.raises(UnsupportedNodeError, match="module 'shared' is called 2 times"):
        _convert(model)


def test_new_modules_follow_the_graph_mode() -> None:
    gm, _ = _convert(randomize_bn(_mlp()).eval())
    assert not any(m.training for m in gm.modules() if not list(m.children()))


def test_conv1d_reflect_and_zero_padding_chain_is_exact() -> None:
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm1d(4), nn.ReLU(),
        nn.Conv1d(4, 4, 5, padding=2, dilation=1), nn.BatchNorm1d(4), nn.ReLU(),
        nn.Conv1d(4, 3, 3, padding=1, padding_mode="replicate"),  # plain, non-zero padding
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(3, 2))
    model = randomize_bn(model, seed=7).eval()
    gm, report = _convert(model)
    assert _count(gm, NormPropBase) == 2
    assert not [n for n in gm.graph.nodes if n.target is F.pad]  # replicate needs no pad node
    _assert_eval_exact(model, gm, torch.randn(3, 2, 11), tol=1e-5)


def test_model_without_bn_is_left_alone() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU())
    gm, report = _convert(model)
    assert not report.changes and any("no BatchNorm" in n.message for n in report.notes)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Linear(4, 4)
        self.b = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 4)
        self.tied = nn.Linear(4, 4)
        self.tied.weight = self.head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(self.c(x)))) + self.tied(x)


def test_tied_next_layer_is_refused() -> None:
    model = randomize_bn(_Tied()).eval()
    with pytest.raises(UnsupportedNodeError, match="tied weights"):
        _convert(model)


# -- graphs captured by torch.export (ATen ops between lifted modules) ---------------------------

class _AtenChain(nn.Module):
    """Plain chains written with functional ops; export turns them into ATen nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.b3 = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.max_pool2d(torch.relu_(self.b2(self.c2(x))), 2)
        x = F.dropout(x.view(x.shape[0], -1), 0.1, training=self.training)
        x = F.relu(self.b3(self.fc(x)), inplace=True)
        return self.head(F.dropout(x, 0.2, self.training))


def _export(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    cap = capture(copy.deepcopy(model), (x,), strategies=("export",), bn_subclasses="inline")
    assert cap.strategy == "export", cap.attempts
    return cap.regions[0].gm


def test_export_captured_chains_convert_eval_exact() -> None:
    torch.manual_seed(0)
    model = randomize_bn(_AtenChain(), seed=3).eval()
    x = torch.randn(4, 3, 16, 16)
    gm = _export(model, x)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"aten.relu.default", "aten.relu_.default", "aten.max_pool2d.default",
            "aten.view.default", "aten.dropout.default"} <= targets
    gm, report = to_normprop(gm, strict=True)
    assert _count(gm, _BatchNorm) == 0 and _count(gm, NormPropBase) == 3
    assert _count(gm, NormPropCorrection) == 3
    # each correction reads an ATen ReLU; the ATen dropouts/pools/view in between commute
    corrections = [n for n in gm.graph.nodes
                   if isinstance(module_of(gm, n), NormPropCorrection)]
    assert {str(n.args[0].target) for n in corrections} == {"aten.relu.default",
                                                            "aten.relu_.default"}
    _assert_eval_exact(model, gm, x, tol=1e-5)
    fx_gm, fx_report = _convert(model)
    assert ({(c.node, c.before, c.after) for c in report.changes}
            == {(c.node, c.before, c.after) for c in fx_report.changes})


class _AtenResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.b2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(h)) + h)


def test_export_captured_residual_sums_are_refused_by_name() -> None:
    model = randomize_bn(_AtenResidual()).eval()
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(UnsupportedNodeError) as info:
        to_normprop(_export(model, x), strict=True)
    msg = str(info.value)
    assert "'b1' (BatchNorm2d): post-ReLU output reaches residual sum 'add' (aten.add.Tensor)" \
        in msg
    assert "'b2' (BatchNorm2d): BN output feeds residual sum 'add' (aten.add.Tensor)" in msg
    gm, report = to_normprop(_export(model, x), strict=False)
    assert {s.node for s in report.skips} == {"b1", "b2"}
    _assert_eval_exact(model, gm, x, tol=1e-6)
