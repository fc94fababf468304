"""Shared graph predicates and op tables of the passes.

* Which modules are BatchNorms (every form a swap replaces), which need grafting (BN subclasses
  that add behaviour in their own ``forward``), which are normswap's own layers.
* :func:`op_kind`: one table mapping every spelling of an op that the passes reason about --
  a module call (``nn.ReLU``), a function (``F.relu``, ``torch.relu``), a method (``x.relu()``),
  an ATen overload from ``torch.export`` (``aten.relu_.default``) -- onto one canonical kind
  (``"relu"``). Passes dispatch on the kind, never on the spelling; :func:`op_args` reads
  an op's arguments by name from any spelling (module attributes, function arguments, ATen
  schema arguments), :func:`describe_op` names it for reports.
* Purity for dead-code elimination: fx's rule plus in-place calls (``x.relu_()``,
  ``inplace=True`` modules, mutating ATen overloads).
* :func:`leaf_function`: helpers that passes insert as ``call_function`` nodes and that must
  stay single nodes when a rewritten graph is traced again.
"""

from __future__ import annotations

import inspect
import logging
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.operator_schemas import get_signature_for_torch_op, normalize_function
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
    "OP_KINDS",
    "op_args",
    "describe_op",
    "is_inplace",
    "returns_tuple",
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


_BN_DEFAULTS = {"running_mean": None, "running_var": None, "weight": None, "bias": None,
                "training": False, "momentum": 0.1, "eps": 1e-5}


def batch_norm_args(node: fx.Node) -> dict[str, Any]:
    """The arguments of a functional batch-norm node by name, whatever its spelling
    (``F.batch_norm`` orders them ``input, running_mean, running_var, weight, bias``;
    ``torch.batch_norm`` and ATen ``input, weight, bias, running_mean, running_var``)."""
    bound = op_args(node)
    out: dict[str, Any] = dict(_BN_DEFAULTS)
    out.update({k: v for k, v in bound.items() if k in out or k == "input"})
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


def _fns(module: Any, *names: str) -> list[Any]:
    """The functions of ``module`` among ``names`` that this torch version has."""
    return [getattr(module, n) for n in names if hasattr(module, n)]


_KINDS: dict[str, dict[str, list[Any]]] = {
    # kind: {"modules": [...], "functions": [...], "methods": [...], "aten": [...]}
    "relu": {"modules": [nn.ReLU], "functions": [F.relu, F.relu_, torch.relu, torch.relu_],
             "methods": ["relu", "relu_"], "aten": ["relu", "relu_"]},
    "add": {"functions": [operator.add, operator.iadd, torch.add], "methods": ["add", "add_"],
            "aten": ["add", "add_"]},
    "sub": {"functions": [operator.sub, operator.isub, torch.sub, torch.subtract],
            "methods": ["sub", "sub_", "subtract", "subtract_"], "aten": ["sub", "sub_"]},
    "rsub": {"functions": [torch.rsub], "aten": ["rsub"]},
    "mul": {"functions": [operator.mul, operator.imul, torch.mul, torch.multiply],
            "methods": ["mul", "mul_", "multiply", "multiply_"], "aten": ["mul", "mul_"]},
    "div": {"functions": [operator.truediv, operator.itruediv, torch.div, torch.divide,
                          torch.true_divide],
            "methods": ["div", "div_", "divide", "divide_", "true_divide", "true_divide_"],
            "aten": ["div", "div_", "true_divide"]},
    "neg": {"functions": [operator.neg, torch.neg, torch.negative],
            "methods": ["neg", "neg_", "negative", "negative_"], "aten": ["neg", "neg_"]},
    "cat": {"functions": [torch.cat, torch.concat, torch.concatenate],
            "aten": ["cat", "concat", "concatenate"]},
    "max_pool": {"modules": [nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d],
                 "functions": [F.max_pool1d, F.max_pool2d, F.max_pool3d,
                               F.max_pool1d_with_indices, F.max_pool2d_with_indices,
                               F.max_pool3d_with_indices, torch.max_pool1d, torch.max_pool2d,
                               torch.max_pool3d],
                 "aten": ["max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices",
                          "max_pool2d_with_indices", "max_pool3d_with_indices"]},
    "adaptive_max_pool": {"modules": [nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                                      nn.AdaptiveMaxPool3d],
                          "functions": [F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                                        F.adaptive_max_pool3d, F.adaptive_max_pool1d_with_indices,
                                        F.adaptive_max_pool2d_with_indices,
                                        F.adaptive_max_pool3d_with_indices],
                          "aten": ["adaptive_max_pool1d", "adaptive_max_pool2d",
                                   "adaptive_max_pool3d"]},
    "avg_pool": {"modules": [nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d],
                 "functions": [F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.avg_pool1d],
                 "aten": ["avg_pool1d", "avg_pool2d", "avg_pool3d"]},
    "adaptive_avg_pool": {"modules": [nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                                      nn.AdaptiveAvgPool3d],
                          "functions": [F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                                        F.adaptive_avg_pool3d, torch.adaptive_avg_pool1d],
                          "aten": ["adaptive_avg_pool1d", "adaptive_avg_pool2d",
                                   "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
                                   "_adaptive_avg_pool3d"]},
    "mean": {"functions": [torch.mean], "methods": ["mean"], "aten": ["mean"]},
    "dropout": {"modules": [nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d],
                "functions": [F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
                              *_fns(torch, "dropout", "dropout_", "feature_dropout",
                                    "feature_dropout_")],
                "aten": ["dropout", "dropout_", "feature_dropout", "feature_dropout_",
                         "native_dropout"]},
    "alpha_dropout": {"modules": [nn.AlphaDropout, nn.FeatureAlphaDropout],
                      "functions": [F.alpha_dropout, F.feature_alpha_dropout,
                                    *_fns(torch, "alpha_dropout", "alpha_dropout_",
                                          "feature_alpha_dropout", "feature_alpha_dropout_")],
                      "aten": ["alpha_dropout", "alpha_dropout_", "feature_alpha_dropout",
                               "feature_alpha_dropout_"]},
    "identity": {"modules": [nn.Identity], "functions": [torch.clone],
                 "methods": ["contiguous", "clone", "float", "double", "half", "bfloat16", "to",
                             "type_as", "type", "cpu", "cuda"],
                 "aten": ["clone", "alias", "_to_copy", "to", "contiguous", "lift_fresh_copy"]},
    "flatten": {"modules": [nn.Flatten], "functions": [torch.flatten], "methods": ["flatten"],
                "aten": ["flatten"]},
    "reshape": {"functions": [torch.reshape], "methods": ["view", "reshape"],
                "aten": ["view", "reshape", "_unsafe_view"]},
    "layout": {"modules": [nn.Unflatten],
               "functions": [torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                             torch.movedim, torch.swapaxes, torch.unflatten],
               "methods": ["permute", "transpose", "squeeze", "unsqueeze", "unflatten",
                           "movedim", "swapaxes"],
               "aten": ["permute", "transpose", "squeeze", "unsqueeze", "unflatten", "movedim",
                        "swapaxes"]},
    "shape": {"functions": [getattr], "methods": ["size", "dim", "numel", "stride", "nelement",
                                                  "ndimension"],
              "aten": ["sym_size", "sym_numel", "sym_stride", "sym_storage_offset",
                       "_assert_tensor_metadata"]},
    "getitem": {"functions": [operator.getitem]},
    "pad": {"modules": [nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
                        *_fns(nn, "ZeroPad1d", "ZeroPad2d", "ZeroPad3d")],
            "functions": [F.pad, *_fns(torch, "constant_pad_nd")],
            "aten": ["constant_pad_nd", "pad"]},
    "upsample": {"modules": [nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d],
                 "functions": [F.interpolate, *_fns(F, "upsample", "upsample_nearest",
                                                    "upsample_bilinear")],
                 "aten": ["upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
                          "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
                          "_upsample_nearest_exact3d", "upsample_linear1d",
                          "upsample_bilinear2d", "upsample_bicubic2d", "upsample_trilinear3d"]},
    "split": {"functions": [torch.split, torch.chunk, torch.tensor_split],
              "methods": ["split", "chunk", "tensor_split"],
              "aten": ["split", "split_with_sizes", "chunk", "tensor_split"]},
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
    "selu": {"modules": [nn.SELU], "functions": [F.selu, torch.selu, torch.selu_],
             "aten": ["selu", "selu_"]},
    "relu_like": {"modules": [nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.GELU, nn.SiLU,
                              nn.Hardswish, nn.Mish, nn.PReLU, nn.RReLU],
                  "functions": [F.relu6, F.leaky_relu, F.elu, F.celu, F.gelu, F.silu,
                                F.hardswish, F.mish, F.prelu, F.rrelu,
                                *_fns(F, "leaky_relu_", "elu_", "celu_", "rrelu_"),
                                *_fns(torch, "celu", "celu_", "rrelu", "rrelu_", "prelu")],
                  "aten": ["relu6", "relu6_", "leaky_relu", "leaky_relu_", "elu", "elu_",
                           "celu", "celu_", "gelu", "gelu_", "silu", "silu_", "hardswish",
                           "hardswish_", "mish", "mish_", "prelu", "_prelu_kernel", "rrelu",
                           "rrelu_"]},
    "gate": {"modules": [nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Softmax, nn.Hardtanh,
                         nn.Softplus, nn.Tanhshrink],
             "functions": [torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.hardsigmoid,
                           F.softmax, torch.softmax, F.hardtanh, F.softplus, F.tanhshrink,
                           *_fns(F, "hardtanh_")],
             "methods": ["sigmoid", "sigmoid_", "tanh", "tanh_", "softmax"],
             "aten": ["sigmoid", "sigmoid_", "tanh", "tanh_", "hardsigmoid", "hardsigmoid_",
                      "softmax", "_softmax", "hardtanh", "hardtanh_", "softplus",
                      "tanhshrink"]},
}
"""Every spelling of each canonical op kind. ``relu_like``: rectifier-like activations (SELU
replaces them); ``gate``: gates and output squashers; ``layout``: ops that move or add
dimensions; ``shape``: ops that read no values (``x.size()``, ``x.shape``)."""

#: kinds of optional packages' ops, by qualified name (the package is never imported here)
_KINDS_BY_NAME: dict[str, str] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": "stochastic_depth",
    "torchvision.ops.stochastic_depth.StochasticDepth": "stochastic_depth",
}

OP_KINDS: tuple[str, ...] = (*_KINDS, *sorted(set(_KINDS_BY_NAME.values())))
_SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})


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


def _module_kind(m: nn.Module) -> str | None:
    """A module's kind: its class or the nearest base class in the table whose ``forward`` it
    does not override (a subclass with its own forward is not that op)."""
    for cls in type(m).__mro__:
        kind = _BY_MODULE.get(cls) or _KINDS_BY_NAME.get(_qualname(cls))
        if kind is not None:
            return kind if getattr(type(m), "forward") is getattr(cls, "forward") else None
    return None


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', None)}"


def op_kind(node: fx.Node, gm: fx.GraphModule | None = None) -> str | None:
    """The canonical kind of ``node``'s op (``"relu"``, ``"add"``, ``"conv"`` ...), or None.

    Args:
        node: any fx node.
        gm: the owning module, needed for ``call_module`` nodes (defaults to the graph's).

    Returns:
        A key of the table in this module (:data:`OP_KINDS`). BatchNorm subclasses count as
        ``"batch_norm"`` when they need no graft; a module subclass that overrides
        ``forward`` is not its base's kind; ATen ``hardtanh(x, 0, max)`` (an unlifted
        ``nn.ReLU6``) is ``"relu_like"``; ``getattr`` is ``"shape"`` only for metadata
        attributes. None for ops the table does not know.
    """
    if node.op == "call_module":
        m = _node_module(node, gm)
        if m is None:
            return None
        kind = _module_kind(m)
        if kind is None and is_batchnorm(m) and not needs_graft(m):
            return "batch_norm"
        return kind
    if node.op == "call_function":
        try:
            kind = _BY_FUNCTION.get(node.target) or _KINDS_BY_NAME.get(_qualname(node.target))
        except TypeError:  # unhashable target
            return None
        if kind == "shape" and node.target is getattr:
            return "shape" if len(node.args) > 1 and node.args[1] in _SHAPE_ATTRIBUTES else None
        if kind == "gate" and isinstance(node.target, torch._ops.OpOverload):
            args = op_args(node, gm)
            if args.get("min_val", -1.0) == 0 and args.get("max_val", 0.0) > 0:
                return "relu_like"  # ATen hardtanh(x, 0, 6): nn.ReLU6 when not lifted
        return kind
    if node.op == "call_method":
        return _BY_METHOD.get(str(node.target))
    return None


def _node_module(node: fx.Node, gm: fx.GraphModule | None) -> nn.Module | None:
    owner = gm if gm is not None else node.graph.owning_module
    if owner is None:
        return None
    try:
        return owner.get_submodule(str(node.target))
    except AttributeError:
        return None


# -- arguments by name, whatever the spelling ----------------------------------------------------
_RENAMES = {"self": "input", "train": "training"}
_OPERATOR_ARGS: dict[Any, tuple[str, ...]] = {
    **{fn: ("input", "other") for fn in (
        operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
        operator.truediv, operator.itruediv, operator.floordiv, operator.pow)},
    operator.neg: ("input",), operator.getitem: ("input", "index"), getattr: ("input", "name"),
}
_SHAPE_VARARG_METHODS = frozenset({"view", "reshape", "permute", "expand", "repeat"})
_MODULE_ATTRS: dict[str, tuple[str, ...]] = {
    "relu": ("inplace",), "relu_like": ("inplace",), "selu": ("inplace",),
    "max_pool": ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "adaptive_max_pool": ("output_size", "return_indices"),
    "avg_pool": ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                 "divisor_override"),
    "adaptive_avg_pool": ("output_size",),
    "dropout": ("p", "inplace"), "alpha_dropout": ("p", "inplace"),
    "stochastic_depth": ("p", "mode"), "pad": ("padding", "value"),
    "upsample": ("size", "scale_factor", "mode", "align_corners"),
    "flatten": ("start_dim", "end_dim"),
    "conv": ("weight", "bias", "stride", "padding", "dilation", "groups", "padding_mode"),
    "conv_transpose": ("weight", "bias", "stride", "padding", "output_padding", "groups",
                       "dilation", "padding_mode"),
    "linear": ("weight", "bias"),
}


def _bind(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """Bind a torch function's or ATen overload's arguments to their names (defaults filled)."""
    try:
        pair = normalize_function(target, tuple(args), dict(kwargs),
                                  normalize_to_only_use_kwargs=True)
    except (RuntimeError, TypeError, ValueError):  # ambiguous overloads of a builtin
        pair = None
    if pair is not None:
        return dict(pair.kwargs)
    signatures: list[inspect.Signature] = []
    try:
        signatures = list(get_signature_for_torch_op(target) or [])
    except (RuntimeError, TypeError, ValueError):
        pass
    if not signatures:
        try:
            signatures = [inspect.signature(target)]
        except (TypeError, ValueError):
            return None
    for sig in signatures:  # overloads of one builtin share the names that matter
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            continue
        bound.apply_defaults()
        return dict(bound.arguments)
    return None


def _method_args(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    if name in _SHAPE_VARARG_METHODS and len(args) > 1:
        shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        return {"input": args[0], "shape": tuple(shape), **kwargs}
    fn = getattr(torch, name, None) or getattr(torch, name.rstrip("_"), None)
    bound = _bind(fn, args, kwargs) if callable(fn) else None
    if bound is None:
        return {"input": args[0] if args else None,
                **{f"arg{i}": a for i, a in enumerate(args[1:], 1)}, **kwargs}
    return bound


def op_args(node: fx.Node, gm: fx.GraphModule | None = None) -> dict[str, Any]:
    """The arguments of ``node``'s op by canonical name, whatever its spelling.

    Functions and ATen overloads are bound to their signatures (``torch.fx``'s
    ``normalize_function``; defaults filled in), so ``F.max_pool2d(x, 2)`` and
    ``aten.max_pool2d.default(x, [2, 2])`` both give ``kernel_size``; ATen's ``self`` is
    ``input`` and its ``train`` is ``training``; ``operator.add(a, b)`` gives ``input`` and
    ``other``. A module call gives ``input`` (its first argument) and the attributes that
    matter for its kind (``kernel_size``, ``p``, ``weight``, ``inplace`` ...).

    Args:
        node: a ``call_module``, ``call_function`` or ``call_method`` node.
        gm: the owning module for ``call_module`` nodes (defaults to the graph's).

    Returns:
        Name -> value (fx nodes for graph values); ``{}`` for other nodes. Arguments that
        cannot be bound are given as ``arg1, arg2 ...`` after ``input``.
    """
    args, kwargs = tuple(node.args), dict(node.kwargs)
    if node.op == "call_module":
        m = _node_module(node, gm)
        out: dict[str, Any] = {"input": args[0] if args else next(iter(kwargs.values()), None)}
        if m is not None:
            kind = op_kind(node, gm)
            out.update({k: getattr(m, k) for k in _MODULE_ATTRS.get(kind or "", ())
                        if hasattr(m, k)})
        return out
    if node.op == "call_method":
        bound = _method_args(str(node.target), args, kwargs)
    elif node.op == "call_function":
        names = _OPERATOR_ARGS.get(node.target) if _hashable(node.target) else None
        if names is not None:
            bound = dict(zip(names, args))
        else:
            bound = _bind(node.target, args, kwargs)
            if bound is None:
                bound = {"input": args[0] if args else None,
                         **{f"arg{i}": a for i, a in enumerate(args[1:], 1)}, **kwargs}
    else:
        return {}
    return {_RENAMES.get(k, k): v for k, v in bound.items()}


def _hashable(target: Any) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


def describe_op(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    """A short name of ``node``'s op for reports: the module's class, ``aten.relu_.default``,
    the function's name, or ``.view()`` for a method."""
    if node.op == "call_module":
        m = _node_module(node, gm)
        return type(m).__name__ if m is not None else str(node.target)
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            return str(node.target)
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return node.op


def is_inplace(node: fx.Node, gm: fx.GraphModule | None = None) -> bool:
    """Whether the op writes into its input: an ``inplace=True`` module or argument, a
    mutating ATen overload (``aten.relu_.default``), a trailing-underscore function or method
    (``torch.relu_``, ``x.relu_()``)."""
    if node.op == "call_module":
        m = _node_module(node, gm)
        return bool(getattr(m, "inplace", False)) if m is not None else False
    if node.op not in ("call_function", "call_method"):
        return False
    if _mutates(node.target):
        return True
    inplace = node.kwargs.get("inplace")
    if inplace is None and node.op == "call_function" and not isinstance(
            node.target, torch._ops.OpOverload):
        inplace = op_args(node, gm).get("inplace", False)
    return inplace is True


def returns_tuple(node: fx.Node, gm: fx.GraphModule | None = None) -> bool:
    """Whether the op returns several values that ``getitem`` nodes pick apart: a max-pool with
    indices (``return_indices=True``, ``aten.max_pool2d_with_indices``), ATen's
    ``adaptive_max_pool2d`` and ``native_dropout``, any ATen overload with several returns."""
    if node.op == "call_module":
        m = _node_module(node, gm)
        return bool(getattr(m, "return_indices", False))
    if node.op != "call_function":
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return len(schema.returns) > 1
    if getattr(node.target, "__name__", "").endswith("_with_indices"):
        return True
    return op_kind(node, gm) in ("max_pool", "adaptive_max_pool") and bool(
        op_args(node, gm).get("return_indices", False))


def is_residual_sum(node: fx.Node) -> bool:
    """An add/sub of two graph values (a residual or skip connection)."""
    return op_kind(node) in ("add", "sub", "rsub") and sum(
        isinstance(a, fx.Node) for a in node.args) >= 2


# -- purity ------------------------------------------------------------------------------------
def _mutates(target: Any) -> bool:
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return bool(schema.is_mutable)
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return str(name).endswith("_") and not str(name).startswith("_")


def is_impure(node: fx.Node) -> bool:
    """fx's purity test, plus in-place calls (:func:`is_inplace`: ``x.relu_()``,
    ``inplace=True``, mutating ATen overloads) kept by DCE."""
    return node.is_impure() or is_inplace(node)


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """fx dead-code elimination that keeps in-place calls whose result is unused."""
    gm.graph.eliminate_dead_code(is_impure_node=is_impure)


LEAF_FUNCTIONS: list[Callable[..., Any]] = []


def leaf_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a helper that passes insert as ``call_function`` nodes: re-tracing a rewritten
    GraphModule keeps it as one node instead of tracing into its Python control flow."""
    LEAF_FUNCTIONS.append(fn)
    return fn
