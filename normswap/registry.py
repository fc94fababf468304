"""Method registry: names map to factories (module-level swaps) or graph passes.

A *module method* receives one BatchNorm-family module and returns its replacement::

    @register_norm("l1")
    def _l1(bn: nn.modules.batchnorm._BatchNorm, **options) -> nn.Module:
        return L1BatchNorm.from_batchnorm(bn, **options)

A *graph method* needs the traced graph (NormProp, SELU strip) and is a pass
``fn(gm, **options) -> tuple[fx.GraphModule, PassReport]``. A method may also carry a
``post_pass`` of the same shape that runs on the swapped graph (Kalman prior propagation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from torch import fx, nn

from .errors import UnknownMethodError
from .report import PassReport


__all__ = ["Method", "register_norm", "register_graph_method", "get_method", "available_methods",
           "normalise_name"]

ModuleFactory = Callable[..., nn.Module]
GraphPass = Callable[..., "tuple[fx.GraphModule, PassReport]"]


@dataclass(frozen=True)
class Method:
    """A registered normalisation method.

    Attributes:
        name: canonical name (``"l1"``).
        factory: per-module factory for module-level swaps, or None for graph methods.
        graph_pass: ``fn(gm, **options) -> (gm, PassReport)`` for methods that need the graph.
        post_pass: optional ``fn(gm, **options) -> (gm, PassReport)`` run after a module swap
            when a graph is available (e.g. Kalman prior wiring).
        eval_exact: whether the rewrite claims identical eval-mode outputs (then it is verified).
        summary: one line for ``normswap inspect`` and the README table.
    """

    name: str
    factory: ModuleFactory | None = None
    graph_pass: GraphPass | None = None
    post_pass: GraphPass | None = None
    eval_exact: bool = True
    summary: str = ""

    @property
    def needs_graph(self) -> bool:
        return self.graph_pass is not None


_METHODS: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def normalise_name(name: str) -> str:
    """Lower-case a method name and drop separators and a trailing 'bn' ("L1_BN" -> "l1")."""
    key = re.sub(r"[\s_\-/]", "", str(name).lower())
    for suffix in ("batchnorm", "bn", "norm"):
        if key.endswith(suffix) and len(key) > len(suffix):
            key = key[: -len(suffix)]
            break
    return key


def _first_line(fn: Callable[..., Any]) -> str:
    """First line of a docstring, or ''."""
    return ((fn.__doc__ or "").strip().splitlines() or [""])[0]


def _add(method: Method, aliases: tuple[str, ...]) -> None:
    _METHODS[method.name] = method
    for a in (method.name, *aliases):
        _ALIASES[normalise_name(a)] = method.name


def register_norm(name: str, *, aliases: tuple[str, ...] = (), eval_exact: bool = True,
                  summary: str = "", post_pass: GraphPass | None = None
                  ) -> Callable[[ModuleFactory], ModuleFactory]:
    """Decorator registering a per-module factory under ``name``."""

    def deco(fn: ModuleFactory) -> ModuleFactory:
        _add(Method(name, factory=fn, post_pass=post_pass, eval_exact=eval_exact,
                    summary=summary or _first_line(fn)), aliases)
        return fn

    return deco


def register_graph_method(name: str, *, aliases: tuple[str, ...] = (), eval_exact: bool = True,
                          summary: str = "") -> Callable[[GraphPass], GraphPass]:
    """Decorator registering a graph pass ``fn(gm, **options) -> (gm, report)`` under ``name``."""

    def deco(fn: GraphPass) -> GraphPass:
        _add(Method(name, graph_pass=fn, eval_exact=eval_exact,
                    summary=summary or _first_line(fn)),
             aliases)
        return fn

    return deco


def set_post_pass(name: str, fn: GraphPass) -> None:
    """Attach a post-pass to an already registered method."""
    m = get_method(name)
    _METHODS[m.name] = Method(m.name, m.factory, m.graph_pass, fn, m.eval_exact, m.summary)


def available_methods() -> list[str]:
    """Canonical names of every registered method, sorted."""
    _load_builtin()
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """Look a method up by any of its spellings; unknown names raise UnknownMethodError."""
    _load_builtin()
    key = _ALIASES.get(normalise_name(name))
    if key is None:
        raise UnknownMethodError(
            f"unknown method {name!r}; choose one of: {', '.join(sorted(_METHODS))}")
    return _METHODS[key]


def _load_builtin() -> None:
    from . import methods  # noqa: F401  (registers the built-in methods on import)


