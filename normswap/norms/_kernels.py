"""Eager per-channel passes for the L1/L-inf layers, built on BatchNorm's native kernels.

Each function is one or two fused aten kernels over the whole ``(N, C, *)`` tensor, in any
layout (contiguous or channels_last), accumulating in float32 (float64 for float64):

* :func:`channel_sums` -- ``(sum g, sum g*(x - mu))`` per channel: one pass of BatchNorm's native
  eval-mode backward (it forms ``x - mu`` element by element, so nothing cancels).
* :func:`channel_affine` -- ``(x - mu) * a + b`` per channel: one pass of BatchNorm's native
  eval-mode forward, into a given buffer (no extra allocation).
* :func:`deviation_sign` -- ``sign(x - mu)``, exactly, in x's dtype.
* :func:`channel_mean` -- the per-channel mean.

Float16/bfloat16 tensors with float32 per-channel vectors never go through the generic
mixed-dtype element-wise kernels (5-30x slower on CPU); the native BatchNorm kernels take
float32 statistics with half data at full speed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _cpu_kernels as fused
from ._common import stats_dtype
from ._layout import channel_broadcast

__all__ = ["channel_mean", "channel_sums", "channel_affine", "deviation_sign", "sign_scale",
           "HALF_DTYPES"]

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _reduce_dims(x: Tensor) -> list[int]:
    """All dims of ``x`` but the channel dim 1."""
    return [0, *range(2, x.dim())]


def channel_mean(x: Tensor) -> Tensor:
    """Per-channel mean of ``x`` (N, C, *) in float32 (float64 for float64 input)."""
    acc = stats_dtype(x.dtype)
    if fused.usable(x):
        return fused.channel_mean(x)
    if x.dtype in HALF_DTYPES:  # the native BN reduction is ~1.5x faster than mean() for half
        n = x.numel() // x.shape[1]
        return channel_sums(x, x, torch.zeros(x.shape[1], dtype=acc, device=x.device))[0] / n
    return x.mean(_reduce_dims(x), dtype=acc)


def channel_sums(g: Tensor, x: Tensor, mu: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum g, sum g*(x - mu))`` per channel, in mu's dtype.

    Args:
        g: (N, C, *) with x's dtype and strides.
        x: (N, C, *).
        mu: (C,) float32 (float64 for float64 x).

    Returns:
        Two (C,) tensors; zeros for an empty batch.
    """
    if x.numel() == 0:
        return torch.zeros_like(mu), torch.zeros_like(mu)
    if mu.dtype == torch.float32 and fused.usable(x, g):
        return fused.gradient_sums(g, x, mu)
    ones = torch.ones_like(mu)
    _, sum_gd, sum_g = torch.ops.aten.native_batch_norm_backward(
        g, x, ones, mu, ones, None, None, False, 0.0, [False, True, True])
    return sum_g, sum_gd


def channel_affine(x: Tensor, mu: Tensor | None, a: Tensor, b: Tensor,
                   out: Tensor | None = None) -> Tensor:
    """``(x - mu) * a + b`` per channel (mu None: ``x * a + b``), written to ``out``.

    Args:
        x: (N, C, *).
        mu: (C,) or None.
        a: (C,) in mu's dtype (float32, float64 for float64 x).
        b: (C,) like a.
        out: destination with x's shape (default: a new tensor like x); may be x's dtype or
            another floating dtype.

    Returns:
        ``out``.
    """
    if out is None:
        out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    mean = torch.zeros_like(a) if mu is None else mu
    if a.dtype == torch.float32 and fused.usable(x, out):
        return fused.affine(x, mean, a, b, out=out)
    unused = a.new_empty(0)  # save_mean/save_invstd: not computed in eval mode
    torch.ops.aten.native_batch_norm.out(x, a, b, mean, torch.ones_like(a), False, 0.0, 0.0,
                                         out=out, save_mean=unused, save_invstd=unused)
    return out


def sign_scale(mu: Tensor) -> Tensor:
    """Per-channel ``2**k`` for :func:`deviation_sign` on half tensors: ``mu * 2**k`` stays
    finite and any non-zero difference to ``mu`` becomes >= 1 in magnitude (or +-inf)."""
    return torch.exp2(100.0 - torch.ceil(torch.log2(mu.abs().clamp_min(1.0))))


def deviation_sign(x: Tensor, mu: Tensor, out: Tensor | None = None,
                   scale: Tensor | None = None) -> Tensor:
    """``sign(x - mu)`` per channel, exact, in x's dtype, written to ``out``.

    float32/float64: ``x - mu`` rounds to nearest, which keeps its sign, then ``sign_``.
    float16/bfloat16: ``(x - mu) * 2**k`` through the native affine kernel (float32 inside, one
    rounding of two exact products, so the sign is exact), saturated to +-1 by ``clamp_``.

    Args:
        x: (N, C, *).
        mu: (C,) float32 (float64 for float64 x).
        out: destination like x (default: a new tensor).
        scale: :func:`sign_scale` of ``mu`` (half inputs; computed when None).

    Returns:
        ``out`` holding -1, 0 or 1.
    """
    if out is None:
        out = torch.empty_like(x)
    if x.dtype not in HALF_DTYPES:
        return torch.sub(x, channel_broadcast(mu, x), out=out).sign_()
    scale = sign_scale(mu) if scale is None else scale
    channel_affine(x, mu, scale, torch.zeros_like(mu), out=out)
    return out.clamp_(-1.0, 1.0)
