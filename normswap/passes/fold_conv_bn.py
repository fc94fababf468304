"""Fold eval-mode BatchNorm-family layers into the Conv/ConvTranspose/Linear before them.

Rewrite (docs/maths.md, "Folding"). An eval-mode norm computes, per output channel ``c`` on
dim 1, ``y = s[c]·x + t[c]`` with ``s = γ/sqrt(σ²_r+ε)`` and ``t = β − s·μ_r`` (or whatever
``eval_scale_shift()`` returns for normswap's own layers). For ``x = conv(z) = W∗z + b``::

    W'[c, ...] = s[c]·W[c, ...]        b'[c] = s[c]·b[c] + t[c]

(:func:`~normswap.passes._math.fold_bn_into_weights`: float64, grouped ConvTranspose layout
handled, cast back to the layer's dtype.)

The rewrite is a module substitution: the conv gets the folded weights and the norm module
becomes ``nn.Identity`` at the same path -- or, for a BatchNorm subclass that adds behaviour
(timm's ``BatchNormAct2d``, a grafted normswap layer), the *remainder* that keeps its
activation and dropout (:mod:`normswap.passes._graft`). The graph keeps its shape, so the API
can put the result into the user's own model.

A norm that cannot fold becomes one :class:`~normswap.norms.affine.ChannelAffine` (``Mul`` +
``Add`` in ONNX) and the report says why (the rules of
:func:`~normswap.passes._match.producer_refusal`: the conv is called more than once, its output
has other users, its weight is shared, there is no conv/linear before the norm, or a Linear's
output is not ``(N, C)``). A norm is left as it is, with the reason in the report, when it
uses batch statistics (train mode, ``track_running_stats=False``) or when its folded weights
would not fit the layer's dtype (an fp16 layer whose folded weights exceed 65504 would hold
``inf``).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._modules import set_submodule
from ..norms.affine import ChannelAffine
from ..report import PassReport
from ._graft import graft, is_grafted, norm_reads_input
from ._math import fold_bn_into_weights, norm_scale_shift
from ._match import (
    CONV_TRANSPOSE_TYPES,
    FUNCTIONAL_BATCH_NORM,
    is_batchnorm,
    is_frozen_batchnorm,
    module_calls,
    needs_graft,
    producer_refusal,
    shared_param_counts,
)

__all__ = ["fold_conv_bn", "is_foldable_norm", "norm_refusal", "fold_into_layer"]

log = logging.getLogger(__name__)

TrainMode = Literal["skip", "freeze"]
_FP16_MAX = 65504.0


def is_foldable_norm(m: nn.Module) -> bool:
    """A norm whose eval output is a per-channel affine (possibly followed by the extra ops
    of a BatchNorm subclass)."""
    if isinstance(m, ChannelAffine):
        return False
    if is_grafted(m):
        return hasattr(m, "eval_scale_shift")
    if hasattr(m, "eval_scale_shift") and callable(m.eval_scale_shift):
        return True
    return is_batchnorm(m)


def norm_refusal(m: nn.Module, train_mode: TrainMode) -> str | None:
    """Why this norm cannot be expressed as a fixed affine (None when it can)."""
    if isinstance(m, _BatchNorm) and not hasattr(m, "eval_scale_shift"):
        if m.running_mean is None or m.running_var is None:
            return ("track_running_stats=False: it normalises with batch statistics even in "
                    "eval mode, so it is not a fixed affine")
    if getattr(m, "running_mean", 0) is None:
        return ("no running statistics (track_running_stats=False): it normalises with batch "
                "statistics even in eval mode, so it is not a fixed affine")
    if m.training and train_mode == "skip" and not is_frozen_batchnorm(m) \
            and not getattr(m, "frozen", False):
        return ("module is in train mode (batch statistics); call model.eval() first, or pass "
                "train_mode='freeze' to fold its running statistics")
    try:
        norm_scale_shift(m)
    except ValueError as exc:
        return str(exc)
    return None


def _dtype_limit(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max) if dtype.is_floating_point else float("inf")


def fold_into_layer(layer: nn.Module, scale: Tensor, shift: Tensor) -> str | None:
    """Fold ``y = scale·layer(x) + shift`` into ``layer``'s weight and bias, in place.

    Returns:
        None when folded; the reason when the folded weights do not fit the layer's dtype
        (nothing is changed then).
    """
    transpose = isinstance(layer, CONV_TRANSPOSE_TYPES)
    groups = int(getattr(layer, "groups", 1))
    new_w, new_b = fold_bn_into_weights(layer.weight.double(), None if layer.bias is None
                                        else layer.bias.double(), scale, shift,
                                        transpose=transpose, groups=groups)
    dtype = layer.weight.dtype
    peak = max(float(new_w.abs().max()), float(new_b.abs().max())) if new_w.numel() else 0.0
    if not (peak <= _dtype_limit(dtype)) or not torch.isfinite(new_w).all() \
            or not torch.isfinite(new_b).all():
        return (f"folded weights reach |w| = {peak:.3g}, beyond {str(dtype).replace('torch.', '')}"
                f"'s largest value {_dtype_limit(dtype):.5g}: they would become inf; the norm "
                "is kept unfolded (fold in float32 before casting, or keep this layer)")
    requires_grad = layer.weight.requires_grad
    layer.weight = nn.Parameter(new_w.to(dtype), requires_grad=requires_grad)
    b_dtype = layer.bias.dtype if layer.bias is not None else dtype
    layer.bias = nn.Parameter(new_b.to(device=layer.weight.device, dtype=b_dtype),
                              requires_grad=requires_grad)
    return None


def _affine_of(norm: nn.Module, trainable: bool) -> ChannelAffine:
    scale, shift = norm_scale_shift(norm)
    ref = next((t for t in list(norm.parameters()) + list(norm.buffers())
                if t.is_floating_point()), None)
    affine = ChannelAffine.from_scale_shift(
        scale, shift, dtype=ref.dtype if ref is not None else torch.get_default_dtype(),
        device=ref.device if ref is not None else None, trainable=trainable)
    affine.train(norm.training)
    return affine


def _without_norm(target: str, norm: nn.Module) -> nn.Module:
    """What replaces a folded norm: Identity, or the remainder of a subclass/grafted norm."""
    if is_grafted(norm) or needs_graft(norm):
        return graft(norm, None, path=target)[0]
    return nn.Identity()


def _as_affine(target: str, norm: nn.Module, trainable: bool) -> nn.Module:
    """What replaces a norm that cannot fold: a ChannelAffine (grafted when it has extras)."""
    affine = _affine_of(norm, trainable)
    if is_grafted(norm) or needs_graft(norm):
        return graft(norm, affine, path=target)[0]
    return affine


def fold_conv_bn(gm: fx.GraphModule, *, train_mode: TrainMode = "skip",
                 trainable_affine: bool = True) -> tuple[fx.GraphModule, PassReport]:
    """Fold eval-mode norms into the preceding Conv/ConvTranspose/Linear of a captured graph.

    Mutates ``gm`` and the layers it calls (the API hands passes a private copy).

    Args:
        gm: a captured graph; norms are ``call_module`` leaves. Shapes recorded on the nodes
            (shape propagation or ``torch.export``) allow Linear→BN1d folds.
        train_mode: ``"skip"`` leaves train-mode norms untouched (they use batch statistics);
            ``"freeze"`` folds their running statistics as if in eval mode.
        trainable_affine: norms that cannot fold become :class:`ChannelAffine` with parameters
            (True) or buffers (False).

    Returns:
        ``(gm, report)``; every norm appears in the report as a change or a skip.
    """
    if train_mode not in ("skip", "freeze"):
        raise ValueError(f"train_mode must be 'skip' or 'freeze', got {train_mode!r}")
    report = PassReport(title="fold conv+bn")
    calls = module_calls(gm)
    owners = shared_param_counts(gm)
    decided: dict[str, tuple[str, str, fx.Node | None]] = {}  # target -> (action, reason, layer)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in FUNCTIONAL_BATCH_NORM:
            report.skip(node.name, "F.batch_norm", "functional batch_norm call (e.g. inside a "
                        "BatchNorm subclass with its own forward) is not folded; capture the "
                        "subclass as a leaf (the default of normswap.fold)")
            continue
        if node.op != "call_module":
            continue
        target = str(node.target)
        norm = gm.get_submodule(target)
        if not is_foldable_norm(norm):
            continue
        kind = type(norm).__name__
        refusal = norm_refusal(norm, train_mode)
        if refusal is not None:
            report.skip(target, kind, refusal)
            decided[target] = ("keep", refusal, None)
            continue
        if target in decided:  # a norm module called more than once cannot fold
            decided[target] = ("affine", f"'{target}' is called more than once", None)
            continue
        if (is_grafted(norm) and not norm_reads_input(norm)):
            decided[target] = ("affine", f"{kind} transforms its input before normalising it",
                               None)
            continue
        scale, _ = norm_scale_shift(norm)
        layer_node, reason = producer_refusal(node, gm, scale.numel(), calls, owners)
        decided[target] = ("fold", "", layer_node) if reason is None else ("affine", reason,
                                                                             None)
    folded = affine = 0
    for target, (action, reason, layer_node) in decided.items():
        norm = gm.get_submodule(target)
        kind = type(norm).__name__
        if action == "keep":
            continue
        keys = [f"{target}.{k}" for k in norm.state_dict()]
        if action == "fold" and layer_node is not None:
            layer_target = str(layer_node.target)
            layer = gm.get_submodule(layer_target)
            scale, shift = norm_scale_shift(norm)
            had_bias = getattr(layer, "bias", None) is not None
            overflow = fold_into_layer(layer, scale, shift)
            if overflow is not None:
                report.skip(target, kind, overflow)
                continue
            rest = _without_norm(target, norm)
            set_submodule(gm, target, rest)
            detail = f"{type(layer).__name__} weight scaled per output channel" + (
                "" if had_bias else "; bias added")
            if not isinstance(rest, nn.Identity):
                detail += f"; its extra behaviour kept as {type(rest).__name__}"
            report.change(target, kind, f"folded into {layer_target}", detail)
            folded += 1
            peak = max(float(layer.weight.detach().abs().max()),
                       float(layer.bias.detach().abs().max()))
            if peak > _FP16_MAX and layer.weight.dtype not in (torch.float16,):
                report.warn(f"folded parameters of '{layer_target}' reach |w| = {peak:.3g} > "
                            f"{_FP16_MAX:g}: inf in fp16 (normswap's fp16 export keeps the "
                            "layer in fp32)", layer_target)
        else:
            new = _as_affine(target, norm, trainable_affine)
            set_submodule(gm, target, new)
            report.skip(target, kind, f"not folded: {reason}")
            report.change(target, kind, type(new).__name__,
                          "kept as per-channel x*scale+shift (ONNX Mul+Add)")
            affine += 1
        present = set(gm.get_submodule(target).state_dict())
        for k in keys:
            if k[len(target) + 1:] not in present:
                report.key_map.setdefault(k, None)
    report.metrics["folded"] = folded
    report.metrics["affine"] = affine
    return gm, report
