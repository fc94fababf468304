"""The pass contract and the one runner every method goes through.

A pass is a function ``pass_fn(gm, *, <typed keyword options>) -> (gm, PassReport)``: it may
mutate ``gm`` (a private copy made once by the API), records every rewrite and every refusal in
its report, and does NOT clean up after itself: :func:`run_passes` runs dead-code elimination
(keeping in-place calls), ``graph.lint()`` and ``recompile()`` once after each pass, and prefixes
any error with the pass's name and the passes that ran before it (keeping its type), like
``torch.fx.passes.infra.pass_manager.PassManager`` does.

Options are checked against each pass's signature before anything runs: an unknown option is an
error that lists the accepted ones (no option is ever dropped silently). Context values that
several passes need (``strict``, ``example_inputs``, ``source``) are handed to the passes whose
signature names them.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import fx

from ..errors import MethodOptionError, PassError, UnsupportedNodeError
from ..report import PassReport
from ._match import eliminate_dead_code

__all__ = ["GraphPass", "PassStep", "pass_options", "check_options", "run_passes", "cleanup",
           "raise_refusals"]

log = logging.getLogger(__name__)

GraphPass = Callable[..., "tuple[fx.GraphModule, PassReport]"]


@dataclass(frozen=True)
class PassStep:
    """One pass of a method, with the options the method fixes for it.

    Attributes:
        fn: the pass function.
        options: keyword options always given to ``fn`` (the user cannot override them).
        user_options: names of user options routed to this pass (None: every option that
            ``fn`` accepts and the method does not fix).
    """

    fn: GraphPass
    options: Mapping[str, Any] = field(default_factory=dict)
    user_options: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def pass_options(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The keyword options a pass (or factory) accepts: its parameters after the first one.

    Raises:
        TypeError: the function takes ``**kwargs`` (a pass must name its options).
    """
    params = list(inspect.signature(fn).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        raise TypeError(f"{getattr(fn, '__name__', fn)} takes **kwargs: a pass or factory "
                        "must name every option it accepts")
    return {p.name: p for p in params
            if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}


def check_options(owner: str, options: Mapping[str, Any], accepted: Iterable[str]) -> None:
    """Raise :class:`MethodOptionError` for options not in ``accepted`` (listing them all)."""
    allowed = sorted(set(accepted))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        listed = ", ".join(allowed) if allowed else "(none)"
        raise MethodOptionError(
            f"{owner}: unknown option(s) {', '.join(repr(u) for u in unknown)}; accepted "
            f"options: {listed}")


def raise_refusals(what: str, refused: Iterable[tuple[str, str, str]], remedy: str) -> None:
    """Raise one :class:`~normswap.errors.UnsupportedNodeError` listing every refusal.

    Args:
        what: what could not be done (``"to_normprop cannot convert"``).
        refused: ``(node, op, reason)`` triples; nothing is raised when empty.
        remedy: what the user can do.
    """
    items = list(refused)
    if not items:
        return
    lines = "\n".join(f"  '{node}' ({op}): {reason}" for node, op, reason in items)
    raise UnsupportedNodeError(f"{what} {len(items)} BatchNorm node(s):\n{lines}\n{remedy}")


def cleanup(gm: fx.GraphModule) -> fx.GraphModule:
    """Dead-code elimination that keeps in-place calls, ``lint`` and ``recompile``."""
    eliminate_dead_code(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _prefix_error(exc: BaseException, where: str) -> None:
    if exc.args and isinstance(exc.args[0], str) and not exc.args[0].startswith(where):
        exc.args = (f"{where}: {exc.args[0]}",) + tuple(exc.args[1:])


def run_passes(gm: fx.GraphModule, steps: Sequence[PassStep], *,
               user_options: Mapping[str, Any] | None = None,
               context: Mapping[str, Any] | None = None,
               report: PassReport | None = None, method: str = "") -> fx.GraphModule:
    """Run ``steps`` on ``gm`` in order, cleaning up after each.

    Args:
        gm: the graph module (mutated).
        steps: the passes with their fixed options.
        user_options: options given by the user; each goes to every pass that accepts it.
        context: values (``strict``, ``example_inputs``, ``source`` ...) given to the passes
            whose signature names them.
        report: where each pass's report is appended (a new one when None).
        method: the method's name, for messages.

    Returns:
        The rewritten graph module; ``report`` holds every pass's entries.

    Raises:
        MethodOptionError: a user option is accepted by no pass.
        Exception: what a pass raised, its message prefixed with the pass's name and the
            passes before it (:class:`PassError` when the error had no message to prefix).
    """
    user_options = dict(user_options or {})
    context = dict(context or {})
    report = report if report is not None else PassReport()
    accepted: set[str] = set()
    plans: list[tuple[PassStep, dict[str, Any]]] = []
    for step in steps:
        params = pass_options(step.fn)
        routed = step.user_options if step.user_options is not None else tuple(params)
        kwargs = {k: v for k, v in context.items() if k in params}
        for k, v in user_options.items():
            if k in params and k in routed and k not in step.options:
                kwargs[k] = v
                accepted.add(k)
        kwargs.update(step.options)
        accepted.update(k for k in routed if k in params and k not in step.options)
        plans.append((step, kwargs))
    check_options(f"method '{method}'" if method else "passes", user_options,
                  accepted - set(context))
    done: list[str] = []
    for step, kwargs in plans:
        where = f"pass '{step.name}'" + (f" (after {', '.join(done)})" if done else "")
        try:
            gm, sub = step.fn(gm, **kwargs)
            cleanup(gm)
        except Exception as exc:  # noqa: BLE001 - named with the pass, type kept
            if not (exc.args and isinstance(exc.args[0], str)):
                raise PassError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
            _prefix_error(exc, where)
            raise
        report.extend(sub)
        done.append(step.name)
        log.debug("ran %s", step.name)
    return gm
