"""Swap every BatchNorm of a traced model for another normalisation.

Rewrite: each BatchNorm-family node ``y = bn(x)`` (a leaf ``call_module`` of nn.BatchNorm1d/2d/3d,
SyncBatchNorm, a BN subclass without its own forward, or a frozen BN; or an ``F.batch_norm`` call
found inside a BN subclass that adds behaviour in its forward) becomes ``y = new(x)`` where
``new = factory(bn)`` carries the trained statistics (``factory`` comes from the registry). The
replacement keeps the BN's qualified name, so unchanged state_dict keys stay as they were; keys
whose meaning changes are listed in the report's key map.

When the model cannot be traced, :func:`swap_modules` replaces modules in place by walking the
module tree (module-level methods only) and the report names the module that broke tracing.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._modules import set_submodule
from ..errors import UnsupportedNodeError
from ..report import PassReport
from ._match import (
    eliminate_dead_code,
    FUNCTIONAL_BATCH_NORM,
    batchnorm_like_modules,
    is_batchnorm,
    is_frozen_batchnorm,
    overrides_forward,
)

__all__ = ["swap_norm", "swap_modules", "state_key_map", "refuse_if_strict"]

log = logging.getLogger(__name__)

Factory = Callable[..., nn.Module]


def state_key_map(prefix: str, old: nn.Module, new: nn.Module) -> dict[str, str | None]:
    """Keys of ``old``'s own state that ``new`` stores under another name (or drops)."""
    old_keys = set(old.state_dict(keep_vars=True).keys())
    new_keys = set(new.state_dict(keep_vars=True).keys())
    gone = sorted(old_keys - new_keys)
    added = sorted(new_keys - old_keys)
    p = f"{prefix}." if prefix else ""
    out: dict[str, str | None] = {}
    if len(gone) == 1 and len(added) == 1:
        out[p + gone[0]] = p + added[0]
    else:
        for g in gone:
            out[p + g] = None
    return out


def _describe(m: nn.Module) -> str:
    return type(m).__name__


def _bn_from_tensors(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
                     bias: torch.Tensor | None, eps: float, momentum: float | None,
                     ndim_hint: int | None) -> _BatchNorm:
    """A stand-in nn.BatchNorm holding the tensors of a functional ``F.batch_norm`` call."""
    cls = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(ndim_hint or 4,
                                                                      nn.BatchNorm2d)
    bn = cls(mean.numel(), eps=eps, momentum=momentum, affine=weight is not None,
             device=mean.device, dtype=mean.dtype)
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        if weight is not None and bn.weight is not None and bn.bias is not None:
            bn.weight.copy_(weight)
            bn.bias.copy_(bias if bias is not None else torch.zeros_like(weight))
    return bn


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _graft(owner: nn.Module, new: nn.Module) -> None:
    """Move children and non-BN attributes of a traced-through BN subclass onto ``new``."""
    bn_names = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    for name, child in owner.named_children():
        new.add_module(name, child)
    for name, p in owner.named_parameters(recurse=False):
        if name not in bn_names and not hasattr(new, name):
            new.register_parameter(name, p)
    for name, b in owner.named_buffers(recurse=False):
        if name not in bn_names and not hasattr(new, name):
            new.register_buffer(name, b)


def swap_norm(gm: fx.GraphModule, factory: Factory, *, source: nn.Module | None = None,
              method: str = "", **options: Any) -> tuple[fx.GraphModule, PassReport]:
    """Replace every BatchNorm node of ``gm`` with ``factory(bn, **options)``.

    Args:
        gm: a GraphModule traced with :func:`normswap.passes._match.trace` (mutated).
        factory: builds the replacement from one BatchNorm module.
        source: the module ``gm`` was traced from; needed to rebuild BN subclasses whose
            forward was traced through (their ``F.batch_norm`` call is replaced).
        method: method name for the report.
        **options: passed to ``factory``.

    Returns:
        The rewritten GraphModule and its report.
    """
    report = PassReport(title=f"swap -> {method}" if method else "swap")
    seen: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if not is_batchnorm(mod) or overrides_forward(mod):
                continue
            qual = str(node.target)
            if qual in seen:
                report.note(f"module called more than once; replaced once and shared", node=qual)
                continue
            seen.add(qual)
            new = factory(mod, **options)
            report.key_map.update(state_key_map(qual, mod, new))
            set_submodule(gm, qual, new)
            detail = "frozen" if is_frozen_batchnorm(mod) else ""
            report.change(qual, _describe(mod), _describe(new), detail)
        elif node.op == "call_function" and node.target in FUNCTIONAL_BATCH_NORM:
            _swap_functional(gm, node, factory, source, report, seen, options)
    eliminate_dead_code(gm)
    gm.graph.lint()
    gm.recompile()
    return gm, report


def _swap_functional(gm: fx.GraphModule, node: fx.Node, factory: Factory,
                     source: nn.Module | None, report: PassReport, seen: set[str],
                     options: dict[str, Any]) -> None:
    """Replace one ``F.batch_norm`` call node by a module call."""
    names = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
             "eps"]
    defaults: list[Any] = [None, None, None, None, None, False, 0.1, 1e-5]
    vals = {n: _arg(node, i, n, d) for i, (n, d) in enumerate(zip(names, defaults))}
    stats = [vals[k] for k in ("running_mean", "running_var", "weight", "bias")]
    label = node.name
    if vals["running_mean"] is None or vals["running_var"] is None:
        report.skip(label, "F.batch_norm", "no running statistics (track_running_stats=False): "
                    "nothing to carry over; left as is")
        return
    attr_nodes = [s for s in stats if s is not None]
    if not all(isinstance(s, fx.Node) and s.op == "get_attr" for s in attr_nodes):
        report.skip(label, "F.batch_norm", "statistics are computed in forward, not stored "
                    "tensors; cannot carry them over")
        return
    targets = [str(s.target) for s in attr_nodes]
    owner_path = targets[0].rpartition(".")[0]
    if not all(t.rpartition(".")[0] == owner_path for t in targets):
        owner_path = ""
    owner_src = None
    if source is not None and owner_path:
        try:
            owner_src = source.get_submodule(owner_path)
        except AttributeError:
            owner_src = None
    label = owner_path or label
    if isinstance(owner_src, _BatchNorm):
        if owner_path in seen:
            report.note("BN subclass called more than once; replaced once and shared",
                        node=owner_path)
        else:
            seen.add(owner_path)
            new = factory(owner_src, **options)
            container = gm.get_submodule(owner_path)
            _graft(container, new)
            report.key_map.update(state_key_map(owner_path, owner_src, new))
            set_submodule(gm, owner_path, new)
            report.change(owner_path, f"{type(owner_src).__name__} (F.batch_norm inside its "
                          f"forward)", type(new).__name__,
                          "extra behaviour of the subclass kept in the graph")
        target = owner_path
    else:
        t = [None if s is None else _attr(gm, str(s.target)).detach() for s in stats]
        mom = vals["momentum"]
        bn = _bn_from_tensors(t[0], t[1], t[2], t[3], float(vals["eps"]),
                              mom if isinstance(mom, float) else 0.1, None)
        new = factory(bn, **options)
        base = f"{owner_path}.{node.name}_swapped" if owner_path else f"{node.name}_swapped"
        gm.add_submodule(base, new)
        for s in attr_nodes:
            report.key_map[str(s.target)] = None
        report.change(label, "F.batch_norm", type(new).__name__,
                      f"functional call; new module at '{base}' (old tensors unused)")
        target = base
    with gm.graph.inserting_after(node):
        new_node = gm.graph.call_module(target, (vals["input"],))
    node.replace_all_uses_with(new_node)
    gm.graph.erase_node(node)
    for s in attr_nodes:  # the old tensors may no longer exist on the replacement
        if not s.users:
            gm.graph.erase_node(s)


def _attr(root: nn.Module, target: str) -> torch.Tensor:
    """The tensor at dotted path ``target``."""
    path, _, name = target.rpartition(".")
    return getattr(root.get_submodule(path) if path else root, name)


def swap_modules(model: nn.Module, factory: Factory, *, method: str = "",
                 **options: Any) -> tuple[nn.Module, PassReport]:
    """Module-walk fallback: replace BN modules in place (``model`` is mutated; pass a copy).

    BN subclasses that override ``forward`` cannot keep their extra behaviour without a graph;
    they are left as they are and reported.
    """
    report = PassReport(title=f"swap -> {method} (module walk)" if method else "swap")
    for qual, mod in batchnorm_like_modules(model):
        if overrides_forward(mod):
            report.skip(qual, type(mod).__name__,
                        "BN subclass with its own forward: without a graph its extra behaviour "
                        "would be lost; make the model traceable or pass leaf_modules= for the "
                        "part that breaks tracing")
            continue
        new = factory(mod, **options)
        report.key_map.update(state_key_map(qual, mod, new))
        set_submodule(model, qual, new)
        report.change(qual, type(mod).__name__, type(new).__name__,
                      "frozen" if is_frozen_batchnorm(mod) else "")
    return model, report


def refuse_if_strict(report: PassReport, strict: bool) -> None:
    """Raise UnsupportedNodeError listing every skip when ``strict``."""
    if strict and report.skips:
        lines = "; ".join(f"'{s.node}' ({s.op}): {s.reason}" for s in report.skips)
        raise UnsupportedNodeError(
            f"{len(report.skips)} normalisation node(s) could not be swapped: {lines}. "
            "Pass strict=False to keep them as they are (each is listed in the report).")
