"""Eval equivalence of Conv/ConvTranspose/Linear + norm folding, with randomised statistics."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import Tensor, fx, nn
from torch.nn.utils import fusion

from normswap.norms.affine import ChannelAffine
from normswap.passes._math import fold_bn_into_weights, norm_scale_shift
from normswap.passes.fold_conv_bn import fold_conv_bn
from tests.conftest import fold_model

TOL = {"rtol": 1e-5, "atol": 1e-5}


@torch.no_grad()
def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running stats and affine params for every BN-like module (in place)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        mean = getattr(m, "running_mean", None)
        if not isinstance(mean, Tensor):
            continue
        c = mean.numel()
        m.running_mean.copy_(torch.randn(c, generator=g))
        m.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.1)
        if getattr(m, "weight", None) is not None:
            m.weight.copy_(torch.randn(c, generator=g))
        if getattr(m, "bias", None) is not None:
            m.bias.copy_(torch.randn(c, generator=g))
    return model


class StandIn(nn.Module):
    """A stand-in for a normswap norm: eval output = x*scale + shift via eval_scale_shift."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(c))
        self.b = nn.Parameter(torch.randn(c))

    def forward(self, x: Tensor) -> Tensor:
        view = [-1] + [1] * (x.dim() - 2)
        return x * self.a.reshape(view) + self.b.reshape(view)

    def eval_scale_shift(self) -> tuple[Tensor, Tensor]:
        return self.a.detach().double(), self.b.detach().double()


def _no_norms(gm: nn.Module) -> bool:
    return not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, StandIn, ChannelAffine))
                   for m in gm.modules())


def _check(model: nn.Module, x: Tensor, tol: dict[str, float] = TOL,
           **kw: object) -> tuple[nn.Module, object]:
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, report = fold_model(model, **kw)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **tol)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    return folded, report


# -- pure math ------------------------------------------------------------------------------------
def test_scale_shift_matches_eval_batchnorm() -> None:
    bn = _randomise(nn.BatchNorm2d(5)).eval()
    scale, shift = norm_scale_shift(bn)
    x = torch.randn(2, 5, 3, 3)
    expected = x.double() * scale.view(-1, 1, 1) + shift.view(-1, 1, 1)
    torch.testing.assert_close(bn(x), expected.float(), **TOL)


def test_pure_fold_matches_torch_fusion_for_ungrouped_conv() -> None:
    conv, bn = nn.Conv2d(3, 6, 3), _randomise(nn.BatchNorm2d(6)).eval()
    scale, shift = norm_scale_shift(bn)
    w, b = fold_bn_into_weights(conv.weight, conv.bias, scale, shift)
    ref_w, ref_b = fusion.fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean,
                                               bn.running_var, bn.eps, bn.weight, bn.bias)
    torch.testing.assert_close(w, ref_w, **TOL)
    torch.testing.assert_close(b, ref_b, **TOL)


def test_torch_fusion_breaks_grouped_transpose_but_ours_does_not() -> None:
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2)
    bn = _randomise(nn.BatchNorm2d(6)).eval()
    with pytest.raises(RuntimeError):
        fusion.fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                    bn.eps, bn.weight, bn.bias, transpose=True)
    scale, shift = norm_scale_shift(bn)
    w, b = fold_bn_into_weights(conv.weight, conv.bias, scale, shift, transpose=True, groups=2)
    assert w.shape == conv.weight.shape and w.dtype == conv.weight.dtype
    x = torch.randn(2, 4, 5, 5)
    y = nn.functional.conv_transpose2d(x, w, b, groups=2)
    torch.testing.assert_close(y, bn(conv(x)), **TOL)


def test_fold_math_is_float64_then_cast() -> None:
    conv = nn.Conv2d(2, 3, 1).to(torch.float16)
    bn = _randomise(nn.BatchNorm2d(3)).eval()
    scale, shift = norm_scale_shift(bn)
    w, b = fold_bn_into_weights(conv.weight, conv.bias, scale, shift)
    assert w.dtype == torch.float16 and b.dtype == torch.float16
    exact = conv.weight.double() * scale.view(-1, 1, 1, 1)
    torch.testing.assert_close(w, exact.half(), rtol=0, atol=0)


# -- convolutions ---------------------------------------------------------------------------------
CONVS = [
    (nn.Conv1d, nn.BatchNorm1d, (2, 4, 9)),
    (nn.Conv2d, nn.BatchNorm2d, (2, 4, 7, 7)),
    (nn.Conv3d, nn.BatchNorm3d, (2, 4, 5, 5, 5)),
]


@pytest.mark.parametrize("conv_cls,bn_cls,shape", CONVS, ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_fold(conv_cls: type, bn_cls: type, shape: tuple[int, ...], bias: bool,
                   groups: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(conv_cls(4, 6, 3, bias=bias, groups=groups), _randomise(bn_cls(6)),
                          nn.ReLU())
    folded, report = _check(model, torch.randn(*shape))
    assert _no_norms(folded)
    assert len(report.changes) == 1 and not report.skips


TRANSPOSES = [
    (nn.ConvTranspose1d, nn.BatchNorm1d, (2, 4, 6)),
    (nn.ConvTranspose2d, nn.BatchNorm2d, (2, 4, 5, 5)),
    (nn.ConvTranspose3d, nn.BatchNorm3d, (2, 4, 3, 3, 3)),
]


@pytest.mark.parametrize("conv_cls,bn_cls,shape", TRANSPOSES, ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("groups,c_out", [(1, 6), (2, 6), (4, 4), (4, 8)],
                         ids=["ungrouped", "g2", "depthwise", "g4x2"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_fold(conv_cls: type, bn_cls: type, shape: tuple[int, ...], groups: int,
                             c_out: int, bias: bool) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(conv_cls(4, c_out, 3, stride=2, groups=groups, bias=bias),
                          _randomise(bn_cls(c_out)))
    folded, report = _check(model, torch.randn(*shape))
    assert _no_norms(folded)
    assert len(report.changes) == 1


def test_stand_in_norm_with_eval_scale_shift_folds() -> None:
    model = nn.Sequential(nn.Conv2d(3, 5, 3), StandIn(5), nn.ReLU())
    folded, report = _check(model, torch.randn(2, 3, 6, 6))
    assert _no_norms(folded)
    assert report.changes[0].before == "StandIn"


def test_frozen_batchnorm_folds() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = nn.Sequential(nn.Conv2d(3, 5, 3), _randomise(FrozenBatchNorm2d(5)))
    folded, _ = _check(model, torch.randn(2, 3, 6, 6))
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())


# -- Linear ---------------------------------------------------------------------------------------
def test_linear_bn1d_folds_with_shapes() -> None:
    model = nn.Sequential(nn.Linear(8, 6), _randomise(nn.BatchNorm1d(6)), nn.ReLU())
    x = torch.randn(4, 8)
    folded, report = _check(model, x, example_inputs=x)
    assert _no_norms(folded) and not report.skips


def test_linear_bn1d_without_shapes_becomes_affine() -> None:
    # a graph without recorded shapes (no example input): the Linear's output rank is unknown
    model = nn.Sequential(nn.Linear(8, 6), _randomise(nn.BatchNorm1d(6))).eval()
    gm, report = fold_conv_bn(fx.symbolic_trace(copy.deepcopy(model)))
    assert any(isinstance(m, ChannelAffine) for m in gm.modules())
    assert "rank unknown" in report.skips[0].reason
    x = torch.randn(4, 8)
    torch.testing.assert_close(gm(x), model(x), **TOL)


def test_linear_bn1d_shapes_come_from_the_guessed_input() -> None:
    model = nn.Sequential(nn.Linear(8, 6), _randomise(nn.BatchNorm1d(6)))
    folded, report = _check(model, torch.randn(4, 8))
    assert _no_norms(folded) and not report.skips


def test_linear_on_3d_input_is_not_folded() -> None:
    # (N, C=5, L=5): BN1d normalises dim 1, the Linear's features are the last dim
    model = nn.Sequential(nn.Linear(5, 5), _randomise(nn.BatchNorm1d(5)))
    x = torch.randn(3, 5, 5)
    folded, report = _check(model, x, example_inputs=x)
    assert any(isinstance(m, ChannelAffine) for m in folded.modules())
    assert "cannot fold" in report.skips[0].reason and "(3, 5, 5)" in report.skips[0].reason


# -- refusals -------------------------------------------------------------------------------------
class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = _randomise(nn.BatchNorm2d(3))

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(self.conv(x)))


def test_shared_conv_is_not_folded() -> None:
    folded, report = _check(SharedConv(), torch.randn(2, 3, 6, 6))
    assert isinstance(folded.get_submodule("bn"), ChannelAffine)
    (skip,) = report.skips
    assert skip.node == "bn" and "called 2 times" in skip.reason


def test_shared_conv_weights_are_untouched() -> None:
    model = SharedConv().eval()
    folded, _ = fold_model(model)
    torch.testing.assert_close(folded.conv.weight, model.conv.weight, rtol=0, atol=0)


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = _randomise(nn.BatchNorm2d(4))

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return self.bn(y) + torch.relu(y)


def test_conv_output_with_two_users_is_not_folded() -> None:
    folded, report = _check(TwoBranches(), torch.randn(2, 3, 6, 6))
    assert isinstance(folded.get_submodule("bn"), ChannelAffine)
    assert "2 users" in report.skips[0].reason


def test_bn_without_conv_becomes_affine() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), _randomise(nn.BatchNorm2d(4)))
    folded, report = _check(model, torch.randn(2, 3, 6, 6))
    assert isinstance(folded.get_submodule("2"), ChannelAffine)
    assert "no preceding" in report.skips[0].reason
    assert report.key_map["2.running_var"] is None


def test_first_layer_bn_becomes_affine() -> None:
    model = nn.Sequential(_randomise(nn.BatchNorm2d(3)), nn.Conv2d(3, 4, 3))
    folded, report = _check(model, torch.randn(2, 3, 6, 6))
    assert isinstance(folded.get_submodule("0"), ChannelAffine)
    assert report.skips and report.skips[0].node == "0"


def test_train_mode_norm_is_left_alone_unless_frozen() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), _randomise(nn.BatchNorm2d(4))))
    gm.train()
    gm, report = fold_conv_bn(gm)
    assert isinstance(gm.get_submodule("1"), nn.BatchNorm2d)
    assert "train mode" in report.skips[0].reason
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _randomise(nn.BatchNorm2d(4)))
    gm2 = fx.symbolic_trace(copy.deepcopy(model)).train()  # fx shares submodules
    gm2, report2 = fold_conv_bn(gm2, train_mode="freeze")
    assert report2.changes and _no_norms(gm2)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(gm2(x), model.eval()(x), **TOL)


def test_no_running_stats_is_left_alone() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    folded, report = fold_model(model)
    assert isinstance(folded.get_submodule("1"), nn.BatchNorm2d)
    assert "track_running_stats=False" in report.skips[0].reason


def test_affine_exports_as_mul_add() -> None:
    from normswap.export.onnx_export import export_fp32_proto

    layer = ChannelAffine(torch.randn(4), torch.randn(4)).eval()
    proto, _ = export_fp32_proto(layer, (torch.randn(2, 4, 3, 3),), exporter="dynamo")
    ops = [n.op_type for n in proto.graph.node]
    assert "Mul" in ops and "Add" in ops
    for x in (torch.randn(2, 4), torch.randn(2, 4, 5), torch.randn(1, 4, 2, 2, 2)):
        view = [-1] + [1] * (x.dim() - 2)
        torch.testing.assert_close(layer(x), x * layer.scale.view(view) + layer.shift.view(view))


# -- fallback and zoo ------------------------------------------------------------------------------
class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), _randomise(nn.BatchNorm2d(4)), nn.ReLU())
        self.head = _randomise(nn.BatchNorm2d(4))

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)
        if y.sum() > 0:  # data-dependent control flow
            return self.head(y)
        return self.head(y)


def test_trace_failure_falls_back_to_module_walk() -> None:
    folded, report = _check(Untraceable(), torch.randn(2, 3, 6, 6))
    assert not isinstance(folded, fx.GraphModule)
    assert isinstance(folded.body[1], nn.Identity)
    assert report.metrics["capture"]["strategy"] == "regions"
    assert any("capture attempt failed" in n.message for n in report.notes)
    assert any(s.node == "head" for s in report.skips)


def test_resnet18_folds_fully() -> None:
    model = _randomise(torchvision.models.resnet18(weights=None)).eval()
    folded, report = _check(model, torch.randn(2, 3, 64, 64), tol={"rtol": 1e-4, "atol": 1e-4})
    assert _no_norms(folded)
    assert len(report.changes) == 20 and not report.skips


class BatchNormAct(nn.BatchNorm2d):
    """timm-style BN subclass that adds an activation in its own forward."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(super().forward(x))


def test_bn_subclass_with_own_forward_keeps_its_behaviour() -> None:
    from normswap.passes._graft import GraftRemainder

    model = nn.Sequential(nn.Conv2d(3, 4, 3), _randomise(BatchNormAct(4)))
    folded, report = _check(model, torch.randn(2, 3, 6, 6))  # exact, ReLU included
    assert isinstance(folded[1], GraftRemainder) and _no_norms(folded)
    assert "extra behaviour kept" in report.changes[0].detail


def test_fold_warns_when_folded_weights_leave_fp16_range() -> None:
    bn = _randomise(nn.BatchNorm2d(4))
    with torch.no_grad():
        bn.running_var.fill_(1e-12)  # scale = gamma / sqrt(1e-12 + eps) ~ 3e7
        bn.weight.fill_(1e5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn)
    _, report = _check(model, torch.randn(2, 3, 6, 6), tol={"rtol": 1e-4, "atol": 1e-2})
    assert any("fp16" in w.message and w.node == "0" for w in report.warnings)
