"""ONNX export, range-guarded fp16 conversion and ONNX Runtime validation."""

from .fp16 import FP32_OP_TYPES, Fp16Plan, convert_fp16
from .onnx_export import ExportReport, ValidationError, export_onnx
from .validate import FP16_TOLERANCES, FP32_TOLERANCES, Tolerances, ValidationResult, validate_onnx

__all__ = [
    "export_onnx",
    "ExportReport",
    "ValidationError",
    "convert_fp16",
    "Fp16Plan",
    "FP32_OP_TYPES",
    "validate_onnx",
    "ValidationResult",
    "Tolerances",
    "FP16_TOLERANCES",
    "FP32_TOLERANCES",
]
