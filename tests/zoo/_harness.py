"""The zoo harness: one model case, the four checks of the sweep, and their records.

Shared by the pytest sweep (``tests/zoo/test_zoo.py``), the survey (``tests/zoo/survey.py``,
which writes docs/zoo.md) and ``benchmarks/bench_zoo.py``. Everything goes through normswap's
public API (``normswap.swap``, ``normswap.fold``, ``normswap.export_onnx``); the checks of the
results are our own:

1. ``swap:<method>`` for l1, linf, kalman (and bwn on torchvision and timm, ``strict=False``:
   it converts conv/linear -> BN pairs only): no BatchNorm module and no batch-norm call
   outside a normswap layer is left (modules listed statically, calls caught at run time by a
   dispatch mode, so a functional ``F.batch_norm`` counts too), and the eval outputs stay
   within :data:`RTOL` of the original, ``max|Δ| / max|ref|`` over every output tensor.
2. ``kalman-priors``: the kalman report warns about no missing prior, its metrics show the
   prior pass ran, and no Kalman layer's prior chain was cut (every layer gets a graph prior).
3. ``fold``: ``fold(swap(m, "l1"))`` leaves no BatchNorm and no normswap norm layer except
   ChannelAffine layers the report gives a reason for (counted), within :data:`RTOL`.
4. ``export``: the fp16 ONNX export of the folded model (``fp16="auto"``) validates: emulated
   fp16 arithmetic and ONNX Runtime against the PyTorch model.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import normswap
from normswap.passes._match import batchnorm_like_modules, is_normswap_layer

from ..conftest import randomize_bn

__all__ = [
    "CHECKS",
    "METHODS",
    "RTOL",
    "CaseResult",
    "CheckResult",
    "ZooCase",
    "batchnorm_calls",
    "capture_strategy",
    "flatten_tensors",
    "leftover_norms",
    "max_rel_err",
    "prepare",
    "run_case",
    "zoo_threads",
]

RTOL = 1e-5
METHODS = ("l1", "linf", "kalman", "bwn")
CHECKS = ("swap:l1", "swap:linf", "swap:kalman", "swap:bwn", "kalman-priors", "fold", "export")
#: zoos the bounded-weight-norm conversion is checked on (issue: torchvision and timm)
BWN_ZOOS = ("torchvision", "timm")

def zoo_threads() -> int:
    """Torch threads for the zoo runs: ``NORMSWAP_ZOO_THREADS``, default 1. On a loaded 2-core
    machine two OpenMP threads that wait for each other make a forward up to 90x slower."""
    return int(os.environ.get("NORMSWAP_ZOO_THREADS", "1"))


Builder = Callable[[], "tuple[nn.Module, tuple[Any, ...]]"]


@dataclass(frozen=True)
class ZooCase:
    """One model of a zoo.

    Attributes:
        zoo: the zoo's name (``"timm"``, ``"torchvision"``, ...).
        name: the model's name inside the zoo (for timm: the family, then the variant).
        build: returns ``(model, inputs)``: the model freshly built (nothing downloaded) and a
            tuple of positional inputs it accepts; :func:`prepare` seeds, randomises BN and
            puts it in eval mode.
        smoke: also run in the default (not slow) test run.
        export: ``None`` to run check 4; otherwise why it is left out of the sweep.
        note: what is special about the model (shown in docs/zoo.md).
    """

    zoo: str
    name: str
    build: Builder
    smoke: bool = False
    export: str | None = None
    note: str = ""

    @property
    def id(self) -> str:
        return f"{self.zoo}:{self.name}"


@dataclass
class CheckResult:
    """The outcome of one check on one model."""

    check: str
    ok: bool
    error: str = ""          # first line: "Type: message" or the failed condition
    detail: str = ""         # traceback or the full failure text
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "ok": self.ok, "error": self.error,
                "seconds": round(self.seconds, 3), "info": self.info}


@dataclass
class CaseResult:
    """Every check of one model, with the build and forward times."""

    case: str
    build_seconds: float = 0.0
    forward_seconds: float = 0.0
    params: int = 0
    bn_modules: int = 0
    bn_calls: int = 0
    input_shapes: list[list[int]] = field(default_factory=list)
    checks: dict[str, CheckResult] = field(default_factory=dict)
    error: str = ""          # the model could not be built or run at all

    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks.values() if not c.ok]

    def as_dict(self) -> dict[str, Any]:
        return {"case": self.case, "build_seconds": round(self.build_seconds, 3),
                "forward_seconds": round(self.forward_seconds, 3), "params": self.params,
                "bn_modules": self.bn_modules, "bn_calls": self.bn_calls,
                "input_shapes": self.input_shapes, "error": self.error,
                "checks": {k: v.as_dict() for k, v in self.checks.items()}}


class _CheckFailed(Exception):
    """A condition of a check does not hold (kept apart from errors raised by normswap)."""


def prepare(case: ZooCase) -> tuple[nn.Module, tuple[Any, ...]]:
    """Build the case's model seeded, with randomised BN statistics, in eval mode."""
    torch.manual_seed(0)
    model, inputs = case.build()
    randomize_bn(model)
    return model.eval(), tuple(inputs)


def flatten_tensors(obj: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested output (tuples, lists, dicts, ``ModelOutput``s), with its path."""
    if isinstance(obj, torch.Tensor):
        yield "", obj
    elif isinstance(obj, dict):  # ModelOutput is an OrderedDict
        for k, v in obj.items():
            for p, t in flatten_tensors(v):
                yield f".{k}{p}", t
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            for p, t in flatten_tensors(v):
                yield f"[{i}]{p}", t


def max_rel_err(ref: Any, got: Any) -> tuple[float, str]:
    """The worst ``max|Δ| / max|ref|`` over every output tensor, and where it is.

    Raises:
        _CheckFailed: the outputs differ in structure, shape or dtype.
    """
    a, b = dict(flatten_tensors(ref)), dict(flatten_tensors(got))
    if a.keys() != b.keys():
        raise _CheckFailed(f"output structure differs: {sorted(a)[:4]} vs {sorted(b)[:4]}")
    if not a:
        raise _CheckFailed("the model returned no tensor")
    worst, where = 0.0, ""
    for k, r in a.items():
        g = b[k]
        if r.shape != g.shape:
            raise _CheckFailed(f"output{k}: shape {list(g.shape)} != {list(r.shape)}")
        if not r.is_floating_point():
            err = 0.0 if torch.equal(r, g) else math.inf
        else:
            r64, g64 = r.detach().double(), g.detach().double()
            if r64.numel() == 0:
                continue
            finite = torch.isfinite(r64)
            if not torch.equal(finite, torch.isfinite(g64)):
                err = math.inf
            else:
                d = (r64[finite] - g64[finite]).abs().max() if finite.any() else r64.new_zeros(())
                scale = r64[finite].abs().max() if finite.any() else r64.new_zeros(())
                err = float(d / scale) if scale > 0 else float(d)
        if err > worst or not where:
            worst, where = err, f"output{k}"
    return worst, where


class _BatchNormCalls(TorchDispatchMode):
    """Counts aten batch-norm calls made outside normswap's own layers."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = 0
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        name = func.name() if hasattr(func, "name") else str(func)
        # a call without running statistics (weight standardisation in NF-nets) is no
        # BatchNorm layer: only calls that carry running statistics count
        stats = args[3] if len(args) > 3 else (kwargs or {}).get("running_mean")
        if self.inside == 0 and "batch_norm" in name and "backward" not in name \
                and stats is not None:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def batchnorm_calls(model: nn.Module, inputs: tuple[Any, ...]) -> tuple[dict[str, int], Any]:
    """Run ``model(*inputs)`` in eval/no-grad and count batch-norm kernels called outside
    normswap layers (whose eval forward may use ``F.batch_norm`` as a fused affine) and
    InstanceNorm modules (which run on the same kernel).

    Returns:
        ``(calls by aten op name, the model's output)``.
    """
    mode = _BatchNormCalls()
    handles = []

    def enter(*_: Any) -> None:
        mode.inside += 1

    def leave(*_: Any) -> None:
        mode.inside -= 1

    for m in model.modules():
        # InstanceNorm runs on aten's batch-norm kernel (over a reshaped input): not a BN
        if is_normswap_layer(m) or isinstance(m, nn.modules.instancenorm._InstanceNorm):
            handles.append(m.register_forward_pre_hook(enter))
            handles.append(m.register_forward_hook(leave))
    try:
        with torch.no_grad(), mode:
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return mode.calls, out


def _is_channel_affine(m: nn.Module) -> bool:
    """A per-channel affine kept where a norm could not fold (grafted: ``ChannelAffine[X]``)."""
    from normswap.norms.affine import ChannelAffine

    return isinstance(m, ChannelAffine)


def leftover_norms(model: nn.Module) -> list[str]:
    """``name (Type)`` of every BatchNorm-family module and normswap norm layer (ChannelAffine
    excepted) in ``model``."""
    bn = {n for n, _ in batchnorm_like_modules(model)}
    return [f"{n or '<root>'} ({type(m).__name__})" for n, m in model.named_modules()
            if n in bn or (is_normswap_layer(m) and not _is_channel_affine(m))]


def capture_strategy(report: Any) -> str:
    """Which capture took the graph: ``metrics["capture"]["strategy"]`` (the capture layer's
    key), else the older ``metrics["mode"]``."""
    metrics = getattr(report, "metrics", {}) or {}
    capture = metrics.get("capture")
    if isinstance(capture, dict) and capture.get("strategy"):
        return str(capture["strategy"])
    if "mode" in metrics:
        return f"mode={metrics['mode']}"
    # fold's report has no mode: it traces, or says it fell back to a module walk
    walked = any("could not trace" in w.message for w in getattr(report, "warnings", []))
    return "mode=fallback" if walked else "mode=graph"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:400]


def _run_check(result: CaseResult, name: str, fn: Callable[[CheckResult], Any]) -> Any:
    """Run one check, recording its outcome; returns what ``fn`` returns (None on failure)."""
    rec = CheckResult(name, ok=False)
    t0 = time.perf_counter()
    value = None
    try:
        value = fn(rec)
        rec.ok = True
    except _CheckFailed as exc:
        rec.error = str(exc).splitlines()[0][:400]
        rec.detail = str(exc)
    except Exception as exc:  # noqa: BLE001 - the survey records every failure and goes on
        rec.error = _first_line(exc)
        rec.detail = traceback.format_exc()
    rec.seconds = time.perf_counter() - t0
    result.checks[name] = rec
    return value


def _check_equivalent(rec: CheckResult, model: nn.Module, inputs: tuple[Any, ...],
                      ref: Any, kept: int = 0) -> None:
    """No BN call left outside normswap layers (but the ``kept`` BatchNorm modules a method
    reported refusing), and outputs within RTOL (records both)."""
    calls, out = batchnorm_calls(model.eval(), inputs)
    err, where = max_rel_err(ref, out)
    rec.info["rel_err"] = err
    rec.info["worst_output"] = where
    if sum(calls.values()) > kept:
        raise _CheckFailed(f"batch-norm calls left outside normswap layers: {calls}")
    if not err <= RTOL:
        raise _CheckFailed(f"eval outputs differ: relative error {err:.3g} > {RTOL:g} at {where}")


def _swap_check(model: nn.Module, inputs: tuple[Any, ...], ref: Any, method: str,
                keep: dict[str, nn.Module]) -> Callable[[CheckResult], None]:
    def check(rec: CheckResult) -> None:
        t0 = time.perf_counter()
        # bwn converts conv/linear -> BN pairs only: a BN with no such producer (a DenseNet
        # pre-activation) is kept, and must then be reported with its reason
        strict = method != "bwn"
        out = normswap.swap(model, method, example_inputs=inputs, strict=strict)
        rec.info["swap_seconds"] = round(time.perf_counter() - t0, 4)
        report = out.normswap_report
        rec.info["strategy"] = capture_strategy(report)
        rec.info["changed"] = len(report.changes)
        rec.info["warnings"] = [w.message[:300] for w in report.warnings]
        if method in ("l1", "kalman"):  # fold and the prior check reuse these two
            keep[method] = out
        reasons = {s.node for s in report.skips if s.reason.strip()}
        left = [f"{n or '<root>'} ({type(m).__name__})" for n, m in batchnorm_like_modules(out)
                if strict or n not in reasons]
        if left:
            raise _CheckFailed(f"{len(left)} BatchNorm module(s) left: {left[:4]}")
        kept = len(batchnorm_like_modules(out)) if not strict else 0
        rec.info["kept_with_reason"] = kept
        _check_equivalent(rec, out, inputs, ref, kept=kept)
    return check


def _kalman_prior_check(keep: dict[str, nn.Module]) -> Callable[[CheckResult], None]:
    def check(rec: CheckResult) -> None:
        if "kalman" not in keep:
            raise _CheckFailed("not run: the kalman swap failed")
        report = keep["kalman"].normswap_report
        metrics = report.metrics
        layers = metrics.get("kalman_layers")
        wired = metrics.get("kalman_layers_with_prior")
        cuts: dict[str, int] = {}
        for s in report.skips:
            if "prior chain cut" in s.reason:
                cuts[s.op] = cuts.get(s.op, 0) + 1
        rec.info.update(kalman_layers=layers, with_prior=wired, chains_cut_at=cuts)
        missing = [w.message for w in report.warnings if "prior" in w.message.lower()]
        if missing:
            raise _CheckFailed(f"report warns: {missing[0][:300]}")
        if not isinstance(layers, int) or not isinstance(wired, int):
            raise _CheckFailed(f"the prior pass did not run (kalman_layers={layers}, "
                               f"kalman_layers_with_prior={wired})")
        if cuts:
            top = ", ".join(f"{op} x{n}" for op, n in
                            sorted(cuts.items(), key=lambda kv: -kv[1])[:3])
            raise _CheckFailed(f"{sum(cuts.values())} of {layers} Kalman layer(s) without a "
                               f"graph prior: prior chains cut at {top}")
    return check


def _fold_check(model: nn.Module, inputs: tuple[Any, ...], ref: Any,
                keep: dict[str, nn.Module]) -> Callable[[CheckResult], None]:
    def check(rec: CheckResult) -> None:
        swapped = keep.get("l1")
        if swapped is None:
            swapped = normswap.swap(model, "l1", example_inputs=inputs)
        t0 = time.perf_counter()
        folded = normswap.fold(swapped, example_inputs=inputs)
        rec.info["fold_seconds"] = round(time.perf_counter() - t0, 4)
        keep["folded"] = folded
        report = folded.normswap_report
        rec.info["strategy"] = capture_strategy(report)
        reasons = {s.node for s in report.skips if s.reason.strip()}
        affine = [n for n, m in folded.named_modules() if _is_channel_affine(m)]
        unexplained = [n for n in affine if n not in reasons]
        rec.info["channel_affine"] = len(affine)
        rec.info["folded"] = report.metrics.get("folded")
        rec.info["warnings"] = [w.message[:300] for w in report.warnings]
        left = leftover_norms(folded)
        if left:
            raise _CheckFailed(f"{len(left)} norm layer(s) left after fold: {left[:4]}")
        if unexplained:
            raise _CheckFailed(f"{len(unexplained)} ChannelAffine without a reason in the "
                               f"report: {unexplained[:4]}")
        _check_equivalent(rec, folded, inputs, ref)
    return check


def _export_check(inputs: tuple[Any, ...], keep: dict[str, nn.Module],
                  workdir: Path) -> Callable[[CheckResult], None]:
    def check(rec: CheckResult) -> None:
        folded = keep.get("folded")
        if folded is None:
            raise _CheckFailed("not run: fold failed")
        path = workdir / "m.onnx"
        t0 = time.perf_counter()
        # "auto": what a deployment uses -- the range plan, then a search for the few nodes
        # that must stay fp32 when the verdict fails
        report = normswap.export_onnx(folded, inputs, path, fp16="auto", strict=False)
        rec.info["export_seconds"] = round(time.perf_counter() - t0, 4)
        rec.info["file_size_bytes"] = getattr(report, "file_size_bytes", None)
        metrics = {k: v for k, v in report.metrics.items()
                   if isinstance(v, (int, float, str, bool))}
        rec.info["metrics"] = metrics
        rec.info["warnings"] = [w.message[:300] for w in report.warnings]
        validation = getattr(report, "validation", None)
        if validation is not None:
            rec.info["validation"] = validation.to_dict()
        if not report.passed:
            why = ("; ".join(validation.errors + [f"{m.output}: {', '.join(m.failures)}"
                                                  for m in validation.metrics if m.failures])
                   if validation is not None else "not validated")
            raise _CheckFailed(f"fp16 export does not validate: {why[:300]}")
    return check


def run_case(case: ZooCase, *, checks: tuple[str, ...] = CHECKS,
             workdir: Path | None = None) -> CaseResult:
    """Build ``case`` and run ``checks`` on it; every failure is recorded, none raised."""
    result = CaseResult(case.id)
    t0 = time.perf_counter()
    try:
        model, inputs = prepare(case)
    except Exception as exc:  # noqa: BLE001 - recorded: the model could not be built
        result.error = "build: " + _first_line(exc)
        return result
    result.build_seconds = time.perf_counter() - t0
    result.params = sum(p.numel() for p in model.parameters())
    result.bn_modules = len(batchnorm_like_modules(model))
    result.input_shapes = [list(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
    t0 = time.perf_counter()
    try:
        calls, ref = batchnorm_calls(model, inputs)
    except Exception as exc:  # noqa: BLE001 - recorded: the model does not run on its input
        result.error = "forward: " + _first_line(exc)
        return result
    result.forward_seconds = time.perf_counter() - t0
    result.bn_calls = sum(calls.values())
    if not result.bn_modules and not result.bn_calls:
        result.error = "the model has no BatchNorm (module or call): nothing to check"
        return result
    keep: dict[str, nn.Module] = {}
    for method in METHODS:
        if method == "bwn" and case.zoo not in BWN_ZOOS:
            continue
        if f"swap:{method}" in checks:
            _run_check(result, f"swap:{method}", _swap_check(model, inputs, ref, method, keep))
    if "kalman-priors" in checks:
        _run_check(result, "kalman-priors", _kalman_prior_check(keep))
    keep.pop("kalman", None)  # hold at most the original, the l1 copy and the folded one
    if "fold" in checks or "export" in checks:
        _run_check(result, "fold", _fold_check(model, inputs, ref, keep))
        if "fold" not in checks:
            del result.checks["fold"]
    if "export" in checks:
        with tempfile.TemporaryDirectory(prefix="zoo-export-") as tmp:
            _run_check(result, "export", _export_check(inputs, keep, Path(workdir or tmp)))
    return result
