"""Run-time guards for graphs that shape-aware tracing specialised to the example's shapes.

Shape-aware tracing (:class:`~normswap.capture._tracers.ValueTracer`) lets a concrete shape
decide Python control flow: ``if x.shape[1] != 3``, ``len(images)``, ``for img in images``, a
shape used as a slice bound. The graph then holds for inputs that take the same branches only. A
conversion that keeps the model's own class (a module-level swap) never runs that graph; one that
returns the graph (Kalman priors, folds, BWN, NormProp) does, and on inputs that would have
taken another branch it would fail somewhere deep inside, or compute something else.

A :class:`SpecialisationGuard` is the first call of such a returned graph. For every input
signature (the shapes and dtypes of the tensor arguments) it has not seen, it recomputes the
values that decided control flow -- on the ``meta`` device, so no arithmetic runs and no weight
is copied -- and compares them with the values recorded while tracing. Same values: the call
proceeds (and the signature is remembered). Different values:
:class:`~normswap.errors.SpecialisedGraphError`
names the places and the remedy. A value the meta device cannot compute leaves the call
unchecked, with a warning.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import warnings
from types import FrameType
from typing import Any, Iterable, Sequence

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..errors import SpecialisedGraphError

__all__ = ["SpecialisationGuard", "fingerprint", "build_guard", "install_guard",
           "frame_location", "caller_location"]

log = logging.getLogger(__name__)

_MAX_SIGNATURES = 64


_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                      for m in (torch, sys.modules[__name__.split(".")[0]])
                      if getattr(m, "__file__", None))


def frame_location(frame: FrameType, lineno: int | None = None) -> str:
    """``file:line (Class.function)`` of a frame of model code; ``""`` for torch's and
    normswap's own frames."""
    path = frame.f_code.co_filename
    if path.startswith("<") or path.startswith(_LIBRARY_DIRS):
        return ""
    owner = frame.f_locals.get("self")
    func = frame.f_code.co_name
    if isinstance(owner, nn.Module):
        func = f"{type(owner).__name__}.{func}"
    return f"{_short_path(path)}:{frame.f_lineno if lineno is None else lineno} ({func})"


def caller_location() -> str:
    """The innermost frame of model code on the current stack (see :func:`frame_location`)."""
    frame = sys._getframe(1)
    while frame is not None:
        where = frame_location(frame)
        if where:
            return where
        frame = frame.f_back  # type: ignore[assignment]
    return ""


def _short_path(path: str) -> str:
    """``path`` from its package root (``torchvision/models/detection/ssd.py``)."""
    parts = path.split(os.sep)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return "/".join(parts[parts.index(marker) + 1:])
    return path


def fingerprint(what: str, value: Any) -> Any:
    """The part of ``value`` that decided control flow, for a place of kind ``what``."""
    if what == "control flow":
        return bool(value)
    if what in ("iteration", "len()"):
        return len(value)
    if what == "used as an index":
        return int(value)
    if what == "keys()":
        return tuple(value.keys())
    raise ValueError(f"unknown specialisation kind {what!r}")


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """Shapes and dtypes of the tensor leaves and types of the others; None while tracing
    (fake, functional or proxy values: the tracer handles shapes itself)."""
    out: list[Any] = []
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor):
            if type(leaf) not in (torch.Tensor, nn.Parameter):
                return None
            out.append((tuple(leaf.shape), leaf.dtype))
        elif isinstance(leaf, fx.Proxy):
            return None
        else:
            out.append(type(leaf).__name__)
    return tuple(out)


def _to_meta(obj: Any) -> Any:
    def conv(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        return t
    return pytree.tree_map(conv, obj)


def _meta_copy(obj: Any) -> Any:
    """A copy of a module (or tensor) whose tensors live on the meta device (no data copied)."""
    if isinstance(obj, torch.Tensor):
        meta = torch.empty_like(obj, device="meta")
        return nn.Parameter(meta, obj.requires_grad) if isinstance(obj, nn.Parameter) else meta
    if not isinstance(obj, nn.Module):
        return copy.deepcopy(obj)
    memo: dict[int, Any] = {}
    for t in [*obj.parameters(), *obj.buffers()]:
        memo[id(t)] = _meta_copy(t)
    return copy.deepcopy(obj, memo)


class SpecialisationGuard(nn.Module):
    """Checks that inputs take the captured graph's branches (module docstring).

    Called by the first node of the converted graph with the graph's inputs; returns None. It
    holds no parameters or buffers (the state dict is unchanged) and keeps its recomputing graph
    outside the module tree, on the meta device (``.to()`` leaves it there).

    Args:
        graph: a graph module computing the deciding values from the forward's inputs (its
            modules and attributes moved to the meta device by :func:`install_guard`).
        places: ``(where, kind, expected fingerprint)`` per output of ``graph``; ``where`` is
            the source location in the model's code (the node's name when unknown).
        example: the signature of the example the graph was traced on (known good).
        example_shapes: the example's tensor shapes, for messages.
        owner: the model's class name, for messages.
    """

    _is_impure = True  # a call whose output nobody uses: dead-code removal must keep it

    def __init__(self, graph: fx.GraphModule, places: Sequence[tuple[str, str, Any]],
                 example: tuple[Any, ...] | None, example_shapes: list[tuple[int, ...]],
                 owner: str) -> None:
        super().__init__()
        object.__setattr__(self, "graph", graph)  # not a submodule: no state, no .to()
        self.places = list(places)
        self.example_shapes = example_shapes
        self.owner = owner
        self.checked: set[tuple[Any, ...]] = {example} if example is not None else set()

    def forward(self, *args: Any, **kwargs: Any) -> None:
        if torch.compiler.is_compiling() or torch.jit.is_scripting():
            return None
        sig = _signature(args, kwargs)
        if sig is None or sig in self.checked:
            return None
        differs = self.differences(args, kwargs)
        if differs:
            shapes = [tuple(t.shape) for t in pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)]
            listed = "; ".join(f"{what} at {n}: traced with {want!r}, these inputs give {got!r}"
                               for n, what, want, got in differs[:4])
            more = f" (and {len(differs) - 4} more)" if len(differs) > 4 else ""
            raise SpecialisedGraphError(
                f"this converted {self.owner} is a graph that shape-aware tracing specialised "
                f"to the example inputs' shapes {self.example_shapes}; the inputs given "
                f"(shapes {shapes}) take another branch of the model's code: {listed}{more}. "
                "Convert again with example_inputs shaped like the inputs you will run (for "
                "kalman, priors=False keeps the model's own class, which takes any shape)")
        if len(self.checked) < _MAX_SIGNATURES:
            self.checked.add(sig)
        return None

    def differences(self, args: tuple[Any, ...], kwargs: dict[str, Any]
                    ) -> list[tuple[str, str, Any, Any]] | None:
        """The places whose value differs on these inputs; None when it cannot be computed."""
        try:
            with torch.no_grad():
                values = self.graph(*_to_meta(args), **_to_meta(kwargs))
            got = [fingerprint(what, v) for (_, what, _), v in zip(self.places, values)]
        except Exception as exc:  # noqa: BLE001 - cannot decide: warn, let the call run
            warnings.warn(
                f"normswap: could not check that these inputs take the branches the converted "
                f"{self.owner}'s graph was specialised to ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); if "
                "the call fails or its output looks wrong, convert again with example_inputs "
                "shaped like these inputs", RuntimeWarning, stacklevel=3)
            return None
        return [(name, what, want, g) for (name, what, want), g in zip(self.places, got)
                if g != want]

    def extra_repr(self) -> str:
        return f"{len(self.places)} shape-decided place(s)"


def build_guard(root: nn.Module, graph: fx.Graph,
                places: Iterable[tuple[fx.Node, str, Any, str]], example_args: tuple[Any, ...],
                example_kwargs: dict[str, Any], owner: str) -> SpecialisationGuard | None:
    """A guard recomputing the values at ``places`` of ``graph`` (traced from ``root``).

    Args:
        root: the traced module.
        graph: its graph, before dead code is removed (the deciding nodes are still there).
        places: ``(node, kind, fingerprint, source location)`` for each place a value decided
            control flow.
        example_args: the example the graph was traced on.
        example_kwargs: its keyword part.
        owner: the model's class name, for messages.

    Returns:
        The guard (its graph still shares ``root``'s modules until :func:`install_guard`), or
        None when there is nothing to guard.
    """
    unique: dict[tuple[str, str], tuple[fx.Node, str, Any, str]] = {}
    for node, what, value, where in places:
        unique.setdefault((node.name, what), (node, what, value, where))
    if not unique:
        return None
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    new.graph_copy(graph, env)
    entries = list(unique.values())
    new.output(tuple(env[n] for n, _, _, _ in entries))
    gm = fx.GraphModule(root, new, f"{owner}Guard")
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    shapes = [tuple(t.shape) for t in pytree.tree_leaves((example_args, example_kwargs))
              if isinstance(t, torch.Tensor)]
    return SpecialisationGuard(gm, [(where or n.name, w, v) for n, w, v, where in entries],
                               _signature(example_args, example_kwargs), shapes, owner)


GUARD_NAME = "normswap_guard"


def _detach_weights(gm: fx.GraphModule) -> None:
    """Replace the modules and tensors ``gm`` calls or reads by meta-device copies (no data
    copied): the guard then holds no weight and ``.to()`` never has to move it."""
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        parent_path, _, name = str(node.target).rpartition(".")
        parent = gm.get_submodule(parent_path) if parent_path else gm
        value = getattr(parent, name)
        if isinstance(value, nn.Module):
            parent._modules[name] = _meta_copy(value)
        elif isinstance(value, nn.Parameter):
            parent._parameters[name] = _meta_copy(value)
        elif isinstance(value, torch.Tensor):
            if name in parent._buffers:
                parent._buffers[name] = _meta_copy(value)
            else:
                setattr(parent, name, _meta_copy(value))


def install_guard(gm: fx.GraphModule, guard: SpecialisationGuard) -> bool:
    """Make ``guard`` the first call of ``gm``'s graph (with every input); False when the
    forward takes ``*args``/``**kwargs`` (the inputs cannot be passed on one by one)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if any(str(p.target).startswith("*") for p in placeholders):
        return False
    # the meta copies are made here, for a guard that is used, not at every capture
    _detach_weights(guard.graph)
    name, i = GUARD_NAME, 0
    while hasattr(gm, name):  # a graph re-captured from a guarded one keeps the first guard
        i += 1
        name = f"{GUARD_NAME}_{i}"
    gm.add_submodule(name, guard)
    anchor = placeholders[-1] if placeholders else None
    ctx = gm.graph.inserting_after(anchor) if anchor is not None else \
        gm.graph.inserting_before(next(iter(gm.graph.nodes)))
    with ctx:
        gm.graph.call_module(name, tuple(placeholders))
    gm.recompile()
    return True
