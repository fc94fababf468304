"""``fp16="auto"``: find a few nodes to keep in fp32 when the range-guarded fp16 graph fails.

The idea of onnxconverter-common's ``auto_convert_mixed_precision`` (keep nodes in fp32 until
the fp16 model validates), driven by measured error instead of blind bisection:

1. Start from the range plan (:func:`~normswap.export.fp16.plan_fp32_nodes`).
2. Evaluate the current fp16 graph in emulated fp16 (:class:`~normswap.export.emulate
   .Fp16Emulator`, every intermediate) and the fp32 graph in ONNX Runtime on the same inputs.
3. Score each fp16 node by the error it *adds*: the relative error of its output minus the
   largest relative error of its inputs (``inf`` when its output turns inf/NaN while its inputs
   were finite: the node where fp16 overflows). Ties go to the larger measured ``max|x|``.
4. Keep the top node in fp32 (an overflowing node keeps its consumers in fp32 too, or the
   cast of its output back to fp16 would overflow), convert again, validate again; repeat
   until the verdict passes, nothing scores above zero, or ``max_iterations`` /
   ``time_budget_s`` is reached.

Each iteration is recorded (node added, why, verdict), with the total cost.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from onnx import ModelProto

from .fp16 import Fp16Plan, ProbeSession, TensorRange
from .validate import ValidationResult

__all__ = ["AutoSearch", "node_error_scores", "search_fp32_nodes"]

log = logging.getLogger(__name__)


@dataclass
class AutoSearch:
    """What the ``fp16="auto"`` search did.

    Attributes:
        nodes: node name -> why the search kept it in fp32 (on top of the range plan).
        iterations: conversions + validations run by the search.
        seconds: wall time of the search.
        passed: the verdict after the search.
        stopped_by: ``"passed"``, ``"no candidate"``, ``"max_iterations"`` or ``"time_budget"``.
        history: one dict per iteration (nodes added, score, verdict).
    """

    nodes: dict[str, str] = field(default_factory=dict)
    iterations: int = 0
    seconds: float = 0.0
    passed: bool = False
    stopped_by: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        return {"nodes": dict(self.nodes), "iterations": self.iterations,
                "seconds": self.seconds, "passed": self.passed, "stopped_by": self.stopped_by,
                "history": list(self.history)}


def _rel_error(got: np.ndarray | None, ref: np.ndarray | None) -> float:
    """``max|a−b| / max|b|`` over finite reference values; inf when ``got`` is not finite there."""
    if got is None or ref is None:
        return 0.0
    a = np.asarray(got, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    if a.shape != b.shape:
        return 0.0
    fin = np.isfinite(b)
    if not fin.any():
        return 0.0
    if not np.isfinite(a[fin]).all():
        return float("inf")
    scale = float(np.abs(b[fin]).max())
    diff = float(np.abs(a[fin] - b[fin]).max())
    return diff / scale if scale > 0 else diff


def node_error_scores(fp32_model: ModelProto, fp16_model: ModelProto, fp32_values:
                      Sequence[Mapping[str, np.ndarray]], fp16_values:
                      Sequence[Mapping[str, np.ndarray]], exclude: set[str]
                      ) -> dict[str, tuple[float, bool]]:
    """Per node computing in fp16, the relative error it adds and whether it overflows.

    Args:
        fp32_model: the fp32 graph (named nodes).
        fp16_model: the converted graph (same node names).
        fp32_values: per input, every fp32 tensor by name (ORT).
        fp16_values: per input, every tensor of the fp16 graph by name (emulation).
        exclude: node names already kept in fp32.

    Returns:
        Node name -> (score, overflow). The score is the worst over the inputs.
    """
    fp16_nodes = {n.name: n for n in fp16_model.graph.node}
    scores: dict[str, tuple[float, bool]] = {}
    for node in fp32_model.graph.node:
        twin = fp16_nodes.get(node.name)
        if twin is None or node.name in exclude or node.op_type in ("Constant", "Identity"):
            continue
        best, overflow = 0.0, False
        for ref, emu in zip(fp32_values, fp16_values):
            e_in = max([_rel_error(emu.get(t16), ref.get(t32))
                        for t16, t32 in zip(twin.input, node.input) if t32 in ref] or [0.0])
            e_out = max([_rel_error(emu.get(t16), ref.get(t32))
                         for t16, t32 in zip(twin.output, node.output) if t32 in ref] or [0.0])
            if e_out == float("inf") and e_in != float("inf"):
                best, overflow = float("inf"), True
            elif np.isfinite(e_out) and np.isfinite(e_in):
                best = max(best, e_out - e_in)
        if best > 0:
            scores[node.name] = (best, overflow)
    return scores


def search_fp32_nodes(fp32_model: ModelProto, convert: Callable[[Sequence[str]],
                      tuple[ModelProto, Fp16Plan]],
                      validate: Callable[[ModelProto], ValidationResult],
                      feeds: Sequence[Mapping[str, np.ndarray]], *,
                      first: tuple[ModelProto, Fp16Plan, ValidationResult],
                      ranges: Mapping[str, TensorRange], max_iterations: int = 16,
                      time_budget_s: float | None = 600.0,
                      fp32_source: ModelProto | str | None = None,
                      emulator_source: Callable[[ModelProto], ModelProto | bytes | str] | None
                      = None) -> tuple[ModelProto, Fp16Plan, ValidationResult, AutoSearch]:
    """Add nodes to the fp32 set, one error source at a time, until validation passes.

    Args:
        fp32_model: the fp32 graph (named nodes; weights need not be loaded).
        convert: node block list -> (fp16 model, plan) (the range plan plus those nodes).
        validate: fp16 model -> verdict.
        feeds: inputs to rank nodes on (the emulated validation inputs).
        first: the failing (model, plan, verdict) of the plain range plan.
        ranges: measured fp32 ranges (tie-break).
        max_iterations: most conversions + validations.
        time_budget_s: stop after this long (the current best is returned).
        fp32_source: what ONNX Runtime loads for the fp32 values (default ``fp32_model``; a
            path for models with external data).
        emulator_source: fp16 model -> what the emulation loads (default: the model itself;
            the staged path for models with external data).

    Returns:
        ``(fp16_model, plan, verdict, search)`` of the last iteration.
    """
    from ..progress import stage
    from .emulate import Fp16Emulator

    t0 = time.perf_counter()
    search = AutoSearch()
    model, plan, result = first
    probe = ProbeSession(fp32_source if fp32_source is not None else fp32_model)
    consumers: dict[str, list[str]] = defaultdict(list)
    for node in fp32_model.graph.node:
        for i in node.input:
            consumers[i].append(node.name)
    outputs = {n.name: list(n.output) for n in fp32_model.graph.node}
    added: list[str] = []
    while not result.passed:
        if search.iterations >= max_iterations:
            search.stopped_by = "max_iterations"
            break
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
            search.stopped_by = "time_budget"
            break
        with stage("fp16 auto", f"iteration {search.iterations + 1}"):
            emulator = Fp16Emulator(model if emulator_source is None
                                    else emulator_source(model))
            # one input at a time: every intermediate of a detection model is gigabytes
            scores: dict[str, tuple[float, bool]] = {}
            for feed in feeds:
                one = node_error_scores(fp32_model, model, [probe.run(feed)],
                                        [emulator.run(feed, intermediate=True)],
                                        set(plan.fp32_nodes))
                for name, (score, overflow) in one.items():
                    was, was_overflow = scores.get(name, (0.0, False))
                    scores[name] = (max(was, score), was_overflow or overflow)
            if not scores:
                search.stopped_by = "no candidate"
                break

            def key(name: str) -> tuple[float, float]:
                peak = max((ranges[o].max_abs for o in outputs.get(name, []) if o in ranges),
                           default=0.0)
                return scores[name][0], peak

            top = max(scores, key=key)
            score, overflow = scores[top]
            new = [top]
            if overflow:
                reason = "fp16 output turns inf/NaN (emulated) while its inputs are finite"
                # its consumers too: the cast of its fp32 output back to fp16 would overflow
                new += [c for o in outputs.get(top, []) for c in consumers.get(o, [])]
            else:
                reason = f"adds relative error {score:.3g} in emulated fp16"
            new = [n for n in dict.fromkeys(new) if n not in plan.fp32_nodes]
            for n in new:
                search.nodes.setdefault(n, reason if n == top else
                                        f"consumer of the overflowing output of {top}")
            added += new
            model, plan = convert(added)
            result = validate(model)
            search.iterations += 1
            search.history.append({"iteration": search.iterations, "added": new,
                                   "score": score, "overflow": overflow,
                                   "passed": result.passed,
                                   "reasons": result.reasons[:3]})
            log.info("fp16 auto: iteration %d kept %s in fp32 -> %s", search.iterations, new,
                     "passed" if result.passed else "failed")
    if result.passed:
        search.stopped_by = "passed"
    search.passed = result.passed
    search.seconds = time.perf_counter() - t0
    for name in search.nodes:
        if name in plan.fp32_nodes:
            plan.fp32_nodes[name] = f"fp16 auto search: {search.nodes[name]}"
    return model, plan, result, search
