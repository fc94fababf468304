"""The method registry: a method is data -- what it needs from the capture, and its passes.

A :class:`Method` names

* ``factory``: for methods that replace each BatchNorm by a new layer, the function building
  the replacement from one BN module (``fn(bn, *, <options>) -> nn.Module``); the swap pass and
  the module walk both use it;
* ``steps``: the graph passes run on every captured region (each a
  :class:`~normswap.passes._infra.PassStep`; see :mod:`normswap.passes._infra` for the pass
  contract);
* ``needs_graph``: whether a BatchNorm that no captured graph reaches must be refused (graph
  methods such as NormProp) or may be handled by walking the module tree;
* ``inline_bn_subclasses``: whether BN subclasses with their own forward are traced through
  (their ``F.batch_norm`` in the graph) rather than kept as leaves and grafted;
* ``eval_exact``: whether the rewrite claims identical eval outputs (then it is verified).

The options a method accepts are the keyword parameters of its factory and of its passes (the
context names ``strict``, ``example_inputs``, ``source``, ``factory``, ``method`` excepted);
anything else is refused with the list of accepted options. Names are normalised
(``"L1_BN"`` -> ``"l1"``); an unknown name raises :class:`~normswap.errors.UnknownMethodError`.
The built-in methods are registered by :mod:`normswap.methods`, which the package imports.

::

    @register_norm("l1")
    def _l1(bn: nn.Module, *, momentum: float | None | Keep = KEEP) -> nn.Module:
        return L1BatchNorm.from_batchnorm(bn, ...)
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import nn

from .errors import UnknownMethodError
from .passes._infra import PassStep, check_options, pass_options

__all__ = ["Method", "register_method", "register_norm", "get_method", "available_methods",
           "normalise_name", "CONTEXT_OPTIONS"]

ModuleFactory = Callable[..., nn.Module]

#: Names the API fills in for the passes; not user options.
CONTEXT_OPTIONS = frozenset({"strict", "example_inputs", "source", "factory", "method"})


@dataclass(frozen=True)
class Method:
    """A registered normalisation method (see the module docstring).

    Attributes:
        name: canonical name (``"l1"``).
        steps: graph passes run on each captured region, in order.
        factory: per-BatchNorm factory (None for pure graph methods).
        eval_exact: whether the rewrite claims identical eval-mode outputs (then verified).
        needs_graph: refuse BatchNorms that no captured graph reaches.
        inline_bn_subclasses: trace through BN subclasses with their own forward; a callable
            receives the user options (Kalman priors need it only when ``priors=True``).
        summary: one line for ``normswap inspect`` and the README table.
        aliases: other spellings.
    """

    name: str
    steps: tuple[PassStep, ...] = ()
    factory: ModuleFactory | None = None
    eval_exact: bool = True
    needs_graph: bool = False
    inline_bn_subclasses: bool | Callable[[Mapping[str, Any]], bool] = False
    summary: str = ""
    aliases: tuple[str, ...] = field(default=())

    def factory_options(self) -> dict[str, inspect.Parameter]:
        """Options the factory accepts."""
        return pass_options(self.factory) if self.factory is not None else {}

    def options(self) -> dict[str, inspect.Parameter]:
        """Every option the method accepts (factory and passes), by name."""
        out = dict(self.factory_options())
        for step in self.steps:
            params = pass_options(step.fn)
            routed = step.user_options if step.user_options is not None else tuple(params)
            for k in routed:
                if k in params and k not in step.options and k not in CONTEXT_OPTIONS:
                    out.setdefault(k, params[k])
        return out

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise :class:`~normswap.errors.MethodOptionError` for an option nobody accepts."""
        check_options(f"method '{self.name}'", options, self.options())

    def split_options(self, options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(factory options, pass options)``; an option both accept goes to both."""
        fac = self.factory_options()
        steps = {k for s in self.steps for k in pass_options(s.fn)
                 if k not in s.options and k not in CONTEXT_OPTIONS}
        return ({k: v for k, v in options.items() if k in fac},
                {k: v for k, v in options.items() if k in steps})

    def inline(self, options: Mapping[str, Any]) -> bool:
        """Whether BN subclasses are traced through for these options."""
        flag = self.inline_bn_subclasses
        return bool(flag(options)) if callable(flag) else bool(flag)


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


def register_method(method: Method) -> Method:
    """Register ``method`` under its name and aliases (a later registration replaces it).

    Raises:
        TypeError: the factory or a pass takes ``**kwargs`` (options must be named).
    """
    method.options()  # fails early on **kwargs
    _METHODS[method.name] = method
    for a in (method.name, *method.aliases):
        _ALIASES[normalise_name(a)] = method.name
    return method


def register_norm(name: str, *, aliases: tuple[str, ...] = (), eval_exact: bool = True,
                  summary: str = "", steps: tuple[PassStep, ...] = (),
                  inline_bn_subclasses: bool | Callable[[Mapping[str, Any]], bool] = False
                  ) -> Callable[[ModuleFactory], ModuleFactory]:
    """Decorator registering a per-BatchNorm factory as a method: the swap pass, then
    ``steps``."""
    from .passes.swap_norm import swap_norm

    def deco(fn: ModuleFactory) -> ModuleFactory:
        register_method(Method(name, steps=(PassStep(swap_norm),) + tuple(steps), factory=fn,
                               eval_exact=eval_exact,
                               inline_bn_subclasses=inline_bn_subclasses,
                               summary=summary or _first_line(fn), aliases=aliases))
        return fn

    return deco


def _first_line(fn: Callable[..., Any]) -> str:
    """First line of a docstring, or ''."""
    return ((fn.__doc__ or "").strip().splitlines() or [""])[0]


def available_methods() -> list[str]:
    """Canonical names of every registered method, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """Look a method up by any of its spellings; unknown names raise UnknownMethodError."""
    key = _ALIASES.get(normalise_name(name))
    if key is None:
        raise UnknownMethodError(
            f"unknown method {name!r}; choose one of: {', '.join(sorted(_METHODS))}")
    return _METHODS[key]
