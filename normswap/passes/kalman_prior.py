"""Wire Batch Kalman Normalization priors through a captured graph.

Rewrite: every ``call_module`` node of a :class:`~normswap.norms.kalman.KalmanBatchNorm` layer
becomes ``out = layer(x, prior=P, return_stats=True)``, ``y = out[0]``, ``stats = out[1]``; the
layer's output moments are pushed through the ops that follow it, in new nodes beside the real
ones, until they reach the next Kalman layer, where they become its prior ``P``. In eval mode the
layers return ``stats = None``, every moment node returns ``None`` at once, and the layers ignore
priors: the eval computation is the same as before the pass.

The propagator is one table, :data:`_RULES`, from canonical op kinds
(:func:`~normswap.passes._match.op_kind`: the same kind for ``nn.ReLU``, ``F.relu``,
``x.relu_()`` and ``aten.relu_.default``) to moment rules; each rule reads the op's arguments by
name (:func:`~normswap.passes._match.op_args`), so graphs from ``torch.fx`` and from
``torch.export`` (ATen ops between lifted modules) are handled alike. A "moment" is a
per-channel ``(mean, var)`` pair (channel = dim 1); values are assumed independent across
channels and positions, and Gaussian where a nonlinearity needs a distribution. The formulas
(docs/maths.md, "Kalman priors"):

- Kalman layer output (``prior_moments="normalised"``): mean ``beta``, variance
  ``gamma**2 * s2 / (s2 + eps)`` from the layer's combined moments ``(mu, s2)``;
  ``prior_moments="raw"`` propagates ``(mu, s2)`` themselves, as the authors' code does.
- ``relu``: rectified-Gaussian moments (exact for Gaussian input); other activations cut.
- ``conv`` / ``linear`` (module, or functional with the weights in the graph): ``sum W*m + b``,
  ``sum W**2 * v`` (``padding_aware=True``: mixture over all output positions, border
  included).
- ``add`` / ``sub`` / ``rsub``: means add, variances add (``alpha**2``-weighted); a Python number
  shifts the mean. ``mul`` / ``div`` by a Python number and ``neg``: affine in the moments.
- ``cat`` along dim 1: channel moments concatenate (other dims cut).
- ``avg_pool`` (``m``, ``v/k``; ``divisor_override``), ``adaptive_avg_pool`` and ``mean`` over
  spatial dims (``k`` = input/output spatial size), ``max_pool`` (max of ``k`` iid Gaussians,
  through the pre-ReLU Gaussian after a ReLU; ``approximate_maxpool=False`` cuts instead).
- ``dropout`` in train mode (inverted): mean kept, ``var = (v + m**2)/(1-p) - m**2``; a
  functional dropout traced with ``training=False`` is the identity.
- ``identity`` (``nn.Identity``, ``contiguous``, ``clone``, casts) passes moments through;
  ``flatten`` / ``reshape`` to ``(N, C*k)`` repeat each channel's moments ``k`` times (checked
  at run time; another layout yields no prior); ``shape`` ops carry none; ``getitem`` passes
  the values output of a max-pool with indices or a dropout with mask.

Any other op on a path from a Kalman layer cuts the chain: the next Kalman layer gets no prior
and the report records a skip naming the op. A Kalman layer grafted into a BatchNorm subclass's
own forward takes no prior: it is reported and cuts the chain. Gradients flow through the prior
path (no detach).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, fx, nn

from ..norms.kalman import KalmanBatchNorm, Moments, set_kalman_gain
from ..report import PassReport
from ._infra import cleanup
from ._match import (
    describe_op,
    eliminate_dead_code,
    leaf_function,
    module_of,
    node_shape,
    op_args,
    op_kind,
    returns_tuple,
)
from ._math import (
    activation_moments,
    add_moments,
    affine_moments,
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

__all__ = ["propagate_kalman_priors", "remove_kalman_priors"]

log = logging.getLogger(__name__)


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """Log a warning once per process and key."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


@leaf_function
def _mom_kalman_out(stats: Moments | None, weight: Tensor | None, bias: Tensor | None,
                    eps: float, raw: bool) -> Moments | None:
    """Output moments of a Kalman layer from the stats it returned."""
    if stats is None:
        return None
    if raw:
        return stats[0], stats[1]
    return normalised_moments(stats[0].float() if stats[0].dtype == torch.float16 else stats[0],
                              stats[1].float() if stats[1].dtype == torch.float16 else stats[1],
                              weight, bias, eps)


@leaf_function
def _mom_relu(mom: Moments | None) -> Moments | None:
    """ReLU moments or None."""
    return None if mom is None else relu_moments(mom[0], mom[1])


@leaf_function
def _mom_conv(mom: Moments | None, x: Tensor, weight: Tensor, bias: Tensor | None,
              stride: Any, padding: Any, dilation: Any, groups: int, padding_mode: str,
              padding_aware: bool) -> Moments | None:
    """Conv moments or None."""
    if mom is None:
        return None
    size = tuple(x.shape[2:]) if padding_aware else None
    return conv_moments(mom[0], mom[1], weight, bias, stride, padding, dilation, groups, size,
                        padding_mode)


@leaf_function
def _mom_linear(mom: Moments | None, x: Tensor, weight: Tensor, bias: Tensor | None
                ) -> Moments | None:
    """Linear moments or None (only for 2-D input, where dim 1 is the feature dim)."""
    if mom is None:
        return None
    if x.dim() != 2 or mom[0].numel() != x.shape[1]:
        _warn_once("linear", "Kalman prior: linear layer on non-(N, C) input; no prior there")
        return None
    return linear_moments(mom[0], mom[1], weight, bias)


@leaf_function
def _mom_add(a: Moments | float | None, b: Moments | float | None, alpha: float,
             a_is_mom: bool, b_is_mom: bool) -> Moments | None:
    """Moments of ``a + alpha*b``; Python numbers shift the mean."""
    if (a_is_mom and a is None) or (b_is_mom and b is None):
        return None
    if a_is_mom and b_is_mom:
        return add_moments(a, b, alpha)  # type: ignore[arg-type]
    if a_is_mom:
        return affine_moments(a[0], a[1], 1.0, alpha * float(b))  # type: ignore[index,arg-type]
    return affine_moments(b[0], b[1], alpha, float(a))  # type: ignore[index,arg-type]


@leaf_function
def _mom_activation(mom: Moments | None, fn: nn.Module) -> Moments | None:
    """Moments of an elementwise activation by quadrature (``fn`` is the graph's own module,
    or an :class:`ElementwiseFn` holding its function), or None."""
    return None if mom is None else activation_moments(mom[0], mom[1], fn)


@leaf_function
def _mom_channel_scale(mom: Moments | None, x: Tensor, factor: Tensor, divide: bool
                       ) -> Moments | None:
    """Moments of ``x·f`` (or ``x/f``) for a constant ``f`` that varies along dim 1 only (a
    layer scale ``gamma.view(-1, 1, 1)``), or None when it varies along other dims too."""
    f = None if mom is None else _per_channel(factor, x, mom[0])
    if f is None:
        return None
    f = 1.0 / f if divide else f
    return mom[0] * f, mom[1] * f * f


def _per_channel(const: Tensor, x: Tensor, like: Tensor) -> Tensor | None:
    """``const`` as one value per channel of ``x`` (shaped and typed like ``like``), or None
    when it varies along another dim (it broadcasts against ``x``)."""
    c = const.detach()
    if c.dim() > x.dim():
        return None
    c = c.reshape((1,) * (x.dim() - c.dim()) + tuple(c.shape))
    if any(n != 1 for i, n in enumerate(c.shape) if i != 1):
        return None
    return c.reshape(-1).to(like.dtype).expand(like.numel())


@leaf_function
def _mom_channel_shift(mom: Moments | None, x: Tensor, shift: Tensor, alpha: float
                       ) -> Moments | None:
    """Moments of ``x + alpha·b`` for a constant ``b`` that varies along dim 1 only (a learnt
    bias or shift), or None when it varies along other dims too."""
    b = None if mom is None else _per_channel(shift, x, mom[0])
    if b is None:
        return None
    return mom[0] + alpha * b, mom[1]


@leaf_function
def _mom_pad(mom: Moments | None, x: Tensor, y: Tensor, value: float) -> Moments | None:
    """Moments after constant padding of the non-channel dims: a mixture of the input's
    values and ``value`` (None for cropping or a padded batch/channel dim)."""
    if mom is None or tuple(y.shape[:2]) != tuple(x.shape[:2]):
        return None
    n_in, n_out = x[0, 0].numel(), y[0, 0].numel()
    if n_out < n_in or n_out == 0:
        return None
    keep = n_in / n_out
    mean = keep * mom[0] + (1.0 - keep) * value
    second = keep * (mom[1] + mom[0] * mom[0]) + (1.0 - keep) * value * value
    return mean, (second - mean * mean).clamp_min(0.0)


@leaf_function
def _mom_upsample(mom: Moments | None, x: Tensor, y: Tensor, nearest: bool
                  ) -> Moments | None:
    """Moments after interpolation: unchanged for a map of one value per channel (any mode)
    and for nearest-neighbour upsampling by whole factors (each value repeated equally often);
    None otherwise."""
    if mom is None or tuple(y.shape[:2]) != tuple(x.shape[:2]):
        return None
    inside, outside = tuple(x.shape[2:]), tuple(y.shape[2:])
    if all(n == 1 for n in inside):
        return mom
    if nearest and all(i > 0 and o % i == 0 for i, o in zip(inside, outside)):
        return mom
    _warn_once("upsample", "Kalman prior: interpolation that is not nearest-neighbour by "
               "whole factors; no prior there")
    return None


@leaf_function
def _mom_split(mom: Moments | None, parts: Any) -> list[Moments] | None:
    """Channel moments cut like a split/chunk along dim 1 (``parts``: the sizes), or None."""
    if mom is None:
        return None
    sizes = [int(t.shape[1]) for t in parts]
    if sum(sizes) != mom[0].numel():
        return None
    return [(m, v) for m, v in zip(mom[0].split(sizes), mom[1].split(sizes))]


@leaf_function
def _mom_channel_slice(mom: Moments | None, start: Any, stop: Any, step: Any
                       ) -> Moments | None:
    """The moments of ``x[:, start:stop:step]`` (a channel slice), or None."""
    if mom is None:
        return None
    sl = slice(start, stop, step)
    return mom[0][sl], mom[1][sl]


@leaf_function
def _mom_item(moms: list[Moments] | None, index: int) -> Moments | None:
    """One part of a split's moments, or None."""
    return None if moms is None else moms[index]


@leaf_function
def _mom_product(a: Moments | None, b: Moments | None, divide: bool) -> Moments | None:
    """Moments of ``x·g`` for two normalised branches (a squeeze-excitation gate), treating
    them as independent: ``E[xg] = E[x]E[g]``, ``E[(xg)²] = E[x²]E[g²]``; None when their
    channels differ or for a division."""
    if a is None or b is None or divide or a[0].numel() != b[0].numel():
        return None
    ex, eg = a[0], b[0]
    ex2, eg2 = a[1] + ex * ex, b[1] + eg * eg
    mean = ex * eg
    return mean, (ex2 * eg2 - mean * mean).clamp_min(0.0)


class ElementwiseFn(nn.Module):
    """A function of the graph (``F.silu``, ``aten.hardswish``, ``x.sigmoid()``) with its
    constant arguments, as a module the prior graph can hand to :func:`_mom_activation`."""

    def __init__(self, target: Any, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> None:
        super().__init__()
        self.target, self.kind, self.extra, self.kw = target, kind, args, kwargs

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "call_method":
            return getattr(x, str(self.target))(*self.extra, **self.kw)
        return self.target(x, *self.extra, **self.kw)


@leaf_function
def _mom_affine(mom: Moments | None, scale: float, shift: float) -> Moments | None:
    """Moments under a scalar affine map, or None."""
    return None if mom is None else affine_moments(mom[0], mom[1], float(scale), float(shift))


@leaf_function
def _mom_avgpool(mom: Moments | None, x: Tensor, kernel_size: Any,
                 divisor: float | None) -> Moments | None:
    """Average-pool moments for a fixed kernel, or None."""
    if mom is None:
        return None
    return avgpool_moments(mom[0], mom[1], _window(kernel_size, x.dim() - 2), divisor)


@leaf_function
def _mom_avgpool_shape(mom: Moments | None, x: Tensor, y: Tensor) -> Moments | None:
    """Adaptive average-pool moments (window = input/output spatial sizes), or None."""
    if mom is None:
        return None
    window = math.prod(x.shape[2:]) / max(1, math.prod(y.shape[2:]))
    return avgpool_moments(mom[0], mom[1], window)


@leaf_function
def _mom_maxpool(mom: Moments | None, pre_relu: Moments | None, x: Tensor,
                 kernel_size: Any) -> Moments | None:
    """Max-pool moments (Clark), through the pre-ReLU moments when given, or None."""
    window = _window(kernel_size, x.dim() - 2)
    if pre_relu is not None:
        return relu_maxpool_moments(pre_relu[0], pre_relu[1], window)
    if mom is None:
        return None
    return maxpool_moments(mom[0], mom[1], window)


@leaf_function
def _mom_dropout(mom: Moments | None, p: float) -> Moments | None:
    """Train-mode dropout moments, or None."""
    return None if mom is None else dropout_moments(mom[0], mom[1], float(p))


@leaf_function
def _mom_reshape(mom: Moments | None, x: Tensor, y: Tensor) -> Moments | None:
    """Moments through a flatten/view/reshape that keeps or expands channels, else None."""
    if mom is None:
        return None
    if x.dim() >= 2 and y.dim() >= 2 and y.shape[0] == x.shape[0]:
        if y.shape[1] == x.shape[1]:
            return mom
        if y.dim() == 2 and y.shape[1] % x.shape[1] == 0 and y.numel() == x.numel():
            k = y.shape[1] // x.shape[1]
            return mom[0].repeat_interleave(k), mom[1].repeat_interleave(k)
    _warn_once("reshape", "Kalman prior: reshape that does not keep channels; no prior there")
    return None


@leaf_function
def _mom_cat(moms: Sequence[Moments | None]) -> Moments | None:
    """Concatenated moments, or None."""
    if any(m is None for m in moms):
        return None
    return cat_moments(moms)  # type: ignore[arg-type]


@leaf_function
def _mom_mean(mom: Moments | None, x: Tensor, y: Tensor, dims: Sequence[int]
              ) -> Moments | None:
    """Moments of a mean over spatial dims (window = input/output sizes), or None when the
    dims include the batch or channel dim."""
    if mom is None:
        return None
    if any(d % x.dim() in (0, 1) for d in dims):
        _warn_once("mean", "Kalman prior: mean over the batch or channel dim; no prior there")
        return None
    return avgpool_moments(mom[0], mom[1], x.numel() / max(1, y.numel()))


def _window(kernel_size: Any, nd: int) -> int:
    """Number of elements of a pooling window."""
    if isinstance(kernel_size, int):
        return kernel_size ** max(nd, 1)
    return math.prod(int(k) for k in kernel_size)


# ---------------------------------------------------------------------------------------------
# Graph pass
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Known:
    """A node whose per-channel moments are produced by graph node ``node``."""

    node: fx.Node
    sources: frozenset[str]
    pre_relu: fx.Node | None = None


@dataclass(frozen=True)
class _Cut:
    """A node on a path from a Kalman layer whose moments cannot be propagated."""

    node: str
    op: str
    reason: str


_State = _Known | _Cut | None
_Rule = Callable[["_Propagator", fx.Node, str, dict[str, Any]], _State]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- the rules: one per canonical op kind ------------------------------------------------------
def _relu(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any]) -> _State:
    """Rectified-Gaussian moments; the pre-ReLU moments are kept for a following max-pool."""
    s = p.st(a.get("input"))
    if not isinstance(s, _Known):
        return s
    return _Known(p.emit(node, _mom_relu, s.node), s.sources, pre_relu=s.node)


def _mixes_channels(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A softmax: not elementwise."""
    if node.op == "call_module":
        return isinstance(module_of(gm, node), (nn.Softmax, nn.Softmax2d, nn.LogSoftmax))
    name = str(getattr(node.target, "__name__", node.target))
    return "softmax" in name


def _activation(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any]) -> _State:
    """Any elementwise activation (ReLU6, SiLU, GELU, Hardswish, sigmoid, tanh ...): moments
    of the graph's own module or function on N(mean, var), by Gauss-Hermite quadrature."""
    x = a.get("input") if "input" in a else (node.args[0] if node.args else None)
    s = p.st(x)
    if not isinstance(s, _Known):
        return s
    if _mixes_channels(node, p.gm):
        return _Cut(node.name, op, "softmax normalises across positions or channels: no "
                    "per-channel moment rule")
    if node.op == "call_module":
        fn_node = p.attr(node, str(node.target))
    else:
        extra, kw = tuple(node.args[1:]), dict(node.kwargs)
        kw.pop("inplace", None)
        if any(isinstance(v, fx.Node) for v in (*extra, *kw.values())):
            return _Cut(node.name, op, "activation arguments computed in the graph")
        fn_node = p.attr(node, p.add_module(ElementwiseFn(node.target, node.op, extra, kw)))
    return _Known(p.emit(node, _mom_activation, s.node, fn_node), s.sources)


def _sum(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any], *, sign: float,
         reverse: bool = False) -> _State:
    """``input + sign*alpha*other`` (``rsub``: ``other - alpha*input``): moments add; a Python
    number shifts the mean."""
    alpha = a.get("alpha", 1)
    if not _number(alpha):
        return p.cut_or_none(node, op, "non-constant alpha", node.all_input_nodes)
    first, second = a.get("input"), a.get("other")
    if reverse:
        first, second = second, first
    sa, sb = p.st(first), p.st(second)
    for s in (sa, sb):
        if isinstance(s, _Cut):
            return s
    a_mom, b_mom = isinstance(sa, _Known), isinstance(sb, _Known)
    if not (a_mom or b_mom):
        return None
    if a_mom != b_mom:  # a per-channel constant (a learnt shift): the mean moves
        known, value, const, factor = ((sa, first, second, sign * float(alpha)) if a_mom
                                       else (sb, second, first, 1.0))
        if _is_constant(p, const) and (a_mom or sign * float(alpha) == 1.0):
            return _Known(p.emit(node, _mom_channel_shift, known.node, value, const, factor),
                          known.sources)
    for arg, has in ((first, a_mom), (second, b_mom)):
        if not has and not _number(arg):
            other = arg.name if isinstance(arg, fx.Node) else type(arg).__name__
            return _Cut(node.name, op, f"operand '{other}' has no normalised layer upstream "
                        "(its moments are unknown)")
    sources = (sa.sources if a_mom else frozenset()) | (sb.sources if b_mom else frozenset())
    out = p.emit(node, _mom_add, sa.node if a_mom else first, sb.node if b_mom else second,
                 sign * float(alpha), a_mom, b_mom)
    return _Known(out, sources)


def _scale(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any], *,
           divide: bool) -> _State:
    """Multiplication / division by a Python number: affine in the moments."""
    x, other = a.get("input"), a.get("other")
    sa, sb = p.st(x), p.st(other)
    if a.get("rounding_mode") is not None:
        return p.cut_or_none(node, op, "rounded division", node.all_input_nodes)
    if isinstance(sa, _Known) and _number(other) and not (divide and other == 0):
        factor = 1.0 / float(other) if divide else float(other)
        return _Known(p.emit(node, _mom_affine, sa.node, factor, 0.0), sa.sources)
    if not divide and isinstance(sb, _Known) and _number(x):
        return _Known(p.emit(node, _mom_affine, sb.node, float(x), 0.0), sb.sources)
    if isinstance(sa, _Known) and isinstance(sb, _Known) and not divide:
        # a gate computed from the normalised activations (squeeze-excitation): independence
        return _Known(p.emit(node, _mom_product, sa.node, sb.node, False),
                      sa.sources | sb.sources)
    # a per-channel constant (a layer scale): a parameter or buffer, reshaped at most
    for known, value, const, may_divide in ((sa, x, other, True), (sb, other, x, False)):
        if (isinstance(known, _Known) and _is_constant(p, const)
                and (may_divide or not divide)):
            return _Known(p.emit(node, _mom_channel_scale, known.node, value, const, divide),
                          known.sources)
    return p.cut_or_none(node, op, "product with a tensor that is not a constant (only Python "
                         "numbers and per-channel parameters are supported)",
                         node.all_input_nodes)


_CONSTANT_STEPS = frozenset({"reshape", "flatten", "layout", "identity"})


def _is_constant(p: _Propagator, value: Any) -> bool:
    """A graph value computed from parameters/buffers only, through reshapes (no moments)."""
    seen = 0
    while isinstance(value, fx.Node) and seen < 8:
        if p.st(value) is not None:
            return False
        if value.op == "get_attr":
            return True
        if op_kind(value, p.gm) not in _CONSTANT_STEPS or not value.args:
            return False
        value, seen = value.args[0], seen + 1
    return False


def _neg(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any]) -> _State:
    """``-x``: mean negated, variance kept."""
    s = p.st(a.get("input"))
    if not isinstance(s, _Known):
        return s
    return _Known(p.emit(node, _mom_affine, s.node, -1.0, 0.0), s.sources)


def _cat(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any]) -> _State:
    """Concatenation along dim 1 (a negative dim counts when the rank is known)."""
    tensors = list(a.get("tensors") or ())
    dim = a.get("dim", 0)
    states = [p.st(t) for t in tensors]
    if not any(isinstance(s, _Known) for s in states):
        return next((s for s in states if isinstance(s, _Cut)), None)
    shape = node_shape(node)
    if isinstance(dim, int) and dim < 0 and shape is not None:
        dim += len(shape)
    if dim != 1:
        return _Cut(node.name, op, f"concatenation along dim {a.get('dim')} (only dim 1, "
                    "channels, is supported)")
    for t, s in zip(tensors, states):
        if isinstance(s, _Cut):
            return s
        if not isinstance(s, _Known):
            name = t.name if isinstance(t, fx.Node) else type(t).__name__
            return _Cut(node.name, op, f"input '{name}' has no normalised layer upstream")
    sources = frozenset().union(*(s.sources for s in states))  # type: ignore[union-attr]
    return _Known(p.emit(node, _mom_cat, [s.node for s in states]),  # type: ignore[union-attr]
                  sources)


def _max_pool(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any]) -> _State:
    """Max of ``k`` iid Gaussians (through the pre-ReLU moments after a ReLU), or a cut when
    approximations are refused."""
    x = a.get("input")
    s = p.st(x)
    if not isinstance(s, _Known):
        return s
    kernel = a.get("kernel_size")
    if isinstance(kernel, fx.Node):
        return _Cut(node.name, op, "kernel size computed in the graph")
    if not p.approximate_maxpool:
        return _Cut(node.name, op, "max-pool moments have no exact form "
                    "(approximate_maxpool=False)")
    return _Known(p.emit(node, _mom_maxpool, s.node, s.pre_relu, x, kernel), s.sources)


def _avg_pool(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any]) -> _State:
    """Average of ``k`` independent elements: ``(m, v/k)`` (``divisor_override`` d:
    ``m*k/d``, ``v*k/d**2``)."""
    x = a.get("input")
    s = p.st(x)
    if not isinstance(s, _Known):
        return s
    kernel, divisor = a.get("kernel_size"), a.get("divisor_override")
    if isinstance(kernel, fx.Node) or isinstance(divisor, fx.Node):
        return _Cut(node.name, op, "pool arguments computed in the graph")
    return _Known(p.emit(node, _mom_avgpool, s.node, x, kernel, divisor), s.sources)


def _adaptive_avg_pool(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any]) -> _State:
    """Average over the input/output spatial size ratio."""
    x = a.get("input")
    s = p.st(x)
    if not isinstance(s, _Known):
        return s
    return _Known(p.emit(node, _mom_avgpool_shape, s.node, x, node), s.sources)


def _mean(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any]) -> _State:
    """A mean over spatial dims is an average pool over them (checked again at run time)."""
    x = a.get("input")
    s = p.st(x)
    if not isinstance(s, _Known):
        return s
    dims = a.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims or ())
    if not dims or not all(isinstance(d, int) for d in dims):
        return _Cut(node.name, op, "mean over every dim (or dims computed in the graph) mixes "
                    "channels")
    if any(d in (0, 1) for d in dims):
        return _Cut(node.name, op, f"mean over dims {tuple(dims)} includes the batch or "
                    "channel dim")
    return _Known(p.emit(node, _mom_mean, s.node, x, node, tuple(dims)), s.sources)


def _dropout(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any]) -> _State:
    """Inverted dropout in train mode; a functional dropout traced with ``training=False`` is
    the identity."""
    s = p.st(a.get("input"))
    if not isinstance(s, _Known):
        return s
    rate, training = a.get("p", 0.5), a.get("training", True)
    if isinstance(rate, fx.Node) or isinstance(training, fx.Node):
        return _Cut(node.name, op, "dropout arguments computed in the graph")
    if node.op != "call_module" and not training:
        return s
    return _Known(p.emit(node, _mom_dropout, s.node, float(rate)), s.sources)


def _pad(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any]) -> _State:
    """Constant padding of the spatial dims (``F.pad``, ``nn.ZeroPad2d`` ...), checked at run
    time; other modes (reflect, replicate ...) cut."""
    x = a.get("input")
    s = p.st(x)
    if not isinstance(s, _Known):
        return s
    mode = a.get("mode", "constant")
    value = a.get("value")
    value = 0.0 if value is None else value
    if mode != "constant" or not _number(value):
        return _Cut(node.name, op, f"padding mode {mode!r} (only constant padding has a moment "
                    "rule)")
    pads = a.get("pad", a.get("padding"))
    if isinstance(pads, (tuple, list)) and any(_number(v) and v < 0 for v in pads):
        return _Cut(node.name, op, "negative padding crops: the moments of what is kept are "
                    "unknown")
    return _Known(p.emit(node, _mom_pad, s.node, x, node, float(value)), s.sources)


def _upsample(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any]) -> _State:
    """Interpolation: moments kept for nearest upsampling by whole factors and for 1×1 maps;
    decided on the recorded shapes (the report names a cut), checked again at run time."""
    x = a.get("input")
    s = p.st(x)
    if not isinstance(s, _Known):
        return s
    target = str(node.target)
    mode = a.get("mode") or ("nearest" if "nearest" in target else "linear")
    if isinstance(mode, fx.Node):
        return _Cut(node.name, op, "interpolation mode computed in the graph")
    nearest = str(mode) in ("nearest", "nearest-exact")
    shape_in, shape_out = node_shape(x), node_shape(node)
    if shape_in is not None and shape_out is not None and len(shape_in) == len(shape_out) and \
            not all(n == 1 for n in shape_in[2:]) and not (
                nearest and all(i > 0 and o % i == 0 for i, o in zip(shape_in[2:],
                                                                     shape_out[2:]))):
        return _Cut(node.name, op, f"{mode} interpolation from {shape_in[2:]} to "
                    f"{shape_out[2:]} changes the moments (kept only for nearest upsampling by "
                    "whole factors and for 1x1 maps)")
    return _Known(p.emit(node, _mom_upsample, s.node, x, node, nearest), s.sources)


def _identity(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any]) -> _State:
    """Moments pass through (``nn.Identity``, ``contiguous``, ``clone``, casts)."""
    x = a.get("input")
    if any(p.st(n) is not None for n in node.all_input_nodes if n is not x):
        return p.cut_or_none(node, op, "tensor-valued arguments", node.all_input_nodes)
    return p.st(x)


def _flatten(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any]) -> _State:
    """Flatten from dim 1 or later: as a reshape; from dim 0 it mixes samples and channels."""
    if a.get("start_dim", 0) == 0:
        return p.cut_or_none(node, op, "flatten from dim 0 mixes samples and channels",
                             node.all_input_nodes)
    return _reshape(p, node, op, a)


def _reshape(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any]) -> _State:
    """View/reshape that keeps channels or expands them to ``(N, C*k)``, checked at run time."""
    x = a.get("input")
    s = p.st(x)
    if not isinstance(s, _Known):
        return s
    return _Known(p.emit(node, _mom_reshape, s.node, x, node), s.sources)


def _weights(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any]
             ) -> tuple[Any, Any] | _Cut:
    """The weight and bias of a conv/linear as graph values (get_attr nodes for a module)."""
    if node.op == "call_module":
        t = str(node.target)
        w = p.attr(node, f"{t}.weight")
        b = p.attr(node, f"{t}.bias") if a.get("bias") is not None else None
        return w, b
    for key in ("weight", "bias"):
        if p.st(a.get(key)) is not None:
            return _Cut(node.name, op, f"{key} depends on normalised activations")
    return a.get("weight"), a.get("bias")


def _conv(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any]) -> _State:
    """``sum W*m + b`` and ``sum W**2 * v`` over each output channel's group."""
    x = a.get("input")
    s = p.st(x)
    if not isinstance(s, _Known):
        return s
    if a.get("transposed"):
        return _Cut(node.name, op, _CUT_REASONS["conv_transpose"])
    weights = _weights(p, node, op, a)
    if isinstance(weights, _Cut):
        return weights
    hyper = [a.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1),
                                       ("groups", 1))]
    if any(isinstance(v, fx.Node) for v in hyper):
        return _Cut(node.name, op, "conv arguments computed in the graph")
    out = p.emit(node, _mom_conv, s.node, x, *weights, *hyper,
                 a.get("padding_mode", "zeros"), p.padding_aware)
    return _Known(out, s.sources)


def _linear(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any]) -> _State:
    """``W m + b`` and ``W**2 v`` (only on ``(N, C)`` input, checked at run time)."""
    x = a.get("input")
    s = p.st(x)
    if not isinstance(s, _Known):
        return s
    weights = _weights(p, node, op, a)
    if isinstance(weights, _Cut):
        return weights
    return _Known(p.emit(node, _mom_linear, s.node, x, *weights), s.sources)


_VALUES_FIRST = frozenset({"max_pool", "adaptive_max_pool", "dropout"})


def _split(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any]) -> _State:
    """A split/chunk along dim 1: each part holds its channels' moments (cut along other
    dims). The parts' sizes are read at run time from the split's own outputs."""
    x = a.get("input") if "input" in a else (node.args[0] if node.args else None)
    s = p.st(x)
    if not isinstance(s, _Known):
        return s
    dim = a.get("dim", 0)
    rank = len(node_shape(x) or ()) if isinstance(x, fx.Node) else 0
    if isinstance(dim, int) and dim < 0 and rank:
        dim += rank
    if dim != 1:
        return _Cut(node.name, op, f"split along dim {dim}, not the channel dim")
    return _Known(p.emit(node, _mom_split, s.node, node), s.sources)


def _getitem(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any]) -> _State:
    """Item 0 of a max-pool with indices or a dropout with mask: its values; item ``i`` of a
    channel split: that part's moments."""
    src = a.get("input")
    if (isinstance(src, fx.Node) and a.get("index") == 0
            and op_kind(src, p.gm) in _VALUES_FIRST and returns_tuple(src, p.gm)):
        return p.st(src)
    index = a.get("index")
    if isinstance(index, tuple) and len(index) >= 2 and index[0] == slice(None) \
            and isinstance(index[1], slice) and all(
                i == slice(None) or i is Ellipsis for i in index[2:]):
        s = p.st(src)
        if not isinstance(s, _Known):
            return s
        ch = index[1]
        if any(isinstance(v, fx.Node) for v in (ch.start, ch.stop, ch.step)):
            return _Cut(node.name, op, "channel slice bounds computed in the graph")
        return _Known(p.emit(node, _mom_channel_slice, s.node, ch.start, ch.stop, ch.step),
                      s.sources)
    if isinstance(src, fx.Node) and op_kind(src, p.gm) == "split" and isinstance(
            a.get("index"), int):
        s = p.st(src)
        if not isinstance(s, _Known):
            return s
        return _Known(p.emit(node, _mom_item, s.node, a["index"]), s.sources)
    return p.cut_or_none(node, op, "indexing: no exact moment rule", node.all_input_nodes)


def _no_moments(p: _Propagator, node: fx.Node, op: str, a: dict[str, Any]) -> _State:
    """Reads no values (``x.shape``, ``x.size()``): carries no moments."""
    return None


_RULES: dict[str, _Rule] = {
    "relu": _relu,
    "relu_like": _activation,
    "gate": _activation,
    "selu": _activation,
    "add": functools.partial(_sum, sign=1.0),
    "sub": functools.partial(_sum, sign=-1.0),
    "rsub": functools.partial(_sum, sign=-1.0, reverse=True),
    "mul": functools.partial(_scale, divide=False),
    "div": functools.partial(_scale, divide=True),
    "neg": _neg,
    "cat": _cat,
    "max_pool": _max_pool,
    "avg_pool": _avg_pool,
    "adaptive_avg_pool": _adaptive_avg_pool,
    "mean": _mean,
    "dropout": _dropout,
    "stochastic_depth": _dropout,  # per-sample inverted dropout: the same moments
    "pad": _pad,
    "upsample": _upsample,
    "identity": _identity,
    "flatten": _flatten,
    "reshape": _reshape,
    "conv": _conv,
    "linear": _linear,
    "getitem": _getitem,
    "split": _split,
    "shape": _no_moments,
}
"""Moment rule of each canonical op kind; every other kind cuts the chain."""

_CUT_REASONS: dict[str | None, str] = {
    "conv_transpose": "transposed convolution: output positions sum different numbers of "
                      "taps, so there is no per-channel moment rule",
    "batch_norm": "BatchNorm that was not swapped to a Kalman layer: its batch moments are "
                  "not exposed",
    "adaptive_max_pool": "no moment rule for adaptive max pooling",
}
_NO_RULE = {
    "call_module": "no exact moment rule for this module (supported: ReLU, Conv1d/2d/3d, "
                   "Linear, pools, dropout, flatten, identity)",
    "call_function": "no exact moment rule for this function",
    "call_method": "no exact moment rule for this method",
}


class _Propagator:
    """Walks the graph once, inserting moment nodes and wiring Kalman priors."""

    def __init__(self, gm: fx.GraphModule, report: PassReport, *, raw: bool,
                 padding_aware: bool, approximate_maxpool: bool) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.report = report
        self.raw = raw
        self.padding_aware = padding_aware
        self.approximate_maxpool = approximate_maxpool
        self.state: dict[fx.Node, _Known | _Cut] = {}
        self.rewritten: list[tuple[fx.Node, fx.Node, dict[str, Any]]] = []
        self._anchor: dict[fx.Node, fx.Node] = {}
        self.calls = 0

    # -- helpers ------------------------------------------------------------------------------
    def st(self, arg: Any) -> _State:
        """State of a node argument (constants have none)."""
        return self.state.get(arg) if isinstance(arg, fx.Node) else None

    def emit(self, after: fx.Node, fn: Callable[..., Any], *args: Any) -> fx.Node:
        """Insert ``fn(*args)`` right after ``after`` (after nodes already inserted there)."""
        anchor = self._anchor.get(after, after)
        with self.graph.inserting_after(anchor):
            new = self.graph.call_function(fn, tuple(args))
        self._anchor[after] = new
        return new

    def attr(self, after: fx.Node, target: str) -> fx.Node:
        """Insert a get_attr node right after ``after``."""
        anchor = self._anchor.get(after, after)
        with self.graph.inserting_after(anchor):
            new = self.graph.get_attr(target)
        self._anchor[after] = new
        return new

    def add_module(self, module: nn.Module) -> str:
        """Register a helper module for the prior graph (no state); returns its name."""
        taken = {n for n, _ in self.gm.named_children()}
        i = 0
        while f"_normswap_prior_fn_{i}" in taken:
            i += 1
        self.gm.add_submodule(f"_normswap_prior_fn_{i}", module)
        return f"_normswap_prior_fn_{i}"

    def cut_or_none(self, node: fx.Node, op: str, reason: str, inputs: Sequence[Any]) -> _State:
        """An op that cannot propagate: cut if moments reach it, else no source."""
        states = [self.st(a) for a in inputs]
        if any(isinstance(s, _Known) for s in states):
            return _Cut(node.name, op, reason)
        return next((s for s in states if isinstance(s, _Cut)), None)

    # -- driver -------------------------------------------------------------------------------
    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            module = module_of(self.gm, node)
            if isinstance(module, KalmanBatchNorm):
                self.calls += 1
                self.kalman(node, module)
                continue
            result = self.visit(node)
            if result is not None:
                self.state[node] = result

    def visit(self, node: fx.Node) -> _State:
        """Moments state of one non-Kalman node: the rule of its op kind, or a cut."""
        op = describe_op(node, self.gm)
        if node.op == "call_module" and len(node.args) + len(node.kwargs) != 1:
            return self.cut_or_none(node, op, "module called with several inputs",
                                    node.all_input_nodes)
        kind = op_kind(node, self.gm)
        rule = _RULES.get(kind) if kind is not None else None
        if rule is None:
            return self.cut_or_none(node, op, _CUT_REASONS.get(kind, _NO_RULE[node.op]),
                                    node.all_input_nodes)
        return rule(self, node, op, op_args(node, self.gm))

    # -- Kalman layers (the sources) ----------------------------------------------------------
    def kalman(self, node: fx.Node, layer: KalmanBatchNorm) -> None:
        """Wire a prior into one Kalman layer and start a new chain from its output."""
        target = str(node.target)
        kind = type(layer).__name__
        inputs = [*node.args, *node.kwargs.values()]
        if len(inputs) != 1 or set(node.kwargs) - {"x"}:
            self.report.skip(target, kind, "layer is already called with extra arguments "
                             "(prior/return_stats); left as is")
            return
        if "prior" not in inspect.signature(type(layer).forward).parameters:
            self.report.skip(target, kind, "its forward is the code of the BatchNorm subclass "
                             "it replaced (grafted), which takes no prior: the layer runs "
                             "without one and gives none to the layers after it")
            self.state[node] = _Cut(node.name, kind, "a grafted Kalman layer returns no moments")
            return
        x = inputs[0]
        incoming = self.st(x)
        prior: fx.Node | None = None
        if isinstance(incoming, _Known):
            prior = incoming.node
            self.report.change(target, f"{kind} (no prior)", f"{kind} (Kalman prior)",
                               f"prior from {', '.join(sorted(incoming.sources))} "
                               f"(node {node.name})")
        elif isinstance(incoming, _Cut):
            self.report.skip(target, incoming.op,
                             f"prior chain cut at node '{incoming.node}' ({incoming.op}): "
                             f"{incoming.reason}; the layer runs without a prior")
        else:
            self.report.note("no normalised layer upstream: first in its chain, no prior",
                             node=target)
        old_kwargs = dict(node.kwargs)
        node.kwargs = {**old_kwargs, "prior": prior, "return_stats": True}
        with self.graph.inserting_after(node):
            stats = self.graph.call_function(operator.getitem, (node, 1))
        with self.graph.inserting_after(node):
            y = self.graph.call_function(operator.getitem, (node, 0))
        node.replace_all_uses_with(y, delete_user_cb=lambda user: user not in (y, stats))
        self._anchor[y] = stats
        weight = self.attr(y, f"{target}.weight") if layer.weight is not None else None
        bias = self.attr(y, f"{target}.bias") if layer.bias is not None else None
        out = self.emit(y, _mom_kalman_out, stats, weight, bias, float(layer.eps), self.raw)
        self.state[y] = _Known(out, frozenset({target}))
        self.rewritten.append((node, y, old_kwargs))

    # -- clean-up -----------------------------------------------------------------------------
    def finish(self) -> None:
        """Undo the stats plumbing of Kalman nodes that neither get nor give a prior."""
        for node, y, old_kwargs in self.rewritten:
            if node.kwargs.get("prior") is None and list(node.users) == [y]:
                y.replace_all_uses_with(node)
                self.graph.erase_node(y)
                node.kwargs = old_kwargs


def propagate_kalman_priors(gm: fx.GraphModule, *, priors: bool = True,
                            gain: float | str | None = None,
                            prior_moments: str = "normalised", padding_aware: bool = False,
                            approximate_maxpool: bool = True,
                            fallback_ratio: float | None = None
                            ) -> tuple[fx.GraphModule, PassReport]:
    """Wire each Kalman layer's prior from the previous normalised layer(s) in the graph.

    Args:
        gm: a GraphModule whose Kalman layers are ``call_module`` nodes (mutated), e.g. the
            output of the swap pass with ``kalman_from_batchnorm``, or a model with Kalman
            layers traced by :func:`normswap.capture.trace`.
        priors: wire priors (False: leave every layer without a prior, as plain BN in train
            mode; the model then needs no graph).
        gain: when given, set the gain of every Kalman layer (a number in [0, 1] or "auto").
        prior_moments: ``"normalised"`` (moments of the normalised, affine output) or
            ``"raw"`` (the combined input moments, as the authors' code).
        padding_aware: account for zero padding in conv moments (default: interior moments).
        approximate_maxpool: Clark's approximation through max-pools (False cuts the chain).
        fallback_ratio: set on every layer when given.

    Returns:
        ``(gm, report)``: one change per layer that received a prior (naming its sources),
        one skip per layer whose chain is cut (naming the op), notes for first layers.

    Raises:
        ValueError: an invalid gain or ``prior_moments``.
    """
    report = PassReport(title="kalman priors")
    mode = prior_moments
    if mode not in ("normalised", "raw"):
        raise ValueError(f"prior_moments must be 'normalised' or 'raw', got {mode!r}")
    if gain is not None:
        count = set_kalman_gain(gm, gain)
        report.note(f"gain set to {gain!r} on {count} Kalman layer(s)")
    if fallback_ratio is not None:
        for module in gm.modules():
            if isinstance(module, KalmanBatchNorm):
                module.fallback_ratio = float(fallback_ratio)
    if not priors:
        report.note("priors=False: Kalman layers run without graph priors (batch moments only "
                    "in train mode)")
        report.metrics["kalman_priors"] = False
        return gm, report
    prop = _Propagator(gm, report, raw=mode == "raw", padding_aware=padding_aware,
                       approximate_maxpool=approximate_maxpool)
    prop.run()
    if not prop.calls:
        report.note("no KalmanBatchNorm call_module nodes in the graph; nothing wired")
    eliminate_dead_code(gm)
    prop.finish()
    cleanup(gm)
    wired = len(report.changes)
    report.metrics["kalman_layers"] = prop.calls
    report.metrics["kalman_layers_with_prior"] = wired
    log.info("kalman priors: %d of %d layer calls wired", wired, prop.calls)
    return gm, report


def remove_kalman_priors(gm: fx.GraphModule) -> tuple[fx.GraphModule, PassReport]:
    """Undo :func:`propagate_kalman_priors`: plain ``layer(x)`` calls, moment nodes removed.

    Args:
        gm: a GraphModule rewritten by :func:`propagate_kalman_priors` (mutated).

    Returns:
        ``(gm, report)`` with one change per layer call restored.
    """
    report = PassReport(title="remove kalman priors")
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)),
                                                      KalmanBatchNorm):
            continue
        if "return_stats" not in node.kwargs and "prior" not in node.kwargs:
            continue
        returns_pair = bool(node.kwargs.get("return_stats", False))
        node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("prior", "return_stats")}
        if returns_pair:
            for user in list(node.users):
                if user.target is operator.getitem and user.args[1] == 0:
                    user.replace_all_uses_with(node)
                    gm.graph.erase_node(user)
        report.change(str(node.target), "Kalman layer with prior", "Kalman layer")
    cleanup(gm)
    return gm, report
