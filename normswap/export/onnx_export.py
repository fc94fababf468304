"""Export a (folded) model to ONNX, optionally as range-guarded fp16, and validate it in ORT.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript) is the default
and the recommended path on this torch (2.9+ made it the default; the TorchScript exporter is
deprecated). It exports torchvision's classifiers and segmentation models with a dynamic batch
(``torch.export.Dim.DYNAMIC``, which also accepts a batch-1 example) and its optimiser already
folds any remaining eval-mode BatchNorm into Conv. When it fails (data-dependent control flow,
unsupported ops), ``exporter="auto"`` retries with the TorchScript exporter
(``dynamo=False``, opset 17) and notes it in the report.

fp16: :func:`~normswap.export.fp16.convert_fp16` (ORT's converter plus measured-range guards).
Validation: :func:`~normswap.export.validate.validate_onnx` on the example inputs, the
calibration inputs and ``n_random`` random inputs shaped like the examples. Nothing is written
until the model is built, checked (``onnx.checker.check_model``) and, when ``validate`` and
``strict``, validated; the write is atomic (a temp file in the target's directory, then
``os.replace``), and an existing file is only replaced with ``force=True``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import onnx
import torch
from onnx import ModelProto
from torch import nn

from .._fs import OutputPathError, atomic_write_bytes, check_output_path
from .._modules import as_inputs, safe_deepcopy
from ..errors import ExportError, NumericalMismatchError
from ..report import PassReport
from .fp16 import (
    FP16_MAX,
    Fp16Plan,
    convert_fp16,
    cpu_fp16_op_types,
    float_initializer_counts,
    name_nodes,
)
from .validate import (
    FP16_TOLERANCES,
    FP32_TOLERANCES,
    Tolerances,
    ValidationResult,
    feeds_for,
    torch_outputs,
    validate_onnx,
)

__all__ = ["ExportReport", "ValidationError", "export_onnx", "export_fp32_proto"]

log = logging.getLogger(__name__)

Exporter = Literal["auto", "dynamo", "torchscript"]
_TORCHSCRIPT_OPSET = 17


class ValidationError(ExportError, NumericalMismatchError):
    """The exported model's runtime outputs are outside the tolerances; ``.report`` has details."""

    def __init__(self, message: str, report: "ExportReport") -> None:
        super().__init__(message)
        self.report = report


@dataclass
class ExportReport(PassReport):
    """What :func:`export_onnx` produced.

    Every node kept in fp32 appears as a ``skip`` entry (node, op type, reason); ``fp32_nodes``
    holds the same as a dict.

    Attributes:
        path: the written file ("" when nothing was written).
        exporter: ``"dynamo"`` or ``"torchscript"``.
        opset: the default-domain opset of the model.
        fp16: whether the model was converted to fp16.
        fp32_nodes: node name -> reason, for nodes kept in fp32.
        fp16_initializer_fraction: fp16 float initialisers / all float initialisers.
        initializer_counts: counts and bytes of fp16/fp32 initialisers.
        file_size_bytes: size of the serialised model.
        cpu_fp16_fallback_ops: fp16 op types without a CPU fp16 kernel (run through casts).
        validation: the runtime comparison (None when ``validate=False``).
    """

    path: str = ""
    exporter: str = ""
    opset: int | None = None
    fp16: bool = False
    fp32_nodes: dict[str, str] = field(default_factory=dict)
    fp16_initializer_fraction: float | None = None
    initializer_counts: dict[str, int] = field(default_factory=dict)
    file_size_bytes: int = 0
    cpu_fp16_fallback_ops: list[str] = field(default_factory=list)
    validation: ValidationResult | None = None

    @property
    def passed(self) -> bool | None:
        """The validation verdict (None when not validated)."""
        return None if self.validation is None else self.validation.passed

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict including the export fields."""
        data = super().to_dict()
        data.update({
            "path": self.path, "exporter": self.exporter, "opset": self.opset,
            "fp16": self.fp16, "fp32_nodes": dict(self.fp32_nodes),
            "fp16_initializer_fraction": self.fp16_initializer_fraction,
            "initializer_counts": dict(self.initializer_counts),
            "file_size_bytes": self.file_size_bytes,
            "cpu_fp16_fallback_ops": list(self.cpu_fp16_fallback_ops),
            "validation": None if self.validation is None else self.validation.to_dict(),
        })
        return data

    def table(self) -> str:
        """The entry table followed by the export summary and the validation lines."""
        lines = [super().table(), f"file: {self.path or '(not written)'} "
                 f"({self.file_size_bytes / 1e6:.2f} MB), exporter={self.exporter}, "
                 f"opset={self.opset}, fp16={self.fp16}"]
        if self.fp16_initializer_fraction is not None:
            lines.append(f"fp16 float initialisers: {self.fp16_initializer_fraction:.1%}")
        if self.validation is not None:
            lines.append(self.validation.summary())
        return "\n".join(lines)


def _random_like(inputs: tuple[Any, ...], gen: torch.Generator) -> tuple[Any, ...]:
    """Random inputs with the shapes and dtypes of ``inputs``."""
    out: list[Any] = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            std = float(x.float().std()) if x.numel() > 1 else 1.0
            mean = float(x.float().mean())
            out.append((torch.randn(x.shape, generator=gen) * (std or 1.0) + mean).to(x.dtype))
        elif isinstance(x, torch.Tensor) and x.numel():
            lo, hi = int(x.min()), int(x.max())
            out.append(torch.randint(lo, hi + 1, x.shape, generator=gen, dtype=x.dtype))
        else:
            out.append(x)
    return tuple(out)


def _dynamic_shapes(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple({0: torch.export.Dim.DYNAMIC} if isinstance(x, torch.Tensor) and x.dim() else None
                 for x in inputs)


def export_fp32_proto(model: nn.Module, inputs: tuple[Any, ...], *, dynamic_batch: bool = True,
                      opset: int | None = None, exporter: Exporter = "auto",
                      report: PassReport | None = None) -> tuple[ModelProto, str]:
    """Export ``model`` to an in-memory fp32 ONNX model.

    Args:
        model: the model, in eval mode.
        inputs: positional example inputs.
        dynamic_batch: make dim 0 of every tensor input dynamic.
        opset: the opset (default: the exporter's).
        exporter: ``"dynamo"``, ``"torchscript"`` or ``"auto"`` (dynamo, then torchscript).
        report: where to note a fallback.

    Returns:
        ``(model_proto, exporter_used)``.

    Raises:
        ExportError: every exporter tried failed.
    """
    errors: list[str] = []
    if exporter in ("auto", "dynamo"):
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    model, inputs, dynamo=True, opset_version=opset, optimize=True,
                    dynamic_shapes=_dynamic_shapes(inputs) if dynamic_batch else None,
                    verbose=False)
            return program.model_proto, "dynamo"
        except Exception as exc:  # noqa: BLE001 - recorded; maybe retried
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            errors.append(f"dynamo exporter: {type(exc).__name__}: {first}")
            if exporter == "dynamo":
                raise ExportError(f"torch.onnx.export(dynamo=True) failed for "
                                  f"{type(model).__name__}: {errors[-1]}; try "
                                  "exporter='torchscript'") from exc
            if report is not None:
                report.warn(f"{errors[-1]}; falling back to the TorchScript exporter")
    try:
        n_in = sum(isinstance(x, torch.Tensor) for x in inputs)
        names = [f"input_{i}" for i in range(n_in)] if n_in > 1 else ["input"]
        with torch.no_grad():
            n_out = len(torch_outputs(model, inputs))
        out_names = [f"output_{i}" for i in range(n_out)] if n_out > 1 else ["output"]
        axes = {n: {0: "batch"} for n in names + out_names} if dynamic_batch else None
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, inputs, buf, dynamo=False, input_names=names,
                              output_names=out_names, dynamic_axes=axes,
                              opset_version=opset or _TORCHSCRIPT_OPSET, do_constant_folding=True)
        return onnx.load_from_string(buf.getvalue()), "torchscript"
    except Exception as exc:  # noqa: BLE001 - reported together
        errors.append(f"torchscript exporter: {type(exc).__name__}: {exc}")
        raise ExportError(f"could not export {type(model).__name__} to ONNX: "
                          + " | ".join(errors)) from exc


def _opset(model: ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _fp16_op_types(model: ModelProto, fp32_nodes: Iterable[str]) -> set[str]:
    """Op types of the nodes that compute in fp16 (not blocked, not casts)."""
    kept = set(fp32_nodes)
    return {n.op_type for n in model.graph.node
            if n.name not in kept and n.op_type not in ("Cast", "Identity", "Constant")}


def _record_plan(report: ExportReport, plan: Fp16Plan) -> None:
    for name, reason in plan.fp32_nodes.items():
        report.skip(name, plan.op_types.get(name, "?"), f"kept in fp32: {reason}")
    report.fp32_nodes = dict(plan.fp32_nodes)
    tiny = 0
    for name, (big, small) in plan.clamped_initializers.items():
        if big:
            report.warn(f"initialiser '{name}': {big} values above {FP16_MAX:g} clamped to "
                        f"±{FP16_MAX:g} by the fp16 converter", name)
        tiny += small
    if tiny:
        report.note(f"{tiny} non-zero initialiser values below 5.96e-08 were raised to "
                    "±5.96e-08 by the fp16 converter (absolute change < 6e-08)")
    if plan.fp32_reference_nonfinite:
        report.warn("the fp32 model itself produces inf/NaN in: "
                    + ", ".join(plan.fp32_reference_nonfinite[:10]))


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike[str], *,
                fp16: bool = True, validate: bool = True, dynamic_batch: bool = True,
                opset: int | None = None, keep_io_types: bool = True,
                calibration_inputs: Sequence[Any] | None = None, force: bool = False,
                op_block_list: Iterable[str] | None = None,
                tolerances: Tolerances | None = None, exporter: Exporter = "auto",
                n_random: int = 2, seed: int = 0, overflow_limit: float = FP16_MAX / 2,
                strict: bool = True) -> ExportReport:
    """Export ``model`` to ONNX (fp16 by default), validate it in ONNX Runtime, write it.

    Args:
        model: the model (fold it first with :func:`~normswap.passes.fold_conv_bn.fold_model`);
            it is run in eval mode on a copy, never modified.
        example_inputs: a tensor or a tuple of positional inputs.
        path: the destination ``.onnx`` file.
        fp16: convert to fp16 with range guards.
        validate: compare ORT outputs with the PyTorch model.
        dynamic_batch: make the batch dim dynamic.
        opset: ONNX opset (default: the exporter's).
        keep_io_types: keep fp32 inputs/outputs on an fp16 model.
        calibration_inputs: more input tuples (or tensors) for range measurement and validation.
        force: overwrite an existing ``path``.
        op_block_list: op types kept in fp32 (default
            :data:`~normswap.export.fp16.FP32_OP_TYPES`; ORT's default list is always added).
        tolerances: verdict thresholds (default :data:`FP16_TOLERANCES` or
            :data:`FP32_TOLERANCES`).
        exporter: ``"auto"`` (dynamo, then TorchScript), ``"dynamo"`` or ``"torchscript"``.
        n_random: random inputs added to the validation set.
        seed: seed of the random inputs.
        overflow_limit: activations above this stay fp32.
        strict: raise :class:`ValidationError` and write nothing when validation fails
            (False: write and return the failing report).

    Returns:
        The :class:`ExportReport`.

    Raises:
        ExportError: the file exists without ``force``, export or the checker failed.
        ValidationError: validation failed and ``strict``.
    """
    target = check_output_path(path, force=force)
    work = safe_deepcopy(model).eval()
    inputs = as_inputs(example_inputs)
    calib = [as_inputs(c) for c in (calibration_inputs or [])]
    report = ExportReport(title=f"export onnx -> {target.name}", fp16=fp16)

    proto, report.exporter = export_fp32_proto(work, inputs, dynamic_batch=dynamic_batch,
                                               opset=opset, exporter=exporter, report=report)
    name_nodes(proto)
    report.opset = _opset(proto)
    bn_nodes = [n.name for n in proto.graph.node if n.op_type == "BatchNormalization"]
    if bn_nodes:
        report.warn(f"{len(bn_nodes)} BatchNormalization nodes remain (e.g. {bn_nodes[0]}); "
                    "fold the model first with normswap.fold_model")
    input_names = [i.name for i in proto.graph.input
                   if i.name not in {t.name for t in proto.graph.initializer}]
    gen = torch.Generator().manual_seed(seed)
    runs = [inputs] + calib + [_random_like(inputs, gen) for _ in range(n_random)]
    if fp16:
        proto, plan = convert_fp16(proto, feeds_for(input_names, [inputs] + calib),
                                   keep_io_types=keep_io_types, op_block_list=op_block_list,
                                   overflow_limit=overflow_limit)
        _record_plan(report, plan)
        counts = float_initializer_counts(proto)
        report.initializer_counts = counts
        total = counts["fp16"] + counts["fp32"]
        report.fp16_initializer_fraction = counts["fp16"] / total if total else None
        cpu_ops = cpu_fp16_op_types()
        if cpu_ops is not None:
            missing = sorted(_fp16_op_types(proto, plan.fp32_nodes) - cpu_ops)
            report.cpu_fp16_fallback_ops = missing
            if missing:
                report.warn("ONNX Runtime's CPU provider has no fp16 kernels for "
                            f"{', '.join(missing)}: they run through inserted casts (slower "
                            "than fp32 on CPU); fp16 pays off on GPU")
    else:
        report.initializer_counts = float_initializer_counts(proto)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the exported model for '{target}': {exc}") from exc
    data = proto.SerializeToString()
    report.file_size_bytes = len(data)
    if validate:
        tol = tolerances or (FP16_TOLERANCES if fp16 else FP32_TOLERANCES)
        report.validation = validate_onnx(data, work, runs, tolerances=tol)
        report.metrics["validation_passed"] = report.validation.passed
        if not report.validation.passed:
            message = (f"exported model for '{target}' fails validation:\n"
                       f"{report.validation.summary()}")
            if strict:
                raise ValidationError(message + "\nnothing was written; pass strict=False to "
                                      "write it anyway, or widen the tolerances", report)
            report.warn(message)
    try:
        atomic_write_bytes(target, data, force=force)
    except OutputPathError:
        raise
    except OSError as exc:
        raise ExportError(f"could not write '{target}': {exc}") from exc
    report.path = str(target)
    report.metrics["file_size_bytes"] = report.file_size_bytes
    log.info("wrote %s (%.2f MB)", target, report.file_size_bytes / 1e6)
    return report
