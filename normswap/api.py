"""The public API, composition only: swap(), inspect(), fold(), export_onnx(), save()/load()."""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, Iterable, Sequence

import torch
from torch import fx, nn

from ._modules import as_inputs
from .errors import NormswapError, NumericalMismatchError, TracingError
from .passes._match import FUNCTIONAL_BATCH_NORM, batchnorm_like_modules, find_untraceable, trace
from .passes.swap_norm import refuse_if_strict, swap_modules, swap_norm
from .registry import get_method
from .report import PassReport
from .verify import default_example_inputs, verify_equivalence

__all__ = ["swap", "inspect", "fold"]

log = logging.getLogger(__name__)


def _trace_or_explain(model: nn.Module, leaf_modules: Sequence[str],
                      report: PassReport) -> fx.GraphModule | None:
    """Trace, or record in the report which modules broke tracing and return None."""
    try:
        return trace(model, leaf_modules)
    except Exception as exc:  # noqa: BLE001 - any fx failure leads to the fallback
        culprits = find_untraceable(model, leaf_modules)
        names = ", ".join(f"'{q}' ({c})" for q, c, _ in culprits) or f"'<root>' ({exc})"
        report.warn(f"could not trace the model with torch.fx: {names} "
                    f"({culprits[0][2] if culprits else type(exc).__name__}); "
                    "falling back to module replacement. To keep the graph, pass "
                    f"leaf_modules={[q for q, _, _ in culprits if q != '<root>']!r}")
        report.metrics["untraceable"] = [q for q, _, _ in culprits]
        return None


def swap(model: nn.Module, method: str, *, example_inputs: Any = None, verify: bool = True,
         rtol: float | None = None, strict: bool = True, leaf_modules: Sequence[str] = (),
         sync: bool = False, process_group: Any = None, **options: Any) -> nn.Module:
    """Return a copy of ``model`` with every BatchNorm replaced by ``method``.

    The caller's model is never modified. The returned module carries ``normswap_report``
    (a :class:`~normswap.report.PassReport`): every node changed, every node declined and why,
    the state_dict key map and the verification result.

    Args:
        model: any ``nn.Module`` holding BatchNorms (trained or not).
        method: a registered method name (``"l1"``, ``"linf"``, ``"kalman"``, ``"normprop"``,
            ``"selu"``; spellings like ``"L1_BN"`` work).
        example_inputs: a tensor or tuple of inputs for the equivalence check; guessed from the
            first layer when omitted.
        verify: check eval-mode equivalence for methods that claim it.
        rtol: tolerance of that check, ``max|Δ| / max|reference|``; by default 1e-4 for
            float32/64 inputs, 1e-2 for float16 and 5e-2 for bfloat16 (rounding of the half
            formats accumulates over depth).
        strict: raise :class:`UnsupportedNodeError` when any normalisation cannot be swapped;
            with ``strict=False`` it is kept as is and listed in the report.
        leaf_modules: qualified names of submodules the tracer must not enter.
        sync: replace the new L1/L∞/Kalman layers by their ``torch.distributed`` sync variants
            (statistics reduced across ``process_group``, like ``nn.SyncBatchNorm``).
        process_group: the group for ``sync`` (default: the whole world).
        **options: method options (``k`` for linf, ``gain`` for kalman, ``init`` for selu ...).

    Returns:
        The rewritten model (an ``fx.GraphModule`` when the model could be traced), in the same
        train/eval mode as ``model``.

    Raises:
        UnknownMethodError, UnsupportedNodeError, TracingError, NumericalMismatchError.
    """
    m = get_method(method)
    t0 = time.perf_counter()
    report = PassReport(title=f"normswap swap -> {m.name}")
    flags = {n: mod.training for n, mod in model.named_modules()}
    work = copy.deepcopy(model).eval()
    gm = _trace_or_explain(work, leaf_modules, report)
    inputs = as_inputs(example_inputs)
    guessed = inputs is None
    if guessed:
        inputs = default_example_inputs(work, gm)
    factory_options = {k: v for k, v in options.items() if k != "priors"}
    result: nn.Module
    if gm is None:
        if m.factory is None:
            raise TracingError(
                f"method '{m.name}' needs the model's graph, but tracing failed: "
                f"{report.warnings[-1].message}")
        result, sub = swap_modules(work, m.factory, method=m.name, **factory_options)
        report.extend(sub)
        refuse_if_strict(sub, strict)
        report.metrics["mode"] = "fallback"
        report.metrics["swapped"] = len(sub.changes)
        if m.post_pass is not None:
            report.warn(f"no graph: '{m.name}' layers run without graph context "
                        "(Kalman layers get no propagated prior)")
    elif m.graph_pass is not None:
        result, sub = m.graph_pass(gm, strict=strict, example_inputs=inputs, **options)
        report.extend(sub)
        report.metrics["mode"] = "graph"
        report.metrics["swapped"] = len(sub.changes)
        _note_dropped(work, result, report)
    elif _needs_graph(gm, m.post_pass is not None and options.get("priors", True)):
        result, sub = swap_norm(gm, m.factory, source=work, method=m.name, **factory_options)
        report.extend(sub)
        refuse_if_strict(sub, strict)
        report.metrics["swapped"] = len(sub.changes)
        if m.post_pass is not None and options.get("priors", True):
            result, post = m.post_pass(result, **factory_options)
            report.extend(post)
        report.metrics["mode"] = "graph"
        _note_dropped(work, result, report)
    else:
        # the graph showed nothing that needs it: replace modules in the user's own class, so
        # its forward (train-time branches included) and methods stay as they are
        result, sub = swap_modules(work, m.factory, method=m.name, **factory_options)
        report.extend(sub)
        refuse_if_strict(sub, strict)
        report.metrics["mode"] = "module"
        report.metrics["swapped"] = len(sub.changes)
    leftover = PassReport()
    for q, mod in batchnorm_like_modules(result):
        if not any(getattr(s, "node", None) == q for s in report.skips):
            leftover.skip(q, type(mod).__name__,
                          "BatchNorm module not reached by the traced forward (unused in eval, "
                          "or hidden behind a leaf module); left as is")
    report.extend(leftover)
    refuse_if_strict(leftover, strict and m.graph_pass is None)
    report.metrics["swap_seconds"] = round(time.perf_counter() - t0, 4)
    if verify and m.eval_exact:
        _verify(model, result, inputs, rtol, report, guessed=guessed)
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
    for n, mod in result.named_modules():  # the caller's train/eval flags, module by module
        mod.training = flags.get(n, model.training)
    result.normswap_report = report  # type: ignore[assignment]
    result.normswap_method = {"method": m.name, "options": _plain(options),
                              "leaf_modules": list(leaf_modules), "strict": strict,
                              "sync": sync}
    log.info("swap -> %s: %d changed, %d skipped", m.name, len(report.changes),
             len(report.skips))
    return result


def _needs_graph(gm: fx.GraphModule, post_pass: bool) -> bool:
    """A graph rewrite is needed for functional batch norms (also those inside BN subclasses
    that add behaviour) and for post-passes such as Kalman priors."""
    return post_pass or any(n.op == "call_function" and n.target in FUNCTIONAL_BATCH_NORM
                            for n in gm.graph.nodes)


def _note_dropped(source: nn.Module, result: nn.Module, report: PassReport) -> None:
    """Record keys the rewrite renamed or dropped, and warn about parameterised modules that the
    eval-mode trace did not reach (train-only branches such as auxiliary heads)."""
    kept = {n for n, _ in result.named_modules()}
    touched = {c.node for c in report.changes} | {s.node for s in report.skips}
    dropped = [n for n, mod in source.named_modules()
               if n and n not in kept and n not in touched
               and not any(t.startswith(n + ".") or n.startswith(t + ".") for t in touched)
               and any(True for _ in mod.parameters(recurse=False))]
    report.note("returned an fx.GraphModule traced in eval mode: Python control flow on "
                "self.training inside traced modules is frozen to its eval branch")
    if dropped:
        report.warn(f"{len(dropped)} module(s) with parameters are not used by the eval-mode "
                    f"forward and are not in the result (e.g. auxiliary heads): "
                    f"{dropped[:6]}{' ...' if len(dropped) > 6 else ''}")
    new_keys = set(result.state_dict().keys())
    for k in source.state_dict():
        if k not in new_keys and k not in report.key_map:
            report.key_map[k] = None


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if isinstance(v, (int, float, str, bool, type(None)))}


_DEFAULT_RTOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _verify(original: nn.Module, rewritten: nn.Module, inputs: tuple[Any, ...] | None,
            rtol: float | None, report: PassReport, *, guessed: bool = False) -> None:
    """Check eval equivalence and record it; a guessed input that does not fit is reported."""
    if inputs is None:
        report.warn("equivalence NOT verified: could not guess an input; pass "
                    "example_inputs=...")
        return
    if rtol is None:
        dtype = next((t.dtype for t in inputs if isinstance(t, torch.Tensor)
                      and t.is_floating_point()), torch.float32)
        rtol = _DEFAULT_RTOL.get(dtype, 1e-4)
    if guessed:
        report.note(f"verified on a generated input of shape {list(inputs[0].shape)}")
    pairs = [(c.node, c.node) for c in report.changes]
    t0 = time.perf_counter()
    try:
        res = verify_equivalence(original, rewritten, inputs, rtol=rtol, layer_pairs=pairs,
                                 raise_on_fail=False)
    except NormswapError:
        raise
    except Exception as exc:  # noqa: BLE001 - the guessed input may not suit the model
        if guessed:
            report.warn(f"equivalence NOT verified: the generated input failed "
                        f"({type(exc).__name__}: {exc}); pass example_inputs=...")
            return
        raise
    report.metrics.update(res.as_metrics())
    report.metrics["verify_seconds"] = round(time.perf_counter() - t0, 4)
    if res.passed:
        report.note(f"eval outputs match the original: relative error {res.rel:.2e} "
                    f"(max abs {res.max_abs:.2e}, rtol {rtol:g})")
    elif res.layers_agree:
        report.metrics["verify.layers_rel"] = res.worst_layer_rel
        report.warn(f"final outputs differ (relative error {res.rel:.3g}) although all "
                    f"{res.layers_checked} rewritten layers match their originals (worst "
                    f"{res.worst_layer_rel:.2e} at '{res.worst_layer}'): the gap comes from "
                    "discontinuous post-processing downstream (NMS, top-k, thresholds); check "
                    "the outputs you care about")
    else:
        where = (f"; the first disagreeing layer is '{res.worst_layer}' (relative error "
                 f"{res.worst_layer_rel:.3g})" if res.worst_layer else "")
        raise NumericalMismatchError(
            f"eval outputs differ: relative error {res.rel:.3g} > rtol {rtol:g}{where}. "
            "Check the layer's statistics, or pass verify=False to skip the check.")


def inspect(model: nn.Module, methods: Iterable[str] | None = None, *,
            leaf_modules: Sequence[str] = ()) -> dict[str, PassReport]:
    """What each method would do to ``model``, layer by layer (nothing is verified or kept).

    Returns:
        A report per method name; a method that refuses the model gets a report whose single
        skip carries the error message.
    """
    from .registry import available_methods

    out: dict[str, PassReport] = {}
    for name in methods or available_methods():
        try:
            out[name] = swap(model, name, verify=False, strict=False,
                             leaf_modules=leaf_modules).normswap_report
        except NormswapError as exc:
            rep = PassReport(title=f"normswap swap -> {name}")
            rep.skip("<model>", type(model).__name__, str(exc))
            out[name] = rep
    return out


def fold(model: nn.Module, *, leaf_modules: Sequence[str] = (), example_inputs: Any = None,
         verify: bool = True, rtol: float | None = None, fold_weight_norms: bool = True
         ) -> nn.Module:
    """Fold eval-mode normalisations and weight norms into plain weights, for inference.

    BatchNorm and every normswap norm layer (per-channel affine maps in eval mode) fold into the
    preceding Conv/ConvTranspose/Linear; a norm that cannot fold becomes one per-channel affine
    and the report says why. Weight norms (legacy hooks, parametrizations, bounded WN) become
    plain weights. The caller's model is not modified.

    Args:
        model: the model to fold (folded as in eval mode).
        leaf_modules: submodules the tracer must not enter.
        example_inputs: inputs used for shape propagation (Linear→BatchNorm1d folds need the
            rank) and for the equivalence check; guessed from the first layer when omitted.
        verify: compare eval outputs of the folded and original model.
        rtol: tolerance of that check (default by dtype, as in :func:`swap`).
        fold_weight_norms: also fold weight normalisation.

    Returns:
        The folded model, carrying ``normswap_report``.
    """
    from .passes.fold_conv_bn import fold_model

    inputs = as_inputs(example_inputs)
    guessed = inputs is None
    if guessed:
        inputs = default_example_inputs(model)
    folded, report = fold_model(model, leaf_modules=leaf_modules, example_inputs=inputs,
                                fold_weight_norms=fold_weight_norms)
    if verify:
        _verify(model, folded, inputs, rtol, report, guessed=guessed)
    folded.normswap_report = report  # type: ignore[assignment]
    return folded
