"""Swap every BatchNorm of a captured graph for another normalisation.

Rewrite: each BatchNorm-family node ``y = bn(x)`` becomes ``y = new(x)`` with
``new = factory(bn)`` carrying the trained statistics (the factory comes from the method's
registry entry). The forms:

* a ``call_module`` of ``nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm``, a subclass without its own
  forward, or a frozen BN: the module is replaced at the same path (module substitution: the
  graph does not change, so the API can put the new module into the user's own model);
* a ``call_module`` of a BN subclass with its own forward (captured as a leaf): the new layer
  is *grafted* (:mod:`normswap.passes._graft`) -- it runs the subclass's forward with the new
  normalisation in place of its ``F.batch_norm`` call, keeping the activation/dropout/extra
  buffers, and it keeps the BN's state_dict keys;
* a functional ``F.batch_norm`` / ``torch.batch_norm`` / ATen ``batch_norm`` call: inside a BN
  subclass traced through (``bn_subclasses="inline"``) the new layer is installed at the
  subclass's path with the subclass's children grafted on, and the call becomes a call of it;
  a call on tensors held by another module becomes a new module ``<node>_swapped``.

The new layer carries the old one's train/eval flag, its parameters' ``requires_grad`` and its
forward hooks. Factories refuse invalid statistics (NaN, inf, negative variance) with a reason
that the report records against the layer. With ``strict=True`` every refusal is collected and
raised once as :class:`~normswap.errors.UnsupportedNodeError`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._modules import carry_module_state, set_submodule
from ..errors import UnsupportedNodeError
from ..report import PassReport
from ._graft import carry_extras, graft
from ._infra import raise_refusals
from ._match import (
    FUNCTIONAL_BATCH_NORM,
    batch_norm_args,
    is_batchnorm,
    is_frozen_batchnorm,
    needs_graft,
)

__all__ = ["swap_norm", "state_key_map", "refuse_if_strict", "swap_module"]

log = logging.getLogger(__name__)

Factory = Callable[[nn.Module], nn.Module]


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


def swap_module(path: str, mod: nn.Module, factory: Factory, report: PassReport
                ) -> nn.Module | None:
    """Build the replacement of one BatchNorm module and record it (None when refused).

    Shared by the graph pass and the API's module walk, so both record the same entries.
    """
    try:
        new = factory(mod)
        detail = "frozen" if is_frozen_batchnorm(mod) else ""
        if needs_graft(mod):
            new, note = graft(mod, new, path=path)
            detail = "extra behaviour of the subclass kept (grafted)" + (
                f"; {note}" if note else "")
    except (ValueError, TypeError, UnsupportedNodeError) as exc:
        report.skip(path, type(mod).__name__, str(exc))
        return None
    for lost in carry_module_state(mod, new):
        report.warn(f"{lost}", node=path)
    report.key_map.update(state_key_map(path, mod, new))
    report.change(path, type(mod).__name__, type(new).__name__, detail)
    return new


def _bn_from_tensors(args: dict[str, Any], gm: fx.GraphModule) -> _BatchNorm:
    """A stand-in nn.BatchNorm2d holding the tensors of a functional batch-norm call."""
    def tensor(node: Any) -> torch.Tensor | None:
        return None if node is None else _attr(gm, str(node.target)).detach()

    mean, var = tensor(args["running_mean"]), tensor(args["running_var"])
    weight, bias = tensor(args["weight"]), tensor(args["bias"])
    if mean is None or var is None:
        raise ValueError("no running statistics")
    mom = args["momentum"]
    bn = nn.BatchNorm2d(mean.numel(), eps=float(args["eps"]),
                        momentum=mom if isinstance(mom, float) else 0.1,
                        affine=weight is not None, device=mean.device, dtype=mean.dtype)
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        if weight is not None and bn.weight is not None and bn.bias is not None:
            bn.weight.copy_(weight)
            bn.bias.copy_(bias if bias is not None else torch.zeros_like(weight))
    return bn


def _attr(root: nn.Module, target: str) -> torch.Tensor:
    """The tensor at dotted path ``target``."""
    path, _, name = target.rpartition(".")
    return getattr(root.get_submodule(path) if path else root, name)


def swap_norm(gm: fx.GraphModule, *, factory: Factory, source: nn.Module | None = None,
              strict: bool = True, method: str = "") -> tuple[fx.GraphModule, PassReport]:
    """Replace every BatchNorm node of ``gm`` with ``factory(bn)``.

    Args:
        gm: a captured graph (mutated).
        factory: builds the replacement from one BatchNorm module (options already bound).
        source: the module ``gm`` was captured from; needed to rebuild BN subclasses whose
            forward was traced through (their functional call is replaced).
        strict: raise :class:`UnsupportedNodeError` listing every BatchNorm that cannot be
            swapped (False: keep them and report each).
        method: method name for the report.

    Returns:
        The rewritten GraphModule and its report.
    """
    report = PassReport(title=f"swap -> {method}" if method else "swap")
    seen: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if not is_batchnorm(mod):
                continue
            qual = str(node.target)
            if qual in seen:
                report.note("module called more than once; replaced once and shared", node=qual)
                continue
            seen.add(qual)
            new = swap_module(qual, mod, factory, report)
            if new is not None:
                set_submodule(gm, qual, new)
        elif node.op == "call_function" and node.target in FUNCTIONAL_BATCH_NORM:
            _swap_functional(gm, node, factory, source, report, seen)
    refuse_if_strict(report, strict)
    return gm, report


def _swap_functional(gm: fx.GraphModule, node: fx.Node, factory: Factory,
                     source: nn.Module | None, report: PassReport, seen: set[str]) -> None:
    """Replace one functional batch-norm call node by a module call."""
    args = batch_norm_args(node)
    stats = [args[k] for k in ("running_mean", "running_var", "weight", "bias")]
    label = node.name
    if args["running_mean"] is None or args["running_var"] is None:
        # not a trained BatchNorm: a normalisation by the statistics of whatever it is given
        # (weight standardisation in NF-nets and StdConv2d: F.batch_norm over a weight tensor)
        report.note("functional batch_norm without running statistics (batch statistics "
                    "only, e.g. weight standardisation): nothing trained to convert; left as is",
                    node=label)
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
        if owner_path not in seen:
            seen.add(owner_path)
            try:
                new = factory(owner_src)
            except (ValueError, TypeError) as exc:
                report.skip(owner_path, type(owner_src).__name__, str(exc))
                return
            carry_module_state(owner_src, new)
            carry_extras(gm.get_submodule(owner_path), new)
            report.key_map.update(state_key_map(owner_path, owner_src, new))
            set_submodule(gm, owner_path, new)
            report.change(owner_path, f"{type(owner_src).__name__} (F.batch_norm inside its "
                          f"forward)", type(new).__name__,
                          "extra behaviour of the subclass kept in the graph")
        else:
            report.note("BN subclass called more than once; replaced once and shared",
                        node=owner_path)
        target = owner_path
    else:
        try:
            new = factory(_bn_from_tensors(args, gm))
        except (ValueError, TypeError) as exc:
            report.skip(label, "F.batch_norm", str(exc))
            return
        base = f"{owner_path}.{node.name}_swapped" if owner_path else f"{node.name}_swapped"
        gm.add_submodule(base, new)
        for s in attr_nodes:
            report.key_map[str(s.target)] = None
        report.change(label, "F.batch_norm", type(new).__name__,
                      f"functional call; new module at '{base}' (old tensors unused)")
        target = base
    with gm.graph.inserting_after(node):
        new_node = gm.graph.call_module(target, (args["input"],))
    node.replace_all_uses_with(new_node)
    gm.graph.erase_node(node)
    for s in attr_nodes:  # the old tensors may no longer exist on the replacement
        if not s.users:
            gm.graph.erase_node(s)


def refuse_if_strict(report: PassReport, strict: bool) -> None:
    """Raise UnsupportedNodeError listing every skip of ``report`` when ``strict``."""
    if strict:
        raise_refusals("could not swap", ((s.node, s.op, s.reason) for s in report.skips),
                       "Pass strict=False to keep them as they are (each is listed in the "
                       "report).")
