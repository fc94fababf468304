"""Convert Conv/Linear → BatchNorm → ReLU chains to Normalization Propagation, eval-exact.

Rewrite (docs/maths.md, "NormProp"). A chain ``y = relu(bn(conv(x)))`` with the BN in eval mode
``bn(z) = s·z + t`` (``s = γ_BN/sqrt(σ²_r+ε)``, ``t = β_BN − s·μ_r``) and a conv/linear with weight
``W`` and bias ``b0`` becomes::

    y = relu(γ·(W ∗ x)/(κ‖W_i‖₂) + β)        (a NormProp layer + the kept ReLU)
    o = (y − 1/sqrt(2π)) / sqrt(½(1 − 1/π)) = a·y + c      (inserted NormPropCorrection)

with ``γ_i = κ·s_i·‖W_i‖₂`` and ``β_i = β_BN,i + s_i·(b0_i − μ_i) = t_i + s_i·b0_i``, which is
exactly the old pre-activation ``s·(W∗x + b0) + t``.

The correction changes what the following layers see (``o`` instead of ``y``), so it is undone
in the next affine layer(s), reached from the ReLU through operations that commute with the
monotone map ``y ↦ a·y + c`` (a > 0): max-pooling, average pooling over real elements
(adaptive, or without zero padding counted), mean, flatten/view/reshape/permute, indexing,
identity and dropout (identity in eval). Ops are matched by their canonical kind
(:func:`~normswap.passes._match.op_kind`), so ``nn.ReLU``, ``F.relu``, ``x.relu_()`` and the
ATen ``aten.relu_.default`` of a ``torch.export`` capture are the same ReLU. Each such
consumer ``L(v) = W2 ∗ v + b2`` becomes::

    W2' = W2/a,   b2' = b2 − (c/a)·ΣW2   (sum over all of unit i's inputs)

and, when the consumer is a convolution with zero padding, its border is padded with ``c``
instead of 0 (an explicit ``F.pad(value=c)`` before a conv with padding 0, or the NormProp
layer's ``padding_value``), because a padded 0 in ``y`` is a ``c`` in ``o``. When the consumer is
itself the conv of a converted chain, the correction is applied to its weights first and the
NormProp mapping then uses the corrected ``W2', b2'``.

In training mode the NormProp layers behave as NormProp (no batch statistics). A dropout between
the ReLU and the next layer then drops corrected (zero-mean) units, as in a native NormProp
network; in eval it is the identity, so the conversion is eval-exact.

Refused (the BN is reported and, with ``strict=False``, kept as BatchNorm; ``strict=True``
collects every such node and raises one :class:`UnsupportedNodeError`):

* a BN not fed by a Conv1d/2d/3d or Linear module (or the conv's module is called more than once,
  or the conv output has other users);
* a BN whose output does not go (only) to a ReLU — e.g. to a residual sum or to another
  activation — or a BN without running statistics;
* a ReLU whose output reaches anything that cannot absorb the correction: a residual sum, a
  concatenation, another activation, the graph output, a transposed convolution, a shared
  consumer module, an average pool counting zero padding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..norms.normprop import (
    KAPPA,
    NORMPROP_LAYERS,
    POST_RELU_SHIFT,
    NormPropCorrection,
    NormPropBase,
)
from ..report import PassReport
from ._infra import cleanup, raise_refusals
from ._match import (
    describe_op,
    is_residual_sum,
    module_calls,
    module_of,
    op_args,
    op_kind,
    returns_tuple,
    shared_param_counts,
)
from ._math import absorb_post_relu, normprop_params, norm_scale_shift

__all__ = ["to_normprop"]

log = logging.getLogger(__name__)

_AFFINE_KINDS = frozenset({"conv", "linear"})


# -- graph analysis --------------------------------------------------------------------------

@dataclass
class _Chain:
    """One convertible conv → BN → ReLU chain and the layers that absorb its correction."""

    conv: fx.Node
    bn: fx.Node
    relu: fx.Node
    consumers: list[fx.Node] = field(default_factory=list)


def _any_set(value: Any) -> bool:
    """A padding (int or per-dim sequence) that pads somewhere."""
    return any(value) if isinstance(value, (tuple, list)) else bool(value)


def _always(args: dict[str, Any]) -> str:
    return ""


def _avg_pool_problem(args: dict[str, Any]) -> str:
    """An average pool commutes with ``v ↦ a·v + c`` only when it averages real elements."""
    if args.get("divisor_override"):
        return "average pool with divisor_override is not an average"
    if _any_set(args.get("padding", 0)) and args.get("count_include_pad", True):
        return "average pool counts zero padding (count_include_pad=True)"
    return ""


def _dropout_problem(args: dict[str, Any]) -> str:
    """A functional dropout traced in training mode would drop corrected units in eval."""
    if args.get("training", False):
        return "functional dropout with training=True"
    return ""


_COMMUTING: dict[str, Callable[[dict[str, Any]], str]] = {
    # kind: why an op of that kind does not commute with the correction ('' = it does)
    "max_pool": _always, "adaptive_max_pool": _always, "adaptive_avg_pool": _always,
    "avg_pool": _avg_pool_problem, "mean": _always,
    "dropout": _dropout_problem, "alpha_dropout": _dropout_problem,
    "identity": _always, "flatten": _always, "reshape": _always, "layout": _always,
    "getitem": _always,  # a slice of the corrected values, or the values of a max-pool
}
"""Ops that commute with the monotone elementwise map ``v ↦ a·v + c`` (a > 0)."""


def _commutes(gm: fx.GraphModule, node: fx.Node, src: fx.Node) -> tuple[bool, str]:
    """Whether ``node`` (reading ``src``) commutes with ``v ↦ a·v + c``; else why not."""
    what = describe_op(node, gm)
    if not node.args or node.args[0] is not src:
        return False, f"reads the ReLU output in an unsupported position ({what})"
    if any(a is src for a in list(node.args[1:]) + list(node.kwargs.values())):
        return False, f"reads the ReLU output twice ({what})"
    check = _COMMUTING.get(op_kind(node, gm) or "")
    if check is None:
        return False, f"{what} does not commute with the correction"
    reason = check(op_args(node, gm))
    return not reason, reason


def _reads_no_values(gm: fx.GraphModule, node: fx.Node, src: fx.Node) -> bool:
    """``x.size()``, ``x.shape`` -- or the indices of a max-pool (an increasing map keeps
    them): nothing that the correction changes."""
    kind = op_kind(node, gm)
    if kind == "shape":
        return True
    return (kind == "getitem" and returns_tuple(src, gm)
            and op_args(node, gm).get("index") != 0)


def _find_consumers(gm: fx.GraphModule, relu: fx.Node, calls: dict[str, int],
                    shared: set[int]) -> tuple[list[fx.Node], list[str]]:
    """Walk forward from a ReLU to the affine layers that can absorb the correction.

    Returns:
        ``(consumers, problems)``; the chain is convertible when ``problems`` is empty.
    """
    consumers: list[fx.Node] = []
    problems: list[str] = []
    stack, seen = [relu], {relu}
    while stack:
        cur = stack.pop()
        for user in cur.users:
            if _reads_no_values(gm, user, cur):
                continue
            where = f"'{user.name}'"
            if is_residual_sum(user):
                problems.append(f"post-ReLU output reaches residual sum {where} "
                                f"({describe_op(user, gm)}): offsets do not cancel")
                continue
            if user.op == "output":
                problems.append("post-ReLU output is a graph output (no layer absorbs the "
                                "correction)")
                continue
            m = module_of(gm, user)
            if isinstance(m, NormPropBase) or (m is not None
                                               and op_kind(user, gm) in _AFFINE_KINDS):
                reason = _consumer_problem(m, user, cur, calls, shared)
                if reason:
                    problems.append(f"next layer {where}: {reason}")
                elif user not in consumers:
                    consumers.append(user)
                continue
            ok, reason = _commutes(gm, user, cur)
            if not ok:
                problems.append(f"post-ReLU output reaches {where}: {reason}")
            elif user not in seen:
                seen.add(user)
                stack.append(user)
    return consumers, problems


def _consumer_problem(m: nn.Module, node: fx.Node, src: fx.Node,
                      calls: dict[str, int], shared: set[int]) -> str:
    """Why a conv/linear cannot absorb the correction ('' when it can)."""
    if isinstance(m, NormPropBase):
        return "already a NormProp layer (its weight normalisation hides a rescale)"
    if not node.args or node.args[0] is not src or len(node.args) > 1 or node.kwargs:
        return "unexpected call signature"
    if calls.get(str(node.target), 0) > 1:
        return f"module '{node.target}' is called {calls[str(node.target)]} times"
    if any(id(p) in shared for p in m.parameters(recurse=False)):
        return f"module '{node.target}' shares its weight with another module (tied weights)"
    return ""


def _chain_problem(gm: fx.GraphModule, bn_node: fx.Node,
                   calls: dict[str, int]) -> tuple[_Chain | None, str]:
    """Match conv → BN → ReLU around ``bn_node``; return the chain or the refusal reason."""
    bn = module_of(gm, bn_node)
    if bn is None:
        return None, "functional batch_norm call (only BatchNorm modules are converted)"
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return None, "no running statistics (track_running_stats=False): not affine in eval"
    if calls.get(str(bn_node.target), 0) > 1:
        return None, f"BN module is called {calls[str(bn_node.target)]} times"
    src = bn_node.args[0] if bn_node.args else None
    conv = module_of(gm, src) if isinstance(src, fx.Node) else None
    if (src is None or conv is None or op_kind(src, gm) not in _AFFINE_KINDS
            or isinstance(conv, NormPropBase)):
        what = describe_op(src, gm) if isinstance(src, fx.Node) else "nothing"
        return None, f"BN not preceded by Conv1d/2d/3d or Linear (input is {what})"
    if calls.get(str(src.target), 0) > 1:
        return None, f"conv module '{src.target}' is called {calls[str(src.target)]} times"
    if len(src.users) != 1:
        return None, f"conv output '{src.name}' has {len(src.users)} users"
    if isinstance(conv, nn.Linear) and conv.out_features != bn.num_features:
        return None, "Linear out_features differ from the BN's num_features"
    users = list(bn_node.users)
    if len(users) != 1:
        return None, f"BN output has {len(users)} users ({', '.join(u.name for u in users)})"
    nxt = users[0]
    if is_residual_sum(nxt):
        return None, (f"BN output feeds residual sum '{nxt.name}' ({describe_op(nxt, gm)}), "
                      "not a ReLU")
    if op_kind(nxt, gm) != "relu":
        return None, (f"BN output feeds '{nxt.name}' ({describe_op(nxt, gm)}): NormProp is "
                      "defined for ReLU only")
    if op_args(nxt, gm).get("input") is not bn_node:
        return None, "ReLU reads the BN output in an unexpected position"
    return _Chain(src, bn_node, nxt), ""


# -- rewriting -------------------------------------------------------------------------------

def _conv_pad_pairs(conv: nn.Module) -> tuple[int, ...]:
    """A conv's zero padding in F.pad order (last dim first, left/right)."""
    pairs = getattr(conv, "_reversed_padding_repeated_twice", None)
    if pairs is not None:
        return tuple(int(p) for p in pairs)
    return tuple(p for v in reversed(conv.padding) for p in (v, v))


def _needs_pad_value(m: nn.Module) -> bool:
    """True for a conv whose zero padding must become a ``c`` padding."""
    return (isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.padding_mode == "zeros"
            and any(_conv_pad_pairs(m)))


def _absorb(m: nn.Module) -> None:
    """Apply :func:`absorb_post_relu` to a conv/linear module in place."""
    w2, b2 = absorb_post_relu(m.weight, m.bias)
    with torch.no_grad():
        m.weight.copy_(w2.to(m.weight.dtype))
        if m.bias is None:
            m.bias = nn.Parameter(b2.to(device=m.weight.device, dtype=m.weight.dtype))
        else:
            m.bias.copy_(b2.to(m.bias.dtype))


def _build_layer(conv: nn.Module, bn: nn.Module, kappa: float, pad_value: float) -> NormPropBase:
    """The NormProp layer reproducing ``bn(conv(x))`` (conv already corrected if needed)."""
    s, t = norm_scale_shift(bn)
    gamma, beta = normprop_params(conv.weight, conv.bias, s, t, kappa)
    factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    cls = NORMPROP_LAYERS[type(conv)] if type(conv) in NORMPROP_LAYERS else None
    if cls is None:  # a subclass of a torch layer: use its base's NormProp layer
        cls = next(v for k, v in NORMPROP_LAYERS.items() if isinstance(conv, k))
    if isinstance(conv, nn.Linear):
        layer: NormPropBase = cls(conv.in_features, conv.out_features, kappa=kappa, **factory)
    else:
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    _conv_pad_pairs(conv), conv.dilation, conv.groups,
                    padding_mode=conv.padding_mode, padding_value=pad_value, kappa=kappa,
                    **factory)
    with torch.no_grad():
        layer.weight.copy_(conv.weight)
        layer.gamma.copy_(gamma.to(layer.gamma.dtype))
        layer.beta.copy_(beta.to(layer.beta.dtype))
    return layer


def _free_name(gm: fx.GraphModule, base: str) -> str:
    """A submodule path based on ``base`` that is not yet taken."""
    name, i = base, 1
    while True:
        try:
            gm.get_submodule(name)
        except AttributeError:
            return name
        name, i = f"{base}_{i}", i + 1


def _insert_pad(gm: fx.GraphModule, node: fx.Node, conv: nn.Module, value: float) -> None:
    """Pad a plain conv's input explicitly with ``value`` and set its own padding to 0."""
    pairs = _conv_pad_pairs(conv)
    src = node.args[0]
    with gm.graph.inserting_before(node):
        pad = gm.graph.call_function(F.pad, (src, list(pairs)),
                                     {"mode": "constant", "value": value})
    node.replace_input_with(src, pad)
    conv.padding = (0,) * len(conv.kernel_size)
    conv._reversed_padding_repeated_twice = [0] * (2 * len(conv.kernel_size))


def to_normprop(gm: fx.GraphModule, *, strict: bool = True, kappa: float = KAPPA
                ) -> tuple[fx.GraphModule, PassReport]:
    """Convert every Conv/Linear → BatchNorm → ReLU chain to NormProp, eval-exact.

    Each converted chain becomes a NormProp layer (``γ·(W∗x)/(κ‖W_i‖₂) + β``) followed by the
    kept ReLU and a :class:`~normswap.norms.normprop.NormPropCorrection`; the layers that read
    the corrected activations are rescaled (``W/a``, ``b − (c/a)ΣW``, border padded with ``c``)
    so that the eval-mode output is unchanged. See the module docstring for the math.

    Args:
        gm: graph traced in eval mode from a private copy (mutated and returned).
        strict: raise :class:`UnsupportedNodeError` listing every BatchNorm that cannot be
            converted (True), or keep those as BatchNorm and report each (False).
        kappa: the NormProp constant κ stored in the new layers (absorbed into γ).

    Returns:
        The rewritten graph module and the report.

    Raises:
        UnsupportedNodeError: ``strict=True`` and at least one BatchNorm cannot be converted.
    """
    report = PassReport(title="to_normprop")
    calls = module_calls(gm)
    shared = {pid for pid, n in shared_param_counts(gm).items() if n > 1}
    chains: list[_Chain] = []
    refused: list[tuple[fx.Node, str, str]] = []
    for node in list(gm.graph.nodes):
        if op_kind(node, gm) != "batch_norm":
            continue
        chain, reason = _chain_problem(gm, node, calls)
        if chain is not None:
            chain.consumers, problems = _find_consumers(gm, chain.relu, calls, shared)
            reason = "; ".join(problems)
            if problems:
                chain = None
        if chain is None:
            refused.append((node, describe_op(node, gm), reason))
        else:
            chains.append(chain)

    def label(n: fx.Node) -> str:
        return str(n.target) if n.op == "call_module" else n.name

    if not chains and not refused:
        report.note("no BatchNorm found: nothing to convert")
    if strict:
        raise_refusals("to_normprop cannot convert", ((label(n), op, why) for n, op, why in refused),
                       "NormProp is defined for plain conv/linear → BN → ReLU chains. Remedy: "
                       "pass strict=False to keep these as BatchNorm, or use a module-level "
                       "method (e.g. 'l1') for residual networks.")
    for n, op, why in refused:
        report.skip(label(n), op, why)

    # 1) every consumer absorbs the correction of the chain that feeds it
    had_bias = {c.conv for c in chains if module_of(gm, c.conv).bias is not None}
    absorbed: list[fx.Node] = []
    for chain in chains:
        for cons in chain.consumers:
            _absorb(module_of(gm, cons))
            absorbed.append(cons)
    # 2) conv + BN become a NormProp layer (from the already corrected conv weights)
    converted: set[fx.Node] = set()
    for chain in chains:
        conv_name, bn_name = str(chain.conv.target), str(chain.bn.target)
        conv, bn = module_of(gm, chain.conv), module_of(gm, chain.bn)
        pad_value = POST_RELU_SHIFT if chain.conv in absorbed and _needs_pad_value(conv) else 0.0
        layer = _build_layer(conv, bn, kappa, pad_value)
        if chain.conv in had_bias:
            report.key_map[f"{conv_name}.bias"] = None
        for key in bn.state_dict():
            report.key_map[f"{bn_name}.{key}"] = None
        layer.train(conv.training)
        gm.add_submodule(conv_name, layer)
        chain.bn.replace_all_uses_with(chain.conv)
        gm.graph.erase_node(chain.bn)
        gm.delete_submodule(bn_name)
        corr_name = _free_name(gm, f"{bn_name}_correction")
        gm.add_submodule(corr_name, NormPropCorrection().train(bn.training))
        with gm.graph.inserting_after(chain.relu):
            corr = gm.graph.call_module(corr_name, (chain.relu,))
        chain.relu.replace_all_uses_with(corr, delete_user_cb=lambda u, c=corr: u is not c)
        converted.add(chain.conv)
        report.change(bn_name, f"{type(conv).__name__}+{type(bn).__name__}+ReLU",
                      f"{type(layer).__name__}+ReLU+NormPropCorrection",
                      f"conv '{conv_name}', correction '{corr_name}'")
    # 3) plain consumers (not converted themselves) pad with c instead of 0
    for cons in absorbed:
        m = module_of(gm, cons)
        detail = "W/a, b - (c/a)·sum(W)"
        if cons not in converted and _needs_pad_value(m):
            _insert_pad(gm, cons, m, POST_RELU_SHIFT)
            detail += ", zero padding -> explicit pad with c"
        elif cons in converted and _needs_pad_value_layer(m):
            detail += ", NormProp padding_value = c"
        report.change(str(cons.target), type(m).__name__,
                      f"{type(m).__name__} reading NormProp-corrected input", detail)
    if chains:
        report.note(f"converted {len(chains)} chain(s) to NormProp; eval output unchanged, "
                    "train mode uses NormProp (no batch statistics)")
    if refused:
        report.warn(f"{len(refused)} BatchNorm node(s) kept as BatchNorm (strict=False)")
    cleanup(gm)
    return gm, report


def _needs_pad_value_layer(m: nn.Module) -> bool:
    """True for a NormProp conv that pads with a non-zero constant."""
    return getattr(m, "padding_value", 0.0) != 0.0 and any(getattr(m, "padding", (0,)))
