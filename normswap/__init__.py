"""normswap: rewrite the normalisation of trained PyTorch models.

One line converts a trained BatchNorm model, eval-exact and verified::

    import normswap
    l1_model = normswap.swap(model, "l1")          # or "linf", "kalman", "normprop", "selu"
    print(l1_model.normswap_report)
"""

from __future__ import annotations

from typing import Any

from .api import fold, inspect, swap
from .checkpoint import load, save
from .errors import (
    CheckpointError,
    ExportError,
    NormswapError,
    NumericalMismatchError,
    TracingError,
    UnknownMethodError,
    UnsupportedNodeError,
)
from .registry import available_methods, register_graph_method, register_norm
from .report import PassReport

__all__ = [
    "swap", "fold", "inspect", "export_onnx", "recalibrate", "load", "save",
    "available_methods", "register_norm", "register_graph_method", "PassReport",
    "NormswapError", "TracingError", "UnsupportedNodeError", "NumericalMismatchError",
    "ExportError", "CheckpointError", "UnknownMethodError",
]
__version__ = "0.1.0"


def export_onnx(*args: Any, **kwargs: Any) -> Any:
    """Export to (fp16) ONNX and validate in ONNX Runtime; see :func:`normswap.export.export_onnx`."""
    from .export import export_onnx as _export

    return _export(*args, **kwargs)


def recalibrate(*args: Any, **kwargs: Any) -> Any:
    """Re-estimate running statistics on data; see :func:`normswap.calibrate.recalibrate`."""
    from .calibrate import recalibrate as _recalibrate

    return _recalibrate(*args, **kwargs)
