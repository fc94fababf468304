"""One error hierarchy for normswap: every message names what, where and the remedy."""

from __future__ import annotations

__all__ = [
    "NormswapError",
    "TracingError",
    "UnsupportedNodeError",
    "UnsupportedModelError",
    "NumericalMismatchError",
    "VerificationError",
    "ExportError",
    "CheckpointError",
    "ArchitectureError",
    "UnknownMethodError",
    "MethodOptionError",
    "PassError",
    "SpecialisedGraphError",
]


class NormswapError(Exception):
    """Base class of every error normswap raises on purpose."""


class TracingError(NormswapError):
    """The model could not be captured and no fallback applies."""


class UnsupportedNodeError(NormswapError):
    """One or more nodes/modules cannot be rewritten by the requested method (strict mode)."""


class UnsupportedModelError(NormswapError, TypeError):
    """The model itself cannot be rewritten (a TorchScript module, a meta-device model ...)."""


class NumericalMismatchError(NormswapError):
    """A rewrite that claims equivalence produced different outputs."""


class VerificationError(NumericalMismatchError):
    """The equivalence check could not run, compared nothing, or met an output it cannot
    compare."""


class ExportError(NormswapError):
    """ONNX export or runtime validation failed."""


class CheckpointError(NormswapError):
    """A checkpoint could not be read, matched to its architecture, or written."""


class ArchitectureError(CheckpointError):
    """An architecture spec (``--arch`` / ``arch=``) could not be resolved or built."""


class UnknownMethodError(NormswapError, ValueError):
    """An unknown method name was asked of the registry."""


class MethodOptionError(NormswapError, ValueError):
    """An option that the method does not accept, or an invalid option value."""


class PassError(NormswapError):
    """A graph pass failed unexpectedly (the message names the pass and those before it)."""


class SpecialisedGraphError(NormswapError, RuntimeError):
    """A converted graph, specialised to the example inputs' shapes, was called with inputs that
    take another branch of the model's code."""
