"""The opt-in ``torch.compile`` path of the L1/L-inf layers: the switch and its kernels.

Off by default: the eager kernels (:mod:`._kernels`) need no compile step. With
:func:`set_compile` (or ``NORMSWAP_COMPILE=1``) the element-wise and reduction passes run as
Inductor kernels written here (one fused loop each, no temporaries). The first call with a new
shape pays Inductor's compile time (seconds, and a C++ compiler on CPU); a kernel that fails to
compile logs one warning and runs eagerly from then on (same maths). Float64 inputs and the sync
layers always run eagerly. The kernels work on channel views (see :mod:`._layout`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch
from torch import Tensor

from ._common import stats_dtype
from ._layout import view_broadcast, view_reduce_dims

__all__ = ["set_compile", "compile_enabled", "compiled_active", "run_kernel", "failed_kernels",
           "l1_statistics", "affine", "l1_input_gradient", "gradient_sums", "scale_shift"]

logger = logging.getLogger(__name__)

_ENABLED: bool = os.environ.get("NORMSWAP_COMPILE", "0").lower() in ("1", "true", "yes", "on")
_COMPILED: dict[str, Callable[..., Any]] = {}
_FAILED: set[str] = set()
_RECOMPILE_LIMIT = 64  # one graph per dtype/layout/rank


def set_compile(enabled: bool = True) -> None:
    """Turn the ``torch.compile`` path of the L1/L-inf layers on or off (process-wide).

    Args:
        enabled: True to use compiled kernels.
    """
    global _ENABLED
    _ENABLED = bool(enabled)


def compile_enabled() -> bool:
    """Whether the ``torch.compile`` path is on."""
    return _ENABLED


def failed_kernels() -> frozenset[str]:
    """Names of kernels that failed to compile and run eagerly."""
    return frozenset(_FAILED)


def compiled_active(x: Tensor) -> bool:
    """Whether compiled kernels are used for this input."""
    return _ENABLED and x.dtype != torch.float64 and not torch.compiler.is_compiling()


def run_kernel(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run kernel ``fn`` compiled (when enabled and working), else eagerly (same maths)."""
    if not _ENABLED or name in _FAILED or torch.compiler.is_compiling():
        return fn(*args)
    compiled = _COMPILED.get(name)
    if compiled is None:
        compiled = torch.compile(fn, dynamic=None)
        _COMPILED[name] = compiled
    try:
        import torch._dynamo.config as dynamo_config

        with dynamo_config.patch(recompile_limit=_RECOMPILE_LIMIT):
            return compiled(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler failure must fall back, not break
        _FAILED.add(name)
        logger.warning("normswap: torch.compile of kernel %r failed (%s: %s); using the eager "
                       "kernel from now on", name, type(exc).__name__, exc)
        return fn(*args)


# ---------------------------------------------------------------------------------------------
# kernels (channel views xw with channel dim cdim)
# ---------------------------------------------------------------------------------------------
def l1_statistics(xw: Tensor, cdim: int) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, sum|x - mean|, sum sign(x - mean)) per channel."""
    xf = xw.to(stats_dtype(xw.dtype))
    dims = view_reduce_dims(cdim)
    mu = xf.mean(dims)
    d = xf - view_broadcast(mu, cdim)
    return mu, d.abs().sum(dims), torch.sign(d).sum(dims)


def affine(xw: Tensor, cdim: int, mu: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``(x - mu) * a + b`` in the input dtype."""
    y = (xw.to(mu.dtype) - view_broadcast(mu, cdim)) * view_broadcast(a, cdim) \
        + view_broadcast(b, cdim)
    return y.to(xw.dtype)


def gradient_sums(gw: Tensor, xw: Tensor, cdim: int, mu: Tensor) -> tuple[Tensor, Tensor]:
    """(sum g, sum g*(x - mu)) per channel."""
    gf = gw.to(mu.dtype)
    d = xw.to(mu.dtype) - view_broadcast(mu, cdim)
    dims = view_reduce_dims(cdim)
    return gf.sum(dims), (gf * d).sum(dims)


def l1_input_gradient(gw: Tensor, xw: Tensor, cdim: int, mu: Tensor, alpha: Tensor,
                      beta: Tensor, kappa: Tensor) -> Tensor:
    """``g * alpha + beta - kappa * sign(x - mu)`` in x's dtype."""
    d = xw.to(mu.dtype) - view_broadcast(mu, cdim)
    dx = gw.to(mu.dtype) * view_broadcast(alpha, cdim) + view_broadcast(beta, cdim) \
        - view_broadcast(kappa, cdim) * torch.sign(d)
    return dx.to(xw.dtype)


def scale_shift(gw: Tensor, cdim: int, alpha: Tensor, beta: Tensor,
                out_dtype: torch.dtype) -> Tensor:
    """``g * alpha + beta`` in ``out_dtype``."""
    return (gw.to(alpha.dtype) * view_broadcast(alpha, cdim)
            + view_broadcast(beta, cdim)).to(out_dtype)
