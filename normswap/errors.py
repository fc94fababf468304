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
    "UnknownMethodError",
    "MethodOptionError",
    "PassError",
    "VerificationError",
    "UnsupportedModelError",
]


class NormswapError(Exception):
    """Base class of every error normswap raises on purpose."""


class TracingError(NormswapError):
    """The model could not be traced with torch.fx and no fallback applies."""


class UnsupportedNodeError(NormswapError):
    """One or more nodes/modules cannot be rewritten by the requested method (strict mode)."""


class NumericalMismatchError(NormswapError):
    """A rewrite that claims equivalence produced different outputs."""


class VerificationError(NormswapError):
    """An equivalence check could not be carried out (an output of a type it cannot compare)."""


class ExportError(NormswapError):
    """ONNX export or runtime validation failed."""


class CheckpointError(NormswapError):
    """A checkpoint could not be read, matched to its architecture, or written."""


class UnknownMethodError(NormswapError, ValueError):
    """An unknown method name was asked of the registry."""


class MethodOptionError(NormswapError, ValueError):
    """An option that the method does not accept, or an invalid option value."""


class PassError(NormswapError):
    """A graph pass failed unexpectedly (the message names the pass and those before it)."""


class VerificationError(NumericalMismatchError):
    """The equivalence check could not run or compared nothing."""


class UnsupportedModelError(NormswapError, TypeError):
    """The model itself cannot be rewritten (a TorchScript module, a meta-device model ...)."""
