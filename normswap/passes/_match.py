"""Shared matching for the passes: which modules are BatchNorms, and an fx tracer that keeps
them (and normswap's own layers) as leaves while tracing through BN subclasses that add
behaviour in their own ``forward``."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..norms._common import is_frozen_batchnorm, overrides_forward

__all__ = [
    "BN_TYPES",
    "CONV_TYPES",
    "CONV_TRANSPOSE_TYPES",
    "AFFINE_LAYER_TYPES",
    "module_call_counts",
    "shared_param_ids",
    "layer_before_norm",
    "out_channels",
    "NormTracer",
    "trace",
    "is_batchnorm",
    "is_frozen_batchnorm",
    "overrides_forward",
    "is_normswap_layer",
    "batchnorm_like_modules",
    "FUNCTIONAL_BATCH_NORM",
    "find_untraceable",
    "is_impure",
    "eliminate_dead_code",
    "leaf_function",
]

log = logging.getLogger(__name__)

BN_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
)
FUNCTIONAL_BATCH_NORM = (F.batch_norm, torch.batch_norm)
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
AFFINE_LAYER_TYPES: tuple[type[nn.Module], ...] = CONV_TYPES + CONV_TRANSPOSE_TYPES + (nn.Linear,)


def is_batchnorm(m: nn.Module) -> bool:
    """Any BatchNorm form a swap replaces: torch BNs, SyncBN, subclasses, frozen BNs."""
    return isinstance(m, _BatchNorm) or is_frozen_batchnorm(m)


def is_normswap_layer(m: nn.Module) -> bool:
    """Layers defined by normswap itself (kept as leaves when tracing)."""
    return type(m).__module__.startswith("normswap.norms")


def batchnorm_like_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm-family module with its qualified name."""
    return [(n, m) for n, m in model.named_modules() if is_batchnorm(m)]


def _no_check(_x: Any) -> None:
    """Stand-in for BatchNorm's input-dim check while tracing."""


LEAF_FUNCTIONS: list[Any] = []


def leaf_function(fn: Any) -> Any:
    """Mark a helper that passes insert as ``call_function`` nodes: re-tracing a rewritten
    GraphModule keeps it as one node instead of tracing into its Python control flow."""
    LEAF_FUNCTIONS.append(fn)
    return fn


class NormTracer(fx.Tracer):
    """Tracer with BatchNorms and normswap layers as leaves.

    BatchNorm subclasses that override ``forward`` are traced through, so the extra behaviour
    they add (an activation, a dropout) stays in the graph and only their ``F.batch_norm``
    call is replaced.
    """

    def __init__(self, leaf_modules: Iterable[str] = ()) -> None:
        super().__init__(autowrap_functions=tuple(LEAF_FUNCTIONS))
        self.leaf_names = set(leaf_modules)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if isinstance(m, _BatchNorm) and overrides_forward(m):
            # a subclass calling super().forward() would branch on input.dim(): silence the
            # shape check on this instance while tracing through it
            m._check_input_dim = _no_check  # type: ignore[method-assign]
            try:
                return super().call_module(m, forward, args, kwargs)
            finally:
                del m._check_input_dim
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names:
            return True
        if is_normswap_layer(m) or is_frozen_batchnorm(m):
            return True
        if isinstance(m, _BatchNorm):
            return not overrides_forward(m)
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, leaf_modules: Iterable[str] = ()) -> fx.GraphModule:
    """Trace ``model`` with :class:`NormTracer`; raises whatever fx raises."""
    tracer = NormTracer(leaf_modules)
    graph = tracer.trace(model)
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.train(model.training)
    return gm


def _trace_error(module: nn.Module, leaf_modules: Iterable[str]) -> Exception | None:
    try:
        NormTracer(leaf_modules).trace(module)
    except Exception as exc:  # noqa: BLE001 - any tracing failure counts
        return exc
    return None


def find_untraceable(model: nn.Module, leaf_modules: Iterable[str] = (),
                     max_depth: int = 6) -> list[tuple[str, str, str]]:
    """Locate the deepest submodules whose own forward cannot be traced.

    Returns ``(qualified_name, class_name, error)`` for each culprit; the root itself when no
    child is to blame.
    """
    leaves = set(leaf_modules)

    def visit(prefix: str, mod: nn.Module, depth: int) -> list[tuple[str, str, str]]:
        err = _trace_error(mod, [])
        if err is None:
            return []
        found: list[tuple[str, str, str]] = []
        if depth < max_depth:
            for name, child in mod.named_children():
                q = f"{prefix}.{name}" if prefix else name
                if q in leaves or is_batchnorm(child):
                    continue
                found.extend(visit(q, child, depth + 1))
        if not found:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            found.append((prefix or "<root>", type(mod).__name__, f"{type(err).__name__}: {first}"))
        return found

    return visit("", model, 0)


def is_impure(node: fx.Node) -> bool:
    """fx's purity test, plus in-place calls (``x.relu_()``, ``inplace=True``) kept by DCE."""
    if node.is_impure():
        return True
    if node.op == "call_module":
        owner = node.graph.owning_module
        return owner is not None and bool(getattr(owner.get_submodule(str(node.target)),
                                                  "inplace", False))
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    inplace = bool(node.kwargs.get("inplace", False)) or (
        node.op in ("call_method", "call_function") and str(name).endswith("_")
        and not str(name).startswith("_"))
    return inplace


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """fx dead-code elimination that keeps in-place calls whose result is unused."""
    gm.graph.eliminate_dead_code(is_impure_node=is_impure)


# -- the layer feeding a norm ------------------------------------------------------------------
def module_call_counts(gm: fx.GraphModule) -> Counter[str]:
    """How many ``call_module`` nodes call each module target."""
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")


def shared_param_ids(model: nn.Module) -> Counter[int]:
    """How many modules hold each parameter tensor (tied weights count more than once)."""
    counts: Counter[int] = Counter()
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            counts[id(p)] += 1
    return counts


def out_channels(layer: nn.Module) -> int:
    """Output channels of a Conv/ConvTranspose (``out_channels``) or Linear (``out_features``)."""
    return int(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)


def layer_before_norm(gm: fx.GraphModule, norm_node: fx.Node, calls: Counter[str],
                      param_owners: Counter[int]) -> tuple[fx.Node | None, str | None]:
    """The Conv/ConvTranspose/Linear node feeding ``norm_node``, and why a rewrite that changes
    that layer's weights (a fold, a bounded-WN conversion) must not use it.

    Refused: no such layer directly before the norm, a layer module called more than once, a
    layer output with other users, a parameter shared with another module (tied weights), no
    floating-point weight, a Linear whose output is not ``(N, C)`` (needs ``tensor_meta`` from
    :class:`torch.fx.passes.shape_prop.ShapeProp`). The channel count is the caller's check.

    Args:
        gm: the traced model.
        norm_node: the norm's node (its first argument is the candidate layer).
        calls: :func:`module_call_counts` of ``gm``.
        param_owners: :func:`shared_param_ids` of ``gm``.

    Returns:
        ``(layer_node, reason)``: ``layer_node`` is set whenever the input is such a layer
        (also when it is refused), ``reason`` is None when the rewrite may use it.
    """
    arg = norm_node.args[0] if norm_node.args else None
    if not isinstance(arg, fx.Node) or arg.op != "call_module":
        what = arg.format_node() if isinstance(arg, fx.Node) else repr(arg)
        producer = f"'{arg.name}' ({arg.op} {arg.target})" if isinstance(arg, fx.Node) else what
        return None, f"no preceding Conv/ConvTranspose/Linear: its input comes from {producer}"
    layer = gm.get_submodule(str(arg.target))
    kind = type(layer).__name__
    if not isinstance(layer, AFFINE_LAYER_TYPES):
        return None, f"no preceding Conv/ConvTranspose/Linear: '{arg.target}' is {kind}"
    if calls[str(arg.target)] > 1:
        return arg, (f"'{arg.target}' ({kind}) is called {calls[str(arg.target)]} times; "
                     "rewriting its weights would change its other calls")
    if len(arg.users) > 1:
        others = sorted(u.name for u in arg.users if u is not norm_node)
        return arg, (f"output of '{arg.target}' has {len(arg.users)} users (also "
                     f"{', '.join(others)}); rewriting its weights would change what they see")
    shared = [n for n, p in layer.named_parameters(recurse=False) if param_owners[id(p)] > 1]
    if shared:
        return arg, f"'{arg.target}'.{shared[0]} is shared with another module (tied weights)"
    if getattr(layer, "weight", None) is None or layer.weight.dtype not in (
            torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return arg, f"'{arg.target}' has no floating-point weight"
    if isinstance(layer, nn.Linear):
        meta = arg.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            return arg, ("Linear output rank unknown: folding is only valid for (N, C) outputs; "
                         "pass example_inputs so shapes can be propagated")
        if len(meta.shape) != 2:
            return arg, (f"Linear output has shape {tuple(meta.shape)}: the norm normalises dim "
                         "1 but the Linear's features are the last dim, so they cannot fold")
    return arg, None
