"""Wire Batch Kalman Normalization priors through an fx graph.

Rewrite: every ``call_module`` node of a :class:`~normswap.norms.kalman.KalmanBatchNorm` layer
becomes ``out = layer(x, prior=P, return_stats=True)``, ``y = out[0]``, ``stats = out[1]``; the
layer's output moments are pushed through the ops that follow it, in new nodes beside the real
ones, until they reach the next Kalman layer, where they become its prior ``P``. In eval mode the
layers return ``stats = None``, every moment node returns ``None`` at once, and the layers ignore
priors: the eval computation is the same as before the pass.

Math (REFERENCE §3, analytic [derived] version of the authors' Monte-Carlo propagation). A
"moment" is a per-channel ``(mean, var)`` pair (channel = dim 1); values are assumed independent
across channels and positions, and Gaussian where a nonlinearity needs a distribution:

- Kalman layer output (default ``prior_moments="normalised"``): the layer normalises with its
  combined moments ``(mu, s2)``; if its input has those moments, ``gamma*(x-mu)/sqrt(s2+eps)+beta``
  has mean ``beta`` and variance ``gamma**2 * s2 / (s2 + eps)``. ``prior_moments="raw"``
  propagates ``(mu, s2)`` themselves, as the authors' TensorFlow code does.
- ReLU (only ReLU: its rectified-Gaussian moments are exact for Gaussian input; other
  activations cut the chain): with ``a = m/s``, ``E = m*Phi(a) + s*phi(a)``,
  ``E2 = (m**2+v)*Phi(a) + m*s*phi(a)``, ``var = E2 - E**2``.
- Conv / Linear: ``mu_o = sum W*m + b``, ``var_o = sum W**2 * v`` over the kernel and the input
  channels of the output channel's group. This is exact at interior positions; with
  ``padding_aware=True`` the zero-padded border is accounted for by convolving constant maps
  (costs one extra conv of a single sample per layer) and taking the mixture's moments over
  positions. Stride and dilation do not change interior moments.
- Residual add / sub: means add (subtract), variances add; a Python scalar shifts the mean;
  multiplication or division by a Python scalar scales mean and standard deviation.
- Concatenation on dim 1: channel moments concatenate.
- Average pooling over ``k`` elements (also adaptive pooling, ``k`` = input/output spatial size):
  mean kept, variance ``v / k`` (independence; spatially correlated features make the real
  variance larger). A ``divisor_override`` ``d`` gives ``m*k/d``, ``v*k/d**2``.
- Max pooling over ``k`` elements: ``max = m + s*Z_k`` for ``k`` iid Gaussians, with the mean and
  variance of ``Z_k`` (max of ``k`` standard normals) by quadrature; after a ReLU the max is
  taken on the pre-ReLU Gaussian (``maxpool(relu(x)) = relu(maxpool(x))``) and the ReLU of the
  max is integrated by quadrature too. Exact for iid Gaussian windows, an approximation for
  real (correlated, non-Gaussian) features and at padded borders: pass
  ``approximate_maxpool=False`` to cut the chain there instead.
- Dropout (train mode, inverted): mean kept, ``var = (v + m**2)/(1-p) - m**2``.
- Identity-like ops (``nn.Identity``, ``contiguous``, ``clone``, dtype casts) pass moments
  through; flatten/view/reshape to ``(N, C*k)`` repeat each channel's moments ``k`` times
  (checked at run time; another layout yields no prior).

Any other op on a path from a Kalman layer cuts the chain: the next Kalman layer gets no prior and
the report records a skip naming the op. Gradients flow through the prior path (no detach).
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..norms.kalman import KalmanBatchNorm, Moments, set_kalman_gain
from ..report import PassReport
from ._match import eliminate_dead_code, leaf_function
from ._math import (
    normalised_moments,
    relu_moments,
    conv_moments,
    linear_moments,
    add_moments,
    affine_moments,
    avgpool_moments,
    maxpool_moments,
    relu_maxpool_moments,
    dropout_moments,
    cat_moments,
)

__all__ = [
    "propagate_kalman_priors",
    "remove_kalman_priors",
    "normalised_moments",
    "relu_moments",
    "conv_moments",
    "linear_moments",
    "add_moments",
    "affine_moments",
    "avgpool_moments",
    "maxpool_moments",
    "relu_maxpool_moments",
    "dropout_moments",
    "cat_moments",
]

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

_ADD = {operator.add, operator.iadd, torch.add}
_SUB = {operator.sub, operator.isub, torch.sub}
_MUL = {operator.mul, operator.imul, torch.mul}
_DIV = {operator.truediv, operator.itruediv, torch.div, torch.true_divide}
_RELU_FN = {F.relu, torch.relu, torch.relu_}
_DROPOUT_FN = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
_CAT_FN = {torch.cat, torch.concat, torch.concatenate}
_AVG_FN = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}
_ADAPTIVE_AVG_FN = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
_MAX_FN = {F.max_pool1d, F.max_pool2d, F.max_pool3d}
_CONV_FN = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_IDENTITY_METHODS = {"contiguous", "clone", "float", "double", "half", "bfloat16", "to",
                     "type_as", "cpu", "cuda"}
_META_METHODS = {"size", "dim", "numel", "type", "stride"}
_ARITH_METHODS = {"add": _ADD, "add_": _ADD, "sub": _SUB, "sub_": _SUB, "mul": _MUL,
                  "mul_": _MUL, "div": _DIV, "div_": _DIV}
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_AVG_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_AVG_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_MAX_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)

_OPTIONS = ("prior_moments", "padding_aware", "approximate_maxpool", "fallback_ratio")


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
        self.modules = dict(gm.named_modules())
        self._anchor: dict[fx.Node, fx.Node] = {}

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

    def cut_or_none(self, node: fx.Node, op: str, reason: str, inputs: Sequence[Any]) -> _State:
        """An op that cannot propagate: cut if moments reach it, else no source."""
        states = [self.st(a) for a in inputs]
        if any(isinstance(s, _Known) for s in states):
            return _Cut(node.name, op, reason)
        return next((s for s in states if isinstance(s, _Cut)), None)

    # -- driver -------------------------------------------------------------------------------
    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node.op in ("placeholder", "get_attr", "output"):
                continue
            module = self.modules.get(str(node.target)) if node.op == "call_module" else None
            if isinstance(module, KalmanBatchNorm):
                self.kalman(node, module)
                continue
            result = self.visit(node, module)
            if result is not None:
                self.state[node] = result

    def visit(self, node: fx.Node, module: nn.Module | None) -> _State:
        """Moments state of one non-Kalman node."""
        if node.op == "call_module" and module is not None:
            return self.visit_module(node, module)
        if node.op == "call_function":
            return self.visit_function(node)
        if node.op == "call_method":
            return self.visit_method(node)
        return None

    # -- Kalman layers ------------------------------------------------------------------------
    def kalman(self, node: fx.Node, layer: KalmanBatchNorm) -> None:
        """Wire a prior into one Kalman layer and start a new chain from its output."""
        target = str(node.target)
        kind = type(layer).__name__
        inputs = [*node.args, *node.kwargs.values()]
        if len(inputs) != 1 or set(node.kwargs) - {"x"}:
            self.report.skip(target, kind, "layer is already called with extra arguments "
                             "(prior/return_stats); left as is")
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

    # -- modules ------------------------------------------------------------------------------
    def visit_module(self, node: fx.Node, module: nn.Module) -> _State:
        """Rules for call_module nodes."""
        op = type(module).__name__
        x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        s = self.st(x)
        if len(node.args) + len(node.kwargs) != 1:
            return self.cut_or_none(node, op, "module called with several inputs",
                                    node.all_input_nodes)
        if not isinstance(s, _Known):
            return s
        if isinstance(module, nn.ReLU):
            return _Known(self.emit(node, _mom_relu, s.node), s.sources, pre_relu=s.node)
        if isinstance(module, nn.Identity):
            return s
        if isinstance(module, _CONV_MODULES):
            t = str(node.target)
            w = self.attr(node, f"{t}.weight")
            b = self.attr(node, f"{t}.bias") if module.bias is not None else None
            out = self.emit(node, _mom_conv, s.node, x, w, b, module.stride, module.padding,
                            module.dilation, module.groups, module.padding_mode,
                            self.padding_aware)
            return _Known(out, s.sources)
        if isinstance(module, nn.Linear):
            t = str(node.target)
            w = self.attr(node, f"{t}.weight")
            b = self.attr(node, f"{t}.bias") if module.bias is not None else None
            return _Known(self.emit(node, _mom_linear, s.node, x, w, b), s.sources)
        if isinstance(module, _DROPOUT_MODULES):
            return _Known(self.emit(node, _mom_dropout, s.node, float(module.p)), s.sources)
        if isinstance(module, nn.Flatten):
            if module.start_dim == 0:
                return _Cut(node.name, op, "flatten from dim 0 mixes samples and channels")
            return _Known(self.emit(node, _mom_reshape, s.node, x, node), s.sources)
        if isinstance(module, _AVG_MODULES):
            out = self.emit(node, _mom_avgpool, s.node, x, module.kernel_size,
                            module.divisor_override)
            return _Known(out, s.sources)
        if isinstance(module, _ADAPTIVE_AVG_MODULES):
            return _Known(self.emit(node, _mom_avgpool_shape, s.node, x, node), s.sources)
        if isinstance(module, _MAX_MODULES):
            return self.maxpool(node, s, x, module.kernel_size, op)
        return _Cut(node.name, op, "no exact moment rule for this module (supported: ReLU, "
                    "Conv1d/2d/3d, Linear, pools, dropout, flatten, identity)")

    def maxpool(self, node: fx.Node, s: _Known, x: Any, kernel_size: Any, op: str) -> _State:
        """Max pooling: Clark's approximation, or a cut when approximations are refused."""
        if not self.approximate_maxpool:
            return _Cut(node.name, op, "max-pool moments have no exact form "
                        "(approximate_maxpool=False)")
        out = self.emit(node, _mom_maxpool, s.node, s.pre_relu, x, kernel_size)
        return _Known(out, s.sources)

    # -- functions ----------------------------------------------------------------------------
    def visit_function(self, node: fx.Node) -> _State:
        """Rules for call_function nodes."""
        fn = node.target
        op = getattr(fn, "__name__", str(fn))
        args, kwargs = node.args, node.kwargs
        if fn is getattr:
            return None  # x.shape, x.dtype...: metadata, carries no moments
        if fn in _ADD or fn in _SUB:
            alpha = float(kwargs.get("alpha", 1.0)) * (-1.0 if fn in _SUB else 1.0)
            if not isinstance(kwargs.get("alpha", 1.0), (int, float)):
                return self.cut_or_none(node, op, "non-constant alpha", node.all_input_nodes)
            return self.binary_add(node, op, args[0], args[1] if len(args) > 1
                                   else kwargs.get("other"), alpha)
        if fn in _MUL or fn in _DIV:
            return self.scale(node, op, args, fn in _DIV, kwargs)
        if fn is operator.neg:
            s = self.st(args[0])
            if isinstance(s, _Known):
                return _Known(self.emit(node, _mom_affine, s.node, -1.0, 0.0), s.sources)
            return s
        if fn in _RELU_FN:
            s = self.st(args[0] if args else kwargs.get("input"))
            if isinstance(s, _Known):
                return _Known(self.emit(node, _mom_relu, s.node), s.sources, pre_relu=s.node)
            return s
        if fn in _DROPOUT_FN:
            return self.functional_dropout(node, op)
        if fn in _CAT_FN:
            return self.cat(node, op)
        if fn is torch.flatten:
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            if start == 0:
                return self.cut_or_none(node, op, "flatten from dim 0 mixes samples and "
                                        "channels", node.all_input_nodes)
            return self.reshape(node, args[0])
        if fn is torch.reshape:
            return self.reshape(node, args[0] if args else kwargs.get("input"))
        if fn in _AVG_FN:
            kernel = args[1] if len(args) > 1 else kwargs.get("kernel_size")
            divisor = args[6] if len(args) > 6 else kwargs.get("divisor_override")
            s = self.st(args[0])
            if not isinstance(s, _Known):
                return s
            if isinstance(kernel, fx.Node) or isinstance(divisor, fx.Node):
                return _Cut(node.name, op, "pool arguments computed in the graph")
            out = self.emit(node, _mom_avgpool, s.node, args[0], kernel, divisor)
            return _Known(out, s.sources)
        if fn in _ADAPTIVE_AVG_FN:
            s = self.st(args[0])
            if isinstance(s, _Known):
                return _Known(self.emit(node, _mom_avgpool_shape, s.node, args[0], node),
                              s.sources)
            return s
        if fn in _MAX_FN:
            s = self.st(args[0])
            kernel = args[1] if len(args) > 1 else kwargs.get("kernel_size")
            if not isinstance(s, _Known):
                return s
            if isinstance(kernel, fx.Node):
                return _Cut(node.name, op, "kernel size computed in the graph")
            return self.maxpool(node, s, args[0], kernel, op)
        if fn in _CONV_FN or fn is F.linear:
            return self.functional_linear(node, op)
        return self.cut_or_none(node, op, "no exact moment rule for this function",
                                node.all_input_nodes)

    def binary_add(self, node: fx.Node, op: str, a: Any, b: Any, alpha: float) -> _State:
        """``a + alpha*b``: moments add; a Python number shifts the mean."""
        sa, sb = self.st(a), self.st(b)
        for s in (sa, sb):
            if isinstance(s, _Cut):
                return s
        a_mom, b_mom = isinstance(sa, _Known), isinstance(sb, _Known)
        if not (a_mom or b_mom):
            return None
        for arg, has in ((a, a_mom), (b, b_mom)):
            if not has and not isinstance(arg, (int, float)):
                other = arg.name if isinstance(arg, fx.Node) else type(arg).__name__
                return _Cut(node.name, op, f"operand '{other}' has no normalised layer upstream "
                            "(its moments are unknown)")
        sources = (sa.sources if a_mom else frozenset()) | (sb.sources if b_mom else frozenset())
        out = self.emit(node, _mom_add, sa.node if a_mom else a, sb.node if b_mom else b,
                        alpha, a_mom, b_mom)
        return _Known(out, sources)

    def scale(self, node: fx.Node, op: str, args: Sequence[Any], divide: bool,
              kwargs: dict[str, Any]) -> _State:
        """Multiplication/division by a Python number."""
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        sa, sb = self.st(a), self.st(b)
        if kwargs.get("rounding_mode") is not None:
            return self.cut_or_none(node, op, "rounded division", node.all_input_nodes)
        if isinstance(sa, _Known) and isinstance(b, (int, float)) and not (divide and b == 0):
            factor = 1.0 / float(b) if divide else float(b)
            return _Known(self.emit(node, _mom_affine, sa.node, factor, 0.0), sa.sources)
        if not divide and isinstance(sb, _Known) and isinstance(a, (int, float)):
            return _Known(self.emit(node, _mom_affine, sb.node, float(a), 0.0), sb.sources)
        return self.cut_or_none(node, op, "product with a tensor (only Python numbers are "
                                "supported)", node.all_input_nodes)

    def functional_dropout(self, node: fx.Node, op: str) -> _State:
        """``F.dropout(x, p, training)``."""
        args, kwargs = node.args, node.kwargs
        x = args[0] if args else kwargs.get("input")
        s = self.st(x)
        if not isinstance(s, _Known):
            return s
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        training = args[2] if len(args) > 2 else kwargs.get("training", True)
        if isinstance(p, fx.Node) or isinstance(training, fx.Node):
            return _Cut(node.name, op, "dropout arguments computed in the graph")
        if not training:
            return s
        return _Known(self.emit(node, _mom_dropout, s.node, float(p)), s.sources)

    def cat(self, node: fx.Node, op: str) -> _State:
        """Concatenation along dim 1."""
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        states = [self.st(t) for t in tensors]
        if not any(isinstance(s, _Known) for s in states):
            return next((s for s in states if isinstance(s, _Cut)), None)
        if dim != 1:
            return _Cut(node.name, op, f"concatenation along dim {dim} (only dim 1, channels, "
                        "is supported)")
        for t, s in zip(tensors, states):
            if isinstance(s, _Cut):
                return s
            if not isinstance(s, _Known):
                name = t.name if isinstance(t, fx.Node) else type(t).__name__
                return _Cut(node.name, op, f"input '{name}' has no normalised layer upstream")
        sources = frozenset().union(*(s.sources for s in states))  # type: ignore[union-attr]
        out = self.emit(node, _mom_cat, [s.node for s in states])  # type: ignore[union-attr]
        return _Known(out, sources)

    def reshape(self, node: fx.Node, x: Any) -> _State:
        """Flatten/view/reshape, checked at run time."""
        s = self.st(x)
        if not isinstance(s, _Known):
            return s
        return _Known(self.emit(node, _mom_reshape, s.node, x, node), s.sources)

    def functional_linear(self, node: fx.Node, op: str) -> _State:
        """``F.conv*d`` / ``F.linear`` with weights from the module (get_attr nodes)."""
        args, kwargs = node.args, node.kwargs
        names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
        defaults: list[Any] = [None, None, None, 1, 0, 1, 1]
        vals = {n: args[i] if len(args) > i else kwargs.get(n, d)
                for i, (n, d) in enumerate(zip(names, defaults))}
        s = self.st(vals["input"])
        if not isinstance(s, _Known):
            return s
        for key in ("weight", "bias"):
            if self.st(vals[key]) is not None:
                return _Cut(node.name, op, f"{key} depends on normalised activations")
        if node.target is F.linear:
            return _Known(self.emit(node, _mom_linear, s.node, vals["input"], vals["weight"],
                                    vals["bias"]), s.sources)
        if any(isinstance(vals[k], fx.Node) for k in ("stride", "padding", "dilation", "groups")):
            return _Cut(node.name, op, "conv arguments computed in the graph")
        out = self.emit(node, _mom_conv, s.node, vals["input"], vals["weight"], vals["bias"],
                        vals["stride"], vals["padding"], vals["dilation"], vals["groups"],
                        "zeros", self.padding_aware)
        return _Known(out, s.sources)

    # -- methods ------------------------------------------------------------------------------
    def visit_method(self, node: fx.Node) -> _State:
        """Rules for call_method nodes."""
        name = str(node.target)
        op = f".{name}()"
        args = node.args
        if name in _META_METHODS:
            return None
        s = self.st(args[0]) if args else None
        if name in ("relu", "relu_"):
            if isinstance(s, _Known):
                return _Known(self.emit(node, _mom_relu, s.node), s.sources, pre_relu=s.node)
            return s
        if name in _IDENTITY_METHODS:
            others = [self.st(a) for a in node.all_input_nodes if a is not args[0]]
            if any(o is not None for o in others):
                return self.cut_or_none(node, op, "tensor-valued arguments",
                                        node.all_input_nodes)
            return s
        if name in ("flatten", "view", "reshape"):
            if name == "flatten" and (args[1] if len(args) > 1
                                      else node.kwargs.get("start_dim", 0)) == 0:
                return self.cut_or_none(node, op, "flatten from dim 0 mixes samples and "
                                        "channels", node.all_input_nodes)
            return self.reshape(node, args[0])
        if name in _ARITH_METHODS:
            group = _ARITH_METHODS[name]
            if group is _ADD or group is _SUB:
                alpha = node.kwargs.get("alpha", 1.0)
                if not isinstance(alpha, (int, float)):
                    return self.cut_or_none(node, op, "non-constant alpha",
                                            node.all_input_nodes)
                sign = -1.0 if group is _SUB else 1.0
                other = args[1] if len(args) > 1 else node.kwargs.get("other")
                return self.binary_add(node, op, args[0], other, sign * float(alpha))
            return self.scale(node, op, args, group is _DIV, dict(node.kwargs))
        return self.cut_or_none(node, op, "no exact moment rule for this method",
                                node.all_input_nodes)

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
    if not prop.rewritten:
        report.note("no KalmanBatchNorm call_module nodes in the graph; nothing wired")
    eliminate_dead_code(gm)
    prop.finish()
    eliminate_dead_code(gm)
    gm.graph.lint()
    gm.recompile()
    wired = len(report.changes)
    report.metrics["kalman_layers"] = len(prop.rewritten)
    report.metrics["kalman_layers_with_prior"] = wired
    log.info("kalman priors: %d of %d layer calls wired", wired, len(prop.rewritten))
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
    eliminate_dead_code(gm)
    gm.graph.lint()
    gm.recompile()
    return gm, report
