"""Shared graph predicates and op tables of the passes.

* Which modules are BatchNorms (every form a swap replaces), which need grafting (BN subclasses
  that add behaviour in their own ``forward``), which are normswap's own layers.
* :func:`op_kind`: one table mapping every spelling of an op that the passes reason about --
  a module call (``nn.ReLU``), a function (``F.relu``, ``torch.relu``), a method (``x.relu()``),
  an ATen overload from ``torch.export`` (``aten.relu_.default``) -- onto one canonical kind
  (``"relu"``). Passes dispatch on the kind, never on the spelling.
* Purity for dead-code elimination: fx's rule plus in-place calls (``x.relu_()``,
  ``inplace=True`` modules, mutating ATen overloads).
* :func:`leaf_function`: helpers that passes insert as ``call_function`` nodes and that must
  stay single nodes when a rewritten graph is traced again.
"""

from __future__ import annotations

import logging
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..norms._common import is_frozen_batchnorm, overrides_forward

__all__ = [
    "BN_TYPES",
    "FUNCTIONAL_BATCH_NORM",
    "is_batchnorm",
    "is_frozen_batchnorm",
    "overrides_forward",
    "needs_graft",
    "is_normswap_layer",
    "batchnorm_like_modules",
    "functional_batch_norm_nodes",
    "batch_norm_args",
    "op_kind",
    "module_of",
    "is_residual_sum",
    "is_impure",
    "eliminate_dead_code",
    "leaf_function",
    "LEAF_FUNCTIONS",
    "CONV_TYPES",
    "CONV_TRANSPOSE_TYPES",
    "FOLD_TARGETS",
    "node_shape",
    "module_calls",
    "shared_param_counts",
    "producer_refusal",
]

log = logging.getLogger(__name__)

BN_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
)
_aten = torch.ops.aten
FUNCTIONAL_BATCH_NORM: tuple[Any, ...] = (F.batch_norm, torch.batch_norm, _aten.batch_norm.default)


def is_batchnorm(m: nn.Module) -> bool:
    """Any BatchNorm form a swap replaces: torch BNs, SyncBN, subclasses, frozen BNs."""
    return isinstance(m, _BatchNorm) or is_frozen_batchnorm(m)


def needs_graft(m: nn.Module) -> bool:
    """A BatchNorm-like module that does more than normalise (its own ``forward``, or a frozen
    BN carrying child modules such as timm's ``FrozenBatchNormAct2d``): a swap must keep that
    extra behaviour."""
    if isinstance(m, _BatchNorm):
        return overrides_forward(m)
    return is_frozen_batchnorm(m) and any(True for _ in m.children())


def is_normswap_layer(m: nn.Module) -> bool:
    """Layers defined by normswap itself (kept as leaves when tracing)."""
    return type(m).__module__.startswith("normswap.norms")


def batchnorm_like_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm-family module with its qualified name."""
    return [(n, m) for n, m in model.named_modules() if is_batchnorm(m)]


def functional_batch_norm_nodes(graph: fx.Graph) -> list[fx.Node]:
    """``call_function`` nodes of a functional batch norm (torch-level or ATen)."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target in FUNCTIONAL_BATCH_NORM]


_F_BN_ORDER = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
               "eps")
_ATEN_BN_ORDER = ("input", "weight", "bias", "running_mean", "running_var", "training",
                  "momentum", "eps", "cudnn_enabled")
_BN_DEFAULTS = {"running_mean": None, "running_var": None, "weight": None, "bias": None,
                "training": False, "momentum": 0.1, "eps": 1e-5}


def batch_norm_args(node: fx.Node) -> dict[str, Any]:
    """The arguments of a functional batch-norm node by name, whatever its spelling
    (``F.batch_norm`` orders them ``input, running_mean, running_var, weight, bias``;
    ``torch.batch_norm`` and ATen ``input, weight, bias, running_mean, running_var``)."""
    order = _F_BN_ORDER if node.target is F.batch_norm else _ATEN_BN_ORDER
    out: dict[str, Any] = dict(_BN_DEFAULTS)
    for name, value in zip(order, node.args):
        out[name] = value
    out.update({k: v for k, v in node.kwargs.items() if k in out or k == "input"})
    return out


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls (None for other nodes)."""
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
FOLD_TARGETS: tuple[type[nn.Module], ...] = CONV_TYPES + CONV_TRANSPOSE_TYPES + (nn.Linear,)


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The output shape recorded on a node (shape propagation or ``torch.export``), or None."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None:
        val = node.meta.get("val")
        shape = getattr(val, "shape", None)
    try:
        return tuple(int(d) for d in shape) if shape is not None else None
    except (TypeError, ValueError):  # symbolic sizes
        return tuple(shape) if shape is not None else None


def module_calls(gm: fx.GraphModule) -> dict[str, int]:
    """How many ``call_module`` nodes call each module path."""
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    return calls


def shared_param_counts(root: nn.Module) -> dict[int, int]:
    """How many modules hold each parameter tensor (tied weights count more than once)."""
    counts: dict[int, int] = {}
    for mod in root.modules():
        for p in mod.parameters(recurse=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
    return counts


def producer_refusal(node: fx.Node, gm: fx.GraphModule, channels: int,
                     calls: dict[str, int], param_owners: dict[int, int]
                     ) -> tuple[fx.Node | None, str | None]:
    """Whether a per-channel norm at ``node`` may be merged into the layer producing its input.

    The rules of folding (and of any rewrite that moves a norm's affine into the layer before
    it): the input comes from a Conv/ConvTranspose/Linear module called once, whose output has
    no other user, whose weights are not tied to another module, with a floating-point weight,
    ``channels`` outputs, and -- for a Linear -- an ``(N, C)`` output.

    Returns:
        ``(layer node, None)`` when it may, else ``(layer node or None, reason)``.
    """
    arg = node.args[0] if node.args else None
    if not isinstance(arg, fx.Node) or arg.op != "call_module":
        producer = (f"'{arg.name}' ({arg.op} {getattr(arg.target, '__name__', arg.target)})"
                    if isinstance(arg, fx.Node) else repr(arg))
        return None, f"no preceding Conv/ConvTranspose/Linear: its input comes from {producer}"
    layer = gm.get_submodule(str(arg.target))
    kind = type(layer).__name__
    if not isinstance(layer, FOLD_TARGETS):
        return None, f"no preceding Conv/ConvTranspose/Linear: '{arg.target}' is {kind}"
    if calls.get(str(arg.target), 0) > 1:
        return arg, (f"'{arg.target}' ({kind}) is called {calls[str(arg.target)]} times; "
                     "folding would change its other calls")
    if len(arg.users) > 1:
        others = sorted(u.name for u in arg.users if u is not node)
        return arg, (f"output of '{arg.target}' has {len(arg.users)} users (also "
                     f"{', '.join(others)}); folding would change what they see")
    shared = [n for n, p in layer.named_parameters(recurse=False) if param_owners.get(id(p), 0) > 1]
    if shared:
        return arg, f"'{arg.target}'.{shared[0]} is shared with another module (tied weights)"
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        return arg, f"'{arg.target}' has no floating-point weight"
    if isinstance(layer, nn.Linear):
        shape = node_shape(arg)
        if shape is None:
            return arg, ("Linear output rank unknown: folding is only valid for (N, C) outputs; "
                         "pass example_inputs so shapes can be propagated")
        if len(shape) != 2:
            return arg, (f"Linear output has shape {tuple(shape)}: the norm normalises dim 1 "
                         "but the Linear's features are the last dim, so they cannot fold")
        out_channels = layer.out_features
    else:
        out_channels = layer.out_channels
    if channels != out_channels:
        return arg, f"norm has {channels} channels but '{arg.target}' has {out_channels} outputs"
    return arg, None


# -- one op table --------------------------------------------------------------------------------
def _aten_ops(*names: str) -> list[Any]:
    ops: list[Any] = []
    for name in names:
        packet = getattr(_aten, name, None)
        if packet is None:
            continue
        for overload in packet.overloads():
            ops.append(getattr(packet, overload))
    return ops


_KINDS: dict[str, dict[str, list[Any]]] = {
    # kind: {"modules": [...], "functions": [...], "methods": [...], "aten": [...]}
    "relu": {"modules": [nn.ReLU], "functions": [F.relu, torch.relu, torch.relu_, F.relu_],
             "methods": ["relu", "relu_"], "aten": ["relu", "relu_"]},
    "add": {"functions": [operator.add, operator.iadd, torch.add], "methods": ["add", "add_"],
            "aten": ["add", "add_"]},
    "sub": {"functions": [operator.sub, operator.isub, torch.sub], "methods": ["sub", "sub_"],
            "aten": ["sub", "sub_"]},
    "mul": {"functions": [operator.mul, operator.imul, torch.mul], "methods": ["mul", "mul_"],
            "aten": ["mul", "mul_"]},
    "div": {"functions": [operator.truediv, operator.itruediv, torch.div],
            "methods": ["div", "div_"], "aten": ["div", "div_"]},
    "cat": {"functions": [torch.cat, torch.concat, torch.concatenate], "aten": ["cat", "concat"]},
    "max_pool": {"modules": [nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d],
                 "functions": [F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d,
                               torch.max_pool2d, torch.max_pool3d],
                 "aten": ["max_pool1d", "max_pool2d", "max_pool3d",
                          "max_pool2d_with_indices", "max_pool3d_with_indices"]},
    "avg_pool": {"modules": [nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d],
                 "functions": [F.avg_pool1d, F.avg_pool2d, F.avg_pool3d],
                 "aten": ["avg_pool1d", "avg_pool2d", "avg_pool3d"]},
    "adaptive_avg_pool": {"modules": [nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                                      nn.AdaptiveAvgPool3d],
                          "functions": [F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                                        F.adaptive_avg_pool3d],
                          "aten": ["adaptive_avg_pool1d", "adaptive_avg_pool2d",
                                   "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
                                   "_adaptive_avg_pool3d"]},
    "mean": {"functions": [torch.mean], "methods": ["mean"], "aten": ["mean"]},
    "dropout": {"modules": [nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d],
                "functions": [F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout],
                "aten": ["dropout", "dropout_", "native_dropout"]},
    "alpha_dropout": {"modules": [nn.AlphaDropout, nn.FeatureAlphaDropout],
                      "functions": [F.alpha_dropout, F.feature_alpha_dropout],
                      "aten": ["alpha_dropout", "feature_alpha_dropout"]},
    "identity": {"modules": [nn.Identity], "aten": ["clone", "alias"]},
    "flatten": {"modules": [nn.Flatten], "functions": [torch.flatten], "methods": ["flatten"],
                "aten": ["flatten"]},
    "reshape": {"functions": [torch.reshape], "methods": ["view", "reshape"],
                "aten": ["view", "reshape", "_unsafe_view"]},
    "conv": {"modules": [nn.Conv1d, nn.Conv2d, nn.Conv3d],
             "functions": [F.conv1d, F.conv2d, F.conv3d],
             "aten": ["conv1d", "conv2d", "conv3d", "convolution"]},
    "conv_transpose": {"modules": [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d],
                       "functions": [F.conv_transpose1d, F.conv_transpose2d,
                                     F.conv_transpose3d],
                       "aten": ["conv_transpose1d", "conv_transpose2d", "conv_transpose3d"]},
    "linear": {"modules": [nn.Linear], "functions": [F.linear], "aten": ["linear"]},
    "batch_norm": {"modules": [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                               nn.SyncBatchNorm],
                   "functions": [F.batch_norm, torch.batch_norm],
                   "aten": ["batch_norm"]},
    "selu": {"modules": [nn.SELU], "functions": [F.selu, torch.selu], "methods": ["selu"],
             "aten": ["selu", "selu_"]},
    "relu_like": {"modules": [nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.GELU, nn.SiLU,
                              nn.Hardswish, nn.Mish, nn.PReLU, nn.RReLU, nn.Softplus],
                  "functions": [F.relu6, F.leaky_relu, F.elu, F.celu, F.gelu, F.silu,
                                F.hardswish, F.mish, F.prelu, F.rrelu, F.softplus],
                  "aten": ["relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "celu",
                           "gelu", "silu", "silu_", "hardswish", "hardswish_", "mish",
                           "hardtanh", "hardtanh_", "prelu", "softplus"]},
}


def _build_tables() -> tuple[dict[type, str], dict[Any, str], dict[str, str]]:
    by_module: dict[type, str] = {}
    by_function: dict[Any, str] = {}
    by_method: dict[str, str] = {}
    for kind, spellings in _KINDS.items():
        for cls in spellings.get("modules", []):
            by_module[cls] = kind
        for fn in spellings.get("functions", []):
            by_function[fn] = kind
        for fn in _aten_ops(*spellings.get("aten", [])):
            by_function[fn] = kind
        for name in spellings.get("methods", []):
            by_method[name] = kind
    return by_module, by_function, by_method


_BY_MODULE, _BY_FUNCTION, _BY_METHOD = _build_tables()


def op_kind(node: fx.Node, gm: fx.GraphModule | None = None) -> str | None:
    """The canonical kind of ``node``'s op (``"relu"``, ``"add"``, ``"conv"`` ...), or None.

    Args:
        node: any fx node.
        gm: the owning module, needed for ``call_module`` nodes (defaults to the graph's).

    Returns:
        The kind from the table in this module; BatchNorm subclasses count as ``"batch_norm"``
        when they do not override ``forward``; None for ops the table does not know.
    """
    if node.op == "call_module":
        owner = gm if gm is not None else node.graph.owning_module
        if owner is None:
            return None
        try:
            m = owner.get_submodule(str(node.target))
        except AttributeError:
            return None
        kind = _BY_MODULE.get(type(m))
        if kind is None and is_batchnorm(m) and not needs_graft(m):
            return "batch_norm"
        return kind
    if node.op == "call_function":
        try:
            return _BY_FUNCTION.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _BY_METHOD.get(str(node.target))
    return None


def is_residual_sum(node: fx.Node) -> bool:
    """An add/sub of two graph values (a residual or skip connection)."""
    return op_kind(node) in ("add", "sub") and sum(
        isinstance(a, fx.Node) for a in node.args) >= 2


# -- purity ------------------------------------------------------------------------------------
def _mutates(target: Any) -> bool:
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return bool(schema.is_mutable)
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return str(name).endswith("_") and not str(name).startswith("_")


def is_impure(node: fx.Node) -> bool:
    """fx's purity test, plus in-place calls (``x.relu_()``, ``inplace=True``, mutating ATen
    overloads) kept by DCE."""
    if node.is_impure():
        return True
    if node.op == "call_module":
        owner = node.graph.owning_module
        if owner is None:
            return False
        try:
            return bool(getattr(owner.get_submodule(str(node.target)), "inplace", False))
        except AttributeError:
            return False
    if node.op in ("call_method", "call_function"):
        return bool(node.kwargs.get("inplace", False)) or _mutates(node.target)
    return False


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """fx dead-code elimination that keeps in-place calls whose result is unused."""
    gm.graph.eliminate_dead_code(is_impure_node=is_impure)


LEAF_FUNCTIONS: list[Callable[..., Any]] = []


def leaf_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a helper that passes insert as ``call_function`` nodes: re-tracing a rewritten
    GraphModule keeps it as one node instead of tracing into its Python control flow."""
    LEAF_FUNCTIONS.append(fn)
    return fn
