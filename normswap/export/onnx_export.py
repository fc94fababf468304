"""Export a (folded) model to ONNX, optionally as range-guarded fp16, validate it, write it.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript) is the default
and the recommended path on this torch (2.9+ made it the default; the TorchScript exporter is
deprecated). It exports torchvision's classifiers and segmentation models with a dynamic batch
(``torch.export.Dim.DYNAMIC``, which also accepts a batch-1 example) and its optimiser already
folds any remaining eval-mode BatchNorm into Conv. When it fails (data-dependent control flow,
unsupported ops), ``exporter="auto"`` retries with the TorchScript exporter
(``dynamo=False``, opset 17) and notes it in the report. A model returning dataclasses is
exported through a wrapper that returns their fields, so that every output is in the graph.

fp16: :func:`~normswap.export.fp16.convert_fp16` (ORT's converter plus measured-range guards);
``fp16="auto"`` adds the search of :mod:`normswap.export.auto` when the verdict fails.
Validation: :func:`~normswap.export.validate.validate_onnx` on the example inputs, the
calibration inputs and ``n_random`` random inputs shaped like the examples, in ONNX Runtime and
(fp16) in emulated fp16 arithmetic; docs/fp16_validation.md says what each evaluator checks.

Nothing is written until the model is built, checked (``onnx.checker.check_model``) and, when
``validate`` and ``strict``, validated; the write is atomic and an existing file is only
replaced with ``force=True``. A model larger than ``external_data_threshold`` (default: 2 GiB
minus a margin, protobuf's limit) is written as ``NAME.onnx`` + ``NAME.onnx.data``
(:mod:`normswap.export._external`). A model larger than ``stream_threshold`` (default 256 MiB)
but within that limit goes through the same external-data files while it is converted and
validated, so that no step holds more than one copy of its weights, and is written as one file
at the end.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import onnx
import torch
from onnx import ModelProto
from torch import nn

from .._fs import OutputPathError, atomic_write, atomic_write_bytes, check_output_path
from .._modules import ModuleStateGuard, as_inputs, safe_deepcopy
from ..errors import ExportError, NumericalMismatchError
from ..progress import stage
from ..report import PassReport
from ._external import (
    EXTERNAL_DATA_THRESHOLD,
    data_file_name,
    estimated_size,
    move_into_place,
    save_external,
    staging_dir,
    write_inline,
)
from .export_report import ExportReport
from .fp16 import (
    FP16_MAX,
    Fp16Plan,
    TensorRange,
    convert_fp16,
    cpu_fp16_op_types,
    float_initializer_counts,
    measure_ranges,
    name_nodes,
)
from .validate import (
    FP16_TOLERANCES,
    FP32_TOLERANCES,
    Tolerances,
    ValidationResult,
    _plain,
    feeds_for,
    flatten_outputs,
    has_unregistered_dataclass,
    input_ranges,
    torch_outputs,
    validate_onnx,
)

__all__ = ["ExportReport", "ValidationError", "export_onnx", "export_fp32_proto",
           "EXTERNAL_DATA_THRESHOLD", "STREAM_THRESHOLD"]

#: Default size above which a model is converted and validated as files with external data
#: (written as one file when it is within ``external_data_threshold``).
STREAM_THRESHOLD = 256 * 2 ** 20

log = logging.getLogger(__name__)

Exporter = Literal["auto", "dynamo", "torchscript"]
_TORCHSCRIPT_OPSET = 17


class ValidationError(ExportError, NumericalMismatchError):
    """The exported model's runtime outputs are outside the tolerances; ``.report`` has details."""

    def __init__(self, message: str, report: ExportReport) -> None:
        super().__init__(message)
        self.report = report


class _PlainOutputs(nn.Module):
    """Returns the model's output with dataclasses as dicts of their fields (exportable)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        return _plain(self.inner(*args))


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


def _first_line(exc: BaseException) -> str:
    """``Type: first line`` of the innermost cause (the exporters wrap the real error)."""
    inner = exc
    seen = {id(inner)}
    while inner.__cause__ is not None and id(inner.__cause__) not in seen:
        inner = inner.__cause__
        seen.add(id(inner))
    text = str(inner).strip()
    return f"{type(inner).__name__}: {text.splitlines()[0] if text else '(no message)'}"


def _rename_inputs(proto: ModelProto, names: Sequence[str]) -> None:
    """Rename the graph inputs (in order) and every use of them, in place."""
    mapping = {vi.name: new for vi, new in zip(proto.graph.input, names) if vi.name != new}
    if not mapping:
        return
    for vi in proto.graph.input:
        vi.name = mapping.get(vi.name, vi.name)
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]


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
        ExportError: every exporter tried failed; the message names the model class and the
            first line of each exporter's error.
    """
    errors: list[str] = []
    cls = type(model.inner if isinstance(model, _PlainOutputs) else model).__name__
    if exporter in ("auto", "dynamo"):
        try:
            shapes: Any = _dynamic_shapes(inputs) if dynamic_batch else None
            if isinstance(model, _PlainOutputs) and shapes is not None:
                shapes = (shapes,)  # forward(*args): one entry for the whole tuple
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), \
                    ModuleStateGuard(model):
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    model, inputs, dynamo=True, opset_version=opset, optimize=True,
                    dynamic_shapes=shapes, verbose=False)
            proto = program.model_proto
            del program
            if isinstance(model, _PlainOutputs):
                params = [p.name for p in inspect.signature(model.inner.forward).parameters
                          .values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
                if len(params) >= len(proto.graph.input):
                    _rename_inputs(proto, params[:len(proto.graph.input)])
            return proto, "dynamo"
        except Exception as exc:  # noqa: BLE001 - recorded; maybe retried
            errors.append(f"dynamo exporter: {_first_line(exc)}")
            if exporter == "dynamo":
                raise ExportError(f"could not export {cls} to ONNX: {errors[-1]}; try "
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
        with warnings.catch_warnings(), ModuleStateGuard(model):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, inputs, buf, dynamo=False, input_names=names,
                              output_names=out_names, dynamic_axes=axes,
                              opset_version=opset or _TORCHSCRIPT_OPSET, do_constant_folding=True)
        return onnx.load_from_string(buf.getvalue()), "torchscript"
    except Exception as exc:  # noqa: BLE001 - reported together
        errors.append(f"torchscript exporter: {_first_line(exc)}")
        raise ExportError(f"could not export {cls} to ONNX: " + " | ".join(errors)) from exc


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


def _node_ranges(model: ModelProto, ranges: dict[str, TensorRange]
                 ) -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
    """Per node (graph order), the range of its float outputs, and its op type."""
    out: dict[str, tuple[float, float]] = {}
    ops: dict[str, str] = {}
    for node in model.graph.node:
        rs = [ranges[o] for o in node.output if o in ranges]
        ops[node.name] = node.op_type
        if rs:
            out[node.name] = (max(r.max_abs for r in rs),
                              min(r.min_abs_nonzero for r in rs))
    return out, ops


def _fold_entries(model: nn.Module, report: ExportReport) -> None:
    """Attach the entries of the ``normswap_report`` a folded model carries."""
    carried = getattr(model, "normswap_report", None)
    if isinstance(carried, PassReport):
        report.fold_entries = carried.to_dict()["entries"]
        report.note(f"the model carries a report ('{carried.title}'): "
                    f"{len(carried.changes)} changes, {len(carried.skips)} skips attached as "
                    "fold_entries")


class _Staging:
    """Where the model under work lives: in memory, or (big models) as files with external data.

    Args:
        target: the final path.
        directory: the staging directory (None: everything stays in memory).
    """

    def __init__(self, target: Path, directory: Path | None) -> None:
        self.target = target
        self.dir = directory
        self.fp32_path: Path | None = None
        self.final_path = None if directory is None else directory / target.name
        self.data_name = data_file_name(target)
        self._staged: ModelProto | None = None
        self._released: ModelProto | None = None

    @property
    def external(self) -> bool:
        return self.dir is not None

    def keep_fp32(self, proto: ModelProto, final: bool) -> ModelProto:
        """Externalise the fp32 export (final: under the final names).

        Returns:
            The model to go on with: ``proto`` in memory; else its graph reloaded without the
            weights (a saved proto keeps its weights' bytes in its protobuf arena for as long
            as any part of it is referenced: the caller drops it).
        """
        if self.dir is None:
            return proto
        if final:
            save_external(proto, self.final_path, self.data_name)  # type: ignore[arg-type]
            self.fp32_path = self.final_path
            self._staged = self._released = _graph_only(self.fp32_path)  # type: ignore[arg-type]
            return self._staged
        self.fp32_path = self.dir / "fp32.onnx"
        save_external(proto, self.fp32_path, "fp32.onnx.data")
        return _graph_only(self.fp32_path)

    def fp32_for_conversion(self, proto: ModelProto) -> tuple[ModelProto, bool, str | None]:
        """The fp32 model to convert, whether it may be converted in place, and where its
        weights are (staged: its graph alone, each weight read from the data file as it is
        converted, so the fp32 weights are never all in memory)."""
        if self.fp32_path is None:
            return proto, False, None
        return _graph_only(self.fp32_path), True, str(self.fp32_path.parent)

    def fp32_source(self, proto: ModelProto) -> ModelProto | str:
        return proto if self.fp32_path is None else str(self.fp32_path)

    def stage(self, model: ModelProto) -> bytes | str:
        """What ONNX Runtime loads: the serialised model, or the staged path."""
        if self.final_path is None:
            return model.SerializeToString()
        if model is not self._staged:  # saving empties the proto: never save one twice
            save_external(model, self.final_path, self.data_name)
            self._staged = model
        return str(self.final_path)

    def release(self, model: ModelProto) -> ModelProto:
        """The model to keep after :meth:`stage`: once saved to files, its graph reloaded
        without the weights, so that the caller can drop the saved proto's arena."""
        if self.final_path is None or model is not self._staged or model is self._released:
            return model
        self._staged = self._released = _graph_only(self.final_path)
        return self._staged

    def size(self, source: bytes | str) -> int:
        if isinstance(source, bytes):
            return len(source)
        return sum(p.stat().st_size for p in (Path(source), Path(source).parent / self.data_name)
                   if p.exists())


def _write_one_file(staged: Path, target: Path, force: bool) -> int:
    """A staged model with external data written to ``target`` as one file (atomically): each
    weight streamed from the data file (``onnx.load`` + serialise would hold the weights twice).
    Models with external tensors outside the top-level initializers take that way."""
    graph = _graph_only(staged)
    size = [0]

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            try:
                size[0] = write_inline(graph, staged.parent, fh)
            except ValueError:
                fh.seek(0)
                fh.truncate()
                data = onnx.load(str(staged)).SerializeToString()
                fh.write(data)
                size[0] = len(data)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(target, write, force=force)
    return size[0]


def _graph_only(path: Path) -> ModelProto:
    """A model saved with external data, loaded without its weights."""
    return onnx.load(str(path), load_external_data=False)


@contextlib.contextmanager
def _maybe_staging(target: Path, external: bool) -> Iterator[Path | None]:
    if not external:
        yield None
        return
    with staging_dir(target) as directory:
        yield directory


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike[str], *,
                fp16: bool | Literal["auto"] = True, validate: bool = True,
                dynamic_batch: bool = True, opset: int | None = None, keep_io_types: bool = True,
                calibration_inputs: Sequence[Any] | None = None, force: bool = False,
                op_block_list: Iterable[str] | None = None,
                tolerances: Tolerances | None = None, exporter: Exporter = "auto",
                n_random: int = 2, seed: int = 0, overflow_limit: float = FP16_MAX / 2,
                strict: bool = True, node_block_list: Iterable[str] = (),
                emulate_max_inputs: int | None = 4, emulate_time_budget_s: float | None = 60.0,
                auto_max_iterations: int = 16, auto_time_budget_s: float | None = 600.0,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
                stream_threshold: int = STREAM_THRESHOLD) -> ExportReport:
    """Export ``model`` to ONNX (fp16 by default), validate it, write it.

    Args:
        model: the model (fold it first with :func:`normswap.fold`); it is run in eval mode
            on a copy that shares its parameters (no second copy of the weights), never
            modified. A ``normswap_report`` it carries is attached.
        example_inputs: a tensor or a tuple of positional inputs.
        path: the destination ``.onnx`` file.
        fp16: convert to fp16 with range guards; ``"auto"``: and when the fp16 verdict fails,
            search for a few more nodes to keep in fp32 (:mod:`normswap.export.auto`).
        validate: compare the runtime outputs with the PyTorch model.
        dynamic_batch: make the batch dim dynamic.
        opset: ONNX opset (default: the exporter's).
        keep_io_types: keep fp32 inputs/outputs on an fp16 model.
        calibration_inputs: more input tuples (or tensors) for range measurement and validation.
        force: overwrite an existing ``path`` (and its external data file).
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
        node_block_list: node names kept in fp32.
        emulate_max_inputs: inputs evaluated in emulated fp16 (the first ones: examples, then
            calibration, then random).
        emulate_time_budget_s: time budget of the emulation per validation.
        auto_max_iterations: most iterations of the ``"auto"`` search.
        auto_time_budget_s: time budget of the ``"auto"`` search.
        external_data_threshold: a model larger than this (bytes) is written as ``NAME.onnx``
            plus ``NAME.onnx.data``.
        stream_threshold: a model larger than this (bytes) is converted and validated as
            files with external data in a temp directory beside the target (bounded memory:
            the fp16 conversion streams its weights, ONNX Runtime reads them from the file;
            the ORT check then runs with basic graph optimisations) and, within
            ``external_data_threshold``, written as one file at the end.

    Returns:
        The :class:`ExportReport`.

    Raises:
        ExportError: the file exists without ``force``, export or the checker failed.
        ValidationError: validation failed and ``strict``.
    """
    if fp16 not in (True, False, "auto"):
        raise ExportError(f"export_onnx: fp16={fp16!r}; use True, False or 'auto'")
    target = check_output_path(path, force=force)
    # a copy to run in eval mode; it shares the parameters (export never writes them): no
    # second copy of the weights
    work = safe_deepcopy(model, share_parameters=True).eval()
    inputs = as_inputs(example_inputs)
    if inputs is None:
        raise ExportError(f"export_onnx('{target}'): example_inputs is None; pass the inputs "
                          "the model is called with")
    calib = [as_inputs(c) for c in (calibration_inputs or [])]
    report = ExportReport(title=f"export onnx -> {target.name}", fp16=bool(fp16))
    _fold_entries(model, report)
    clock: dict[str, float] = report.timings

    @contextlib.contextmanager
    def step(name: str, detail: str = "") -> Iterator[None]:
        t0 = time.perf_counter()
        with stage(name, detail):
            yield
        clock[name] = clock.get(name, 0.0) + time.perf_counter() - t0

    with step("reference outputs"), torch.no_grad():
        try:
            raw = work(*inputs)
        except Exception as exc:
            raise ExportError(f"could not export {type(model).__name__} to ONNX: running it on "
                              f"the example inputs failed: {_first_line(exc)}") from exc
    labels = [label for label, _ in flatten_outputs(raw)]
    exported: nn.Module = _PlainOutputs(work) if has_unregistered_dataclass(raw) else work
    del raw
    with step("export onnx", exporter):
        proto, report.exporter = export_fp32_proto(exported, inputs, dynamic_batch=dynamic_batch,
                                                   opset=opset, exporter=exporter, report=report)
    name_nodes(proto)
    report.opset = _opset(proto)
    report.ops_before = dict(Counter(n.op_type for n in proto.graph.node))
    report.size_before_bytes = estimated_size(proto)  # not ByteSize: that encodes it
    report.overflow_limit = overflow_limit if fp16 else None
    bn_nodes = [n.name for n in proto.graph.node if n.op_type == "BatchNormalization"]
    if bn_nodes:
        report.warn(f"{len(bn_nodes)} BatchNormalization nodes remain (e.g. {bn_nodes[0]}); "
                    "fold the model first with normswap.fold")
    input_names = [i.name for i in proto.graph.input
                   if i.name not in {t.name for t in proto.graph.initializer}]
    gen = torch.Generator().manual_seed(seed)
    runs = [inputs] + calib + [_random_like(inputs, gen) for _ in range(n_random)]
    calib_feeds = feeds_for(input_names, [inputs] + calib)
    external = report.size_before_bytes > external_data_threshold
    streamed = external or report.size_before_bytes > stream_threshold
    if external:
        report.note(f"the model ({report.size_before_bytes / 1e9:.2f} GB) exceeds "
                    f"external_data_threshold={external_data_threshold}: written with its "
                    f"weights in '{data_file_name(target)}'")
    elif streamed:
        report.note(f"the model ({report.size_before_bytes / 1e9:.2f} GB) exceeds "
                    f"stream_threshold={stream_threshold}: converted and validated as files "
                    "with external data (bounded memory), written as one file")
    tol = tolerances or (FP16_TOLERANCES if fp16 else FP32_TOLERANCES)
    refs: list[list[Any]] = []
    if validate:
        with step("reference outputs"):
            refs = [torch_outputs(work, x) for x in runs]

    def run_validation(source: bytes | str, parsed: ModelProto | None = None
                       ) -> ValidationResult:
        with step("validate"):
            return validate_onnx(source, None, runs, tolerances=tol, references=refs,
                                 model_proto=None if isinstance(source, str) else parsed,
                                 emulate_max_inputs=emulate_max_inputs,
                                 emulate_time_budget_s=emulate_time_budget_s,
                                 calibration_ranges=input_ranges(calib_feeds),
                                 output_labels=labels)

    with _maybe_staging(target, streamed) as directory:
        staging = _Staging(target, directory)
        proto = staging.keep_fp32(proto, final=not fp16)
        final = proto
        plan: Fp16Plan | None = None
        ranges: dict[str, TensorRange] = {}
        if fp16:
            with step("measure ranges"):
                ranges = measure_ranges(staging.fp32_source(proto), calib_feeds)
            report.node_ranges, report.node_ops = _node_ranges(proto, ranges)

            def convert(extra: Sequence[str]) -> tuple[ModelProto, Fp16Plan]:
                src, in_place, base_dir = staging.fp32_for_conversion(proto)
                with step("fp16 convert"):
                    return convert_fp16(src, [], keep_io_types=keep_io_types,
                                        op_block_list=op_block_list,
                                        node_block_list=list(node_block_list) + list(extra),
                                        overflow_limit=overflow_limit, ranges=ranges,
                                        copy=not in_place and fp16 == "auto", base_dir=base_dir)

            # with "auto" the conversion works on a copy: the search converts the fp32 model again
            final, plan = convert([])
        source = staging.stage(final)
        final = staging.release(final)
        with step("check"):
            try:
                onnx.checker.check_model(source if isinstance(source, str) else final)
            except onnx.checker.ValidationError as exc:
                raise ExportError(f"onnx.checker rejected the exported model for '{target}': "
                                  f"{exc}") from exc
        if fp16 == "auto" and not validate:
            report.warn("fp16='auto' needs validate=True: the search did not run")
        if validate:
            report.validation = run_validation(source, final)
            if fp16 == "auto" and not report.validation.passed and plan is not None:
                from .auto import search_fp32_nodes

                emu_feeds = feeds_for(input_names, runs[:emulate_max_inputs or len(runs)])
                with step("fp16 auto search"):
                    final, plan, report.validation, search = search_fp32_nodes(
                        proto, convert, lambda m: run_validation(staging.stage(m), m),
                        emu_feeds, first=(final, plan, report.validation), ranges=ranges,
                        max_iterations=auto_max_iterations, time_budget_s=auto_time_budget_s,
                        fp32_source=staging.fp32_source(proto),
                        emulator_source=lambda m: staging.stage(m) if staging.external else m)
                source = staging.stage(final)
                final = staging.release(final)
                report.auto = search.to_dict()
                report.note(f"fp16 auto: {len(search.nodes)} nodes kept in fp32 "
                            f"({', '.join(search.nodes) or '-'}), {search.iterations} "
                            f"iterations, {search.seconds:.2f} s, {search.stopped_by}")
            report.metrics["validation_passed"] = report.validation.passed
        if plan is not None:
            _record_plan(report, plan)
            cpu_ops = cpu_fp16_op_types()
            if cpu_ops is not None:
                missing = sorted(_fp16_op_types(final, plan.fp32_nodes) - cpu_ops)
                report.cpu_fp16_fallback_ops = missing
                if missing:
                    report.warn("ONNX Runtime's CPU provider has no fp16 kernels for "
                                f"{', '.join(missing)}: they run there through inserted casts "
                                "in fp32 (not an fp16 check, and slower than fp32 on CPU); fp16 "
                                "pays off on GPU")
        counts = float_initializer_counts(final)
        report.initializer_counts = counts
        total = counts["fp16"] + counts["fp32"]
        if fp16:
            report.fp16_initializer_fraction = counts["fp16"] / total if total else None
        report.ops_after = dict(Counter(n.op_type for n in final.graph.node))
        report.file_size_bytes = staging.size(source)
        if report.validation is not None and not report.validation.passed:
            message = (f"exported model for '{target}' fails validation:\n"
                       f"{report.validation.summary()}")
            if strict:
                raise ValidationError(message + "\nnothing was written; pass strict=False to "
                                      "write it anyway, or widen the tolerances", report)
            report.warn(message)
        with step("write"):
            try:
                if isinstance(source, bytes):
                    atomic_write_bytes(target, source, force=force)
                elif not external:   # streamed: one file, each weight copied from the data
                    report.file_size_bytes = _write_one_file(Path(source), target, force)
                else:
                    data = move_into_place(Path(source), Path(source).parent / staging.data_name,
                                           target, force=force)
                    report.external_data_path = "" if data is None else str(data)
            except OutputPathError:
                raise
            except OSError as exc:
                raise ExportError(f"could not write '{target}': {exc}") from exc
    report.path = str(target)
    report.metrics["file_size_bytes"] = report.file_size_bytes
    log.info("wrote %s (%.2f MB)", target, report.file_size_bytes / 1e6)
    return report
