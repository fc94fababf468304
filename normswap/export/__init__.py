"""ONNX export, range-guarded fp16 conversion, fp16 emulation and validation."""

from .auto import AutoSearch
from .emulate import Fp16Emulator
from .export_report import ExportReport
from .fp16 import FP32_OP_TYPES, Fp16Plan, convert_fp16
from .onnx_export import EXTERNAL_DATA_THRESHOLD, ValidationError, export_onnx
from .validate import (
    FP16_TOLERANCES,
    FP32_TOLERANCES,
    EvaluatorRun,
    Tolerances,
    ValidationResult,
    validate_onnx,
)

__all__ = [
    "export_onnx",
    "ExportReport",
    "ValidationError",
    "convert_fp16",
    "Fp16Plan",
    "FP32_OP_TYPES",
    "Fp16Emulator",
    "AutoSearch",
    "validate_onnx",
    "ValidationResult",
    "EvaluatorRun",
    "Tolerances",
    "FP16_TOLERANCES",
    "FP32_TOLERANCES",
    "EXTERNAL_DATA_THRESHOLD",
]
