"""One error hierarchy for normswap: every message names what, where and the remedy."""

from __future__ import annotations

__all__ = [
    "NormswapError",
    "TracingError",
    "UnsupportedNodeError",
    "NumericalMismatchError",
    "VerificationError",
    "ExportError",
    "CheckpointError",
    "ArchitectureError",
    "UnknownMethodError",
]


class NormswapError(Exception):
    """Base class of every error normswap raises on purpose."""


class TracingError(NormswapError):
    """The model could not be traced with torch.fx and no fallback applies."""


class UnsupportedNodeError(NormswapError):
    """One or more nodes/modules cannot be rewritten by the requested method (strict mode)."""


class NumericalMismatchError(NormswapError):
    """A rewrite that claims equivalence produced different outputs."""


class VerificationError(NumericalMismatchError):
    """The equivalence check could not run or compared nothing."""


class ExportError(NormswapError):
    """ONNX export or runtime validation failed."""


class CheckpointError(NormswapError):
    """A checkpoint could not be read, matched to its architecture, or written."""


class UnknownMethodError(NormswapError, ValueError):
    """An unknown method name was asked of the registry."""


class ArchitectureError(CheckpointError):
    """An architecture spec (``--arch`` / ``arch=``) could not be resolved or built."""
