"""Graft: keep what a BatchNorm subclass adds when its normalisation is replaced or folded.

A BatchNorm subclass with its own ``forward`` (timm's ``BatchNormAct2d``: ``F.batch_norm``,
then ``self.drop``, then ``self.act``) cannot be swapped by replacing the module: the extra
behaviour would be lost. :func:`graft` traces the subclass's forward alone with ``torch.fx``,
replaces its one functional batch-norm call by ``self._normswap_norm(x)``, and generates a class
whose ``forward`` is that code:

* ``graft(owner, new_norm)`` -- the new layer (an ``L1BatchNorm2d`` ...) becomes an instance of
  ``L1BatchNorm2d[BatchNormAct2d]``: it *is* the new layer (same state_dict keys as the old
  BN), carries the owner's children (``act``, ``drop``) and extra parameters/buffers, and its
  forward runs the owner's code with the new normalisation in place of ``F.batch_norm``;
* ``graft(owner, None)`` -- the *remainder* after folding the norm into the preceding conv:
  ``BatchNormAct2d[folded]`` runs the owner's code with the normalisation removed.

The module stays where it was in the user's own model, so the user's class, methods and every
other module are kept. The trace runs in eval mode: Python branches on ``self.training``
inside the owner's forward are frozen to the eval branch; when the train-mode trace differs in
anything but BatchNorm bookkeeping the report says so.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx, nn

from .._modules import ModuleStateGuard
from ..errors import UnsupportedNodeError
from ._match import batch_norm_args, functional_batch_norm_nodes

__all__ = ["graft", "carry_extras", "is_grafted", "norm_reads_input", "GraftedNorm",
           "GraftRemainder"]

log = logging.getLogger(__name__)

NORM_CALL = "_normswap_norm"
_BN_STATE = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
_CLASSES: dict[tuple[Any, ...], type] = {}


class GraftedNorm:
    """Mixin of generated classes: a normswap layer running a BN subclass's forward code."""

    _graft_owner: type
    _graft_src: str
    _graft_globals: dict[str, Any]
    _graft_norm_reads_input: bool


class GraftRemainder(nn.Module):
    """Base of generated classes: a BN subclass's forward with the normalisation folded away."""

    _graft_owner: type
    _graft_src: str
    _graft_globals: dict[str, Any]

    def _normswap_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The folded normalisation: identity."""
        return x


def is_grafted(m: nn.Module) -> bool:
    """A module made by :func:`graft` (a grafted norm or a remainder)."""
    return isinstance(m, (GraftedNorm, GraftRemainder))


def norm_reads_input(m: nn.Module) -> bool:
    """Whether a grafted norm normalises its forward's input directly (nothing before it):
    only then may it fold into the layer that produces that input."""
    return bool(getattr(m, "_graft_norm_reads_input", False))


def _no_check(_x: Any) -> None:
    """Stand-in for BatchNorm's input-dim check while tracing."""


def _trace_owner(owner: nn.Module, training: bool) -> fx.GraphModule:
    """Trace ``owner``'s own forward (through ``super().forward`` too) in one mode."""
    from ..capture._tracers import NormTracer

    class _OwnerTracer(NormTracer):
        def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
            return super().is_leaf_module(m, qualified_name) if m is not owner else False

    with ModuleStateGuard(owner):
        owner.train(training)
        if hasattr(owner, "_check_input_dim"):
            owner._check_input_dim = _no_check  # type: ignore[method-assign]
        tracer = _OwnerTracer(bn_subclasses="inline")
        graph = tracer.trace(owner)
        gm = fx.GraphModule(tracer.root, graph, type(owner).__name__)
    return gm


def _structure(graph: fx.Graph) -> list[tuple[str, str]]:
    """The ops of a graph, without BatchNorm bookkeeping (state reads, counters, the BN call)."""
    out: list[tuple[str, str]] = []
    bn = set(functional_batch_norm_nodes(graph))
    for n in graph.nodes:
        if n.op in ("get_attr", "placeholder", "output") or n in bn:
            continue
        if any(a.op == "get_attr" and str(a.target).rpartition(".")[2] in _BN_STATE
               for a in n.all_input_nodes):
            continue
        out.append((n.op, str(getattr(n.target, "__name__", n.target))))
    return out


def _replace_norm_call(gm: fx.GraphModule, owner: nn.Module, path: str) -> bool:
    """Replace the owner's one batch-norm call by ``self._normswap_norm(x)`` (in place).

    Returns:
        Whether the normalised value is the forward's first input itself.
    """
    nodes = functional_batch_norm_nodes(gm.graph)
    if len(nodes) != 1:
        raise UnsupportedNodeError(
            f"'{path}' ({type(owner).__name__}): its forward calls batch_norm {len(nodes)} "
            "times; only one call can be grafted. Pass leaf_modules=[...] naming it and swap "
            "it by hand")
    node = nodes[0]
    x = batch_norm_args(node)["input"]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    reads_input = bool(placeholders) and x is placeholders[0]
    gm.add_submodule(NORM_CALL, nn.Identity())  # lets the graph lint; code calls the method
    with gm.graph.inserting_after(node):
        call = gm.graph.call_module(NORM_CALL, (x,))
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    return reads_input


def _make_forward(gm: fx.GraphModule) -> tuple[str, dict[str, Any], Any]:
    code = gm.graph.python_code(root_module="self")
    namespace: dict[str, Any] = dict(code.globals)
    exec(compile(code.src, f"<normswap graft {gm.__class__.__name__}>", "exec"), namespace)
    return code.src, code.globals, namespace["forward"]


def _norm_method(base: type) -> Any:
    def _normswap_norm(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return base.forward(self, x)

    _normswap_norm.__doc__ = f"The replacement normalisation ({base.__name__}.forward)."
    return _normswap_norm


def _grafted_class(base: type, owner_cls: type, src: str, forward: Any,
                   globals_: dict[str, Any], reads_input: bool) -> type:
    key = (base, owner_cls, src)
    cls = _CLASSES.get(key)
    if cls is None:
        if base is GraftRemainder:
            name, bases = f"{owner_cls.__name__}[folded]", (GraftRemainder,)
            extra: dict[str, Any] = {"_graft_norm_reads_input": reads_input}
        else:
            name, bases = f"{base.__name__}[{owner_cls.__name__}]", (GraftedNorm, base)
            extra = {NORM_CALL: _norm_method(base), "_graft_norm_reads_input": reads_input}
        cls = type(name, bases, {"forward": forward, "__module__": base.__module__,
                                 "_graft_owner": owner_cls, "_graft_src": src,
                                 "_graft_globals": globals_, "__doc__":
                                 f"{name}: {owner_cls.__name__}.forward with its batch_norm "
                                 f"call {'removed (folded)' if base is GraftRemainder else 'replaced by ' + base.__name__}.",
                                 **extra})
        _CLASSES[key] = cls
    return cls


def carry_extras(owner: nn.Module, new: nn.Module) -> None:
    """Move the owner's children and non-BN parameters/buffers onto ``new`` (only the
    children of an earlier graft: its own state is the old normalisation's)."""
    for name, child in owner.named_children():
        new.add_module(name, child)
    if is_grafted(owner):
        return
    for name, p in owner.named_parameters(recurse=False):
        if name not in _BN_STATE and not hasattr(new, name):
            new.register_parameter(name, p)
    for name, b in owner.named_buffers(recurse=False):
        if name not in _BN_STATE and not hasattr(new, name):
            new.register_buffer(name, b)


def _owner_code(owner: nn.Module, path: str) -> tuple[type, str, dict[str, Any], Any, bool, str]:
    """``(owner class, source, globals, forward, reads_input, note)`` of a BN subclass's forward
    with its batch-norm call replaced (traced now, or taken from an earlier graft)."""
    if is_grafted(owner):
        namespace: dict[str, Any] = dict(owner._graft_globals)
        exec(compile(owner._graft_src, f"<normswap graft {owner._graft_owner.__name__}>",
                     "exec"), namespace)
        return (owner._graft_owner, owner._graft_src, owner._graft_globals,
                namespace["forward"], norm_reads_input(owner), "")
    try:
        gm = _trace_owner(owner, training=False)
    except Exception as exc:  # noqa: BLE001 - reported with the remedy
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedNodeError(
            f"'{path}' ({type(owner).__name__}): its forward cannot be traced to keep its "
            f"extra behaviour ({type(exc).__name__}: {first}); make it traceable or swap it "
            "by hand") from exc
    note = ""
    try:
        train_gm = _trace_owner(owner, training=True)
        if _structure(train_gm.graph) != _structure(gm.graph):
            note = (f"{type(owner).__name__}.forward takes another branch in train mode; the "
                    "eval-mode branch is kept")
    except Exception:  # noqa: BLE001 - only the remark is lost
        note = ""
    reads_input = _replace_norm_call(gm, owner, path)
    src, globals_, forward = _make_forward(gm)
    return type(owner), src, globals_, forward, reads_input, note


def graft(owner: nn.Module, norm: nn.Module | None, *, path: str = "") -> tuple[nn.Module, str]:
    """Build the replacement of a BN subclass ``owner`` (see the module docstring).

    Args:
        owner: the BatchNorm subclass instance with its own forward, or a module made by an
            earlier graft (its code is reused: e.g. folding an ``L1BatchNorm2d[BatchNormAct2d]``).
        norm: its replacement normalisation (built from ``owner`` by a method's factory, or a
            ``ChannelAffine``), or None for the remainder after folding.
        path: the owner's qualified name, for messages.

    Returns:
        ``(module, note)``: the grafted module and a remark for the report ("" if none).

    Raises:
        UnsupportedNodeError: the owner's forward cannot be traced or calls batch_norm more
            than once.
    """
    owner_cls, src, globals_, forward, reads_input, note = _owner_code(owner, path)
    base = GraftRemainder if norm is None else type(norm)
    cls = _grafted_class(base, owner_cls, src, forward, globals_, reads_input)
    if norm is None:
        new: nn.Module = cls()
        new.train(owner.training)
    else:
        new = norm
        new.__class__ = cls
    carry_extras(owner, new)
    return new, note
