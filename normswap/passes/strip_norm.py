"""Strip BatchNorm for a self-normalizing network (SELU, Klambauer et al. 2017). NOT eval-exact.

Rewrite (docs/maths.md, "SELU"):

1. Every eval-mode BatchNorm is folded into the Conv/ConvTranspose/Linear before it
   (``W' = s·W``, ``b' = s·(b − μ) + β``; exact, by the ``fold_conv_bn`` pass that the "selu"
   method runs first). A BN that cannot fold (no conv before it, a shared conv, a conv output
   with other users) becomes a per-channel :class:`~normswap.norms.affine.ChannelAffine` and
   the report says why.
2. Rectifier-like activations -- the op kinds ``relu`` and ``relu_like`` of
   :func:`~normswap.passes._match.op_kind`: ``nn.ReLU, ReLU6, LeakyReLU, PReLU, RReLU, ELU,
   CELU, GELU, SiLU, Mish, Hardswish``, their functions (``F.relu``, ``torch.relu``,
   ``F.leaky_relu_`` ...), ``x.relu()``/``x.relu_()`` and their ATen overloads in a
   ``torch.export`` capture (``aten.relu_.default``, ``aten.hardtanh(x, 0, 6)`` ...) -- become
   SELU, ``selu(x) = λx`` (x > 0), ``λα(eˣ − 1)`` (x ≤ 0), in the same spelling family: a
   module becomes ``nn.SELU``, a torch-level call ``F.selu``, an ATen call ``aten.selu``
   (``aten.selu_`` when it was in place). In-place activations become in-place SELU (same data
   flow). Gates and output squashers (kind ``gate``: Sigmoid, Tanh, Hardsigmoid, Softmax,
   Hardtanh, Softplus ...) are left alone and listed in a note.
3. With ``alpha_dropout=True``, ``nn.Dropout`` becomes ``nn.AlphaDropout`` with the same ``p``
   (``Dropout1d/2d/3d`` become ``nn.FeatureAlphaDropout``); functional dropouts keep their
   spelling and arguments: ``F.dropout``/``F.dropoutNd`` become
   ``F.alpha_dropout``/``F.feature_alpha_dropout``, ``aten.dropout``/``aten.feature_dropout``
   become ``aten.alpha_dropout``/``aten.feature_alpha_dropout`` (with the ``training`` flag the
   capture fixed). ``aten.native_dropout`` (which also returns its mask) is kept and reported.
4. Initialisation: ``"keep"`` keeps the folded weights; ``"lecun"`` re-draws every
   conv/linear weight from N(0, 1/fan_in) with zero bias (``kaiming_normal_(mode='fan_in',
   nonlinearity='linear')``) and resets kept ChannelAffines to the identity; ``"calibrate"``
   keeps the weights and, layer by layer in graph order, rescales each output unit of every
   hidden conv/linear (one whose output reaches a SELU) so that its output (the
   pre-activation) has mean 0 and variance 1 on ``calibration_inputs``:
   ``W_i ← W_i/σ_i``, ``b_i ← (b_i − μ_i)/σ_i``.

Replacing ReLU by SELU changes the function: the result needs fine-tuning (or retraining), and
the report says so. Residual sums and max-pools break the self-normalizing fixed point (the
theory covers plain feed-forward nets): each is named in a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .._modules import set_submodule
from ..calibrate import forward_batch
from ..errors import NormswapError
from ..norms.affine import ChannelAffine
from ..report import PassReport
from ._match import (
    FOLD_TARGETS,
    describe_op,
    functional_batch_norm_nodes,
    is_impure,
    is_inplace,
    is_residual_sum,
    module_calls,
    module_of,
    op_args,
    op_kind,
)
from ._math import fold_bn_into_weights

__all__ = ["selu_activations", "alpha_dropout", "selu_init", "lecun_normal_", "calibrate_units"]

log = logging.getLogger(__name__)

Init = Literal["keep", "lecun", "calibrate"]

_aten = torch.ops.aten
_RECTIFIERS = frozenset({"relu", "relu_like"})
"""Op kinds that become SELU (``op_kind``: ReLU and the rectifier-like activations)."""

_ALPHA_DROPOUT_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Dropout: nn.AlphaDropout, nn.Dropout1d: nn.FeatureAlphaDropout,
    nn.Dropout2d: nn.FeatureAlphaDropout, nn.Dropout3d: nn.FeatureAlphaDropout,
}
_ALPHA_DROPOUT_FUNCTIONS: dict[Any, Any] = {
    # the same spelling family and the same signature: only the target changes
    F.dropout: F.alpha_dropout, F.dropout1d: F.feature_alpha_dropout,
    F.dropout2d: F.feature_alpha_dropout, F.dropout3d: F.feature_alpha_dropout,
    torch.dropout: torch.alpha_dropout, torch.dropout_: torch.alpha_dropout_,
    torch.feature_dropout: torch.feature_alpha_dropout,
    torch.feature_dropout_: torch.feature_alpha_dropout_,
    _aten.dropout.default: _aten.alpha_dropout.default,
    _aten.dropout_.default: _aten.alpha_dropout_.default,
    _aten.feature_dropout.default: _aten.feature_alpha_dropout.default,
    _aten.feature_dropout_.default: _aten.feature_alpha_dropout_.default,
}


class _StopForward(Exception):
    """Raised by a hook to end a calibration forward early."""


# -- tensor math (pure) ----------------------------------------------------------------------

def lecun_normal_(weight: Tensor, bias: Tensor | None = None,
                  generator: torch.Generator | None = None) -> None:
    """Re-draw ``weight`` from N(0, 1/fan_in) and zero ``bias``, in place (docs/maths.md,
    "SELU").

    Args:
        weight: a conv/linear weight.
        bias: its bias or None.
        generator: random generator for reproducible draws.
    """
    with torch.no_grad():
        nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="linear", generator=generator)
        if bias is not None:
            bias.zero_()


def _channel_moments(x: Tensor, channel_dim: int) -> tuple[Tensor, Tensor, int]:
    """Per-channel float64 sum and sum of squares of ``x`` and the count per channel."""
    moved = x.detach().movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim]).double()
    return moved.sum(0), (moved * moved).sum(0), moved.shape[0]


# -- graph helpers ---------------------------------------------------------------------------

def _selu_call(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, tuple[Any, ...],
                                                         dict[str, Any]]:
    """Target, args and kwargs of the SELU replacing a functional rectifier, in the same
    spelling family: ATen for ATen (``aten.selu_`` for an in-place overload), else ``F.selu``."""
    x = op_args(node, gm).get("input")
    inplace = is_inplace(node, gm)
    if isinstance(node.target, torch._ops.OpOverload):
        return (_aten.selu_.default if inplace else _aten.selu.default), (x,), {}
    return F.selu, (x,), {"inplace": inplace}


def _replace_activations(gm: fx.GraphModule, report: PassReport) -> int:
    """Turn rectifier-like activations into SELU; returns how many call sites changed."""
    done: set[str] = set()
    count = 0
    gates: list[str] = []
    for node in list(gm.graph.nodes):
        kind = op_kind(node, gm)
        if kind == "gate":
            label = str(node.target) if node.op == "call_module" else node.name
            gates.append(f"{label} ({describe_op(node, gm)})")
        if kind not in _RECTIFIERS:
            continue
        count += 1
        m = module_of(gm, node)
        if m is not None:
            target = str(node.target)
            if target in done:
                continue
            done.add(target)
            inplace = bool(getattr(m, "inplace", False))
            for key in m.state_dict():
                report.key_map[f"{target}.{key}"] = None
            set_submodule(gm, target, nn.SELU(inplace=inplace))
            report.change(target, type(m).__name__, "SELU", "in-place" if inplace else "")
            continue
        before = describe_op(node, gm)
        fn, args, kwargs = _selu_call(gm, node)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(fn, args, kwargs)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        after = str(fn) if isinstance(fn, torch._ops.OpOverload) else "selu"
        report.change(node.name, before, after, "in-place" if is_inplace(new, gm) else "")
    if gates:
        report.note("left unchanged (gates/output squashers, not rectifiers): " + ", ".join(gates))
    return count


def _replace_dropout(gm: fx.GraphModule, report: PassReport) -> None:
    """Turn Dropout into AlphaDropout (same p), keeping each call's spelling."""
    done: set[str] = set()
    for node in list(gm.graph.nodes):
        if op_kind(node, gm) != "dropout":
            continue
        m = module_of(gm, node)
        if m is not None:
            if str(node.target) in done:
                continue
            done.add(str(node.target))
            new_cls = next(new for base, new in _ALPHA_DROPOUT_MODULES.items()
                           if isinstance(m, base))
            set_submodule(gm, str(node.target), new_cls(p=m.p, inplace=m.inplace))
            report.change(str(node.target), type(m).__name__, new_cls.__name__, f"p={m.p}")
            continue
        new_fn = _ALPHA_DROPOUT_FUNCTIONS.get(node.target)
        if new_fn is None:
            report.skip(node.name, describe_op(node, gm), "no alpha-dropout form of this "
                        "dropout (it returns a mask too); kept as is")
            continue
        before = describe_op(node, gm)
        node.target = new_fn
        report.change(node.name, before, describe_op(node, gm),
                      "functional: keeps the training flag fixed at capture time")


def _warn_fixed_point_breakers(gm: fx.GraphModule, report: PassReport) -> None:
    """Warn about residual sums and max-pools (they break the SELU fixed point)."""
    sums, pools = [], []
    for node in gm.graph.nodes:
        if is_residual_sum(node):
            sums.append(node.name)
        elif op_kind(node, gm) in ("max_pool", "adaptive_max_pool"):
            pools.append(str(node.target) if node.op == "call_module" else node.name)
    if sums:
        report.warn(f"{len(sums)} residual sum(s) break the self-normalizing fixed point "
                    f"(variances add up): {', '.join(sums)}")
        for name in sums:
            report.warn("residual sum: not covered by SELU theory", node=name)
    if pools:
        report.warn(f"{len(pools)} max-pool(s) break the self-normalizing fixed point (they "
                    f"raise the mean): {', '.join(pools)}")
        for name in pools:
            report.warn("max-pool: not covered by SELU theory", node=name)


def _hidden_layers(gm: fx.GraphModule) -> list[fx.Node]:
    """Conv/linear module nodes whose output reaches a SELU (graph order)."""
    selu_nodes = {n for n in gm.graph.nodes if op_kind(n, gm) == "selu"}
    feeds_selu: set[fx.Node] = set()
    for node in reversed(list(gm.graph.nodes)):
        if any(u in selu_nodes or u in feeds_selu for u in node.users):
            feeds_selu.add(node)
    return [n for n in gm.graph.nodes
            if isinstance(module_of(gm, n), FOLD_TARGETS) and n in feeds_selu]


def _as_batches(inputs: Any) -> list[Any]:
    """Calibration inputs as a list of batches (a single tensor is one batch)."""
    if isinstance(inputs, Tensor):
        return [inputs]
    if isinstance(inputs, Iterable):
        batches = list(inputs)
        if batches:
            return batches
    raise NormswapError("init='calibrate' needs calibration_inputs: a tensor or a non-empty "
                        "iterable of tensors / (input, target) tuples / dicts")


def calibrate_units(gm: fx.GraphModule, calibration_inputs: Any, report: PassReport | None = None,
                    *, eps: float = 1e-12) -> PassReport:
    """Rescale each hidden conv/linear unit to mean 0 / variance 1 on calibration data.

    Layers are processed one at a time in graph order, each measured with all earlier layers
    already rescaled. A unit's statistics are taken over the batch and all positions (output
    channel on dim 1 for convolutions, the last dim for Linear). The model runs in eval mode
    without gradients; a forward stops as soon as the layer's output is seen.

    Args:
        gm: the (stripped) graph module, mutated.
        calibration_inputs: a tensor, or an iterable of tensors / ``(input, target)`` tuples /
            dicts (fed as in :func:`~normswap.calibrate.forward_batch`).
        report: report to add to (a new one if None).
        eps: variance below which a unit is only centred, not scaled.

    Returns:
        The report, with one change per layer and ``metrics['calibrated_layers']``.

    Raises:
        NormswapError: no calibration inputs.
    """
    report = report if report is not None else PassReport(title="calibrate units")
    batches = _as_batches(calibration_inputs)
    flags = {m: m.training for m in gm.modules()}
    gm.eval()
    layers = _hidden_layers(gm)
    calls = module_calls(gm)
    done = 0
    try:
        for node in layers:
            layer = module_of(gm, node)
            if calls[str(node.target)] > 1:
                report.skip(str(node.target), type(layer).__name__,
                            f"not calibrated: module is called {calls[str(node.target)]} times "
                            "(one rescale cannot normalise every call)")
                continue
            channel_dim = -1 if isinstance(layer, nn.Linear) else 1
            acc: list[Any] = [0.0, 0.0, 0]

            def hook(_m: nn.Module, _inp: Any, out: Tensor, acc: list[Any] = acc,
                     dim: int = channel_dim) -> None:
                s, sq, n = _channel_moments(out, dim)
                acc[0], acc[1], acc[2] = acc[0] + s, acc[1] + sq, acc[2] + n
                raise _StopForward

            handle = layer.register_forward_hook(hook)
            try:
                with torch.no_grad():
                    for batch in batches:
                        try:
                            forward_batch(gm, batch)
                        except _StopForward:
                            pass
            finally:
                handle.remove()
            mean = acc[0] / acc[2]
            var = (acc[1] / acc[2] - mean * mean).clamp_min(0.0)
            flat = var <= eps
            inv_std = torch.where(flat, torch.ones_like(var), var.clamp_min(eps).rsqrt())
            groups = int(getattr(layer, "groups", 1))
            new_w, new_b = fold_bn_into_weights(
                layer.weight, layer.bias, inv_std, -mean * inv_std,
                transpose=isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d,
                                             nn.ConvTranspose3d)), groups=groups)
            with torch.no_grad():
                layer.weight.copy_(new_w)
                if layer.bias is None:
                    layer.bias = nn.Parameter(new_b.to(layer.weight.device))
                else:
                    layer.bias.copy_(new_b)
            detail = f"per-unit std in [{var.min().sqrt():.3g}, {var.max().sqrt():.3g}]"
            if bool(flat.any()):
                detail += f"; {int(flat.sum())} constant unit(s) only centred"
            report.change(str(node.target), type(layer).__name__, "calibrated (mean 0, var 1)",
                          detail)
            done += 1
    finally:
        for m, flag in flags.items():
            m.training = flag
    report.metrics["calibrated_layers"] = done
    return report


# -- the passes (the "selu" method runs fold_conv_bn, then these three) ---------------------

def selu_activations(gm: fx.GraphModule) -> tuple[fx.GraphModule, PassReport]:
    """Turn rectifier-like activations into SELU (step 2 of the module docstring).

    Returns:
        ``(gm, report)``; the report warns that the function changed, and names the residual
        sums and max-pools that break the self-normalizing fixed point.
    """
    report = PassReport(title="SELU activations")
    dead_inplace = [n.name for n in gm.graph.nodes if not n.users and n.op != "output"
                    and is_impure(n) and not n.is_impure()]
    if dead_inplace:
        report.warn("in-place calls whose result is unused keep their in-place effect only as "
                    f"long as nothing re-traces them: {', '.join(dead_inplace)}")
    report.warn("the 'selu' method changes the network's function (ReLU -> SELU, BatchNorm "
                "removed): it is NOT eval-exact; fine-tune or retrain before use")
    if _replace_activations(gm, report) == 0:
        report.warn("no ReLU-family activation found: nothing was turned into SELU")
    leftover = [n.name for n in functional_batch_norm_nodes(gm.graph)]
    if leftover:
        report.warn("functional batch_norm calls remain (BatchNorm subclasses with their own "
                    f"forward): {', '.join(leftover)}")
    _warn_fixed_point_breakers(gm, report)
    return gm, report


def alpha_dropout(gm: fx.GraphModule, *, alpha_dropout: bool = True
                  ) -> tuple[fx.GraphModule, PassReport]:
    """Replace Dropout by AlphaDropout with the same ``p`` (step 3), unless disabled."""
    report = PassReport(title="alpha dropout")
    if alpha_dropout:
        _replace_dropout(gm, report)
    else:
        report.note("alpha_dropout=False: dropout layers kept as they are")
    return gm, report


def selu_init(gm: fx.GraphModule, *, init: Init = "keep", calibration_inputs: Any = None,
              generator: torch.Generator | None = None) -> tuple[fx.GraphModule, PassReport]:
    """Initialise the SELU network (step 4): keep, LeCun normal, or calibrate each unit.

    Args:
        gm: the graph after the BN fold and the activation swap (mutated).
        init: ``"keep"`` the folded weights, re-draw them ``"lecun"`` normal, or
            ``"calibrate"`` each hidden unit to mean 0 / variance 1 on ``calibration_inputs``.
        calibration_inputs: a tensor or an iterable of tensors / ``(input, target)`` tuples /
            dicts; required by ``init="calibrate"``.
        generator: random generator for ``init="lecun"``.

    Raises:
        NormswapError: ``init="calibrate"`` without calibration inputs.
        ValueError: unknown ``init``.
    """
    if init not in ("keep", "lecun", "calibrate"):
        raise ValueError(f"init must be 'keep', 'lecun' or 'calibrate'; got {init!r}")
    report = PassReport(title="SELU init")
    if init == "lecun":
        for name, m in gm.named_modules():
            if isinstance(m, FOLD_TARGETS):
                lecun_normal_(m.weight, m.bias, generator)
                report.change(name, type(m).__name__, "LeCun normal init",
                              "weight ~ N(0, 1/fan_in), bias 0")
            elif isinstance(m, ChannelAffine):
                with torch.no_grad():
                    m.scale.fill_(1.0)
                    m.shift.zero_()
                report.change(name, "ChannelAffine", "identity", "reset for LeCun init")
    elif init == "calibrate":
        gm.recompile()
        calibrate_units(gm, _as_batches(calibration_inputs), report)
    return gm, report
