"""The two ``torch.fx`` tracers of the capture layer.

:class:`NormTracer` is plain symbolic tracing with normswap's leaf rules: BatchNorms, normswap's
own layers and frozen BNs are leaves; BatchNorm subclasses that add behaviour in their own
``forward`` are either leaves (``bn_subclasses="leaf"``: a module-level swap grafts them) or
traced through (``"inline"``: their ``F.batch_norm`` call appears in the graph); modules and
functions of known no-trace registries (timm's ``timm.layers._fx``) and the user's
``leaf_modules`` stay leaves.

:class:`ValueTracer` is the shape-aware variant (the idea of torch.fx's meta tracer and of
Hugging Face's ``HFTracer``): every proxy also carries the concrete value the node takes on the
example input. The graph stays symbolic (``x.size(0)`` is still a node), but where Python needs
a concrete value -- ``if x.shape[-2:] != (32, 32)``, ``assert x.dim() == 4``, ``len(x)``,
``range(x.size(1))``, unpacking a shape -- the value is used. Only values that do not depend on
tensor *data* are used this way: ``bool()`` of a tensor still fails, exactly as in plain fx, and
so does any value computed after an op whose output shape or Python value is data (``nonzero``,
boolean-mask indexing, ``unique``, ``nms``, ``.item()``, ``.tolist()`` ...; the mark follows
every node computed from such a node), so data-dependent control flow is never frozen to the
example. Every place where a shape was used
to decide control flow is recorded (``tracer.specialised``), since the graph then holds for
inputs that take the same branches.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Iterable, Iterator

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate
from torch.nn.modules.batchnorm import _BatchNorm

from ..passes._match import LEAF_FUNCTIONS, is_frozen_batchnorm, is_normswap_layer, needs_graft
from ._guard import SpecialisationGuard, caller_location, fingerprint

__all__ = ["NormTracer", "ValueTracer", "notrace_registry", "trace", "BnSubclasses"]

log = logging.getLogger(__name__)

BnSubclasses = str  # "leaf" | "inline"
_NO_VALUE = object()


def notrace_registry() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    """Module classes and functions that known model zoos declare untraceable.

    timm's registry (``timm.layers._fx``) is read when timm is already imported (a timm model
    imports it); nothing is imported otherwise.

    Returns:
        ``(module_classes, functions)``.
    """
    classes: list[type] = []
    functions: list[Any] = []
    if "timm" in sys.modules:
        try:
            from timm.layers import _fx as timm_fx

            classes.extend(timm_fx.get_notrace_modules())
            functions.extend(timm_fx.get_notrace_functions())
        except Exception as exc:  # noqa: BLE001 - an old timm: no registry to honour
            log.debug("timm no-trace registry unavailable: %s", exc)
    return tuple(classes), tuple(functions)


def _no_check(_x: Any) -> None:
    """Stand-in for BatchNorm's input-dim check while tracing through a subclass."""


class NormTracer(fx.Tracer):
    """Symbolic tracer with normswap's leaf rules (see the module docstring).

    Args:
        leaf_modules: qualified names and/or classes of modules not to trace into.
        bn_subclasses: ``"leaf"`` or ``"inline"`` for BatchNorm subclasses with their own forward.
        leaf_functions: functions recorded as single ``call_function`` nodes.
    """

    def __init__(self, leaf_modules: Iterable[str | type] = (), *,
                 bn_subclasses: BnSubclasses = "inline",
                 leaf_functions: Iterable[Any] = ()) -> None:
        classes, functions = notrace_registry()
        super().__init__(autowrap_functions=tuple(functions) + tuple(LEAF_FUNCTIONS)
                         + tuple(leaf_functions), param_shapes_constant=True)
        leaves = list(leaf_modules)
        self.leaf_names = {x for x in leaves if isinstance(x, str)}
        self.leaf_types = tuple(x for x in leaves if isinstance(x, type)) + classes
        if bn_subclasses not in ("leaf", "inline"):
            raise ValueError(f"bn_subclasses must be 'leaf' or 'inline', got {bn_subclasses!r}")
        self.bn_subclasses = bn_subclasses

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if isinstance(m, _BatchNorm) and needs_graft(m):
            # a subclass calling super().forward() would branch on input.dim(): silence the
            # shape check on this instance while tracing through it
            m._check_input_dim = _no_check  # type: ignore[method-assign]
            try:
                return super().call_module(m, forward, args, kwargs)
            finally:
                del m._check_input_dim
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names:
            return True
        if is_normswap_layer(m) or isinstance(m, SpecialisationGuard):  # a guard stays a call
            return True
        if isinstance(m, _BatchNorm) or is_frozen_batchnorm(m):  # before any registry
            return self.bn_subclasses == "leaf" or not needs_graft(m)
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


class _ValueProxy(fx.Proxy):
    """A proxy that also holds the node's concrete value (``_value``) when known."""

    _value: Any = _NO_VALUE

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_value", "node", "tracer"):
            raise AttributeError(name)
        return _ValueAttribute(self, name)

    def __len__(self) -> int:
        value = self._value
        if value is _NO_VALUE or self.tracer.depends_on_data(self):  # type: ignore[attr-defined]
            return super().__len__()
        self.tracer.note_specialised(self, "len()")  # type: ignore[attr-defined]
        return len(value)

    def __index__(self) -> int:
        value = self._value
        if isinstance(value, (bool, int, torch.SymInt)) and not \
                self.tracer.depends_on_data(self):  # type: ignore[attr-defined]
            self.tracer.note_specialised(self, "used as an index")  # type: ignore[attr-defined]
            return int(value)
        raise fx.proxy.TraceError(f"'{self.node.name}' cannot be used as an integer while "
                                  "tracing")

    def __int__(self) -> int:
        return self.__index__()


class _ValueAttribute(_ValueProxy, fx.proxy.Attribute):
    """``proxy.attr`` whose value is ``getattr(value, attr)`` (a method or a property)."""

    def __init__(self, root: _ValueProxy, attr: str) -> None:
        fx.proxy.Attribute.__init__(self, root, attr)
        base = root._value
        try:
            self._value = getattr(base, attr) if base is not _NO_VALUE else _NO_VALUE
        except Exception:  # noqa: BLE001 - an unknown attribute: plain fx behaviour
            self._value = _NO_VALUE


@contextlib.contextmanager
def _unpatched_modules() -> Iterator[None]:
    """Run real modules while fx traces: fx patches ``nn.Module.__call__`` (and
    ``__getattr__``) for the duration of a trace, which would turn a concrete call into graph
    nodes."""
    from torch.fx import _symbolic_trace as st

    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__ = st._orig_module_call  # type: ignore[method-assign]
    nn.Module.__getattr__ = st._orig_module_getattr  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__call__ = call  # type: ignore[method-assign]
        nn.Module.__getattr__ = getattr_  # type: ignore[method-assign]


#: top-level packages whose functions never call an ``nn.Module``
_NO_MODULE_PACKAGES = frozenset({"torch", "_operator", "operator", "builtins", "math"})


def _may_call_modules(kind: str, target: Any, args: Any) -> bool:
    """Whether computing a node's value may run an ``nn.Module`` (then fx's patches must be
    lifted). Lifting them reassigns ``nn.Module.__call__``, which invalidates the type cache of
    every Module subclass loaded (thousands with timm or transformers imported: ~0.5 ms a
    time), so tensor methods and torch/operator functions run without it."""
    if kind == "call_method":
        return not (args and isinstance(args[0], torch.Tensor))
    if kind == "call_function":
        package = (getattr(target, "__module__", None) or "builtins").split(".")[0]
        return package not in _NO_MODULE_PACKAGES or isinstance(target, nn.Module)
    return True


#: ops whose output shape (or, for item/tolist, whose Python value) is tensor data
_DATA_SHAPED = frozenset({"nonzero", "nonzero_static", "masked_select", "unique",
                          "unique_consecutive", "argwhere", "nms", "batched_nms", "bincount",
                          "repeat_interleave", "item", "tolist", "masked_scatter"})


def _op_name(target: Any) -> str:
    name = getattr(target, "__name__", None) or str(target)
    return str(name).replace("::", ".").rsplit(".", 1)[-1]


def _shape_from_data(kind: str, target: Any, args: tuple[Any, ...]) -> bool:
    """Whether this op's output shape (or Python value) depends on its inputs' data."""
    if kind not in ("call_function", "call_method"):
        return False
    name = _op_name(target)
    if name in _DATA_SHAPED:
        return True
    if name == "where" and len(args) == 1:  # torch.where(cond): the indices of True
        return True
    if name in ("getitem", "__getitem__") and len(args) > 1:  # x[mask]: boolean indexing
        index = args[1] if isinstance(args[1], (tuple, list)) else (args[1],)
        return any(_bool_index(i) for i in index)
    return False


def _bool_index(i: Any) -> bool:
    value = getattr(i, "_value", i)
    return isinstance(value, torch.Tensor) and value.dtype == torch.bool


def _proxies(obj: Any) -> list[fx.Proxy]:
    found: list[fx.Proxy] = []

    def visit(a: Any) -> Any:
        if isinstance(a, fx.Proxy):
            found.append(a)
        return a

    map_aggregate(obj, visit)
    return found


def _depends_on_data(value: Any) -> bool:
    """A value that reflects tensor data (a tensor, or a container holding one)."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_depends_on_data(v) for v in value)
    if isinstance(value, dict):
        return any(_depends_on_data(v) for v in value.values())
    return False


class ValueTracer(NormTracer):
    """Shape-aware :class:`NormTracer`: proxies carry concrete values (module docstring).

    Args:
        example_inputs: positional values of the traced forward's parameters, in order.
        example_kwargs: keyword values (matched to placeholders by name).
        **kwargs: as :class:`NormTracer`.

    Attributes:
        specialised: ``(node name, what)`` for each place where a concrete shape decided
            control flow.
    """

    def __init__(self, example_inputs: tuple[Any, ...], example_kwargs: dict[str, Any] | None
                 = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._positional = list(example_inputs)
        self._keyword = dict(example_kwargs or {})
        self.specialised: list[tuple[str, str]] = []
        self.guards: list[tuple[fx.Node, str, Any, str]] = []
        self.data_dependent: set[fx.Node] = set()

    # -- proxies with values ---------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def depends_on_data(self, proxy: fx.Proxy) -> bool:
        """Whether ``proxy``'s value (a shape, a length, a number) depends on tensor *data*:
        it comes after an op whose output shape or value is data (``nonzero``, boolean-mask
        indexing, ``unique``, ``nms``, ``.item()`` ...). Such values never decide control
        flow: the graph would hold for the example's data only."""
        while isinstance(proxy, fx.proxy.Attribute):
            proxy = proxy.root
        return getattr(proxy, "node", None) in self.data_dependent

    def note_specialised(self, proxy: fx.Proxy, what: str, value: Any = _NO_VALUE) -> None:
        """Record that a concrete value decided control flow at ``proxy``'s node (and, for the
        run-time guard, the part of the value that decided it)."""
        self.specialised.append((proxy.node.name, what))
        if value is _NO_VALUE:
            value = getattr(proxy, "_value", _NO_VALUE)
        try:
            self.guards.append((proxy.node, what, fingerprint(what, value), caller_location()))
        except Exception as exc:  # noqa: BLE001 - recorded unguarded; the report lists it
            log.debug("no guard for %s (%s): %s", proxy.node.name, what, exc)

    def _value_of(self, arg: Any) -> Any:
        def unwrap(a: Any) -> Any:
            if isinstance(a, fx.Proxy):
                v = getattr(a, "_value", _NO_VALUE)
                if v is _NO_VALUE or isinstance(v, fx.Proxy):  # a Proxy a module cached
                    raise LookupError(a.node.name)
                return v
            return a

        return map_aggregate(arg, unwrap)

    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...],
                     kwargs: dict[str, Any], name: str | None = None,
                     type_expr: Any | None = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn)
        if isinstance(proxy, _ValueProxy):
            if _shape_from_data(kind, target, args) or any(
                    self.depends_on_data(p) for p in _proxies((args, kwargs))):
                self.data_dependent.add(proxy.node)
            try:
                proxy._value = self._compute(kind, target, args, kwargs, proxy.node)
            except Exception as exc:  # noqa: BLE001 - value unknown: plain fx from here on
                log.debug("no value for %s %s: %s", kind, target, exc)
                proxy._value = _NO_VALUE
        return proxy

    def _compute(self, kind: str, target: Any, args: tuple[Any, ...],
                 kwargs: dict[str, Any], node: fx.Node) -> Any:
        if kind == "placeholder":
            name = str(target).lstrip("*")
            if name in self._keyword:
                return self._keyword.pop(name)
            if self._positional:
                return self._positional.pop(0)
            default = node.args[0] if node.args else _NO_VALUE
            return default
        if kind == "get_attr":
            value: Any = self.root
            for part in str(target).split("."):
                value = getattr(value, part)
            return value
        a, kw = self._value_of(args), self._value_of(kwargs)
        unpatch = _unpatched_modules() if _may_call_modules(kind, target, a) else \
            contextlib.nullcontext()
        with torch.no_grad(), unpatch:
            if kind == "call_module":
                return self.root.get_submodule(str(target))(*a, **kw)
            if kind == "call_method":
                return getattr(a[0], str(target))(*a[1:], **kw)
            if kind == "call_function":
                return target(*a, **kw)
        return _NO_VALUE

    # -- control flow on shapes --------------------------------------------------------------
    def to_bool(self, obj: fx.Proxy) -> bool:
        value = getattr(obj, "_value", _NO_VALUE)
        if value is _NO_VALUE or _depends_on_data(value) or self.depends_on_data(obj):
            return super().to_bool(obj)
        self.note_specialised(obj, "control flow")
        return bool(value)

    def iter(self, obj: fx.Proxy) -> Iterator[fx.Proxy]:
        value = getattr(obj, "_value", _NO_VALUE)
        if value is _NO_VALUE or self.depends_on_data(obj):
            return super().iter(obj)
        self.note_specialised(obj, "iteration")
        return (obj[i] for i in range(len(value)))  # type: ignore[index]

    def keys(self, obj: fx.Proxy) -> Any:
        value = getattr(obj, "_value", _NO_VALUE)
        if isinstance(value, dict) and not self.depends_on_data(obj):
            self.note_specialised(obj, "keys()")
            return list(value.keys())
        return super().keys(obj)


def trace(model: nn.Module, leaf_modules: Iterable[str | type] = (), *,
          bn_subclasses: BnSubclasses = "inline",
          concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """Trace ``model`` with :class:`NormTracer`; raises whatever fx raises.

    Args:
        model: the module to trace (its state is not changed).
        leaf_modules: names/classes of modules not to trace into.
        bn_subclasses: ``"leaf"`` or ``"inline"``.
        concrete_args: forward parameters fixed to a value (e.g. ``{"mask": None}``).

    Returns:
        The GraphModule, in ``model``'s train/eval mode.
    """
    tracer = NormTracer(leaf_modules, bn_subclasses=bn_subclasses)
    graph = tracer.trace(model, concrete_args=concrete_args)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.train(model.training)
    return gm


