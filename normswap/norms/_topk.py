"""Exact per-channel top-k of ``|x - mu|`` for the L-inf/top-k layer, without ranking all n.

Elements of a channel are grouped (by spatial position over the batch, or by batch row when
there are fewer than k positions); one reduction pass gives each group's max and min. Every one
of the k largest ``|d|`` lies in one of the k groups with the largest extreme ``|d|`` (a group
outside them has its maximum below the k-th group maximum, itself attained by k distinct
elements), so only those k groups are gathered and ranked. For k = 1 this is an argmax over the
(C, groups) table of group extrema. Works on channel views (see :mod:`._layout`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _cpu_kernels as fused
from ._common import stats_dtype
from ._layout import channel_view, view_batch_and_positions, view_broadcast, view_reduce_dims

__all__ = ["topk_abs_deviation", "full_topk", "select_topk", "group_extrema", "grouping"]


def grouping(N: int, R: int, k: int) -> bool | None:
    """How to group: by positions (False), by batch rows (True) or not at all (None)."""
    if R >= k and (R > 1 or N == 1):
        return False
    if N >= k:
        return True
    return None


def group_extrema(xw: Tensor, cdim: int, by_rows: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(channel mean, group max, group min) of a channel view; groups as (C, G).

    One fused pass where :mod:`._cpu_kernels` takes the tensor (the tables are float32 then).
    """
    nc = _as_nc(xw, cdim)
    if fused.usable(nc):
        return fused.group_extrema(nc, by_rows)
    mu = xw.mean(view_reduce_dims(cdim), dtype=stats_dtype(xw.dtype))
    if by_rows:
        rdim = 2 if cdim == 1 else 1
        return mu, xw.amax(rdim).t(), xw.amin(rdim).t()
    gmax, gmin = xw.amax(0), xw.amin(0)
    return (mu, gmax, gmin) if cdim == 1 else (mu, gmax.t(), gmin.t())


def _as_nc(xw: Tensor, cdim: int) -> Tensor:
    """A contiguous channel view back as an (N, C, R) tensor with the same memory (a view)."""
    return xw if cdim == 1 else xw.transpose(1, 2)


def full_topk(xw: Tensor, cdim: int, mu: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Selection by a full ``topk``: (values (C, k), flat ``n*R + r`` indices (C, k))."""
    N, R = view_batch_and_positions(xw, cdim)
    C = mu.shape[0]
    dabs = (xw.to(mu.dtype) - view_broadcast(mu, cdim)).abs()
    per_channel = dabs.transpose(0, 1) if cdim == 1 else dabs.permute(2, 0, 1)
    return per_channel.reshape(C, N * R).topk(k, dim=1)


def select_topk(xw: Tensor, cdim: int, mu: Tensor, k: int,
                groups: tuple[Tensor, Tensor, bool] | None = None) -> tuple[Tensor, Tensor]:
    """Exact top-k of ``|x - mu|`` from group extrema (``groups`` = (gmax, gmin, by_rows))."""
    N, R = view_batch_and_positions(xw, cdim)
    C = mu.shape[0]
    if groups is None:
        by_rows = grouping(N, R, k)
        if by_rows is None:
            return full_topk(xw, cdim, mu, k)
        _, gmax, gmin = group_extrema(xw, cdim, by_rows)
    else:
        gmax, gmin, by_rows = groups
    gabs = torch.maximum(gmax.to(mu.dtype) - mu[:, None], mu[:, None] - gmin.to(mu.dtype))
    if by_rows:
        gabs = gabs.contiguous()  # (C, N) from a transposed view; topk is ~3x faster on rows
    if by_rows and R == 1:  # every group is one element: the groups are the answer
        return gabs.topk(k, dim=1)
    nc = _as_nc(xw, cdim)
    if not by_rows and mu.dtype == torch.float32 and fused.usable(nc):
        # fused: the k best positions, then the top-k among their N*k members, one pass each
        top_g = fused.topk_rows(gabs.t().contiguous(), torch.zeros_like(mu), k)[1]
        return fused.topk_members(nc, mu, top_g, k)
    top_g = gabs.topk(k, dim=1).indices                      # (C, k) best groups per channel
    c_i = torch.arange(C, device=xw.device)[:, None]
    if by_rows:      # groups are batch rows: members (C, k, R)
        members = xw[top_g, c_i, :] if cdim == 1 else xw[top_g, :, c_i]
        width = R
    else:            # groups are positions: members (N, C, k) -> (C, N, k)
        members = (xw[:, c_i, top_g] if cdim == 1 else xw[:, top_g, c_i]).transpose(0, 1)
        width = k
    dabs = (members.to(mu.dtype) - mu[:, None, None]).abs().reshape(C, -1)
    vals, pos = dabs.topk(k, dim=1)
    outer, inner = pos // width, pos % width
    if by_rows:
        n_i, r_i = top_g.gather(1, outer), inner
    else:
        n_i, r_i = outer, top_g.gather(1, inner)
    return vals, n_i * R + r_i


def topk_abs_deviation(x: Tensor, mu: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact per-channel top-k of ``|x - mu|`` without ranking every element (module docstring).

    Args:
        x: input (N, C, *).
        mu: per-channel mean (C,) in the accumulation dtype.
        k: 1 <= k <= N * R (R = prod of the spatial dims).

    Returns:
        ``values`` (C, k) of ``|d|`` in mu's dtype, descending, and ``flat`` (C, k) int64 indices
        into the channel's N*R elements (``n = flat // R``, ``r = flat % R``).
    """
    xw, cdim = channel_view(x)
    return select_topk(xw, cdim, mu, k, None)
