"""Fold eval-mode BatchNorm-family layers into the Conv/ConvTranspose/Linear before them.

Rewrite (REFERENCE §0, §7). An eval-mode norm computes, per output channel ``c`` on dim 1,
``y = s[c]·x + t[c]`` with ``s = γ/sqrt(σ²_r+ε)`` and ``t = β − s·μ_r`` (or whatever
``eval_scale_shift()`` returns for normswap's own layers). For ``x = conv(z) = W∗z + b``::

    W'[c, ...] = s[c]·W[c, ...]        b'[c] = s[c]·b[c] + t[c]

``Conv*d`` and ``Linear`` keep the output channel on weight axis 0. ``ConvTranspose*d`` stores
its weight as ``(C_in, C_out/groups, k...)``: output channel ``c = g·(C_out/groups) + j`` lives
at group ``g``, column ``j`` of axis 1, so the weight is viewed as
``(groups, C_in/groups, C_out/groups, k...)`` and scaled by ``s.view(groups, 1, C_out/groups)``.
(``torch.nn.utils.fusion.fuse_conv_bn_weights(transpose=True)`` scales axis 1 by the full
``s`` and breaks for ``groups > 1``; hence the own implementation.) The arithmetic runs in
float64 and is cast back to the layer's dtype.

A norm that cannot fold becomes one :class:`~normswap.norms.affine.ChannelAffine` (``Mul`` +
``Add`` in ONNX) and the report says why: the conv module is called more than once, its output
has other users, its weight is shared with another module, there is no conv/linear before the
norm, or a Linear's output is not ``(N, C)``. A norm in train mode, or one without running
statistics, computes batch statistics and is left as it is (``train_mode="freeze"`` treats a
train-mode norm as if it were in eval mode).

:func:`fold_model` is the one-call entry point: it deep-copies the model, sets eval, folds
weight norms (before tracing: the legacy ``weight_norm`` pre-hooks and parametrizations are
plain module state that fx would otherwise keep as opaque leaves), traces with torch.fx (norms
as leaves) and folds; when tracing fails it falls back to a module walk over ``nn.Sequential``.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from typing import Any, Iterable, Literal

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _BatchNorm

from .._modules import as_inputs, safe_deepcopy, set_submodule
from ..norms.affine import ChannelAffine
from ..report import PassReport
from ._match import (
    BN_TYPES,
    CONV_TRANSPOSE_TYPES,
    CONV_TYPES,
    FUNCTIONAL_BATCH_NORM,
    NormTracer,
    eliminate_dead_code,
    is_frozen_batchnorm,
    layer_before_norm,
    module_call_counts,
    out_channels,
    overrides_forward,
    shared_param_ids,
)
from .fold_weight_norm import fold_weight_norm

__all__ = [
    "CONV_TYPES",
    "CONV_TRANSPOSE_TYPES",
    "norm_scale_shift",
    "fold_bn_into_weights",
    "fold_conv_bn",
    "fold_model",
]

log = logging.getLogger(__name__)

TrainMode = Literal["skip", "freeze"]
_FP16_MAX = 65504.0


# -- tensor math (pure) -------------------------------------------------------------------------
def norm_scale_shift(module: nn.Module) -> tuple[Tensor, Tensor]:
    """Return the float64 per-channel ``(scale, shift)`` of a norm's eval-mode output.

    Args:
        module: a BatchNorm1d/2d/3d, SyncBatchNorm, FrozenBatchNorm2d, or any module with
            ``eval_scale_shift()``.

    Returns:
        ``(scale, shift)`` such that eval output = ``x·scale[c] + shift[c]`` over dim 1.

    Raises:
        ValueError: the module has no running statistics or is not a known norm.
    """
    if hasattr(module, "eval_scale_shift"):
        scale, shift = module.eval_scale_shift()
        return scale.detach().double(), shift.detach().double()
    mean = getattr(module, "running_mean", None)
    var = getattr(module, "running_var", None)
    if mean is None or var is None:
        raise ValueError(f"{type(module).__name__} has no running statistics; it cannot be "
                         "expressed as a per-channel affine")
    eps = float(getattr(module, "eps", 1e-5))
    mean64, var64 = mean.detach().double(), var.detach().double()
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    gamma = weight.detach().double() if weight is not None else torch.ones_like(mean64)
    beta = bias.detach().double() if bias is not None else torch.zeros_like(mean64)
    scale = gamma / torch.sqrt(var64 + eps)
    return scale, beta - scale * mean64


def fold_bn_into_weights(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, *,
                         transpose: bool = False, groups: int = 1) -> tuple[Tensor, Tensor]:
    """Fold ``y = s·layer(x) + t`` into the layer's weight and bias.

    Args:
        weight: Conv ``(C_out, C_in/g, k...)``, Linear ``(C_out, C_in)`` or ConvTranspose
            ``(C_in, C_out/g, k...)`` weight.
        bias: the layer's bias ``(C_out,)`` or None.
        scale: per-output-channel ``s`` ``(C_out,)``.
        shift: per-output-channel ``t`` ``(C_out,)``.
        transpose: the weight is a ConvTranspose weight.
        groups: the ConvTranspose ``groups`` (ignored for non-transposed weights).

    Returns:
        ``(weight', bias')`` in the dtype of ``weight`` (bias in the dtype of ``bias`` if given),
        computed in float64.

    Raises:
        ValueError: shapes do not match.
    """
    s64, t64 = scale.detach().double(), shift.detach().double()
    w64 = weight.detach().double()
    c_out = s64.numel()
    if transpose:
        c_in, per_group = w64.shape[0], w64.shape[1]
        if groups < 1 or c_in % groups or per_group * groups != c_out:
            raise ValueError(f"ConvTranspose weight {tuple(w64.shape)} with groups={groups} does "
                             f"not have {c_out} output channels")
        kernel = w64.shape[2:]
        grouped = w64.reshape(groups, c_in // groups, per_group, *kernel)
        s_view = s64.reshape(groups, 1, per_group, *([1] * len(kernel)))
        new_w = (grouped * s_view).reshape(w64.shape)
    else:
        if w64.shape[0] != c_out:
            raise ValueError(f"weight {tuple(w64.shape)} has {w64.shape[0]} output channels, the "
                             f"norm has {c_out}")
        new_w = w64 * s64.reshape(-1, *([1] * (w64.dim() - 1)))
    b64 = bias.detach().double() if bias is not None else torch.zeros_like(s64)
    new_b = b64 * s64 + t64
    b_dtype = bias.dtype if bias is not None else weight.dtype
    return new_w.to(weight.dtype), new_b.to(b_dtype)


# -- what may fold --------------------------------------------------------------------------------
def _is_foldable_norm_type(m: nn.Module) -> bool:
    """A norm whose eval output is exactly a per-channel affine."""
    if hasattr(m, "eval_scale_shift") and callable(m.eval_scale_shift):
        return True
    return type(m) in BN_TYPES or is_frozen_batchnorm(m) or (
        isinstance(m, _BatchNorm) and not overrides_forward(m))


def _norm_refusal(m: nn.Module, train_mode: TrainMode) -> str | None:
    """Why this norm cannot be expressed as a fixed affine (None when it can)."""
    if isinstance(m, _BatchNorm) and not hasattr(m, "eval_scale_shift"):
        if m.running_mean is None or m.running_var is None:
            return ("track_running_stats=False: it normalises with batch statistics even in "
                    "eval mode, so it is not a fixed affine")
    if m.training and train_mode == "skip" and not is_frozen_batchnorm(m):
        return ("module is in train mode (batch statistics); call model.eval() first, or pass "
                "train_mode='freeze' to fold its running statistics")
    return None


def _layer_kind(m: nn.Module) -> str:
    return type(m).__name__


class _Site:
    """One call of a norm module in the graph and the decision about it."""

    def __init__(self, node: fx.Node, norm: nn.Module) -> None:
        self.node = node
        self.norm = norm
        self.layer_node: fx.Node | None = None
        self.reason: str | None = None


def _fold_refusal(site: _Site, gm: fx.GraphModule, calls: Counter[str],
                  param_owners: Counter[int]) -> str | None:
    """Why the norm at this site cannot fold into the node before it (None when it can)."""
    site.layer_node, reason = layer_before_norm(gm, site.node, calls, param_owners)
    if reason is not None or site.layer_node is None:
        return reason
    scale, _ = norm_scale_shift(site.norm)
    channels = out_channels(gm.get_submodule(str(site.layer_node.target)))
    if scale.numel() != channels:
        return (f"norm has {scale.numel()} channels but '{site.layer_node.target}' has "
                f"{channels} outputs")
    return None


# -- graph rewrite --------------------------------------------------------------------------------
def _fold_site(gm: fx.GraphModule, site: _Site) -> None:
    """Fold the norm at ``site`` into its (checked) preceding layer."""
    if site.layer_node is None:
        raise RuntimeError("internal: fold site without layer")
    layer = gm.get_submodule(str(site.layer_node.target))
    scale, shift = norm_scale_shift(site.norm)
    transpose = isinstance(layer, CONV_TRANSPOSE_TYPES)
    groups = int(getattr(layer, "groups", 1))
    new_w, new_b = fold_bn_into_weights(layer.weight, layer.bias, scale, shift,
                                        transpose=transpose, groups=groups)
    layer.weight = nn.Parameter(new_w, requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(new_b.to(layer.weight.device), requires_grad=layer.weight.requires_grad)
    site.node.replace_all_uses_with(site.layer_node)
    gm.graph.erase_node(site.node)


def _state_keys(m: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{k}" for k in m.state_dict().keys()]


def fold_conv_bn(gm: fx.GraphModule, *, train_mode: TrainMode = "skip",
                 trainable_affine: bool = True, **opts: Any) -> tuple[fx.GraphModule, PassReport]:
    """Fold eval-mode norms into the preceding Conv/ConvTranspose/Linear of a traced model.

    Mutates ``gm`` (the API hands passes a private copy).

    Args:
        gm: a traced model; norms must be ``call_module`` leaves. Run
            :class:`torch.fx.passes.shape_prop.ShapeProp` first to allow Linear→BN1d folds.
        train_mode: ``"skip"`` leaves train-mode norms untouched (they use batch statistics);
            ``"freeze"`` folds their running statistics as if in eval mode.
        trainable_affine: norms that cannot fold become :class:`ChannelAffine` with parameters
            (True) or buffers (False).
        **opts: ignored (accepted so that the API can pass shared options through).

    Returns:
        ``(gm, report)``; every norm appears in the report as a change or a skip.
    """
    if train_mode not in ("skip", "freeze"):
        raise ValueError(f"train_mode must be 'skip' or 'freeze', got {train_mode!r}")
    if opts:
        log.debug("fold_conv_bn: ignoring options %s", sorted(opts))
    report = PassReport(title="fold conv+bn")
    calls = module_call_counts(gm)
    param_owners = shared_param_ids(gm)

    sites: list[_Site] = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in FUNCTIONAL_BATCH_NORM:
            report.skip(node.name, "F.batch_norm", "functional batch_norm call (e.g. inside a "
                        "BatchNorm subclass with its own forward) is not folded; keep the "
                        "subclass as a leaf or fold it by hand")
            continue
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(str(node.target))
        if not _is_foldable_norm_type(mod):
            if isinstance(mod, _BatchNorm):
                report.skip(node.name, _layer_kind(mod), "BatchNorm subclass with its own forward "
                            "(extra behaviour would be lost); trace through it instead")
            continue
        sites.append(_Site(node, mod))

    # decide everything first, on the unmodified graph
    affine_targets: dict[str, list[_Site]] = {}
    fold_sites: list[_Site] = []
    for site in sites:
        target, kind = str(site.node.target), _layer_kind(site.norm)
        refusal = _norm_refusal(site.norm, train_mode)
        if refusal is not None:
            report.skip(target, kind, refusal)
            continue
        site.reason = _fold_refusal(site, gm, calls, param_owners)
        if site.reason is None:
            fold_sites.append(site)
        else:
            affine_targets.setdefault(target, []).append(site)

    for site in fold_sites:
        target, kind = str(site.node.target), _layer_kind(site.norm)
        layer_target = str(site.layer_node.target) if site.layer_node is not None else "?"
        layer = gm.get_submodule(layer_target)
        had_bias = getattr(layer, "bias", None) is not None
        _fold_site(gm, site)
        report.change(target, kind, f"folded into {layer_target}",
                      f"{_layer_kind(layer)} weight scaled per output channel"
                      + ("" if had_bias else "; bias added"))
        peak = max(float(layer.weight.detach().abs().max()), float(layer.bias.detach().abs().max()))
        if peak > _FP16_MAX:
            report.warn(f"folded parameters of '{layer_target}' reach |w| = {peak:.3g} > "
                        f"{_FP16_MAX:g}: inf in fp16 (normswap's fp16 export keeps the layer in "
                        "fp32)", layer_target)

    for target, tsites in affine_targets.items():
        norm = tsites[0].norm
        scale, shift = norm_scale_shift(norm)
        ref = next((t for t in list(norm.parameters()) + list(norm.buffers())
                    if t.is_floating_point()), None)
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        device = ref.device if ref is not None else None
        affine = ChannelAffine.from_scale_shift(scale, shift, dtype=dtype, device=device,
                                                trainable=trainable_affine)
        affine.train(norm.training)
        old_keys = _state_keys(norm, target)
        set_submodule(gm, target, affine)
        for site in tsites:
            where = f" (call '{site.node.name}')" if len(tsites) > 1 else ""
            report.skip(target, _layer_kind(norm), f"not folded{where}: {site.reason}")
        report.change(target, _layer_kind(norm), "ChannelAffine",
                      "kept as per-channel x*scale+shift (ONNX Mul+Add)")
        for k in old_keys:
            report.key_map[k] = None
    for site in fold_sites:
        for k in _state_keys(site.norm, str(site.node.target)):
            report.key_map.setdefault(k, None)

    eliminate_dead_code(gm)
    gm.delete_all_unused_submodules()
    # keys of norms still present (shared module folded at one site only) are not dropped
    present = set(gm.state_dict().keys())
    for k in [k for k, v in report.key_map.items() if v is None and k in present]:
        del report.key_map[k]
    gm.graph.lint()
    gm.recompile()
    report.metrics["folded"] = len(fold_sites)
    report.metrics["affine"] = len(affine_targets)
    return gm, report


# -- one-call entry point -------------------------------------------------------------------------
class _FoldTracer(NormTracer):
    """NormTracer that also keeps any ``eval_scale_shift`` module and listed types as leaves."""

    def __init__(self, leaf_names: Iterable[str], leaf_types: tuple[type, ...]) -> None:
        super().__init__(leaf_names)
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if hasattr(m, "eval_scale_shift") or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module, leaf_modules: Iterable[str | type]) -> fx.GraphModule:
    names = [x for x in leaf_modules if isinstance(x, str)]
    types = tuple(x for x in leaf_modules if isinstance(x, type))
    tracer = _FoldTracer(names, types)
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.train(model.training)
    return gm


def _fold_sequential_walk(model: nn.Module, train_mode: TrainMode) -> PassReport:
    """Fallback without a graph: fold adjacent Conv→norm pairs inside ``nn.Sequential``."""
    report = PassReport(title="fold conv+bn (module walk)")
    uses: Counter[int] = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    param_owners = shared_param_ids(model)
    seen: set[str] = set()
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        keys = list(seq._modules.keys())
        for i, key in enumerate(keys):
            norm = seq._modules[key]
            name = f"{seq_name}.{key}" if seq_name else key
            if norm is None or not _is_foldable_norm_type(norm):
                continue
            seen.add(name)
            kind = _layer_kind(norm)
            refusal = _norm_refusal(norm, train_mode)
            prev = seq._modules[keys[i - 1]] if i > 0 else None
            if refusal is None and not isinstance(prev, CONV_TYPES + CONV_TRANSPOSE_TYPES):
                refusal = "module walk: no Conv/ConvTranspose directly before it in its Sequential"
            elif refusal is None and (uses[id(prev)] > 1 or uses[id(norm)] > 1):
                refusal = "module walk: the conv or the norm module is used at several places"
            elif refusal is None and any(param_owners[id(p)] > 1 for p in prev.parameters()):
                refusal = "module walk: the conv's weight is shared with another module"
            elif refusal is None and norm_scale_shift(norm)[0].numel() != prev.out_channels:
                refusal = "channel count differs from the conv's outputs"
            if refusal is not None:
                report.skip(name, kind, refusal)
                continue
            scale, shift = norm_scale_shift(norm)
            new_w, new_b = fold_bn_into_weights(
                prev.weight, prev.bias, scale, shift,
                transpose=isinstance(prev, CONV_TRANSPOSE_TYPES), groups=prev.groups)
            prev.weight = nn.Parameter(new_w, requires_grad=prev.weight.requires_grad)
            prev.bias = nn.Parameter(new_b.to(new_w.device), requires_grad=prev.weight.requires_grad)
            seq._modules[key] = nn.Identity()
            report.change(name, kind, f"folded into {seq_name + '.' if seq_name else ''}{keys[i - 1]}",
                          "module walk; replaced by nn.Identity")
    for name, m in model.named_modules():
        if name not in seen and _is_foldable_norm_type(m) and not isinstance(m, ChannelAffine):
            report.skip(name, _layer_kind(m), "module walk: not inside an nn.Sequential after a conv")
    return report


def fold_model(model: nn.Module, *, leaf_modules: Iterable[str | type] = (),
               example_inputs: Any = None, fold_weight_norms: bool = True,
               train_mode: TrainMode = "skip",
               trainable_affine: bool = True) -> tuple[nn.Module, PassReport]:
    """Fold every foldable norm of a copy of ``model`` for inference.

    Steps: deep-copy (the caller's model is never changed), ``eval()``, fold weight norms
    (:func:`~normswap.passes.fold_weight_norm.fold_weight_norm`), trace with torch.fx (norms as
    leaves), propagate shapes when ``example_inputs`` are given, :func:`fold_conv_bn`. If tracing
    fails, adjacent Conv→norm pairs inside ``nn.Sequential`` are folded by a module walk and the
    report names the tracing failure.

    Args:
        model: the trained model.
        leaf_modules: qualified module names and/or module classes fx must not trace into.
        example_inputs: a tensor or tuple of inputs; enables Linear→BN1d folding (needs shapes).
        fold_weight_norms: fold weight-norm hooks/parametrizations first.
        train_mode: see :func:`fold_conv_bn` (``eval()`` is applied first, so this only matters
            for modules whose ``eval()`` keeps them training).
        trainable_affine: see :func:`fold_conv_bn`.

    Returns:
        ``(folded_model, report)``: a ``GraphModule``, or the walked copy after a fallback.
    """
    work = safe_deepcopy(model)
    work.eval()
    report = PassReport(title="fold")
    if fold_weight_norms:
        work, wn_report = fold_weight_norm(work)
        report.extend(wn_report)
    try:
        gm = _trace(work, leaf_modules)
    except Exception as exc:  # noqa: BLE001 - any tracing failure triggers the fallback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        msg = (f"could not trace {type(model).__name__} with torch.fx "
               f"({type(exc).__name__}: {first}); falling back to a module walk that folds only "
               "adjacent Conv->norm pairs in nn.Sequential; pass leaf_modules=[...] naming the "
               "untraceable submodules to fold the rest")
        log.warning(msg)
        report.warn(msg)
        report.extend(_fold_sequential_walk(work, train_mode))
        return work, report
    inputs = as_inputs(example_inputs) or ()
    if inputs:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    if any(n.op == "call_function" and getattr(n.target, "__module__", "").endswith("kalman_prior")
           for n in gm.graph.nodes):
        # the Kalman prior wiring only matters in train mode: drop it before folding
        from .kalman_prior import remove_kalman_priors

        gm, prior_report = remove_kalman_priors(gm)
        report.extend(prior_report)
    gm, fold_report = fold_conv_bn(gm, train_mode=train_mode, trainable_affine=trainable_affine)
    report.extend(fold_report)
    return gm, report
