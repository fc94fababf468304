"""The public API, composition only: swap(), fold(), inspect().

``swap`` = check the request -> copy the model once -> capture (:mod:`normswap.capture`) ->
run the method's passes on every captured region and put the model back together
(:mod:`normswap._pipeline`) -> walk the module tree for what no graph reached -> verify ->
restore the caller's train/eval flags. ``fold`` is the same with the fold passes.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ._modules import ModuleStateGuard, as_inputs, safe_deepcopy
from ._pipeline import leftover_batchnorms, rewrite_regions, walk_fold, walk_swap
from .capture import Capture, CaptureInputError, capture
from .errors import (
    MethodOptionError,
    NormswapError,
    NumericalMismatchError,
    TracingError,
    UnsupportedModelError,
    UnsupportedNodeError,
    VerificationError,
)
from .passes._infra import PassStep
from .passes._match import FUNCTIONAL_BATCH_NORM, batchnorm_like_modules, is_batchnorm
from .passes.fold_conv_bn import fold_conv_bn, is_foldable_norm
from .passes.fold_weight_norm import fold_weight_norm
from .passes.kalman_prior import remove_kalman_priors
from .progress import stage
from .registry import Method, get_method
from .report import PassReport
from .inputs import guess_inputs
from .verify import run_reference, verify_equivalence

__all__ = ["swap", "inspect", "fold"]

log = logging.getLogger(__name__)

_DEFAULT_RTOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


# -- checks before any work --------------------------------------------------------------------
def _check_model(model: Any) -> None:
    """Refuse what cannot be rewritten, with the remedy."""
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            f"{type(model).__name__} is a TorchScript module: normswap rewrites Python "
            "nn.Modules. Pass the original (unscripted) model, then script or export the "
            "result")
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
            if p.device.type == "meta"]
    if meta:
        raise UnsupportedModelError(
            f"{type(model).__name__} has {len(meta)} parameter(s)/buffer(s) on the meta device "
            f"(no values; e.g. '{meta[0]}'): materialise the weights first (load a checkpoint "
            "with load_state_dict(..., assign=True), or to_empty() then load)")


def _bind_factory(method: Method, options: Mapping[str, Any]) -> Callable[[nn.Module], nn.Module] | None:
    """The method's factory with the user's options bound, checked once on a probe BN."""
    if method.factory is None:
        return None
    factory = functools.partial(method.factory, **options) if options else method.factory
    if options:
        probe = nn.BatchNorm2d(2).eval()
        try:
            factory(probe)
        except (ValueError, TypeError) as exc:
            raise MethodOptionError(f"method '{method.name}': invalid option value: {exc}") from exc
    return factory


# -- inputs and capture --------------------------------------------------------------------------
def _resolve_inputs(work: nn.Module, example_inputs: Any, example_kwargs: Mapping[str, Any] | None,
                    report: PassReport) -> tuple[tuple[Any, ...] | None, dict[str, Any], str]:
    """The example inputs, and "" or the description of a guessed one."""
    inputs = as_inputs(example_inputs)
    kwargs = dict(example_kwargs or {})
    if inputs is not None or kwargs:
        return inputs or (), kwargs, ""
    reasons: list[str] = []
    with stage("guess example input"):
        guess = guess_inputs(work, reasons=reasons)
    if guess is None:
        report.warn("could not guess an example input ("
                    + ("; ".join(reasons[:4]) or "nothing in the model tells its input")
                    + "); pass example_inputs=...")
        return None, {}, "no input"
    return tuple(guess.args), dict(guess.kwargs), guess.describe()


def _capture(work: nn.Module, inputs: tuple[Any, ...] | None, kwargs: dict[str, Any],
             leaf_modules: Sequence[str | type], inline: bool, guessed: str,
             report: PassReport) -> tuple[Capture, tuple[Any, ...] | None]:
    mode = "inline" if inline else "leaf"
    try:
        cap = capture(work, inputs, kwargs, leaf_modules=leaf_modules, bn_subclasses=mode)
    except CaptureInputError as exc:
        if not guessed:
            raise CaptureInputError(f"{exc}; check example_inputs") from exc
        report.warn(f"{guessed} does not run through the model ({exc}); captured "
                    "symbolically only. Pass example_inputs=...")
        inputs = None
        cap = capture(work, None, {}, leaf_modules=leaf_modules, bn_subclasses=mode)
    _record_capture(cap, report)
    return cap, inputs


def _record_capture(cap: Capture, report: PassReport) -> None:
    summary = cap.summary()
    report.metrics["capture"] = summary
    strategy = summary["strategy"]
    culprits = summary["culprits"]
    blame = ""
    if culprits:
        named = ", ".join(f"'{a.culprit}' ({a.culprit_type})" for a in _first_per_culprit(cap))
        blame = (f"; the parts that break it: {named} (pass leaf_modules={culprits!r} to keep "
                 "them out of the graph)")
    else:
        places = sorted({a.location for a in cap.attempts if a.path == "" and a.location})
        if places:
            blame = ("; it breaks in the model's own forward, not in a submodule, at "
                     + ", ".join(places[:3]))
    if strategy in ("fx", "fx-shape", "export"):
        report.note(f"captured the whole model with {_STRATEGY_NAMES[strategy]}")
    elif strategy == "regions":
        parts = ", ".join(f"'{p}' ({s})" for p, s in summary["regions"].items())
        report.warn(f"could not capture the whole model{blame}; captured {len(cap.regions)} "
                    f"region(s) instead: {parts}. Rewrites across region boundaries (folds, "
                    "Kalman priors) are not possible there")
    else:
        report.warn(f"no graph could be captured{blame}: BatchNorms are replaced by walking "
                    "the module tree")
    for a in [a for a in cap.attempts if a.path == ""]:
        report.note(f"capture attempt failed: {a.describe()}")
    for path, spec in summary["specialised"].items():
        report.note(f"'{path}': control flow decided by the example's shapes at "
                    f"{len(spec)} place(s) ({'; '.join(spec[:3])}); the graph holds for inputs "
                    "that take the same branches")


def _first_per_culprit(cap: Capture) -> list[Any]:
    seen: dict[str, Any] = {}
    for a in cap.attempts:
        if a.path == "" and a.culprit and a.culprit not in seen:
            seen[a.culprit] = a
    return list(seen.values())


_STRATEGY_NAMES = {"fx": "torch.fx symbolic tracing", "fx-shape": "shape-aware torch.fx "
                   "tracing", "export": "torch.export (non-strict)"}


def _report_outcomes(outcomes: Sequence[Any], report: PassReport, model: nn.Module) -> None:
    graphs = [o for o in outcomes if o.mode == "graph"]
    for o in graphs:
        where = f"'{o.path}'" if o.path else type(model).__name__
        what = "the model" if not o.path else f"submodule {where}"
        report.note(f"{what} is returned as a torch.fx GraphModule because the method changed "
                    f"its graph ({o.reason}); Python control flow on self.training inside it is "
                    "frozen to its eval branch")
    report.metrics["mode"] = ("graph" if any(o.path == "" for o in graphs)
                              else "module" if outcomes else "module-walk")


def _inputs_dtype(inputs: tuple[Any, ...] | None) -> torch.dtype:
    return next((t.dtype for t in (inputs or ()) if isinstance(t, torch.Tensor)
                 and t.is_floating_point()), torch.float32)


def _verify(original: nn.Module, rewritten: nn.Module, inputs: tuple[Any, ...] | None,
            kwargs: Mapping[str, Any], rtol: float | None, report: PassReport, *, guessed: str,
            what: str, reference: Any = None) -> None:
    """Check eval equivalence and record it; a check that cannot run is an error."""
    if inputs is None:
        raise VerificationError(
            f"{what}: the equivalence check could not run (no example input could be guessed "
            "or the generated one does not fit the model); pass example_inputs=... (CLI: "
            "--input-shape), or verify=False (CLI: --no-verify) to skip the check")
    rtol = _DEFAULT_RTOL.get(_inputs_dtype(inputs), 1e-4) if rtol is None else rtol
    pairs = [(c.node, c.node) for c in report.changes]
    t0 = time.perf_counter()
    with stage("verify"):
        if reference is not None:  # recorded on the private copy before any rewrite
            res = verify_equivalence(None, rewritten, inputs, rtol=rtol, raise_on_fail=False,
                                     kwargs=dict(kwargs), reference=reference)
        if reference is None or not res.passed:  # a copy of the original finds the layer
            res = verify_equivalence(safe_deepcopy(original), rewritten, inputs, rtol=rtol,
                                     layer_pairs=pairs, raise_on_fail=False,
                                     kwargs=dict(kwargs))
    report.metrics.update(res.as_metrics())
    report.metrics["verify_seconds"] = round(time.perf_counter() - t0, 4)
    source = f" on {guessed}" if guessed else ""
    if res.passed:
        report.note(f"eval outputs match the original{source}: relative error {res.rel:.2e} "
                    f"over {res.tensors_compared} tensor(s) (max abs {res.max_abs:.2e}, "
                    f"rtol {rtol:g})")
    elif res.layers_agree:
        report.metrics["verify.layers_rel"] = res.worst_layer_rel
        report.warn(f"final outputs differ (relative error {res.rel:.3g}) although all "
                    f"{res.layers_checked} rewritten layers match their originals (worst "
                    f"{res.worst_layer_rel:.2e} at '{res.worst_layer}'): the gap comes from "
                    "discontinuous post-processing downstream (NMS, top-k, thresholds); check "
                    "the outputs you care about")
    else:
        raise NumericalMismatchError(f"{what}{source}: {res.message()}")


def _restore_flags(result: nn.Module, flags: Mapping[str, bool], default: bool) -> None:
    for n, mod in result.named_modules():
        mod.training = flags.get(n, default)


def _has_functional_bn(cap: Capture) -> bool:
    """A functional batch norm with running statistics (one a method converts)."""
    from .passes._match import batch_norm_args

    return any(n.op == "call_function" and n.target in FUNCTIONAL_BATCH_NORM
               and batch_norm_args(n)["running_mean"] is not None
               for r in cap.regions for n in r.gm.graph.nodes)


def _plain(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if isinstance(v, (int, float, str, bool, type(None)))}


# -- swap ------------------------------------------------------------------------------------------
def swap(model: nn.Module, method: str, *, example_inputs: Any = None,
         example_kwargs: Mapping[str, Any] | None = None, verify: bool = True,
         rtol: float | None = None, strict: bool = True, leaf_modules: Sequence[str | type] = (),
         sync: bool = False, process_group: Any = None, **options: Any) -> nn.Module:
    """Return a copy of ``model`` with every BatchNorm replaced by ``method``.

    The caller's model is never modified. The result keeps the model's own class whenever the
    method only replaces modules (l1, linf, kalman without priors); otherwise it is a
    ``torch.fx.GraphModule`` and the report says why. It carries ``normswap_report``
    (a :class:`~normswap.report.PassReport`): how the graph was captured, every node changed,
    every node declined and why, the state_dict key map and the verification result.

    Args:
        model: any ``nn.Module`` holding BatchNorms (trained or not).
        method: a registered method name (``"l1"``, ``"linf"``, ``"kalman"``, ``"normprop"``,
            ``"selu"``; spellings like ``"L1_BN"`` work).
        example_inputs: a tensor or tuple of positional inputs; they drive the capture and the
            equivalence check. Guessed from the model when omitted.
        example_kwargs: keyword inputs of the model's forward.
        verify: check eval-mode equivalence for methods that claim it; a check that cannot
            run raises :class:`~normswap.errors.VerificationError` unless this is False.
        rtol: tolerance of that check, ``max|Δ| / max|reference|``; by default 1e-4 for
            float32/64 inputs, 1e-2 for float16 and 5e-2 for bfloat16.
        strict: raise :class:`UnsupportedNodeError` when any normalisation cannot be swapped;
            with ``strict=False`` it is kept as is and listed in the report.
        leaf_modules: qualified names or classes of submodules the tracer must not enter.
        sync: replace the new L1/L∞/Kalman layers by their ``torch.distributed`` sync variants.
        process_group: the group for ``sync`` (default: the whole world).
        **options: method options (``k`` for linf, ``gain``/``priors`` for kalman, ``init`` for
            selu, ``kappa`` for normprop ...); an unknown option raises
            :class:`~normswap.errors.MethodOptionError` listing the accepted ones.

    Returns:
        The rewritten model, in the same train/eval mode as ``model`` (module by module).

    Raises:
        UnknownMethodError, MethodOptionError, UnsupportedModelError, UnsupportedNodeError,
        TracingError, NumericalMismatchError, VerificationError.
    """
    m = get_method(method)
    m.check_options(options)
    factory_options, pass_options = m.split_options(options)
    factory = _bind_factory(m, factory_options)
    _check_model(model)
    t0 = time.perf_counter()
    report = PassReport(title=f"normswap swap -> {m.name}")
    flags = {n: mod.training for n, mod in model.named_modules()}
    with stage("copy model"):
        work = safe_deepcopy(model).eval()
    inputs, kwargs, guessed = _resolve_inputs(work, example_inputs, example_kwargs, report)
    cap, inputs = _capture(work, inputs, kwargs, leaf_modules, m.inline(options), guessed,
                           report)
    if m.needs_graph and cap.strategy not in _STRATEGY_NAMES:
        culprits = cap.summary()["culprits"]
        tried = "; ".join(a.describe() for a in cap.attempts if a.path == "")
        raise TracingError(
            f"method '{m.name}' needs the whole model's graph, but {type(model).__name__} could "
            f"not be captured ({tried or 'no strategy applied'}). "
            + (f"Pass leaf_modules={culprits!r} to keep the parts that break capture out of "
               "the graph" if culprits else "Pass example_inputs=... so that shape-aware "
               "tracing and torch.export can run"))
    n_bn = len(batchnorm_like_modules(work))
    functional = _has_functional_bn(cap)
    uncovered = cap.uncovered_batchnorms()
    with stage(f"swap -> {m.name}"):
        context = {"strict": strict, "factory": factory, "method": m.name,
                   "example_inputs": inputs}
        result, outcomes = rewrite_regions(cap, m.steps, user_options=pass_options,
                                           context=context, report=report, method=m.name)
    _report_outcomes(outcomes, report, model)
    _handle_uncovered(m, result, work, uncovered, factory, report, strict, cap)
    _record_dropped_keys(work, result, report)
    _check_leftovers(m, result, report, strict, n_bn, functional)
    report.metrics["swapped"] = len(report.changes)
    report.metrics["swap_seconds"] = round(time.perf_counter() - t0, 4)
    if verify and m.eval_exact:
        _verify(model, result, inputs, kwargs, rtol, report, guessed=guessed,
                what=f"swap -> {m.name} of {type(model).__name__}", reference=cap.output)
    elif not m.eval_exact:
        report.warn(f"'{m.name}' changes the function: outputs are not expected to match the "
                    "original; fine-tune (or retrain) the converted model")
    else:
        report.note("equivalence check skipped (verify=False)")
    if sync:
        from .distributed import convert_sync, is_sync_layer

        result = convert_sync(result, process_group)
        n_sync = sum(is_sync_layer(mod) for mod in result.modules())
        report.note(f"{n_sync} layer(s) made distributed-sync (statistics reduced across the "
                    "process group in train mode)")
    _restore_flags(result, flags, model.training)
    result.normswap_report = report  # type: ignore[assignment]
    result.normswap_method = {"method": m.name, "options": _plain(options),  # type: ignore
                              "leaf_modules": [x for x in leaf_modules if isinstance(x, str)],
                              "strict": strict, "sync": sync}
    log.info("swap -> %s: %d changed, %d skipped", m.name, len(report.changes),
             len(report.skips))
    return result


def _handle_uncovered(m: Method, result: nn.Module, work: nn.Module, uncovered: list[str],
                      factory: Callable[[nn.Module], nn.Module] | None, report: PassReport,
                      strict: bool, cap: Capture) -> None:
    """BatchNorms no captured graph reached: module walk, or a refusal for graph methods."""
    if not uncovered:
        return
    root = work if result is work else result
    dropped = [p for p in uncovered if not _has_batchnorm(root, p)]
    if dropped:  # inside a region returned as a graph: not used by its eval forward
        report.warn(f"{len(dropped)} BatchNorm module(s) are not used by the eval-mode "
                    f"forward and are not in the returned graph (e.g. auxiliary heads): "
                    f"{dropped[:6]}{' ...' if len(dropped) > 6 else ''}")
        uncovered = [p for p in uncovered if p not in dropped]
        if not uncovered:
            return
    why = ("not reached by the eval-mode trace (e.g. a train-only branch): swapped without "
           "verification" if cap.strategy in ("fx", "fx-shape", "export")
           else "module walk: no captured graph reaches it")
    if factory is None or m.needs_graph:
        sub = PassReport()
        for p in uncovered:
            sub.skip(p, type(work.get_submodule(p)).__name__,
                     f"'{m.name}' needs the graph around it, but no captured graph reaches it"
                     + _capture_hint(cap))
        report.extend(sub)
        if strict:
            from .passes.swap_norm import refuse_if_strict

            refuse_if_strict(sub, True)
        return
    walked = walk_swap(root, uncovered, factory, report, why=why)
    if strict:
        from .passes.swap_norm import refuse_if_strict

        refuse_if_strict(walked, True)
    kalman_prior = any(s.fn.__name__ == "propagate_kalman_priors" for s in m.steps)
    if kalman_prior and cap.strategy not in ("fx", "fx-shape", "export"):
        report.warn(f"{len(uncovered)} Kalman layer(s) outside any captured graph run without "
                    f"graph priors: {uncovered[:6]}{' ...' if len(uncovered) > 6 else ''}")


def _record_dropped_keys(work: nn.Module, result: nn.Module, report: PassReport) -> None:
    """State keys of the model that the result no longer holds (a graph without the modules
    the eval forward never calls)."""
    if result is work:
        return
    kept = set(result.state_dict().keys())
    for k in work.state_dict():
        if k not in kept and k not in report.key_map:
            report.key_map[k] = None


def _capture_hint(cap: Capture) -> str:
    if not cap.attempts:
        return ""
    return f" (capture: {cap.attempts[-1].describe()})"


def _has_batchnorm(root: nn.Module, path: str) -> bool:
    """Whether a BatchNorm still sits at ``path`` (a returned graph may hold only a container
    of its tensors there, or nothing)."""
    try:
        return is_batchnorm(root.get_submodule(path))
    except AttributeError:
        return False


def _has_path(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _check_leftovers(m: Method, result: nn.Module, report: PassReport, strict: bool, n_bn: int,
                     functional: bool) -> None:
    skipped = {s.node for s in report.skips}
    left = [p for p in leftover_batchnorms(result) if p not in skipped]
    if left:
        sub = PassReport()
        for p in left:
            sub.skip(p, type(result.get_submodule(p)).__name__,
                     "BatchNorm module left in the result (not reached by any rewrite)")
        report.extend(sub)
        if strict:
            from .passes.swap_norm import refuse_if_strict

            refuse_if_strict(sub, True)
    if not report.changes:
        if n_bn == 0 and not functional:
            report.note("no BatchNorm found: nothing to swap")
        elif strict:
            raise UnsupportedNodeError(
                f"{n_bn} BatchNorm module(s) found but none was swapped by '{m.name}' "
                f"({len(report.skips)} refused); pass strict=False to get the report, or "
                "leaf_modules=[...] naming the parts that break capture")


# -- inspect -----------------------------------------------------------------------------------------
def inspect(model: nn.Module, methods: Iterable[str] | None = None, *,
            leaf_modules: Sequence[str | type] = (), example_inputs: Any = None
            ) -> dict[str, PassReport]:
    """What each method would do to ``model``, layer by layer (nothing is verified or kept).

    Returns:
        A report per method name; a method that refuses the model gets a report whose single
        skip carries the error message.
    """
    from .registry import available_methods

    out: dict[str, PassReport] = {}
    for name in methods or available_methods():
        try:
            out[name] = swap(model, name, verify=False, strict=False, leaf_modules=leaf_modules,
                             example_inputs=example_inputs).normswap_report
        except NormswapError as exc:
            rep = PassReport(title=f"normswap swap -> {name}")
            rep.skip("<model>", type(model).__name__, str(exc))
            out[name] = rep
    return out


# -- fold --------------------------------------------------------------------------------------------
_FOLD_STEPS = (PassStep(remove_kalman_priors), PassStep(fold_conv_bn))


def fold(model: nn.Module, *, example_inputs: Any = None,
         example_kwargs: Mapping[str, Any] | None = None, leaf_modules: Sequence[str | type] = (),
         verify: bool = True, rtol: float | None = None, fold_weight_norms: bool = True,
         train_mode: str = "skip", trainable_affine: bool = True) -> nn.Module:
    """Fold eval-mode normalisations and weight norms into plain weights, for inference.

    BatchNorm and every normswap norm layer (per-channel affine maps in eval mode) fold into the
    preceding Conv/ConvTranspose/Linear; a BatchNorm subclass keeps its activation/dropout; a
    norm that cannot fold becomes one per-channel affine and the report says why. Weight norms
    (legacy hooks, parametrizations, bounded WN) become plain weights. The caller's model is not
    modified; the result keeps the model's class unless Kalman prior wiring had to be removed.

    Args:
        model: the model to fold (folded as in eval mode).
        example_inputs: inputs for capture, shapes (Linear→BatchNorm1d folds need the rank) and
            the equivalence check; guessed when omitted.
        example_kwargs: keyword inputs of the model's forward.
        leaf_modules: submodules the tracer must not enter.
        verify: compare eval outputs of the folded and original model.
        rtol: tolerance of that check (default by dtype, as in :func:`swap`).
        fold_weight_norms: also fold weight normalisation.
        train_mode: ``"skip"`` leaves norms that are in train mode; ``"freeze"`` folds their
            running statistics.
        trainable_affine: norms that cannot fold become affines with parameters (True) or
            buffers (False).

    Returns:
        The folded model, carrying ``normswap_report``.
    """
    _check_model(model)
    t0 = time.perf_counter()
    report = PassReport(title="normswap fold")
    flags = {n: mod.training for n, mod in model.named_modules()}
    with stage("copy model"):
        work = safe_deepcopy(model).eval()
    inputs, kwargs, guessed = _resolve_inputs(work, example_inputs, example_kwargs, report)
    reference = None
    if inputs is not None and verify:  # the original's output, before any weight changes
        with ModuleStateGuard(work):
            reference = run_reference(work, inputs, kwargs)
    if fold_weight_norms:
        work, wn_report = fold_weight_norm(work)
        report.extend(wn_report)
    cap, inputs = _capture(work, inputs, kwargs, leaf_modules, False, guessed, report)
    covered = cap.covered()
    uncovered = [n for n, mod in work.named_modules()
                 if n and is_foldable_norm(mod) and n not in covered]
    with stage("fold"):
        result, outcomes = rewrite_regions(
            cap, _FOLD_STEPS, user_options={"train_mode": train_mode,
                                            "trainable_affine": trainable_affine},
            context={"method": "fold"}, report=report, method="fold")
    _report_outcomes(outcomes, report, model)
    if uncovered and (result is work or any(_has_path(result, p) for p in uncovered)):
        walk_fold(result, [p for p in uncovered if _has_path(result, p)], report,
                  train_mode=train_mode, trainable_affine=trainable_affine)
    report.metrics["fold_seconds"] = round(time.perf_counter() - t0, 4)
    if verify:
        _verify(model, result, inputs, kwargs, rtol, report, guessed=guessed,
                what=f"fold of {type(model).__name__}", reference=reference)
    _restore_flags(result, flags, model.training)
    result.normswap_report = report  # type: ignore[assignment]
    return result

