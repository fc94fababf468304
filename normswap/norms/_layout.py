"""Per-channel views of ``(N, C, *)`` tensors for the L1/L-inf kernels.

A tensor ``x`` of shape ``(N, C, *)`` is viewed as a 3-D *channel view* ``xw``: ``(N, C, R)``
with the channel at dim 1 for contiguous tensors, or ``(N, R, C)`` with the channel at dim 2
when the channels are innermost in memory (``channels_last``). ``R`` is the product of the
spatial dims. Per-channel reductions then run over the two other dims, and the view costs no
copy whenever the strides allow it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "channel_view",
    "as_channel_view",
    "from_channel_view",
    "channel_broadcast",
    "view_broadcast",
    "view_reduce_dims",
    "view_batch_and_positions",
    "view_index",
    "like_layout",
    "dense",
    "batch_tiles",
    "TILE_BYTES",
]


def channel_view(x: Tensor) -> tuple[Tensor, int]:
    """``(xw, cdim)``: x's channel view and its channel dim (1 or 2); a view when possible."""
    N, C = x.shape[0], x.shape[1]
    if x.stride(1) == 1 and C > 1:
        xt = x.movedim(1, -1)
        if xt.is_contiguous():
            return xt.reshape(N, -1, C), 2
    return (x.unsqueeze(2) if x.dim() == 2 else x.flatten(2)), 1


def as_channel_view(t: Tensor, cdim: int) -> Tensor:
    """``t`` (N, C, *) in the channel view with channel dim ``cdim`` (a copy only if needed)."""
    N, C = t.shape[0], t.shape[1]
    if cdim == 1:
        return t.unsqueeze(2) if t.dim() == 2 else t.flatten(2)
    return t.movedim(1, -1).reshape(N, -1, C)


def from_channel_view(tw: Tensor, like: Tensor, cdim: int) -> Tensor:
    """Back from the channel view to ``like``'s shape ``(N, C, *)``."""
    if cdim == 1:
        return tw.reshape(like.shape)
    N, C = like.shape[0], like.shape[1]
    return tw.reshape((N,) + tuple(like.shape[2:]) + (C,)).movedim(-1, 1)


def channel_broadcast(v: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector ``(C,)`` shaped to broadcast against ``x`` (N, C, *)."""
    return v.reshape((v.shape[0],) + (1,) * (x.dim() - 2))


def view_broadcast(v: Tensor, cdim: int) -> Tensor:
    """A per-channel vector ``(C,)`` shaped to broadcast against a channel view."""
    return v.unsqueeze(1) if cdim == 1 else v


def view_reduce_dims(cdim: int) -> tuple[int, int]:
    """The dims a per-channel reduction runs over in a channel view."""
    return (0, 2) if cdim == 1 else (0, 1)


def view_batch_and_positions(xw: Tensor, cdim: int) -> tuple[int, int]:
    """``(N, R)`` of a channel view."""
    return xw.shape[0], xw.shape[2] if cdim == 1 else xw.shape[1]


def view_index(cdim: int, n: Tensor, c: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Advanced-index tuple of elements (batch n, channel c, position r) in a channel view."""
    return (n, c, r) if cdim == 1 else (n, r, c)


def like_layout(g: Tensor, x: Tensor) -> Tensor:
    """``g`` with ``x``'s strides (one layout for the native kernels), copying if needed."""
    if g.stride() == x.stride():
        return g
    return torch.empty_like(x, dtype=g.dtype).copy_(g)  # x's strides if dense, else contiguous


def dense(x: Tensor) -> Tensor:
    """``x`` if its strides are a dense layout (``empty_like`` keeps them), else a contiguous copy.

    The kernels write outputs with ``empty_like(x)`` and pair them with ``x`` in one native
    kernel, which is fastest (and, for bfloat16, most precise) when both share one layout.
    """
    if x.is_contiguous() or torch.empty_like(x, device="meta").stride() == x.stride():
        return x
    return x.contiguous()


TILE_BYTES = 4 * 1024 * 1024
"""Target size of one batch tile: a few tiles' worth of tensors stay in cache across passes."""


def batch_tiles(x: Tensor, tile_bytes: int | None = None) -> list[slice]:
    """Slices of dim 0 that split ``x`` into contiguous tiles of about ``tile_bytes``.

    A chain of element-wise passes run tile by tile reads ``x`` from memory once and keeps the
    intermediate results in cache. Tiles hold at least one sample. One slice (the whole batch)
    when ``x`` holds fewer than two tiles or when the batch is not the outermost dim in memory.
    """
    tile_bytes = TILE_BYTES if tile_bytes is None else tile_bytes
    N = x.shape[0]
    if N < 2 or x.numel() == 0 or x.stride(0) * N != x.numel():
        return [slice(0, N)]
    per_sample = x.stride(0) * x.element_size()
    rows = max(1, tile_bytes // per_sample)
    if rows * 2 > N:
        return [slice(0, N)]
    return [slice(n0, min(N, n0 + rows)) for n0 in range(0, N, rows)]
