"""Train-mode L1 and L-inf/top-k batch normalisation: autograd Functions with closed-form backward.

Per channel over the n = N * prod(spatial) elements (d = x - mu, mu the batch mean), both layers
compute ``y = d / s * weight + bias`` with a scale ``s = c * sum_{j in J} |d_j| + eps``:

* L1:    J = all n elements, ``c = C_L1 / n``, ``C_L1 = sqrt(pi/2)``;
* L-inf: J = the k largest ``|d|``, ``c = C(n) / k``, ``C(n) = 0.5*(1+sqrt(pi*ln 4))/sqrt(2*ln n)``.

So one backward serves both (docs/layers.md, "Backward"): with ``g = weight * grad_out``,
``S = sum(g * d / s)`` and ``sign_J(d_j) = sign(d_j)`` for j in J (else 0),

    dx = alpha * grad_out + beta - kappa * sign_J(d),   alpha = weight / s,
    kappa = c * S / s,   beta = -alpha * mean(grad_out) + kappa * sum_J sign(d) / n,

computed by :func:`scale_backward_coefficients`; ``grad_weight = sum(grad_out * d) / s``,
``grad_bias = sum(grad_out)``. No squares and no ``1/s**2`` of tiny numbers appear, so float16
stays finite where autograd's backward of the same formula overflows.

Statistics come from this process's batch (``reducer=None``) or from a process group (a
:class:`~normswap.norms._reduce.ProcessGroupReducer`: the sync layers). Eager passes are the
native-kernel passes of :mod:`._kernels`: the forward allocates only its output (the sign of
``d`` is staged in it), saves only ``x`` and per-channel vectors for the backward (the sign is
recomputed there), and the backward allocates only ``dx`` (float32/64). The opt-in compiled
passes are in :mod:`._compile`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import _compile as compiled
from . import _cpu_kernels as fused
from ._common import stats_dtype
from ._kernels import (
    HALF_DTYPES,
    channel_affine,
    channel_mean,
    channel_sums,
    deviation_sign,
    sign_scale,
)
from ._layout import (
    as_channel_view,
    batch_tiles,
    channel_broadcast,
    channel_view,
    dense,
    from_channel_view,
    like_layout,
    view_batch_and_positions,
    view_index,
)
from ._reduce import ProcessGroupReducer
from ._topk import full_topk, group_extrema, grouping, select_topk

__all__ = [
    "C_L1",
    "linf_constant",
    "l1_batch_norm",
    "linf_batch_norm",
    "l1_batch_norm_reduced",
    "linf_batch_norm_reduced",
    "scale_backward_coefficients",
]

C_L1: float = math.sqrt(math.pi / 2.0)
"""``sqrt(pi/2)``: for Gaussian data ``C_L1 * E|x - mu| = sigma``."""
_LINF_NUMERATOR: float = 0.5 * (1.0 + math.sqrt(math.pi * math.log(4.0)))


def linf_constant(n: int) -> float:
    """``C(n) = 0.5*(1 + sqrt(pi*ln 4)) / sqrt(2*ln n)`` for n >= 2 elements per channel."""
    if n < 2:
        raise ValueError(f"linf_constant: need n >= 2 elements per channel, got {n}")
    return _LINF_NUMERATOR / math.sqrt(2.0 * math.log(n))


def scale_backward_coefficients(sum_g: Tensor, sum_gd: Tensor, sign_sum: Tensor, s: Tensor,
                                weight: Tensor, n: int, c: float
                                ) -> tuple[Tensor, Tensor, Tensor]:
    """``(alpha, beta, kappa)`` with ``dx = alpha*grad_out + beta - kappa*sign_J(x - mu)``.

    Args:
        sum_g: ``sum(grad_out)`` per channel (over the whole, possibly global, batch).
        sum_gd: ``sum(grad_out * (x - mu))`` per channel (same batch).
        sign_sum: ``sum_{j in J} sign(x_j - mu)`` per channel.
        s: the scale ``c * sum_J |d| + eps``.
        weight: gamma (ones without affine).
        n: elements per channel.
        c: ``C_L1 / n`` (L1) or ``C(n) / k`` (L-inf).

    Returns:
        Three (C,) tensors.
    """
    alpha = weight / s
    kappa = c * (alpha * sum_gd / s)
    beta = -alpha * sum_g / n + kappa * sign_sum / n
    return alpha, beta, kappa


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------
def _affine_params(x: Tensor, weight: Tensor | None, bias: Tensor | None, acc: torch.dtype
                   ) -> tuple[Tensor, Tensor]:
    """weight/bias as (C,) tensors in acc dtype (ones/zeros when None)."""
    C = x.shape[1]
    w = torch.ones(C, dtype=acc, device=x.device) if weight is None else weight.to(acc)
    b = torch.zeros(C, dtype=acc, device=x.device) if bias is None else bias.to(acc)
    return w, b


def _check_n(n: int, x: Tensor, who: str, scope: str = "") -> None:
    """n elements per channel must exceed 1 in train mode."""
    if n < 2:
        raise ValueError(f"{who}: expected more than 1 value per channel{scope} when training, "
                         f"got {n} (input of shape {tuple(x.shape)}); use eval mode or a larger "
                         "batch")


def _global_mean(x: Tensor, acc: torch.dtype, reducer: ProcessGroupReducer, who: str
                 ) -> tuple[Tensor, int]:
    """(mean of the global batch in ``acc``, global elements per channel): one all-reduce."""
    C = x.shape[1]
    n_local = x.numel() // C
    local = torch.cat([x.sum([0, *range(2, x.dim())], dtype=acc).to(torch.float64),
                       torch.tensor([float(n_local)], dtype=torch.float64, device=x.device)])
    total = reducer.sum(local)
    n = int(round(float(total[C])))
    _check_n(n, x, who, " in the global batch")
    return (total[:C] / n).to(acc), n


def _param_grads(ctx: Any, sum_g: Tensor, sum_gd: Tensor, s: Tensor
                 ) -> tuple[Tensor | None, Tensor | None]:
    """grad_weight = sum(grad_out * d) / s, grad_bias = sum(grad_out) (this process's batch)."""
    gw = (sum_gd / s).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
    gb = sum_g.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
    return gw, gb


def _remember_params(ctx: Any, weight: Tensor | None, bias: Tensor | None) -> None:
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _gradient_sums(g: Tensor, x: Tensor, mu: Tensor, use_compiled: bool
                   ) -> tuple[Tensor, Tensor]:
    """(sum g, sum g*(x - mu)) per channel on this process's batch."""
    if use_compiled:
        xw, cdim = channel_view(x)
        return compiled.run_kernel("gradient_sums", compiled.gradient_sums,
                                   as_channel_view(g, cdim), xw, cdim, mu)
    return channel_sums(g, x, mu)


def _own(y: Tensor) -> Tensor:
    """A Function's output must not be a view (in-place ops on it would be refused): copy the
    rare views the compiled path's layout handling could not avoid."""
    return y.clone(memory_format=torch.preserve_format) if y._is_view() else y


# ---------------------------------------------------------------------------------------------
# L1
# ---------------------------------------------------------------------------------------------
class _L1BatchNormFn(torch.autograd.Function):
    """L1 batch norm: forward returns (y, mu, s_raw, n); backward in closed form."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                reducer: ProcessGroupReducer | None) -> tuple[Tensor, Tensor, Tensor, int]:
        x = dense(x)
        acc = stats_dtype(x.dtype)
        w, b = _affine_params(x, weight, bias, acc)
        use_compiled = reducer is None and compiled.compiled_active(x)
        if use_compiled:
            n = x.numel() // x.shape[1]
            _check_n(n, x, "L1BatchNorm")
            xw, cdim = channel_view(x)
            mu, sum_abs, sum_sign = compiled.run_kernel("l1_statistics",
                                                        compiled.l1_statistics, xw, cdim)
            s_raw = sum_abs * (C_L1 / n)
            s = s_raw + eps
            y = _own(from_channel_view(compiled.run_kernel(
                "affine", compiled.affine, xw, cdim, mu, w / s, b), x, cdim))
        else:
            if reducer is None:
                n = x.numel() // x.shape[1]
                _check_n(n, x, "L1BatchNorm")
                mu = channel_mean(x)
            else:
                mu, n = _global_mean(x, acc, reducer, "L1BatchNorm")
            y = torch.empty_like(x)
            sum_sign, sum_abs = _l1_sign_sums(x, mu, y)
            if reducer is not None:
                C = x.shape[1]
                total = reducer.sum(torch.cat([sum_abs, sum_sign])).to(acc)
                sum_abs, sum_sign = total[:C], total[C:].clone()
            s_raw = sum_abs * (C_L1 / n)
            s = s_raw + eps
            channel_affine(x, mu, w / s, b, out=y)
        ctx.save_for_backward(x, weight, mu, s, sum_sign)
        ctx.n, ctx.reducer, ctx.use_compiled = n, reducer, use_compiled
        _remember_params(ctx, weight, bias)
        ctx.mark_non_differentiable(mu, s_raw)
        return y, mu, s_raw, n

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, _gm: Any, _gs: Any, _gn: Any
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        x, weight, mu, s, sum_sign = ctx.saved_tensors
        n, reducer = ctx.n, ctx.reducer
        g = like_layout(grad_y, x)  # one layout: native CPU kernels lose bf16 precision on
        sum_g, sum_gd = _gradient_sums(g, x, mu, ctx.use_compiled)  # mixed layouts
        grad_w, grad_b = _param_grads(ctx, sum_g, sum_gd, s)
        if not ctx.needs_input_grad[0]:
            return None, grad_w, grad_b, None, None
        if reducer is not None:
            C = x.shape[1]
            total = reducer.sum(torch.cat([sum_g, sum_gd])).to(mu.dtype)
            sum_g, sum_gd = total[:C], total[C:]
        w = torch.ones_like(mu) if weight is None else weight.to(mu.dtype)
        alpha, beta, kappa = scale_backward_coefficients(sum_g, sum_gd, sum_sign, s, w, n,
                                                         C_L1 / n)
        if ctx.use_compiled:
            xw, cdim = channel_view(x)
            dxw = compiled.run_kernel("l1_input_gradient", compiled.l1_input_gradient,
                                      as_channel_view(g, cdim), xw, cdim, mu, alpha, beta, kappa)
            return from_channel_view(dxw, x, cdim), grad_w, grad_b, None, None
        return _l1_input_gradient(g, x, mu, alpha, beta, kappa), grad_w, grad_b, None, None


def _l1_sign_sums(x: Tensor, mu: Tensor, buffer: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum sign(x - mu), sum |x - mu|)`` per channel.

    Tile by tile over the batch: each tile's sign is staged in a tile-sized scratch buffer and
    summed while it is in cache, so this reads ``x`` once and writes nothing to memory. Inputs
    too small to tile stage the sign in ``buffer`` (the output, overwritten afterwards).
    """
    if mu.dtype == torch.float32 and fused.usable(x):
        return fused.l1_sums(x, mu)
    scale = sign_scale(mu) if x.dtype in HALF_DTYPES else None
    tiles = batch_tiles(x)
    scratch = buffer if len(tiles) == 1 else torch.empty_like(x[tiles[0]])
    parts = []
    for tile in tiles:
        x_t = x[tile]
        sign_t = scratch[:x_t.shape[0]]
        deviation_sign(x_t, mu, out=sign_t, scale=scale)
        parts.append(torch.stack(channel_sums(sign_t, x_t, mu)))
    sums = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
    return sums[0].clone(), sums[1]  # own storage: the sign sum is saved for backward


def _l1_input_gradient(g: Tensor, x: Tensor, mu: Tensor, alpha: Tensor, beta: Tensor,
                       kappa: Tensor) -> Tensor:
    """``alpha*g + beta - kappa*sign(x - mu)`` in x's dtype, tile by tile over the batch.

    float32/float64: the sign is staged in ``dx`` (the only full-size allocation). Half: the
    affine of ``g`` in float32 by the native kernel, the sign term in half through a tile-sized
    buffer. (One fused pass where :mod:`._cpu_kernels` takes the tensors.)
    """
    if mu.dtype == torch.float32 and fused.usable(x, g):
        return fused.l1_input_gradient(g, x, mu, alpha, beta, kappa)
    dx = torch.empty_like(x)
    if x.dtype in HALF_DTYPES:
        scale, neg_kappa = sign_scale(mu), channel_broadcast((-kappa).to(x.dtype), x)
        tiles = batch_tiles(x)
        scratch = torch.empty_like(x[tiles[0]])
        for tile in tiles:
            x_t, dx_t = x[tile], dx[tile]
            sign_t = deviation_sign(x_t, mu, out=scratch[:x_t.shape[0]], scale=scale)
            channel_affine(g[tile], None, alpha, beta, out=dx_t)
            dx_t.addcmul_(sign_t, neg_kappa)
        return dx
    neg_kappa, beta_b = channel_broadcast(-kappa, x), channel_broadcast(beta, x)
    alpha_b = channel_broadcast(alpha, x)
    for tile in batch_tiles(x):
        dx_t = deviation_sign(x[tile], mu, out=dx[tile])
        dx_t.mul_(neg_kappa).add_(beta_b).addcmul_(g[tile], alpha_b)
    return dx


def l1_batch_norm_reduced(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                          reducer: ProcessGroupReducer | None
                          ) -> tuple[Tensor, Tensor, Tensor, int]:
    """:func:`l1_batch_norm` with statistics from ``reducer`` (None: this batch); also returns n.

    Returns:
        ``(y, mu, s_raw, n)`` with n the (global) element count per channel.
    """
    return _L1BatchNormFn.apply(x, weight, bias, float(eps), reducer)


def l1_batch_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                  eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """Train-mode L1 batch norm of ``x`` (N, C, *) with batch statistics.

    Args:
        x: input, channels at dim 1.
        weight: gamma (C,) or None.
        bias: beta (C,) or None.
        eps: added to the scale.

    Returns:
        ``(y, mu, s_raw)``: output in x's dtype (differentiable in x, weight, bias), batch mean
        and ``C_L1 * mean|x - mu|`` (both (C,) float32, float64 for float64 inputs; not
        differentiable).
    """
    y, mu, s_raw, _ = _L1BatchNormFn.apply(x, weight, bias, float(eps), None)
    return y, mu, s_raw


# ---------------------------------------------------------------------------------------------
# L-inf / top-k
# ---------------------------------------------------------------------------------------------
_DIRECT_TOPK_BATCH = 16
"""Up to this batch size the fused L-inf selection ranks the elements directly (no group
tables): measured faster there, from 1x64x56x56 to 16x256x14x14, in both layouts."""


def _local_selection(x: Tensor, mu: Tensor | None, k: int, exact: bool, use_compiled: bool
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """(mu, values (C, k), flat n*R + r indices (C, k)) of this batch's top-k of ``|x - mu|``
    (``mu`` None: the batch mean, computed in the same pass as the group extrema)."""
    xw, cdim = channel_view(x)
    N, R = view_batch_and_positions(xw, cdim)
    by_rows = grouping(N, R, k)
    if exact or by_rows is None:  # full topk: reference path, or tiny inputs
        mu = channel_mean(x) if mu is None else mu
        vals, flat = full_topk(xw, cdim, mu, k)
        return mu, vals, flat
    if ((R == 1 or N <= _DIRECT_TOPK_BATCH) and by_rows is not None and not use_compiled
            and fused.usable(x)):
        # (N, C) inputs and small batches: the group tables would hold as many values as the
        # tensor itself; one fused top-k pass over the elements instead
        mu = channel_mean(x) if mu is None else mu
        vals, flat = fused.topk_abs(x, mu, k)
        return mu, vals, flat
    if N == 1 and not by_rows:   # each position is its own group: no reduction
        gmax = gmin = xw[0] if cdim == 1 else xw[0].t()
    elif R == 1 and by_rows:     # each batch row is its own group
        gmax = gmin = xw[:, :, 0].t() if cdim == 1 else xw[:, 0, :].t()
    else:
        batch_mu, gmax, gmin = (
            compiled.run_kernel("group_extrema", group_extrema, xw, cdim, by_rows)
            if use_compiled else group_extrema(xw, cdim, by_rows))
        mu = batch_mu if mu is None else mu
    mu = channel_mean(x) if mu is None else mu
    vals, flat = select_topk(xw, cdim, mu, k, (gmax, gmin, by_rows))
    return mu, vals, flat


def _index_dtype(bound: int) -> torch.dtype:
    """The smallest integer dtype the saved selection's indices (all ``< bound``) fit in."""
    for dtype, top in ((torch.uint8, 2 ** 8), (torch.int16, 2 ** 15), (torch.int32, 2 ** 31)):
        if bound <= top:
            return dtype
    return torch.int64


class _LinfBatchNormFn(torch.autograd.Function):
    """L-inf/top-k batch norm: forward returns (y, mu, s_raw, n); backward in closed form."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                k: int, exact_topk: bool, reducer: ProcessGroupReducer | None
                ) -> tuple[Tensor, Tensor, Tensor, int]:
        x = dense(x)
        C = x.shape[1]
        acc = stats_dtype(x.dtype)
        use_compiled = reducer is None and compiled.compiled_active(x)
        n_local = x.numel() // C
        if reducer is None:
            n = n_local
            _check_n(n, x, "LinfBatchNorm")
            k = max(1, min(int(k), n))
            mu, vals, flat = _local_selection(x, None, k, exact_topk, use_compiled)
            top_sum = vals.sum(1)
            index = flat               # (C, k) positions within each channel's n elements
            sign_sum = None
        else:
            mu, n = _global_mean(x, acc, reducer, "LinfBatchNorm")
            k = max(1, min(int(k), n))
            top_sum, index, sign_sum = _global_selection(x, mu, k, exact_topk, reducer)
        s_raw = top_sum * (linf_constant(n) / k)
        s = s_raw + eps
        w, b = _affine_params(x, weight, bias, acc)
        if use_compiled:
            xw, cdim = channel_view(x)
            y = _own(from_channel_view(compiled.run_kernel(
                "affine", compiled.affine, xw, cdim, mu, w / s, b), x, cdim))
        else:
            y = channel_affine(x, mu, w / s, b)
        # the selection as (C, k) positions within a channel (local batch: the smallest dtype
        # they fit in, one byte each up to 256 elements per channel) or, reduced, as flat
        # c * n_local + j indices of the elements held here
        bound = n if reducer is None else x.numel()
        saved = [x, weight, mu, s, index.to(_index_dtype(bound))]
        if sign_sum is not None:
            saved.append(sign_sum)
        ctx.save_for_backward(*saved)
        ctx.n, ctx.k, ctx.reducer, ctx.use_compiled = n, k, reducer, use_compiled
        _remember_params(ctx, weight, bias)
        ctx.mark_non_differentiable(mu, s_raw)
        return y, mu, s_raw, n

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, _gm: Any, _gs: Any, _gn: Any
                 ) -> tuple[Tensor | None, ...]:
        x, weight, mu, s, index, *rest = ctx.saved_tensors
        n, k, reducer = ctx.n, ctx.k, ctx.reducer
        nones = (None,) * 4
        g = like_layout(grad_y, x)
        sum_g, sum_gd = _gradient_sums(g, x, mu, ctx.use_compiled)
        grad_w, grad_b = _param_grads(ctx, sum_g, sum_gd, s)
        if not ctx.needs_input_grad[0]:
            return (None, grad_w, grad_b) + nones
        C = x.shape[1]
        if reducer is not None:
            total = reducer.sum(torch.cat([sum_g, sum_gd])).to(mu.dtype)
            sum_g, sum_gd = total[:C], total[C:]
        xw, cdim = channel_view(x)
        _, R = view_batch_and_positions(xw, cdim)
        local = index.dim() == 2
        index = index.long()
        n_local = x.numel() // C
        if local:                      # (C, k) positions within each channel
            c_i = torch.arange(C, device=x.device).repeat_interleave(index.shape[1])
            flat = index.reshape(-1)
        else:
            c_i, flat = index // n_local, index % n_local
        idx = view_index(cdim, flat // R, c_i, flat % R)
        sel_sign = torch.sign(xw[idx].to(mu.dtype) - mu[c_i])
        sign_sum = rest[0] if rest else sel_sign.reshape(C, -1).sum(1)
        w = torch.ones_like(mu) if weight is None else weight.to(mu.dtype)
        alpha, beta, kappa = scale_backward_coefficients(sum_g, sum_gd, sign_sum, s, w, n,
                                                         linf_constant(n) / k)
        if ctx.use_compiled:
            dxw = compiled.run_kernel("scale_shift", compiled.scale_shift,
                                      as_channel_view(g, cdim), cdim, alpha, beta, x.dtype)
            dx = from_channel_view(dxw, x, cdim)
        else:
            dx = channel_affine(g, None, alpha, beta)
            dxw = as_channel_view(dx, cdim)  # a view: dx has x's layout
        if index.numel():
            fix = dxw[idx].to(mu.dtype) - kappa[c_i] * sel_sign
            dxw[idx] = fix.to(dxw.dtype)
        return (dx, grad_w, grad_b) + nones


def _global_selection(x: Tensor, mu: Tensor, k: int, exact: bool,
                      reducer: ProcessGroupReducer) -> tuple[Tensor, Tensor, Tensor]:
    """The global batch's top-k: (sum of the k |d| per channel, flat ``c*n_local + j`` indices of
    the selected elements held here, sum of the selected signs per channel)."""
    C = x.shape[1]
    n_local = x.numel() // C
    k_local = min(k, n_local)
    acc = mu.dtype
    if k_local:
        _, _, flat = _local_selection(x, mu, k_local, exact, False)
        xw, cdim = channel_view(x)
        _, R = view_batch_and_positions(xw, cdim)
        c_i = torch.arange(C, device=x.device)[:, None].expand_as(flat)
        signed = xw[view_index(cdim, flat // R, c_i, flat % R)].to(acc) - mu[:, None]
    else:
        signed = torch.empty(C, 0, dtype=acc, device=x.device)
        flat = torch.empty(C, 0, dtype=torch.long, device=x.device)
    pad = k - k_local   # a rank with fewer than k elements pads with NaN (never selected)
    if pad:
        signed = torch.cat([signed, torch.full((C, pad), float("nan"), dtype=acc,
                                               device=x.device)], 1)
        flat = torch.cat([flat, torch.zeros(C, pad, dtype=torch.long, device=x.device)], 1)
    gathered = reducer.gather(signed)                           # (world, C, k)
    world = gathered.shape[0]
    cand = gathered.permute(1, 0, 2).reshape(C, world * k)      # slot j = rank * k + i
    key = torch.nan_to_num(cand.abs(), nan=-1.0)
    top_vals, pick = key.topk(k, dim=1)
    sign_sum = torch.gather(cand, 1, pick).sign().sum(1)
    mine = (pick // k) == reducer.rank
    c_sel = torch.arange(C, device=x.device)[:, None].expand_as(pick)[mine]
    my_flat = flat[c_sel, (pick % k)[mine]]
    return top_vals.sum(1), c_sel * n_local + my_flat, sign_sum


def linf_batch_norm_reduced(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                            k: int, exact_topk: bool, reducer: ProcessGroupReducer | None
                            ) -> tuple[Tensor, Tensor, Tensor, int]:
    """:func:`linf_batch_norm` with statistics from ``reducer`` (None: this batch); also
    returns n (the global top-k when reduced: the union of the local top-k sets contains it).

    Raises:
        ValueError: ``k < 1``.
    """
    if int(k) < 1:
        raise ValueError(f"linf_batch_norm: k must be >= 1, got {k}")
    return _LinfBatchNormFn.apply(x, weight, bias, float(eps), int(k), bool(exact_topk), reducer)


def linf_batch_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                    eps: float = 1e-5, k: int = 1, exact_topk: bool = False
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Train-mode L-inf / top-k batch norm of ``x`` (N, C, *) with batch statistics.

    Args:
        x: input, channels at dim 1.
        weight: gamma (C,) or None.
        bias: beta (C,) or None.
        eps: added to the scale.
        k: number of largest ``|x - mu|`` averaged per channel; clamped to ``[1, n]``.
        exact_topk: use a full ``topk`` for the selection (the slow reference path).

    Returns:
        ``(y, mu, s_raw)`` with ``s_raw = C(n) * mean(top-k |x - mu|)`` (as for
        :func:`l1_batch_norm`).

    Raises:
        ValueError: ``k < 1``.
    """
    y, mu, s_raw, _ = linf_batch_norm_reduced(x, weight, bias, eps, k, exact_topk, None)
    return y, mu, s_raw
