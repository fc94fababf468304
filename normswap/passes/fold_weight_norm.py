"""Fold weight normalisation into plain weights (docs/maths.md, "Weight norms").

Rewrite: a weight-normalised layer recomputes its weight on every call,

* weight norm (Salimans & Kingma 2016): ``w = g · v / ‖v‖`` with the norm over all dims but
  ``dim`` (legacy ``torch.nn.utils.weight_norm`` hook with ``weight_g``/``weight_v``, or
  ``torch.nn.utils.parametrizations.weight_norm`` with ``original0``/``original1``);
* bounded weight norm (Hoffer et al. 2018): ``w_i = ρ · v_i / ‖v_i‖`` with a fixed ``ρ`` per layer,
  or, in the variant with a per-channel gain ``g`` rescaled to a fixed total norm,
  ``w_i = ρ·sqrt(C) · (g_i/‖g‖) · v_i/‖v_i‖`` (both give ``‖w‖_F = ρ·sqrt(C)``);
  normswap detects it as the :class:`BoundedWeightNorm` parametrization below, which users
  register with :func:`apply_bounded_weight_norm`;
* any other ``torch.nn.utils.parametrize`` parametrization.

At inference the weight is a constant, so folding evaluates it once (float64 for the weight-norm
forms, then cast to the parameter dtype) and stores it as a plain ``nn.Parameter``: exact. A
slice with ``‖v_i‖ = 0`` makes ``w_i`` NaN; such layers are never folded into NaN: the pass
raises :class:`~normswap.errors.UnsupportedNodeError` naming all of them (default) or, with
``on_zero_norm="skip"``, leaves them parametrized with a reason in the report.

Run this pass on the module *before* capture (:func:`normswap.fold`
does): hooks and parametrizations are module state that fx keeps inside opaque leaf modules, and
a folded weight is what :func:`~normswap.passes.fold_conv_bn.fold_conv_bn` needs to scale.
It also works on a ``GraphModule`` (it walks ``gm.modules()``). The pass mutates its argument.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import UnsupportedNodeError
from ..norms.bwn import BoundedWeightNorm, apply_bounded_weight_norm
from ..report import PassReport

__all__ = [
    "BoundedWeightNorm",
    "apply_bounded_weight_norm",
    "weight_norm_value",
    "fold_weight_norm",
]

log = logging.getLogger(__name__)

ZeroNormPolicy = Literal["raise", "skip"]

_legacy_wn = sys.modules["torch.nn.utils.weight_norm"]
_LegacyWeightNorm: type = _legacy_wn.WeightNorm
try:  # the class behind torch.nn.utils.parametrizations.weight_norm
    from torch.nn.utils.parametrizations import _WeightNorm as _ParamWeightNorm
except ImportError:  # pragma: no cover - older torch
    _ParamWeightNorm = None  # type: ignore[assignment,misc]


def _norm_except(v: Tensor, dim: int | None) -> Tensor:
    """‖v‖₂ over every dim but ``dim`` (the whole tensor for ``dim`` None/-1), keepdim-shaped."""
    if dim is None or dim == -1:
        return torch.linalg.vector_norm(v).reshape([1] * v.dim())
    dims = [d for d in range(v.dim()) if d != dim % v.dim()]
    return torch.linalg.vector_norm(v, dim=dims, keepdim=True)


def _zero_slices(v: Tensor, dim: int | None) -> list[int]:
    """Indices along ``dim`` (or [0] for a whole-tensor norm) where ``‖v‖ = 0``."""
    norms = _norm_except(v.detach().double(), dim).flatten()
    return [int(i) for i in torch.nonzero(norms == 0).flatten().tolist()]


def weight_norm_value(g: Tensor, v: Tensor, dim: int | None = 0) -> Tensor:
    """Return ``g · v/‖v‖`` computed in float64 and cast to ``v.dtype``.

    Args:
        g: magnitudes, broadcastable to ``v`` (as stored by weight_norm).
        v: directions.
        dim: the dim kept by the norm (None or -1: the whole tensor).

    Returns:
        The folded weight.
    """
    v64 = v.detach().double()
    return (g.detach().double() * v64 / _norm_except(v64, dim)).to(v.dtype)


def _zero_message(name: str, slices: list[int], form: str) -> str:
    return (f"{name}: v has zero norm in slice(s) {slices[:8]}{' ...' if len(slices) > 8 else ''} "
            f"({form} would be NaN there)")


def _fold_legacy(name: str, module: nn.Module, hook: Any) -> str | None:
    """Fold one legacy weight_norm hook; returns a refusal reason instead when v has a zero slice."""
    g = getattr(module, hook.name + "_g")
    v = getattr(module, hook.name + "_v")
    zero = _zero_slices(v, hook.dim)
    if zero:
        return _zero_message(f"{name}.{hook.name}", zero, "g·v/‖v‖")
    value = weight_norm_value(g, v, hook.dim)
    requires_grad = v.requires_grad
    hook.remove(module)
    for key, h in list(module._forward_pre_hooks.items()):
        if h is hook:
            del module._forward_pre_hooks[key]
    setattr(module, hook.name, nn.Parameter(value, requires_grad=requires_grad))
    return None


def _exact_value(p_list: Any, originals: list[Tensor]) -> tuple[Tensor | None, str | None, str]:
    """Float64 value of a known single parametrization, a zero-norm reason, and its form name."""
    if len(p_list) != 1:
        return None, None, "parametrization chain"
    p = p_list[0]
    if _ParamWeightNorm is not None and isinstance(p, _ParamWeightNorm) and len(originals) == 2:
        g, v = originals
        zero = _zero_slices(v, p.dim)
        return (None if zero else weight_norm_value(g, v, p.dim),
                _zero_message("", zero, "g·v/‖v‖") if zero else None, "weight_norm")
    if isinstance(p, BoundedWeightNorm) and len(originals) == 1:
        (v,) = originals
        reason = p.nan_reason(v)
        return (None if reason else p.exact_value(v), reason, "bounded_weight_norm")
    return None, None, type(p).__name__


def _private_class(module: nn.Module) -> None:
    """Give a parametrized module its own class object.

    ``remove_parametrizations`` deletes the property from ``module.__class__``, and a
    ``deepcopy`` of a parametrized module shares that dynamically created class with the
    original: removing on the copy would break the caller's model.
    """
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def _fold_parametrization(name: str, module: nn.Module, tensor_name: str) -> tuple[str | None, str]:
    """Fold one parametrized tensor; returns (refusal reason or None, form)."""
    plist = module.parametrizations[tensor_name]
    originals: list[Tensor] = []
    if hasattr(plist, "original"):
        originals.append(plist.original)
    while hasattr(plist, f"original{len(originals)}"):
        originals.append(getattr(plist, f"original{len(originals)}"))
    exact, zero_reason, form = _exact_value(plist, originals)
    if zero_reason is not None:
        return f"{name}.{tensor_name}: {zero_reason.lstrip(': ')}", form
    if exact is None:
        with torch.no_grad():
            value = getattr(module, tensor_name)
        if not torch.isfinite(value).all():
            return (f"{name}.{tensor_name}: {form} evaluates to non-finite values "
                    f"({int((~torch.isfinite(value)).sum())} entries)"), form
    _private_class(module)
    parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    if exact is not None:
        with torch.no_grad():
            getattr(module, tensor_name).copy_(exact)
    return None, form


def fold_weight_norm(model_or_gm: nn.Module, *, on_zero_norm: ZeroNormPolicy = "raise"
                     ) -> tuple[nn.Module, PassReport]:
    """Replace weight-norm hooks and parametrizations by plain, folded weights (in place).

    Args:
        model_or_gm: a module or a ``GraphModule``; mutated.
        on_zero_norm: ``"raise"`` (default) raises once naming every layer whose ``v`` has a
            zero-norm slice; ``"skip"`` leaves those layers as they are and reports why.

    Returns:
        ``(model_or_gm, report)``.

    Raises:
        UnsupportedNodeError: zero-norm ``v`` and ``on_zero_norm="raise"``.
    """
    if on_zero_norm not in ("raise", "skip"):
        raise ValueError(f"on_zero_norm must be 'raise' or 'skip', got {on_zero_norm!r}")
    report = PassReport(title="fold weight norm")
    problems: list[str] = []
    for name, module in list(model_or_gm.named_modules()):
        label = name or "<root>"
        hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, _LegacyWeightNorm)]
        for hook in hooks:
            reason = _fold_legacy(label, module, hook)
            if reason is None:
                report.change(f"{label}.{hook.name}", "weight_norm (legacy hook)", "Parameter",
                              "w = g*v/||v|| folded in float64")
                report.key_map[f"{name + '.' if name else ''}{hook.name}_g"] = None
                report.key_map[f"{name + '.' if name else ''}{hook.name}_v"] = (
                    f"{name + '.' if name else ''}{hook.name}")
            else:
                problems.append(reason)
                report.skip(f"{label}.{hook.name}", "weight_norm (legacy hook)", reason)
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name in list(module.parametrizations.keys()):
            before_keys = [k for k in module.state_dict() if k.startswith("parametrizations.")]
            reason, form = _fold_parametrization(label, module, tensor_name)
            if reason is None:
                report.change(f"{label}.{tensor_name}", f"parametrization {form}", "Parameter",
                              "evaluated once (leave_parametrized=True)")
                prefix = f"{name}." if name else ""
                for k in before_keys:
                    if k.startswith(f"parametrizations.{tensor_name}."):
                        report.key_map[prefix + k] = None
            else:
                problems.append(reason)
                report.skip(f"{label}.{tensor_name}", f"parametrization {form}", reason)
    if problems and on_zero_norm == "raise":
        raise UnsupportedNodeError(
            "cannot fold weight normalisation without producing NaN: " + "; ".join(problems)
            + ". Re-initialise those slices, or pass on_zero_norm='skip' to keep them "
            "parametrized")
    return model_or_gm, report
