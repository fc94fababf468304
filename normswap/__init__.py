"""normswap: rewrite the normalisation of trained PyTorch models.

One line converts a trained BatchNorm model, eval-exact and verified::

    import normswap
    l1_model = normswap.swap(model, "l1")          # or "linf", "kalman", "normprop", "selu"
    print(l1_model.normswap_report)

``export_onnx`` and ``recalibrate`` are loaded on first use (ONNX and the calibration loop are
not needed to swap a model); they are the real functions, with their real signatures.
"""

from __future__ import annotations

from typing import Any

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .api import fold, inspect, swap
from .checkpoint import load, save
from .errors import (
    CheckpointError,
    ExportError,
    MethodOptionError,
    NormswapError,
    NumericalMismatchError,
    SpecialisedGraphError,
    TracingError,
    UnknownMethodError,
    UnsupportedModelError,
    UnsupportedNodeError,
    VerificationError,
)
from .registry import available_methods, register_method, register_norm
from .report import PassReport

__all__ = [
    "swap", "fold", "inspect", "export_onnx", "recalibrate", "load", "save",
    "available_methods", "register_norm", "register_method", "PassReport",
    "NormswapError", "TracingError", "UnsupportedNodeError", "NumericalMismatchError",
    "VerificationError", "ExportError", "CheckpointError", "UnknownMethodError",
    "MethodOptionError", "UnsupportedModelError", "SpecialisedGraphError",
]
__version__ = "0.2.0"

_LAZY = {"export_onnx": ("normswap.export", "export_onnx"),
         "recalibrate": ("normswap.calibrate", "recalibrate")}


def __getattr__(name: str) -> Any:
    """Load ``export_onnx`` / ``recalibrate`` on first access (PEP 562)."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'normswap' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
