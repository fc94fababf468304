"""Direct formulas of the L1 and L-inf/top-k train-mode forward, in plain autograd ops.

Slow and memory-hungry on purpose: they are the float64 references the fast layers
(``normswap.norms._functional``) are tested against (forward and, through autograd, backward).
"""

from __future__ import annotations

from torch import Tensor

from normswap.norms._functional import C_L1, linf_constant


def _deviations(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """(d = x - channel mean, d as (C, n), n) for x (N, C, *)."""
    C = x.shape[1]
    mu = x.transpose(0, 1).reshape(C, -1).mean(1)
    shape = (1, C) + (1,) * (x.dim() - 2)
    d = x - mu.reshape(shape)
    return d, d.transpose(0, 1).reshape(C, -1), d.numel() // C


def _finish(x: Tensor, d: Tensor, s: Tensor, weight: Tensor | None, bias: Tensor | None
            ) -> Tensor:
    """``d / s * weight + bias`` with per-channel broadcasting."""
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    y = d / s.reshape(shape)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def l1_reference(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                 eps: float = 1e-5) -> Tensor:
    """``(x - mu) / (C_L1 * mean|x - mu| + eps) * weight + bias`` per channel."""
    d, dc, _ = _deviations(x)
    s = C_L1 * dc.abs().mean(1) + eps
    return _finish(x, d, s, weight, bias)


def linf_reference(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                   eps: float = 1e-5, k: int = 1) -> Tensor:
    """``(x - mu) / (C(n) * mean(top-k |x - mu|) + eps) * weight + bias`` per channel."""
    d, dc, n = _deviations(x)
    k = max(1, min(int(k), n))
    s = linf_constant(n) * dc.abs().topk(k, dim=1).values.mean(1) + eps
    return _finish(x, d, s, weight, bias)
