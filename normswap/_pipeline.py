"""Orchestration between capture and the result: run passes per region, put the model back
together, and walk the module tree for what no graph reached.

After a method's passes ran on a region's graph, the region is reassembled in one of two ways:

* **module mode** -- the graph kept its shape (same nodes, same targets, same arguments); only
  the modules some ``call_module`` nodes point to were replaced. The replacements are installed
  into the user's own module tree, so the model keeps its class, its methods, its Python control
  flow (train-only branches included) and every module the trace did not reach.
* **graph mode** -- a pass changed the graph itself (Kalman prior wiring, a functional
  ``F.batch_norm`` turned into a module call, NormProp's padding nodes): the region's
  GraphModule replaces the submodule (or, for the whole model, becomes the result), and the
  report says which node changed first.

The module walk (:func:`walk_swap`, :func:`walk_fold`) handles the BatchNorms that no captured
graph reaches (untraceable glue around them, or modules the eval forward never calls): each is
replaced in place, a BatchNorm subclass with its own forward grafted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from torch import fx, nn

from ._modules import set_submodule
from .capture import Capture, Region
from .capture._guard import install_guard
from .norms.affine import ChannelAffine
from .passes._infra import PassStep, run_passes
from .passes._match import CONV_TRANSPOSE_TYPES, CONV_TYPES, is_batchnorm, needs_graft
from .passes.fold_conv_bn import fold_into_layer, is_foldable_norm, norm_refusal
from .passes.swap_norm import swap_module
from .report import PassReport

__all__ = ["RegionOutcome", "rewrite_regions", "walk_swap", "walk_fold", "graph_structure",
           "leftover_batchnorms"]

log = logging.getLogger(__name__)


@dataclass
class RegionOutcome:
    """How one region came back: ``mode`` is ``"module"`` or ``"graph"``."""

    path: str
    mode: str
    reason: str = ""


def _args_signature(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return ("node", value.name)
    if isinstance(value, (list, tuple)):
        return tuple(_args_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _args_signature(v)) for k, v in value.items()))
    return ("const", repr(value))


def graph_structure(graph: fx.Graph) -> list[tuple[Any, ...]]:
    """The shape of a graph: every node's op, target and arguments (not module identities)."""
    out = []
    for n in graph.nodes:
        target = n.target if isinstance(n.target, str) else getattr(
            n.target, "__qualname__", repr(n.target))
        out.append((n.name, n.op, str(target), _args_signature(n.args),
                    _args_signature(n.kwargs)))
    return out


def _first_difference(before: list[tuple[Any, ...]], after: list[tuple[Any, ...]]) -> str:
    for i, (a, b) in enumerate(zip(before, after)):
        if a != b:
            return f"node '{b[0]}' ({b[1]} {b[2]}; was '{a[0]}' {a[1]} {a[2]})"
    if len(after) > len(before):
        b = after[len(before)]
        return f"node '{b[0]}' ({b[1]} {b[2]}) added"
    if len(before) > len(after):
        a = before[len(after)]
        return f"node '{a[0]}' ({a[1]} {a[2]}) removed"
    return "no difference"


def _targets(gm: fx.GraphModule) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and str(n.target) not in out:
            try:
                out[str(n.target)] = id(gm.get_submodule(str(n.target)))
            except AttributeError:
                continue
    return out


def _depth(path: str) -> int:
    return 0 if not path else path.count(".") + 1


def _copy_public_attributes(source: nn.Module, gm: fx.GraphModule) -> list[str]:
    """Plain data attributes of the user's model (``config``, ``pretrained_cfg`` ...) onto a
    returned GraphModule."""
    copied = []
    for name, value in vars(source).items():
        if name.startswith("_") or name == "training" or hasattr(gm, name) or callable(value):
            continue
        try:
            setattr(gm, name, value)
            copied.append(name)
        except (AttributeError, TypeError):
            continue
    return copied


def rewrite_regions(cap: Capture, steps: Sequence[PassStep], *,
                    user_options: Mapping[str, Any], context: Mapping[str, Any],
                    report: PassReport, method: str) -> tuple[nn.Module, list[RegionOutcome]]:
    """Run ``steps`` on every captured region and reassemble the model.

    Args:
        cap: the capture (its root is the private copy; it is modified in place).
        steps: the passes.
        user_options: options routed to the passes.
        context: values for the passes (``strict``, ``factory``, ``method`` ...); ``source``
            and ``example_inputs`` are set per region.
        report: collects every pass's entries.
        method: the method's name.

    Returns:
        ``(result, outcomes)``: the root (the user's class unless the whole model's graph
        changed) and one outcome per region.
    """
    result: nn.Module = cap.root
    outcomes: list[RegionOutcome] = []
    for region in sorted(cap.regions, key=lambda r: -_depth(r.path)):
        module = cap.root.get_submodule(region.path) if region.path else cap.root
        before = graph_structure(region.gm.graph)
        ids = _targets(region.gm)
        inputs = cap.calls.get(region.path, (None, {}))[0] if region.path else context.get(
            "example_inputs")
        ctx = {**context, "source": module, "example_inputs": inputs}
        sub = PassReport()
        gm = run_passes(region.gm, steps, user_options=user_options, context=ctx,
                        report=sub, method=method)
        report.extend(sub.prefixed(region.path))
        region.gm = gm
        after = graph_structure(gm.graph)
        if after == before:
            for target in _targets(gm):
                new = gm.get_submodule(target)
                if target not in ids or id(new) != ids[target]:
                    set_submodule(module, target, new)
            outcomes.append(RegionOutcome(region.path, "module"))
            continue
        reason = _first_difference(before, after)
        outcomes.append(RegionOutcome(region.path, "graph", reason))
        if region.guard is not None and install_guard(gm, region.guard):
            report.note(f"'{region.path or '<model>'}': the converted graph checks, once per "
                        "new input shape, that the inputs take the branches its "
                        f"{len(region.guard.places)} shape-decided place(s) took on the "
                        "example (a clear error otherwise)")
        elif region.specialised:
            report.warn(f"'{region.path or '<model>'}': the converted graph holds only for "
                        "inputs that take the branches the example's shapes took "
                        f"({'; '.join(region.specialised[:3])}), and cannot check it at run "
                        "time: run it on inputs shaped like the example")
        if region.path:
            set_submodule(cap.root, region.path, gm)
            _repoint_outer(cap, region, gm)
        else:
            copied = _copy_public_attributes(cap.root, gm)
            if copied:
                report.note(f"attributes of {type(cap.root).__name__} kept on the GraphModule: "
                            f"{', '.join(copied)}")
            result = gm
    return result, outcomes


def _repoint_outer(cap: Capture, inner: Region, gm: fx.GraphModule) -> None:
    """Make the graphs of enclosing regions call the inner region's new GraphModule."""
    for outer in cap.regions:
        if outer is inner or not (outer.path == "" or inner.path.startswith(outer.path + ".")):
            continue
        rel = inner.path[len(outer.path) + 1:] if outer.path else inner.path
        if any(n.op == "call_module" and str(n.target) == rel for n in outer.gm.graph.nodes):
            set_submodule(outer.gm, rel, gm)


# -- module walks --------------------------------------------------------------------------------
def walk_swap(root: nn.Module, paths: Sequence[str], factory: Callable[[nn.Module], nn.Module],
              report: PassReport, *, why: str) -> PassReport:
    """Replace the BatchNorms at ``paths`` in place.

    Returns:
        The walk's own entries (also appended to ``report``): a change or a skip per path.
    """
    walked = PassReport(title="module walk")
    for path in paths:
        mod = root.get_submodule(path)
        sub = PassReport()
        new = swap_module(path, mod, factory, sub)
        for entry in sub.entries:
            if getattr(entry, "kind", "") == "change":
                walked.change(entry.node, entry.before, entry.after,  # type: ignore[union-attr]
                              "; ".join(x for x in (entry.detail, why) if x))  # type: ignore
            else:
                walked.entries.append(entry)
        walked.key_map.update(sub.key_map)
        if new is not None:
            set_submodule(root, path, new)
    report.extend(walked)
    return walked


def walk_fold(root: nn.Module, paths: Sequence[str], report: PassReport, *,
              train_mode: str = "skip", trainable_affine: bool = True) -> None:
    """Fold the norms at ``paths`` that follow a conv inside an ``nn.Sequential``; the others
    become per-channel affines (grafted when they carry extra behaviour)."""
    from .passes._graft import graft

    parents: dict[str, tuple[nn.Sequential, str]] = {}
    for seq_name, seq in root.named_modules():
        if isinstance(seq, nn.Sequential):
            keys = list(seq._modules.keys())
            for i, key in enumerate(keys[1:], 1):
                parents[f"{seq_name}.{key}" if seq_name else key] = (seq, keys[i - 1])
    uses: dict[int, int] = {}
    for _, m in root.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    for path in paths:
        norm = root.get_submodule(path)
        if not is_foldable_norm(norm):
            continue
        kind = type(norm).__name__
        refusal = norm_refusal(norm, train_mode)  # type: ignore[arg-type]
        if refusal is not None:
            report.skip(path, kind, f"module walk: {refusal}")
            continue
        from .passes._math import norm_scale_shift

        scale, shift = norm_scale_shift(norm)
        seq_prev = parents.get(path)
        prev = seq_prev[0]._modules[seq_prev[1]] if seq_prev else None
        reason = None
        if not isinstance(prev, CONV_TYPES + CONV_TRANSPOSE_TYPES):
            reason = "module walk: no Conv/ConvTranspose directly before it in an nn.Sequential"
        elif uses.get(id(prev), 0) > 1 or uses.get(id(norm), 0) > 1:
            reason = "module walk: the conv or the norm module is used at several places"
        elif scale.numel() != prev.out_channels:
            reason = "channel count differs from the conv's outputs"
        if reason is None:
            reason = fold_into_layer(prev, scale, shift)
            if reason is None:
                rest: nn.Module = (graft(norm, None, path=path)[0] if needs_graft(norm)
                                   or hasattr(norm, "_graft_src") else nn.Identity())
                set_submodule(root, path, rest)
                report.change(path, kind, f"folded into {path.rpartition('.')[0]}."
                              f"{seq_prev[1] if seq_prev else '?'}", "module walk")
                continue
        affine = ChannelAffine.from_scale_shift(scale, shift, trainable=trainable_affine,
                                                dtype=next(norm.buffers()).dtype
                                                if any(True for _ in norm.buffers()) else None)
        new = graft(norm, affine, path=path)[0] if needs_graft(norm) else affine
        set_submodule(root, path, new)
        report.skip(path, kind, f"not folded: {reason}")
        report.change(path, kind, type(new).__name__, "kept as per-channel x*scale+shift")


def leftover_batchnorms(model: nn.Module) -> list[str]:
    """Qualified names of BatchNorm modules still in ``model``."""
    return [n for n, m in model.named_modules() if n and is_batchnorm(m)]
