"""Convert Conv/ConvTranspose/Linear → BatchNorm pairs to bounded weight norm + mean-only BN.

Rewrite (docs/bwn.md; Hoffer et al. 2018). With the layer ``z = W∗x + b`` and the BN in eval
mode ``y = s·(z − μ) + β``, ``s = γ/sqrt(σ² + ε)`` per output channel ``c``::

    y = (s·W)∗x − s·(μ − b) + β

is exactly a layer with weight ``w = s·W`` and no bias, followed by a mean-only BN in eval mode
``y = u − m + β'`` with ``m = s·(μ − b)`` and ``β' = β``. The weight is expressed as a bounded
weight norm :class:`~normswap.norms.bwn.BoundedWeightNorm` with direction ``v = W`` (the trained
weight, unchanged) and, per output channel, ``w_c = ρ·g_c·v_c/‖v_c‖``::

    g_c = s_c·‖W_c‖ / ρ            (signed: a negative γ gives a negative g_c)

``ρ`` is fixed per layer; by default ``ρ = sqrt(mean_c (s_c·‖W_c‖)²)``, the root-mean-square
channel norm of ``s·W``, so that ``mean_c g_c² = 1`` and ``‖w‖_F = ρ·sqrt(C)``. With that ``ρ``
the authors' bounded form ``w_c = ρ·sqrt(C)·(g_c/‖g‖)·v_c/‖v_c‖`` (``learn_gain="bounded"``)
computes the same weight, since ``‖g‖ = sqrt(C)``. A channel with ``W_c = 0`` gets the direction
``v_c = 1`` and ``g_c = 0``. ConvTranspose output channels live on weight axis 1 per group
(``(C_in, C_out/groups, k...)``), handled by :func:`~normswap.norms.bwn.channel_norms`.

The tensor maths is :func:`bwn_mapping` (float64). The pass decides every pair on the unmodified
graph, then rewrites by module substitution only: a copy of the conv with the parametrization
at the conv's path and a :class:`~normswap.norms.bwn.MeanOnlyBatchNorm` at the BN's path; no
graph node is added or removed, so the new modules can also be put into the user's own class.

Refused (``strict=True`` raises one :class:`~normswap.errors.UnsupportedNodeError` listing all;
``strict=False`` keeps those BatchNorms and reports each): a BN without running statistics or
called more than once; the preconditions of a fold (no Conv/ConvTranspose/Linear directly before
the BN, a layer called more than once or whose output has other users, tied weights, a Linear
whose output is not ``(N, C)``; :func:`~normswap.passes._match.producer_refusal`); a layer
whose weight is already parametrized or weight-normalised; a channel count mismatch; a
non-finite BN scale or an all-zero ``s·W``; a functional ``batch_norm`` call, including the one
inside a BatchNorm subclass with its own forward (its extra behaviour would be lost).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize

from .._modules import as_inputs, set_submodule
from ..errors import UnsupportedNodeError
from ..norms._common import BatchNormState, batchnorm_state, bn_dims_of
from ..norms.bwn import (
    MEAN_ONLY_BY_DIMS,
    BoundedWeightNorm,
    MeanOnlyBatchNorm,
    channel_norms,
    scale_channels,
    weight_layout,
)
from ..report import PassReport
from ..verify import eval_mode
from ._graft import graft, norm_reads_input
from ._infra import cleanup, raise_refusals
from ._match import (
    CONV_TRANSPOSE_TYPES,
    CONV_TYPES,
    FOLD_TARGETS,
    FUNCTIONAL_BATCH_NORM,
    is_batchnorm,
    module_calls,
    needs_graft,
    producer_refusal,
    shared_param_counts,
)

__all__ = ["BWNMapping", "bwn_mapping", "to_bwn"]

log = logging.getLogger(__name__)

RhoChoice = float | Literal["rms", "mean"]
ConvGain = Literal["free", "bounded"]


# -- tensor maths (pure) -------------------------------------------------------------------------
@dataclass(frozen=True)
class BWNMapping:
    """The bounded-WN layer and mean-only BN reproducing ``bn(layer(x))`` in eval mode.

    Attributes:
        direction: ``v`` (float64, the layer's weight layout): ``W`` with zero channels set to 1.
        gain: ``g`` per output channel (float64).
        rho: ``ρ`` (a Python float, already rounded to the target dtype).
        running_mean: ``m = s·(μ − b)`` (float64).
        bias: ``β' = β`` (float64).
        zero_channels: output channels where ``W_c = 0``.
    """

    direction: Tensor
    gain: Tensor
    rho: float
    running_mean: Tensor
    bias: Tensor
    zero_channels: tuple[int, ...]


def bwn_mapping(weight: Tensor, bias: Tensor | None, scale: Tensor, mean: Tensor, beta: Tensor, *,
                dim: int = 0, groups: int = 1, rho: RhoChoice = "rms",
                learn_gain: ConvGain = "free", dtype: torch.dtype = torch.float32) -> BWNMapping:
    """Map ``s·(W∗x + b − μ) + β`` onto ``ρ·g·v/‖v‖`` and a mean-only BN (see module docstring).

    Args:
        weight: the layer's weight ``W``.
        bias: the layer's bias ``b`` or None.
        scale: the BN scale ``s = γ/sqrt(σ² + ε)`` per output channel.
        mean: the BN running mean ``μ``.
        beta: the BN shift ``β`` (zeros for a BN without affine).
        dim: the weight axis of the output channels (1 for ConvTranspose).
        groups: the ConvTranspose groups.
        rho: ``"rms"`` (default) the root-mean-square of ``|s_c|·‖W_c‖``; ``"mean"`` their mean;
            or a positive number. The bounded gain form is exact only with ``"rms"``.
        learn_gain: ``"free"`` (``w_c = ρ·g_c·v_c/‖v_c‖``) or ``"bounded"``.
        dtype: the dtype ``ρ`` will be stored in (it is rounded to it before ``g`` is computed).

    Returns:
        The mapping, in float64.

    Raises:
        ValueError: non-finite ``s``, ``s·W`` zero everywhere, a bad ``rho``/``learn_gain``.
    """
    if learn_gain not in ("free", "bounded"):
        raise ValueError(f"learn_gain must be 'free' or 'bounded' for a conversion, got "
                         f"{learn_gain!r} (without a gain, per-channel scales are not "
                         "representable)")
    if learn_gain == "bounded" and rho != "rms":
        raise ValueError("learn_gain='bounded' fixes ||w||_F = rho*sqrt(C): it is exact only with "
                         f"rho='rms', got rho={rho!r}")
    s64 = scale.detach().double()
    bad = torch.nonzero(~torch.isfinite(s64)).flatten().tolist()
    if bad:
        raise ValueError(f"BN scale gamma/sqrt(var+eps) is not finite in channel(s) {bad[:8]}")
    w64 = weight.detach().double()
    norms = channel_norms(w64, dim, groups)
    if norms.numel() != s64.numel():
        raise ValueError(f"weight {tuple(w64.shape)} has {norms.numel()} output channels, the "
                         f"BN has {s64.numel()}")
    magnitude = s64 * norms  # signed ‖w_c‖
    if rho == "rms":
        rho_value = float(magnitude.square().mean().sqrt())
    elif rho == "mean":
        rho_value = float(magnitude.abs().mean())
    elif isinstance(rho, (int, float)) and not isinstance(rho, bool):
        rho_value = float(rho)
    else:
        raise ValueError(f"rho must be 'rms', 'mean' or a positive number, got {rho!r}")
    rho_value = float(torch.tensor(rho_value, dtype=dtype))
    if rho_value == 0.0 and not isinstance(rho, (int, float)):
        raise ValueError("the BN-scaled weight s*W is zero in every channel (rho would be 0)")
    if not (rho_value > 0 and math.isfinite(rho_value)):
        raise ValueError(f"rho must be a finite number > 0 in {dtype}, got {rho_value:g}")
    zero = torch.nonzero(norms == 0).flatten()
    direction = w64.clone()
    if zero.numel():  # no direction there: v_c = 1, and g_c = 0 keeps w_c = 0
        keep = (norms != 0).double()
        direction = (scale_channels(w64, keep, dim, groups)
                     + scale_channels(torch.ones_like(w64), 1.0 - keep, dim, groups))
    b64 = bias.detach().double() if bias is not None else torch.zeros_like(s64)
    return BWNMapping(direction=direction, gain=magnitude / rho_value, rho=rho_value,
                      running_mean=s64 * (mean.detach().double() - b64),
                      bias=beta.detach().double().clone(),
                      zero_channels=tuple(int(i) for i in zero.tolist()))


def _bn_scale_mean_beta(state: BatchNormState) -> tuple[Tensor, Tensor, Tensor]:
    """``(s, μ, β)`` of a BN state in float64 (γ = 1, β = 0 without affine)."""
    if state.running_mean is None or state.running_var is None:
        raise ValueError("no running statistics")
    denominator = state.eval_scale()
    mean = state.running_mean.double()
    gamma = state.weight.double() if state.weight is not None else torch.ones_like(mean)
    beta = state.bias.double() if state.bias is not None else torch.zeros_like(mean)
    return gamma / denominator, mean, beta  # type: ignore[operator]


# -- decisions -----------------------------------------------------------------------------------
@dataclass
class _Pair:
    """One convertible layer → BN pair and its mapping."""

    bn_node: fx.Node
    layer_node: fx.Node
    state: BatchNormState
    mapping: BWNMapping
    dim: int
    groups: int


def _owner(node: fx.Node) -> tuple[str, str]:
    """(module path, class name) of the module whose forward made a call_function node."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        return str(path), getattr(cls, "__name__", str(cls))
    return node.name, "F.batch_norm"


def _traced_into_hint(node: fx.Node) -> str:
    """A remedy when the BN's input was made inside a Conv/Linear subclass that fx traced into
    (a class defined outside torch.nn is not a leaf), else ''."""
    arg = node.args[0] if node.args else None
    stack = arg.meta.get("nn_module_stack") if isinstance(arg, fx.Node) else None
    if not stack:
        return ""
    path, cls = list(stack.values())[-1]
    if isinstance(cls, type) and issubclass(cls, FOLD_TARGETS):
        return (f"; it was computed inside '{path}' ({cls.__name__}), a {cls.__mro__[1].__name__} "
                f"subclass that fx traced into: pass leaf_modules=['{path}', ...] to keep such "
                "layers whole")
    return ""


def _parametrized(layer: nn.Module) -> str | None:
    """Why the layer's weight cannot take a new parametrization (None when it can)."""
    if parametrize.is_parametrized(layer, "weight"):
        kinds = ", ".join(type(p).__name__ for p in layer.parametrizations["weight"])
        return (f"its weight is already parametrized ({kinds}); fold it first "
                "(normswap.passes.fold_weight_norm)")
    if any(type(h).__name__ == "WeightNorm" for h in layer._forward_pre_hooks.values()):
        return ("its weight carries a legacy weight_norm hook; fold it first "
                "(normswap.passes.fold_weight_norm)")
    return None


def _decide(gm: fx.GraphModule, node: fx.Node, bn: nn.Module, calls: dict[str, int],
            owners: dict[int, int],
            rho: RhoChoice, learn_gain: ConvGain) -> tuple[_Pair | None, str]:
    """The pair for the BN at ``node``, or the reason it is refused."""
    target = str(node.target)
    if needs_graft(bn):
        try:
            rest, _ = graft(bn, None, path=target)
        except UnsupportedNodeError as exc:
            return None, str(exc)
        if not norm_reads_input(rest):
            return None, (f"{type(bn).__name__} transforms its input before normalising it: "
                          "its normalisation cannot be moved into the layer before it")
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return None, ("no running statistics (track_running_stats=False): eval mode uses batch "
                      "statistics, which is not a fixed affine map")
    if calls[target] > 1:
        return None, f"BN module '{target}' is called {calls[target]} times"
    state = batchnorm_state(bn)
    layer_node, reason = producer_refusal(node, gm, state.num_features, calls, owners)
    if reason is not None or layer_node is None:
        return None, str(reason) + _traced_into_hint(node)
    layer = gm.get_submodule(str(layer_node.target))
    problem = _parametrized(layer)
    if problem is not None:
        return None, f"'{layer_node.target}': {problem}"
    dim, groups = weight_layout(layer)
    try:
        scale, mean, beta = _bn_scale_mean_beta(state)
        mapping = bwn_mapping(layer.weight, layer.bias, scale, mean, beta, dim=dim, groups=groups,
                              rho=rho, learn_gain=learn_gain, dtype=layer.weight.dtype)
    except ValueError as exc:
        return None, f"'{layer_node.target}': {exc}"
    return _Pair(node, layer_node, state, mapping, dim, groups), ""


def _propagate_shapes(gm: fx.GraphModule, example_inputs: Any, report: PassReport) -> None:
    """Shapes for the Linear → BN rank check (only when some BN reads a Linear without them)."""
    needs = False
    for node in gm.graph.nodes:
        arg = node.args[0] if node.op == "call_module" and node.args else None
        if (isinstance(arg, fx.Node) and arg.op == "call_module"
                and is_batchnorm(gm.get_submodule(str(node.target)))
                and isinstance(gm.get_submodule(str(arg.target)), nn.Linear)
                and "tensor_meta" not in arg.meta):
            needs = True
            break
    inputs = as_inputs(example_inputs)
    if not needs or not inputs:
        return
    try:
        with eval_mode(gm), torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:  # noqa: BLE001 - a guessed input may not fit; the check reports it
        report.note(f"shape propagation on the example inputs failed ({type(exc).__name__}: "
                    f"{exc}); Linear -> BatchNorm pairs are refused without shapes")


# -- rewriting -----------------------------------------------------------------------------------
def _bwn_layer(layer: nn.Module, pair: _Pair, learn_gain: ConvGain) -> nn.Module:
    """A copy of ``layer`` with weight ``ρ·g·v/‖v‖`` (v = W) and no bias."""
    new = copy.deepcopy(layer)
    w = layer.weight
    new.weight = nn.Parameter(pair.mapping.direction.to(device=w.device, dtype=w.dtype),
                              requires_grad=w.requires_grad)
    if getattr(new, "bias", None) is not None:
        new.bias = None
    param = BoundedWeightNorm(pair.mapping.rho, pair.mapping.gain.numel(), dim=pair.dim,
                              learn_gain=learn_gain, groups=pair.groups, device=w.device,
                              dtype=w.dtype)
    with torch.no_grad():
        param.gain.copy_(pair.mapping.gain)
    param.gain.requires_grad_(w.requires_grad)
    parametrize.register_parametrization(new, "weight", param, unsafe=False)
    return new


def _mean_only(bn: nn.Module, pair: _Pair) -> MeanOnlyBatchNorm:
    """The mean-only BN with ``running_mean = s·(μ − b)`` and ``bias = β``."""
    state = pair.state
    cls = MEAN_ONLY_BY_DIMS.get(bn_dims_of(bn), MeanOnlyBatchNorm)
    new = cls(state.num_features, momentum=state.momentum, affine=state.affine,
              track_running_stats=True, device=state.device, dtype=state.dtype)
    with torch.no_grad():
        new.running_mean.copy_(pair.mapping.running_mean)  # type: ignore[union-attr]
        if new.bias is not None:
            new.bias.copy_(pair.mapping.bias)
        if state.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(state.num_batches_tracked)  # type: ignore[union-attr]
    if new.bias is not None and isinstance(getattr(bn, "bias", None), Tensor):
        new.bias.requires_grad_(bn.bias.requires_grad)  # a frozen BN's bias is a buffer
    new.frozen = state.frozen
    return new


def _record(report: PassReport, pair: _Pair, layer: nn.Module, bn: nn.Module,
            new_bn: nn.Module, learn_gain: ConvGain) -> None:
    """Changes and key map of one converted pair."""
    conv_path, bn_path = str(pair.layer_node.target), str(pair.bn_node.target)
    kind = type(layer).__name__
    form = "rho*g*v/||v||" if learn_gain == "free" else "rho*sqrt(C)*(g/||g||)*v/||v||"
    detail = (f"w = {form}, rho = {pair.mapping.rho:.4g}, v = trained weight, "
              f"g = s*||W_c||/rho; new keys {conv_path}.parametrizations.weight.0.gain/.rho")
    if layer.bias is not None:
        detail += f"; bias moved into {bn_path}.running_mean"
    if pair.mapping.zero_channels:
        detail += f"; zero channels {list(pair.mapping.zero_channels)[:8]}: v = 1, g = 0"
    report.change(conv_path, kind, f"{kind} + BoundedWeightNorm", detail)
    report.change(bn_path, type(bn).__name__, type(new_bn).__name__,
                  "running_mean = s*(mu - b), bias = beta; weight and running_var dropped")
    report.key_map[f"{conv_path}.weight"] = f"{conv_path}.parametrizations.weight.original"
    if layer.bias is not None:
        report.key_map[f"{conv_path}.bias"] = None
    for key in ("weight", "running_var"):
        if key in bn.state_dict():
            report.key_map[f"{bn_path}.{key}"] = None
    if isinstance(bn, nn.SyncBatchNorm):
        report.warn(f"'{bn_path}' was a SyncBatchNorm: the MeanOnlyBatchNorm that replaces it "
                    "does not synchronise its batch mean across processes", bn_path)
    cls = type(layer)
    base = next((b for b in cls.__mro__ if b in CONV_TYPES + CONV_TRANSPOSE_TYPES
                 or b is nn.Linear), cls)
    if cls.forward is not base.forward:
        report.warn(f"'{conv_path}' is a {cls.__name__} with its own forward: the conversion "
                    "assumes it uses self.weight as a plain weight (the equivalence check "
                    "tells)", conv_path)


def to_bwn(gm: fx.GraphModule, *, strict: bool = True, rho: RhoChoice = "rms",
           learn_gain: ConvGain = "free", example_inputs: Any = None
           ) -> tuple[fx.GraphModule, PassReport]:
    """Convert every Conv/ConvTranspose/Linear → BatchNorm pair to bounded WN + mean-only BN.

    Eval-exact (module docstring, docs/bwn.md). Mutates ``gm`` by module substitution only.

    Args:
        gm: a model captured by :func:`normswap.capture.capture` (BatchNorms are leaves).
        strict: raise :class:`UnsupportedNodeError` listing every BatchNorm that cannot be
            converted (True), or keep those as BatchNorm and report each (False).
        rho: the fixed bound per layer: ``"rms"`` (default; root-mean-square channel norm of the
            BN-scaled weight), ``"mean"`` (their mean) or a positive number.
        learn_gain: ``"free"`` (default; ``w_c = ρ·g_c·v_c/‖v_c‖``) or ``"bounded"`` (the
            authors' ``ρ·sqrt(C)·(g_c/‖g‖)·v_c/‖v_c‖``, needs ``rho="rms"``).
        example_inputs: inputs for shape propagation (a Linear → BN1d pair needs ``(N, C)``).

    Returns:
        ``(gm, report)``: each conversion recorded as two changes (layer, BN) and the key map.

    Raises:
        UnsupportedNodeError: ``strict=True`` and at least one BatchNorm cannot be converted.
        ValueError: a bad ``rho`` or ``learn_gain``.
    """
    if learn_gain not in ("free", "bounded"):
        raise ValueError(f"learn_gain must be 'free' or 'bounded', got {learn_gain!r}")
    if learn_gain == "bounded" and rho != "rms":
        raise ValueError(f"learn_gain='bounded' is exact only with rho='rms', got {rho!r}")
    if not (rho in ("rms", "mean") or (isinstance(rho, (int, float)) and not isinstance(rho, bool)
                                       and rho > 0 and math.isfinite(rho))):
        raise ValueError(f"rho must be 'rms', 'mean' or a finite number > 0, got {rho!r}")
    report = PassReport(title="to_bwn")
    _propagate_shapes(gm, example_inputs, report)
    calls = module_calls(gm)
    owners = shared_param_counts(gm)
    pairs: list[_Pair] = []
    refused: list[tuple[str, str, str]] = []  # (label, what, reason)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in FUNCTIONAL_BATCH_NORM:
            path, cls = _owner(node)
            why = ("functional batch_norm inside a BatchNorm subclass with its own forward "
                   "(traced through to keep its extra behaviour, which a mean-only BN would "
                   "lose)" if cls != "F.batch_norm" else "functional batch_norm call")
            refused.append((path, f"{cls}, node '{node.name}'", why))
            continue
        if node.op != "call_module":
            continue
        bn = gm.get_submodule(str(node.target))
        if not is_batchnorm(bn):
            continue
        pair, reason = _decide(gm, node, bn, calls, owners, rho, learn_gain)
        if pair is None:
            refused.append((str(node.target), f"{type(bn).__name__}, node '{node.name}'", reason))
        else:
            pairs.append(pair)
    if strict:
        raise_refusals("to_bwn cannot convert", refused,
                       "Bounded weight norm needs a Conv/ConvTranspose/Linear used only by its "
                       "BatchNorm. Remedy: pass strict=False to keep these as BatchNorm, or use "
                       "a module-level method (e.g. 'l1').")
    for label, what, why in refused:
        report.skip(label, what.split(",")[0], why)
    if not pairs and not refused:
        report.note("no BatchNorm found: nothing to convert")

    for pair in pairs:
        conv_path, bn_path = str(pair.layer_node.target), str(pair.bn_node.target)
        layer, bn = gm.get_submodule(conv_path), gm.get_submodule(bn_path)
        new_layer = _bwn_layer(layer, pair, learn_gain)
        new_bn = _mean_only(bn, pair)
        if needs_graft(bn):  # keep the subclass's activation/dropout around the new norm
            new_bn, _ = graft(bn, new_bn, path=bn_path)
        set_submodule(gm, conv_path, new_layer)
        set_submodule(gm, bn_path, new_bn)
        _record(report, pair, layer, bn, new_bn, learn_gain)
    report.metrics["bwn.converted"] = len(pairs)
    if pairs:
        report.note(f"converted {len(pairs)} layer/BatchNorm pair(s) to bounded weight norm + "
                    "mean-only BatchNorm; eval output unchanged, train mode subtracts the batch "
                    "mean only (no batch variance)")
    if refused:
        report.warn(f"{len(refused)} BatchNorm node(s) kept as BatchNorm (strict=False)")
    cleanup(gm)
    return gm, report
