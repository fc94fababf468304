"""Capture a model's graph: strategies tried in order, every attempt recorded.

:func:`capture` turns a model (the API's private copy) into one or more *regions*: a region is
a submodule (``""`` for the whole model) with a ``torch.fx`` GraphModule that computes exactly
what that submodule computes. Strategies, in order, each checked against the module's real
output on the example inputs before it is accepted:

1. ``"fx"`` -- plain ``torch.fx`` symbolic tracing (:class:`~normswap.capture._tracers.
   NormTracer`), which keeps the module structure; timm's no-trace registry and the user's
   ``leaf_modules`` are honoured;
2. ``"fx-shape"`` -- shape-aware tracing driven by the example input
   (:class:`~normswap.capture._tracers.ValueTracer`): control flow and asserts on shapes
   resolve, data-dependent control flow still fails;
3. ``"export"`` -- ``torch.export`` (non-strict), lifted back to module calls
   (:mod:`normswap.capture._export`).

When the whole model cannot be captured, its children are captured instead, recursively
(``"regions"``): a detection model's backbone and heads are captured even where the glue
between them (NMS, loops over images) is data-dependent. A leaf module that hides
BatchNorms (a registry leaf such as timm's ``MobileVitBlock``) is captured as a region of its
own inside its parent's graph. BatchNorms that no region reaches are *uncovered*; the API
replaces them by walking the module tree (``"module-walk"``), the last resort.

Every submodule's inputs are recorded on one real forward run (forward pre-hooks), which gives
the shape-aware tracer and ``torch.export`` their example inputs at every level. Nothing is
left behind: every run, trace and export happens inside
:class:`~normswap._modules.ModuleStateGuard` (a detection head that caches a Proxy or an
anchor grid of FakeTensors gets its attributes back).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .._modules import ModuleStateGuard
from ..errors import NormswapError
from ..passes._match import (
    batch_norm_args,
    functional_batch_norm_nodes,
    is_batchnorm,
    is_normswap_layer,
)
from ..passes._infra import cleanup
from ..progress import stage
from ._export import export_graph
from ._guard import SpecialisationGuard, build_guard, frame_location
from ._tracers import BnSubclasses, NormTracer, ValueTracer, trace

__all__ = ["capture", "Capture", "Region", "Attempt", "CaptureInputError", "STRATEGIES",
           "record_calls", "trace", "NormTracer", "ValueTracer", "outputs_match",
           "unspecified_defaults"]

log = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = ("fx", "fx-shape", "export")


class CaptureInputError(NormswapError):
    """The example inputs do not run through the model."""


@dataclass
class Attempt:
    """One failed capture attempt."""

    path: str
    strategy: str
    error: str
    culprit: str = ""
    culprit_type: str = ""
    location: str = ""

    def describe(self) -> str:
        where = f" in '{self.culprit}' ({self.culprit_type})" if self.culprit else ""
        at = f" at {self.location}" if self.location else ""
        return f"{self.strategy} on '{self.path or '<model>'}'{where}{at}: {self.error}"


@dataclass
class Region:
    """A captured submodule.

    Attributes:
        path: qualified name of the submodule in the captured model (``""`` = the whole model).
        gm: the graph module computing what the submodule computes.
        strategy: ``"fx"``, ``"fx-shape"`` or ``"export"``.
        specialised: where a concrete shape decided control flow (fx-shape only).
        checked: whether the graph was checked against the module's real output.
        guard: checks at run time that inputs take the branches ``specialised`` lists (for a
            graph that replaces the module; None when nothing was specialised).
    """

    path: str
    gm: fx.GraphModule
    strategy: str
    specialised: list[str] = field(default_factory=list)
    checked: bool = False
    guard: SpecialisationGuard | None = None


@dataclass
class Capture:
    """The regions of a model, the failed attempts, and what each module was called with.

    Attributes:
        root: the captured model (the API's private copy).
        regions: captured regions, outermost first (a region may sit inside another one's
            graph as a leaf call).
        attempts: every failed attempt, in order.
        calls: module path -> ``(args, kwargs)`` of its first call on the example inputs.
        output: the model's output on the example inputs (None when no inputs were given).
    """

    root: nn.Module
    regions: list[Region] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)
    output: Any = None

    @property
    def strategy(self) -> str:
        """How the model was captured: a strategy name for the whole model, ``"regions"``
        for submodules, ``"module-walk"`` when nothing could be captured."""
        for r in self.regions:
            if r.path == "":
                return r.strategy
        return "regions" if self.regions else "module-walk"

    def covered(self) -> set[str]:
        """Module paths that some region's graph calls, or whose functional batch norm it holds."""
        out: set[str] = set()
        for r in self.regions:
            prefix = f"{r.path}." if r.path else ""
            for node in r.gm.graph.nodes:
                if node.op == "call_module":
                    out.add(prefix + str(node.target))
            for node in functional_batch_norm_nodes(r.gm.graph):
                owner = _functional_owner(node)
                if owner:
                    out.add(prefix + owner)
        return out

    def uncovered_batchnorms(self) -> list[str]:
        """BatchNorm modules that no region reaches (they need the module walk)."""
        covered = self.covered()
        return [n for n, m in self.root.named_modules()
                if n and is_batchnorm(m) and n not in covered]

    def summary(self) -> dict[str, Any]:
        """JSON-friendly record for the report's metrics."""
        return {
            "strategy": self.strategy,
            "culprits": sorted({a.culprit for a in self.attempts if a.path == "" and a.culprit}),
            "regions": {r.path or "<model>": r.strategy for r in self.regions},
            "failed_attempts": [a.describe() for a in self.attempts],
            "specialised": {r.path or "<model>": r.specialised for r in self.regions
                            if r.specialised},
        }


def _functional_owner(node: fx.Node) -> str:
    """The module that owns the running statistics of a functional batch-norm node."""
    args = batch_norm_args(node)
    targets = [str(a.target) for a in (args["running_mean"], args["running_var"])
               if isinstance(a, fx.Node) and a.op == "get_attr"]
    owners = {t.rpartition(".")[0] for t in targets}
    return owners.pop() if len(owners) == 1 else ""


# -- recording the example run -------------------------------------------------------------------
def record_calls(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[Any, dict[str, tuple[tuple[Any, ...], dict[str, Any]]]]:
    """Run ``model`` once (eval, no grad) and record every module's first-call inputs.

    Returns:
        ``(output, calls)``.

    Raises:
        CaptureInputError: the inputs do not run through the model.
    """
    calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    handles = []

    def hook(name: str) -> Any:
        def pre(_m: nn.Module, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
            calls.setdefault(name, (tuple(a), dict(kw)))
        return pre

    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(hook(name), with_kwargs=True))
    from ..verify import run_reference  # the reference the verification reuses

    try:
        with ModuleStateGuard(model), torch.no_grad():
            output = run_reference(model, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - reported as unusable inputs
        raise CaptureInputError(
            f"the example inputs do not run through {type(model).__name__}: "
            f"{type(exc).__name__}: {_first_line(exc)}") from exc
    finally:
        for h in handles:
            h.remove()
    return output, calls


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _culprit(exc: BaseException, root: nn.Module, prefix: str = "") -> tuple[str, str]:
    """``(qualified name, class)`` of the innermost submodule of ``root`` whose forward was
    running when ``exc`` was raised (``("", "")`` when none is found or it is the root)."""
    names = {id(m): n for n, m in root.named_modules()}
    found: tuple[str, str] = ("", "")
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        obj = frame.f_locals.get("self")
        if isinstance(obj, nn.Module) and id(obj) in names and names[id(obj)]:
            found = (f"{prefix}.{names[id(obj)]}" if prefix else names[id(obj)],
                     type(obj).__name__)
    cause = exc.__cause__ or exc.__context__
    if not found[0] and cause is not None and cause is not exc:
        return _culprit(cause, root, prefix)
    return found


def _model_location(exc: BaseException) -> str:
    """``file:line (function)`` of the innermost frame of model code (not torch's, not
    normswap's) that was running when ``exc`` was raised; ``""`` when there is none."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        found = ""
        for frame, lineno in traceback.walk_tb(exc.__traceback__):
            found = frame_location(frame, lineno) or found
        if found:
            return found
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return ""


def unspecified_defaults(module: nn.Module, args: tuple[Any, ...],
                         kwargs: dict[str, Any]) -> dict[str, Any]:
    """Forward parameters the example does not give, with their defaults (``mask=None``):
    fixed as concrete arguments, so ``if mask is not None`` does not trace a Proxy."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    out: dict[str, Any] = {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for i, p in enumerate(positional):
        if i < len(args) or p.name in kwargs:
            continue
        if p.default is not inspect.Parameter.empty:
            out[p.name] = p.default
    for p in params:
        if p.kind is p.KEYWORD_ONLY and p.name not in kwargs and p.default is not p.empty:
            out[p.name] = p.default
    return out


# -- checking a capture --------------------------------------------------------------------------
def outputs_match(a: Any, b: Any, rtol: float = 1e-5) -> tuple[bool, str]:
    """Whether two outputs have the same structure and (nearly) the same tensors."""
    from torch.utils import _pytree as pytree

    try:
        la, sa = pytree.tree_flatten(a)
        lb, sb = pytree.tree_flatten(b)
    except Exception as exc:  # noqa: BLE001 - an output pytree cannot flatten
        return False, f"outputs cannot be compared: {exc}"
    if len(la) != len(lb):
        return False, f"{len(la)} output leaves vs {len(lb)}"
    for i, (x, y) in enumerate(zip(la, lb)):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False, f"output leaf {i}: tensor vs {type(y).__name__}"
        if not isinstance(x, torch.Tensor):
            if x != y and not (x is None and y is None):
                return False, f"output leaf {i}: {x!r} vs {y!r}"
            continue
        if x.shape != y.shape:
            return False, f"output leaf {i}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return False, f"output leaf {i}: values differ"
            continue
        xd, yd = x.detach().double(), y.detach().double()
        same_nonfinite = torch.equal(torch.isfinite(xd), torch.isfinite(yd))
        if not same_nonfinite:
            return False, f"output leaf {i}: non-finite values differ"
        fin = torch.isfinite(yd)
        if fin.any():
            diff = (xd[fin] - yd[fin]).abs().max().item()
            scale = yd[fin].abs().max().item()
            if diff > rtol * max(scale, 1e-12):
                return False, f"output leaf {i}: relative error {diff / max(scale, 1e-12):.3g}"
    return True, ""


# -- strategies ----------------------------------------------------------------------------------
def _tracer_kwargs(leaf_modules: Sequence[str | type], bn_subclasses: BnSubclasses
                   ) -> dict[str, Any]:
    return {"leaf_modules": leaf_modules, "bn_subclasses": bn_subclasses}


@contextlib.contextmanager
def _unwrapped_forward(module: nn.Module) -> Iterator[None]:
    """Trace the function a decorated ``forward`` wraps (Hugging Face wraps ``forward`` in
    ``def wrapper(self, *args, **kwargs)``, which fx cannot trace through); the capture check
    against the real module decides whether the unwrapped code computes the same."""
    cls = type(module)
    original = cls.__dict__.get("forward")
    unwrapped = inspect.unwrap(cls.forward)
    if unwrapped is cls.forward:
        yield
        return
    cls.forward = unwrapped  # type: ignore[method-assign]
    try:
        yield
    finally:
        if original is None:
            del cls.forward
        else:
            cls.forward = original  # type: ignore[method-assign]


def _fx(module: nn.Module, args: tuple[Any, ...] | None, kwargs: dict[str, Any],
        leaf_modules: Sequence[str | type], bn_subclasses: BnSubclasses
        ) -> tuple[fx.GraphModule, list[str]]:
    concrete = unspecified_defaults(module, args or (), kwargs) if args is not None else None
    with _unwrapped_forward(module):
        return trace(module, leaf_modules, bn_subclasses=bn_subclasses,
                     concrete_args=concrete or None), []


def _fx_shape(module: nn.Module, args: tuple[Any, ...] | None, kwargs: dict[str, Any],
              leaf_modules: Sequence[str | type], bn_subclasses: BnSubclasses
              ) -> tuple[fx.GraphModule, list[str]]:
    if args is None:
        raise CaptureInputError("shape-aware tracing needs example inputs")
    tracer = ValueTracer(args, kwargs, **_tracer_kwargs(leaf_modules, bn_subclasses))
    concrete = unspecified_defaults(module, args, kwargs)
    with _unwrapped_forward(module):
        graph = tracer.trace(module, concrete_args=concrete or None)
    # a pickled GraphModule re-traces its code with its tracer class, built without arguments:
    # the plain NormTracer (the values are not needed to re-trace generated code)
    graph._tracer_cls = NormTracer
    gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
    gm.train(module.training)
    spec = sorted({f"{name}: {what}" for name, what in tracer.specialised})
    if tracer.guards:
        gm.meta["normswap_guard"] = build_guard(tracer.root, graph, tracer.guards, args, kwargs,
                                                type(module).__name__)
    return gm, spec


def _export(module: nn.Module, args: tuple[Any, ...] | None, kwargs: dict[str, Any],
            leaf_modules: Sequence[str | type], bn_subclasses: BnSubclasses
            ) -> tuple[fx.GraphModule, list[str]]:
    if args is None:
        raise CaptureInputError("torch.export needs example inputs")
    leaf_rule = NormTracer(leaf_modules, bn_subclasses=bn_subclasses)
    hidden = _hides_batchnorm

    def lift(m: nn.Module, qual: str) -> bool:
        return leaf_rule.is_leaf_module(m, qual) and not hidden(m)

    return export_graph(module, args, kwargs, lift), []


_STRATEGY_FN = {"fx": _fx, "fx-shape": _fx_shape, "export": _export}


def _is_norm(m: nn.Module) -> bool:
    """A BatchNorm, or a normswap layer that normalises (it has an eval-mode affine)."""
    return is_batchnorm(m) or (is_normswap_layer(m) and hasattr(m, "eval_scale_shift"))


def _hides_batchnorm(m: nn.Module) -> bool:
    """A module that is no norm itself with norms inside (a leaf would hide them from the
    graph)."""
    if _is_norm(m) or is_normswap_layer(m):
        return False
    return any(_is_norm(s) for s in m.modules() if s is not m)


def capture(model: nn.Module, args: tuple[Any, ...] | None, kwargs: dict[str, Any] | None
            = None, *, leaf_modules: Sequence[str | type] = (),
            bn_subclasses: BnSubclasses = "leaf",
            strategies: Sequence[str] = STRATEGIES, max_depth: int = 8) -> Capture:
    """Capture ``model`` (see the module docstring).

    Args:
        model: the model (a private copy: its state is restored after every attempt).
        args: positional example inputs; None captures symbolically only (strategy "fx",
            unchecked).
        kwargs: keyword example inputs.
        leaf_modules: qualified names or classes of modules not to trace into.
        bn_subclasses: ``"leaf"`` (BN subclasses with their own forward stay one call, for
            module-level swaps) or ``"inline"`` (their ``F.batch_norm`` appears in the graph).
        strategies: the strategies to try, in order.
        max_depth: how deep regions are searched.

    Returns:
        The :class:`Capture`.

    Raises:
        CaptureInputError: the example inputs do not run through the model.
        ValueError: an unknown strategy.
    """
    unknown = [s for s in strategies if s not in _STRATEGY_FN]
    if unknown:
        raise ValueError(f"unknown capture strategies {unknown}; choose from {list(STRATEGIES)}")
    kwargs = dict(kwargs or {})
    result = Capture(root=model)
    if args is not None:
        with stage("record example run"):
            result.output, result.calls = record_calls(model, args, kwargs)
    else:
        result.calls = {}
    _capture_module(result, "", model, args, kwargs, leaf_modules, bn_subclasses, strategies,
                    max_depth)
    return result


def _module_inputs(result: Capture, path: str, top_args: tuple[Any, ...] | None,
                   top_kwargs: dict[str, Any]) -> tuple[tuple[Any, ...] | None, dict[str, Any]]:
    if path == "":
        return top_args, top_kwargs
    if path in result.calls:
        a, kw = result.calls[path]
        return a, kw
    return None, {}


def _try_strategies(result: Capture, path: str, module: nn.Module,
                    args: tuple[Any, ...] | None, kwargs: dict[str, Any],
                    leaf_modules: Sequence[str | type], bn_subclasses: BnSubclasses,
                    strategies: Sequence[str]) -> Region | None:
    reference = result.output if path == "" else None
    for name in strategies:
        if args is None and name != "fx":
            continue
        label = path or type(module).__name__
        try:
            with stage(f"capture {label}", name), ModuleStateGuard(result.root), _quiet():
                gm, spec = _STRATEGY_FN[name](module, args, kwargs, _relative(leaf_modules, path),
                                             bn_subclasses)
                guard = gm.meta.pop("normswap_guard", None)
                cleanup(gm)
                checked = False
                if args is not None:
                    with torch.no_grad():
                        if reference is None:
                            reference = module(*args, **kwargs)
                        got = _run_with_shapes(gm, args, kwargs)
                    ok, why = outputs_match(got, reference)
                    if not ok:
                        raise _Mismatch(f"the captured graph does not reproduce the module's "
                                        f"output ({why})")
                    checked = True
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, next strategy
            result.attempts.append(Attempt(path, name, f"{type(exc).__name__}: "
                                           f"{_first_line(exc)}", *_culprit(exc, module, path),
                                           location=_model_location(exc)))
            log.debug("capture %s with %s failed: %s", path or "<model>", name, exc)
            continue
        return Region(path, gm, name, spec, checked, guard)
    return None


def _run_with_shapes(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run ``gm`` on the example, recording every node's output shape (``tensor_meta``) when
    the graph's placeholders take the inputs positionally."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not kwargs and len(placeholders) == len(args):
        try:
            return ShapeProp(gm).propagate(*args)
        except Exception as exc:  # noqa: BLE001 - shapes are a bonus; the plain run decides
            log.debug("shape propagation failed: %s", exc)
    return gm(*args, **kwargs)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep torch's own logs and warnings of a failing trace/export off the user's console
    (the failure is recorded in the report instead)."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.export", "torch._dynamo",
                                               "torch.fx", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class _Mismatch(Exception):
    """A captured graph that does not reproduce its module."""


def _relative(leaf_modules: Sequence[str | type], path: str) -> list[str | type]:
    """Leaf names relative to ``path`` (classes pass through)."""
    out: list[str | type] = []
    prefix = f"{path}." if path else ""
    for x in leaf_modules:
        if isinstance(x, str):
            if not path:
                out.append(x)
            elif x.startswith(prefix):
                out.append(x[len(prefix):])
        else:
            out.append(x)
    return out


def _capture_module(result: Capture, path: str, module: nn.Module,
                    top_args: tuple[Any, ...] | None, top_kwargs: dict[str, Any],
                    leaf_modules: Sequence[str | type], bn_subclasses: BnSubclasses,
                    strategies: Sequence[str], depth: int) -> None:
    args, kwargs = _module_inputs(result, path, top_args, top_kwargs)
    region = _try_strategies(result, path, module, args, kwargs, leaf_modules, bn_subclasses,
                             strategies)
    if region is not None:
        result.regions.append(region)
        _capture_hidden(result, region, top_args, top_kwargs, leaf_modules, bn_subclasses,
                        strategies, depth)
        return
    if depth <= 0:
        return
    for name, child in module.named_children():
        q = f"{path}.{name}" if path else name
        if not _worth_capturing(child):
            continue
        _capture_module(result, q, child, top_args, top_kwargs, leaf_modules, bn_subclasses,
                        strategies, depth - 1)


def _worth_capturing(m: nn.Module) -> bool:
    """A module that holds (or is) a BatchNorm, or has buffers a functional batch norm may use."""
    if _is_norm(m):
        return False  # the module walk replaces (or grafts) a norm without a graph
    return any(_is_norm(s) for s in m.modules()) or any(True for _ in m.buffers())


def _capture_hidden(result: Capture, region: Region, top_args: tuple[Any, ...] | None,
                    top_kwargs: dict[str, Any], leaf_modules: Sequence[str | type],
                    bn_subclasses: BnSubclasses, strategies: Sequence[str], depth: int) -> None:
    """Capture leaf calls of ``region`` that hide BatchNorms (registry or user leaves)."""
    prefix = f"{region.path}." if region.path else ""
    seen: set[str] = set()
    for node in region.gm.graph.nodes:
        if node.op != "call_module":
            continue
        target = str(node.target)
        if target in seen:
            continue
        seen.add(target)
        sub = region.gm.get_submodule(target)
        if _hides_batchnorm(sub) and depth > 0:
            _capture_module(result, prefix + target, sub, top_args, top_kwargs, leaf_modules,
                            bn_subclasses, strategies, depth - 1)
