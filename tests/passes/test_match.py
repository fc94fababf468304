"""The shared op table and predicates of normswap.passes._match: every spelling of an op
(module, function, method, ATen overload) maps to one kind, arguments are read by name
whatever the spelling, purity and the layer-before-norm rules."""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from normswap.capture import capture
from normswap.passes._match import (
    OP_KINDS,
    batch_norm_args,
    describe_op,
    is_impure,
    is_inplace,
    is_residual_sum,
    module_calls,
    op_args,
    op_kind,
    producer_refusal,
    returns_tuple,
    shared_param_counts,
)

aten = torch.ops.aten


def _graph(modules: dict[str, nn.Module] | None = None
           ) -> tuple[fx.GraphModule, fx.Graph, fx.Node, fx.Node]:
    """A graph module holding ``modules`` and a graph it owns, with placeholders x and y (the
    graph gets its output later)."""
    empty = fx.Graph()
    empty.output(None)
    gm = fx.GraphModule(nn.Module(), empty)
    for name, m in (modules or {}).items():
        gm.add_submodule(name, m)
    graph = fx.Graph(owning_module=gm)
    x, y = graph.placeholder("x"), graph.placeholder("y")
    return gm, graph, x, y


# (kind, spelling, make node): one row per spelling
_Make = Callable[[fx.Graph, fx.Node, fx.Node], fx.Node]


def _fn(target: Any, *extra: Any, **kwargs: Any) -> _Make:
    return lambda g, x, y: g.call_function(target, (x, *extra), kwargs)


def _meth(name: str, *extra: Any, **kwargs: Any) -> _Make:
    return lambda g, x, y: g.call_method(name, (x, *extra), kwargs)


def _binary(target: Any, method: bool = False) -> _Make:
    if method:
        return lambda g, x, y: g.call_method(target, (x, y))
    return lambda g, x, y: g.call_function(target, (x, y))


_FUNCTION_SPELLINGS: list[tuple[str, str, _Make]] = [
    ("relu", "F.relu", _fn(F.relu)),
    ("relu", "F.relu inplace", _fn(F.relu, True)),
    ("relu", "torch.relu_", _fn(torch.relu_)),
    ("relu", "x.relu()", _meth("relu")),
    ("relu", "x.relu_()", _meth("relu_")),
    ("relu", "aten.relu", _fn(aten.relu.default)),
    ("relu", "aten.relu_", _fn(aten.relu_.default)),
    ("add", "operator.add", _binary(operator.add)),
    ("add", "operator.iadd", _binary(operator.iadd)),
    ("add", "torch.add", _binary(torch.add)),
    ("add", "x.add_(y)", _binary("add_", method=True)),
    ("add", "aten.add.Tensor", _binary(aten.add.Tensor)),
    ("add", "aten.add_.Tensor", _binary(aten.add_.Tensor)),
    ("sub", "operator.sub", _binary(operator.sub)),
    ("sub", "aten.sub.Tensor", _binary(aten.sub.Tensor)),
    ("rsub", "aten.rsub.Scalar", _fn(aten.rsub.Scalar, 1.0)),
    ("mul", "operator.mul", _fn(operator.mul, 2.0)),
    ("mul", "aten.mul.Tensor", _fn(aten.mul.Tensor, 2.0)),
    ("div", "operator.truediv", _fn(operator.truediv, 2.0)),
    ("div", "x.div(2)", _meth("div", 2.0)),
    ("div", "aten.div.Tensor", _fn(aten.div.Tensor, 2.0)),
    ("neg", "operator.neg", _fn(operator.neg)),
    ("neg", "aten.neg", _fn(aten.neg.default)),
    ("cat", "torch.cat", lambda g, x, y: g.call_function(torch.cat, ([x, y], 1))),
    ("cat", "aten.cat", lambda g, x, y: g.call_function(aten.cat.default, ([x, y], 1))),
    ("max_pool", "F.max_pool2d", _fn(F.max_pool2d, 2)),
    ("max_pool", "aten.max_pool2d", _fn(aten.max_pool2d.default, [2, 2])),
    ("max_pool", "aten.max_pool2d_with_indices",
     _fn(aten.max_pool2d_with_indices.default, [2, 2])),
    ("adaptive_max_pool", "aten.adaptive_max_pool2d",
     _fn(aten.adaptive_max_pool2d.default, [1, 1])),
    ("avg_pool", "F.avg_pool2d", _fn(F.avg_pool2d, 2)),
    ("avg_pool", "aten.avg_pool2d", _fn(aten.avg_pool2d.default, [2, 2])),
    ("adaptive_avg_pool", "F.adaptive_avg_pool2d", _fn(F.adaptive_avg_pool2d, 1)),
    ("adaptive_avg_pool", "aten.adaptive_avg_pool2d",
     _fn(aten.adaptive_avg_pool2d.default, [1, 1])),
    ("mean", "torch.mean", _fn(torch.mean, (2, 3))),
    ("mean", "x.mean()", _meth("mean", (2, 3))),
    ("mean", "aten.mean.dim", _fn(aten.mean.dim, [2, 3])),
    ("dropout", "F.dropout", _fn(F.dropout, 0.1, False)),
    ("dropout", "F.dropout2d", _fn(F.dropout2d, 0.1, False)),
    ("dropout", "aten.dropout", _fn(aten.dropout.default, 0.1, False)),
    ("dropout", "aten.feature_dropout", _fn(aten.feature_dropout.default, 0.1, False)),
    ("dropout", "aten.native_dropout", _fn(aten.native_dropout.default, 0.1, False)),
    ("alpha_dropout", "F.alpha_dropout", _fn(F.alpha_dropout, 0.1, False)),
    ("alpha_dropout", "aten.alpha_dropout", _fn(aten.alpha_dropout.default, 0.1, False)),
    ("identity", "x.contiguous()", _meth("contiguous")),
    ("identity", "x.float()", _meth("float")),
    ("identity", "aten.clone", _fn(aten.clone.default)),
    ("identity", "aten.to.dtype", _fn(aten.to.dtype, torch.float32)),
    ("flatten", "torch.flatten", _fn(torch.flatten, 1)),
    ("flatten", "x.flatten(1)", _meth("flatten", 1)),
    ("flatten", "aten.flatten.using_ints", _fn(aten.flatten.using_ints, 1)),
    ("reshape", "x.view(2, -1)", _meth("view", 2, -1)),
    ("reshape", "torch.reshape", _fn(torch.reshape, (2, -1))),
    ("reshape", "aten.view", _fn(aten.view.default, [2, -1])),
    ("layout", "x.permute()", _meth("permute", 0, 2, 3, 1)),
    ("layout", "aten.unsqueeze", _fn(aten.unsqueeze.default, 0)),
    ("shape", "x.size()", _meth("size")),
    ("shape", "x.shape", lambda g, x, y: g.call_function(getattr, (x, "shape"))),
    ("shape", "aten.sym_size", _fn(aten.sym_size.int, 0)),
    ("getitem", "x[0]", _fn(operator.getitem, 0)),
    ("conv", "F.conv2d", _binary(F.conv2d)),
    ("conv", "aten.conv2d", _binary(aten.conv2d.default)),
    ("conv", "aten.convolution", lambda g, x, y: g.call_function(
        aten.convolution.default, (x, y, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1))),
    ("conv_transpose", "F.conv_transpose2d", _binary(F.conv_transpose2d)),
    ("linear", "F.linear", _binary(F.linear)),
    ("linear", "aten.linear", _binary(aten.linear.default)),
    ("batch_norm", "F.batch_norm", _binary(F.batch_norm)),
    ("batch_norm", "aten.batch_norm", _binary(aten.batch_norm.default)),
    ("selu", "F.selu", _fn(F.selu)),
    ("selu", "aten.selu_", _fn(aten.selu_.default)),
    ("relu_like", "F.gelu", _fn(F.gelu)),
    ("relu_like", "F.leaky_relu_", _fn(F.leaky_relu_, 0.1)),
    ("relu_like", "aten.silu_", _fn(aten.silu_.default)),
    ("relu_like", "aten.hardtanh(x, 0, 6) (unlifted ReLU6)",
     _fn(aten.hardtanh.default, 0.0, 6.0)),
    ("gate", "aten.hardtanh(x, -1, 1)", _fn(aten.hardtanh.default, -1.0, 1.0)),
    ("gate", "torch.sigmoid", _fn(torch.sigmoid)),
    ("gate", "aten.tanh", _fn(aten.tanh.default)),
    (None, "x.T", lambda g, x, y: g.call_function(getattr, (x, "T"))),
    (None, "aten.slice", _fn(aten.slice.Tensor, 1, 0, 2)),
    (None, "torch.exp", _fn(torch.exp)),
    (None, "x.sum()", _meth("sum")),
]


@pytest.mark.parametrize("kind,spelling,make", _FUNCTION_SPELLINGS,
                         ids=[s for _, s, _ in _FUNCTION_SPELLINGS])
def test_op_kind_of_function_method_and_aten_spellings(kind: str | None, spelling: str,
                                                       make: _Make) -> None:
    gm, graph, x, y = _graph()
    assert op_kind(make(graph, x, y), gm) == kind
    assert kind is None or kind in OP_KINDS


class _OwnForwardReLU(nn.ReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class _PlainSubclassConv(nn.Conv2d):
    pass


class _BNAct(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


_MODULE_SPELLINGS: list[tuple[str | None, nn.Module]] = [
    ("relu", nn.ReLU()), ("relu_like", nn.ReLU6()), ("relu_like", nn.GELU()),
    ("gate", nn.Hardtanh()), ("gate", nn.Sigmoid()), ("selu", nn.SELU()),
    ("max_pool", nn.MaxPool2d(2)), ("adaptive_max_pool", nn.AdaptiveMaxPool2d(1)),
    ("avg_pool", nn.AvgPool1d(2)), ("adaptive_avg_pool", nn.AdaptiveAvgPool2d(1)),
    ("dropout", nn.Dropout(0.1)), ("dropout", nn.Dropout2d(0.1)),
    ("alpha_dropout", nn.AlphaDropout(0.1)), ("identity", nn.Identity()),
    ("flatten", nn.Flatten()), ("layout", nn.Unflatten(1, (2, 2))),
    ("conv", nn.Conv1d(2, 2, 1)), ("conv", _PlainSubclassConv(2, 2, 1)),
    ("conv_transpose", nn.ConvTranspose2d(2, 2, 1)), ("linear", nn.Linear(2, 2)),
    ("batch_norm", nn.BatchNorm2d(2)), ("batch_norm", nn.SyncBatchNorm(2)),
    (None, _OwnForwardReLU()),   # a subclass with its own forward is not a ReLU
    (None, _BNAct(2)),           # a BN subclass with its own forward needs a graft
    (None, nn.Softmax2d()), (None, nn.LayerNorm(2)),
]


@pytest.mark.parametrize("kind,module", _MODULE_SPELLINGS,
                         ids=[type(m).__name__ for _, m in _MODULE_SPELLINGS])
def test_op_kind_of_module_spellings(kind: str | None, module: nn.Module) -> None:
    gm, graph, x, _ = _graph({"m": module})
    node = graph.call_module("m", (x,))
    assert op_kind(node, gm) == kind
    assert describe_op(node, gm) == type(module).__name__


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        h = torch.cat([h + h * 0.5, F.max_pool2d(h, 1)], 1)
        h = torch.relu_(h).mean((2, 3))
        h = F.dropout(h.view(-1, 2, 4).sum(1), 0.1, self.training)
        return self.fc(h)


def test_fx_and_export_captures_give_the_same_kinds() -> None:
    model = _Functional().eval()
    x = torch.randn(2, 3, 6, 6)
    kinds: dict[str, list[str | None]] = {}
    for strategy in ("fx", "export"):
        cap = capture(copy.deepcopy(model), (x,), strategies=(strategy,))
        assert cap.strategy == strategy, cap.attempts
        gm = cap.regions[0].gm
        kinds[strategy] = [op_kind(n, gm) for n in gm.graph.nodes
                           if n.op in ("call_module", "call_function", "call_method")
                           and op_kind(n, gm) != "shape" and n.target != "_guards_fn"]
    assert kinds["fx"] == kinds["export"] == [
        "conv", "batch_norm", "relu", "mul", "add", "max_pool", "cat", "relu", "mean",
        "reshape", None, "dropout", "linear"]   # None: the sum


# -- arguments by name --------------------------------------------------------------------------
def test_batch_norm_args_for_every_argument_order() -> None:
    gm, graph, x, _ = _graph()
    mean, var, w, b = (graph.placeholder(n) for n in ("mean", "var", "w", "b"))
    nodes = {
        # F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        "F": graph.call_function(F.batch_norm, (x, mean, var, w, b, True, 0.3, 1e-3)),
        # torch.batch_norm / ATen: (input, weight, bias, running_mean, running_var, ...)
        "torch": graph.call_function(torch.batch_norm, (x, w, b, mean, var, True, 0.3, 1e-3,
                                                        False)),
        "aten": graph.call_function(aten.batch_norm.default, (x, w, b, mean, var, True, 0.3,
                                                              1e-3, False)),
        "kwargs": graph.call_function(F.batch_norm, (x, mean, var), {
            "weight": w, "bias": b, "training": True, "momentum": 0.3, "eps": 1e-3}),
    }
    for spelling, node in nodes.items():
        args = batch_norm_args(node)
        assert (args["input"], args["running_mean"], args["running_var"], args["weight"],
                args["bias"]) == (x, mean, var, w, b), spelling
        assert (args["training"], args["momentum"], args["eps"]) == (True, 0.3, 1e-3), spelling
    defaults = batch_norm_args(graph.call_function(F.batch_norm, (x, mean, var)))
    assert defaults["weight"] is None and defaults["training"] is False
    assert defaults["eps"] == 1e-5 and defaults["momentum"] == 0.1


def test_op_args_name_arguments_alike_across_spellings() -> None:
    gm, graph, x, y = _graph({"pool": nn.MaxPool2d(3, stride=2), "drop": nn.Dropout(0.3),
                              "conv": nn.Conv2d(2, 4, 3, padding=1, groups=2)})
    pools = [graph.call_module("pool", (x,)), graph.call_function(F.max_pool2d, (x, 3, 2)),
             graph.call_function(aten.max_pool2d.default, (x, [3, 3], [2, 2]))]
    assert [op_args(n, gm)["input"] for n in pools] == [x, x, x]
    assert [op_args(n, gm)["kernel_size"] for n in pools] == [3, 3, [3, 3]]
    # ATen's `train` is `training`; the module gives its p
    assert op_args(graph.call_function(aten.dropout.default, (x, 0.2, True)))["training"]
    assert op_args(graph.call_function(F.dropout, (x,)))["training"] is True
    assert op_args(graph.call_module("drop", (x,)), gm)["p"] == 0.3
    # operator and method spellings: input / other / alpha
    assert op_args(graph.call_function(operator.sub, (x, 2.0))) == {"input": x, "other": 2.0}
    assert op_args(graph.call_function(torch.add, (x, y), {"alpha": 3}))["alpha"] == 3
    assert op_args(graph.call_method("add", (x, y), {"alpha": 2}))["alpha"] == 2
    assert op_args(graph.call_function(aten.cat.default, ([x, y], -1))) == {
        "tensors": [x, y], "dim": -1}
    assert op_args(graph.call_method("view", (x, 2, -1)))["shape"] == (2, -1)
    conv = op_args(graph.call_module("conv", (x,)), gm)
    assert conv["groups"] == 2 and conv["padding"] == (1, 1) and conv["weight"].shape[0] == 4
    aconv = op_args(graph.call_function(aten.convolution.default, (
        x, y, None, [1, 1], [0, 0], [1, 1], True, [0, 0], 1)))
    assert aconv["weight"] is y and aconv["transposed"] is True


def test_returns_tuple_and_describe_op() -> None:
    gm, graph, x, _ = _graph({"pool": nn.MaxPool2d(2, return_indices=True)})
    assert returns_tuple(graph.call_module("pool", (x,)), gm)
    assert returns_tuple(graph.call_function(aten.max_pool2d_with_indices.default, (x, [2])))
    assert returns_tuple(graph.call_function(F.max_pool2d, (x, 2), {"return_indices": True}))
    assert not returns_tuple(graph.call_function(F.max_pool2d, (x, 2)))
    assert not returns_tuple(graph.call_function(aten.max_pool2d.default, (x, [2])))
    assert describe_op(graph.call_function(aten.relu_.default, (x,))) == "aten.relu_.default"
    assert describe_op(graph.call_function(F.relu, (x,))) == "relu"
    assert describe_op(graph.call_method("view", (x, -1))) == ".view()"


# -- predicates ---------------------------------------------------------------------------------
def test_is_residual_sum() -> None:
    gm, graph, x, y = _graph()
    assert is_residual_sum(graph.call_function(operator.add, (x, y)))
    assert is_residual_sum(graph.call_function(aten.add.Tensor, (x, y)))
    assert is_residual_sum(graph.call_function(torch.sub, (x, y)))
    assert is_residual_sum(graph.call_method("add_", (x, y)))
    assert not is_residual_sum(graph.call_function(operator.add, (x, 1.0)))
    assert not is_residual_sum(graph.call_function(aten.add.Tensor, (x, 1.0)))
    assert not is_residual_sum(graph.call_function(operator.mul, (x, y)))
    assert not is_residual_sum(graph.call_function(torch.cat, ([x, y], 1)))


def test_is_impure_keeps_inplace_calls() -> None:
    gm, graph, x, y = _graph({"relu": nn.ReLU(inplace=True), "plain": nn.ReLU()})
    impure = [graph.call_function(aten.relu_.default, (x,)),
              graph.call_function(aten.add_.Tensor, (x, y)),
              graph.call_function(F.relu, (x, True)),           # positional inplace
              graph.call_function(F.relu, (x,), {"inplace": True}),
              graph.call_function(torch.relu_, (x,)),
              graph.call_method("relu_", (x,)),
              graph.call_module("relu", (x,))]
    pure = [graph.call_function(aten.relu.default, (x,)),
            graph.call_function(aten.add.Tensor, (x, y)),
            graph.call_function(F.relu, (x,)),
            graph.call_method("relu", (x,)),
            graph.call_module("plain", (x,))]
    assert all(is_impure(n) and is_inplace(n, gm) for n in impure)
    assert not any(is_impure(n) or is_inplace(n, gm) for n in pure)
    # dead-code elimination through the runner's helper keeps exactly the in-place calls
    graph.output(x)
    gm.graph = graph
    from normswap.passes._match import eliminate_dead_code

    eliminate_dead_code(gm)
    kept = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert len(kept) == len(impure)


class _ConvBN(nn.Module):
    def __init__(self, tie: bool = False, reuse: bool = False, extra_user: bool = False,
                 linear: bool = False) -> None:
        super().__init__()
        self.reuse, self.extra_user, self.linear = reuse, extra_user, linear
        self.conv = nn.Linear(4, 4) if linear else nn.Conv2d(4, 4, 1)
        self.other = nn.Linear(4, 4) if linear else nn.Conv2d(4, 4, 1)
        if tie:
            self.other.weight = self.conv.weight
        self.bn = nn.BatchNorm1d(4) if linear else nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        out = self.bn(y) + self.other(x)
        if self.reuse:
            out = out + self.conv(x)
        if self.extra_user:
            out = out + y
        return out


def _refusal(model: nn.Module, channels: int = 4, shape: tuple[int, ...] | None = None
             ) -> str | None:
    gm = fx.symbolic_trace(model)
    bn = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "bn")
    if shape is not None:
        bn.args[0].meta["val"] = torch.empty(shape)
    layer, reason = producer_refusal(bn, gm, channels, module_calls(gm),
                                     shared_param_counts(gm))
    assert layer is None or layer.target == "conv"
    return reason


def test_producer_refusal() -> None:
    assert _refusal(_ConvBN()) is None
    assert "called 2 times" in _refusal(_ConvBN(reuse=True))
    assert "has 2 users" in _refusal(_ConvBN(extra_user=True))
    assert "tied weights" in _refusal(_ConvBN(tie=True))
    assert "norm has 3 channels" in _refusal(_ConvBN(), channels=3)
    assert _refusal(_ConvBN(linear=True), shape=(2, 4)) is None
    assert "rank unknown" in _refusal(_ConvBN(linear=True))
    assert "shape (2, 5, 4)" in _refusal(_ConvBN(linear=True), shape=(2, 5, 4))
    gm = fx.symbolic_trace(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)))
    bn = list(gm.graph.nodes)[2]
    layer, reason = producer_refusal(bn, gm, 4, module_calls(gm), shared_param_counts(gm))
    assert layer is None and "'0' is ReLU" in reason
