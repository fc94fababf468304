"""Train-mode L1 and L-inf/top-k batch normalisation with closed-form backward.

Math (per channel c over the n = N * prod(spatial) elements; d = x - mu, mu the batch mean):

* L1:    ``s = C_L1 * mean|d| + eps``, ``C_L1 = sqrt(pi/2)``.
* L-inf: ``s = C(n) * mean(top-k |d|) + eps``, ``C(n) = 0.5*(1+sqrt(pi*ln 4))/sqrt(2*ln n)``;
  ``k`` is clamped to ``n``.

Output ``y = d / s * weight + bias``. ``eps`` is *added* to the scale in train mode (as BN adds
it to the variance); eval layers use their stored scale as is.

Backward (REFERENCE section 9), with ``g = weight * grad_out``, ``ybar = d / s``,
``S = sum(g * ybar)``:

* L1:    ``dx = [(g - mean g) - C_L1 * (S/n) * (sign d - mean sign d)] / s``
* L-inf: ``dx = [(g - mean g) - (C(n)/k) * S * (sign(d_j) [j in K] - sum_K sign(d) / n)] / s``
  (the scale's gradient reaches only the k selected elements K).
* ``grad_weight = sum(grad_out * ybar)``, ``grad_bias = sum(grad_out)``.

Everything accumulates in float32 (float64 for float64 inputs); outputs keep the input dtype,
so pure fp16 tensors of magnitude ~1e3 stay finite (no squares anywhere).

Speed (see benchmarks/bench_layers.py). Eager mode builds each pass from single fused aten
kernels: per-channel sums of ``g`` and ``g*(x - mu)`` come from one call of BatchNorm's native
eval-mode backward, affine maps ``x*a + b`` from its native eval forward, and temporaries are
reused as outputs (a fresh 25 MB buffer costs ~6k page faults on glibc, more than a pass). L1
saves ``sign(x - mu)`` as int8 (1 byte/element) for its backward. With :func:`set_compile` (or
``NORMSWAP_COMPILE=1``) the passes run as ``torch.compile``d (Inductor) kernels instead: about
3 reads + 1 write forward for L1, 2 + 1 for L-inf, and 2 reads + 1 write backward, with no
temporaries. A kernel that fails to compile logs one warning and runs eagerly from then on.

The top-k selection is exact without ranking all n elements: one reduction gives every group's
(spatial position's, or batch row's) max and min; the k largest ``|d|`` always lie in the k
groups with the largest extreme ``|d|``, so only those k groups are gathered and ranked. For
k = 1 this is an argmax over the (C, H*W) table of group extrema.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable

import torch
from torch import Tensor

from ._common import stats_dtype

__all__ = [
    "C_L1",
    "linf_constant",
    "l1_batch_norm",
    "linf_batch_norm",
    "l1_reference",
    "linf_reference",
    "set_compile",
    "compile_enabled",
    "topk_abs_deviation",
]

logger = logging.getLogger(__name__)

C_L1: float = math.sqrt(math.pi / 2.0)
_LINF_NUM: float = 0.5 * (1.0 + math.sqrt(math.pi * math.log(4.0)))


def linf_constant(n: int) -> float:
    """``C(n) = 0.5*(1 + sqrt(pi*ln 4)) / sqrt(2*ln n)`` for n >= 2 elements per channel."""
    if n < 2:
        raise ValueError(f"linf_constant: need n >= 2 elements per channel, got {n}")
    return _LINF_NUM / math.sqrt(2.0 * math.log(n))


# ---------------------------------------------------------------------------------------------
# compile switch
# ---------------------------------------------------------------------------------------------
_COMPILE: bool = os.environ.get("NORMSWAP_COMPILE", "0").lower() in ("1", "true", "yes", "on")
_COMPILED: dict[str, Callable[..., Any]] = {}
_FAILED: set[str] = set()


def set_compile(enabled: bool = True) -> None:
    """Turn the ``torch.compile`` fast path of the L1/L-inf layers on or off (process-wide).

    Off by default (also settable with ``NORMSWAP_COMPILE=1``). The first call with a new
    shape pays Inductor's compile time (seconds); a kernel that fails to compile falls back to
    the eager kernels with one warning. Float64 inputs always run eager.

    Args:
        enabled: True to use compiled kernels.
    """
    global _COMPILE
    _COMPILE = bool(enabled)


def compile_enabled() -> bool:
    """Whether the ``torch.compile`` fast path is on."""
    return _COMPILE


def _call(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run kernel ``fn`` compiled (when enabled and working), else eagerly (same math)."""
    if not _COMPILE or name in _FAILED or torch.compiler.is_compiling():
        return fn(*args)
    compiled = _COMPILED.get(name)
    if compiled is None:
        compiled = torch.compile(fn, dynamic=None)
        _COMPILED[name] = compiled
    try:
        with _dynamo_limits():
            return compiled(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler failure must fall back, not break
        _FAILED.add(name)
        logger.warning("normswap: torch.compile of kernel %r failed (%s: %s); using the eager "
                       "kernel from now on", name, type(exc).__name__, exc)
        return fn(*args)


def _dynamo_limits() -> Any:
    """A context raising dynamo's per-function recompile limit (one graph per dtype/layout/rank)."""
    import torch._dynamo.config as dynamo_config

    return dynamo_config.patch(recompile_limit=_RECOMPILE_LIMIT)


_RECOMPILE_LIMIT = 64


def _fused_active(x: Tensor) -> bool:
    """Whether the compiled kernels are in use for this input."""
    return _COMPILE and x.dtype != torch.float64 and not torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------------
# working views: x (N, C, *) as xw (N, C, R) with cdim=1, or (N, R, C) with cdim=2 when the
# channels are innermost (channels_last), so per-channel reductions run over the outer dims
# ---------------------------------------------------------------------------------------------
def _work(x: Tensor) -> tuple[Tensor, int]:
    """(xw, cdim) for x: a view whenever the strides allow."""
    N, C = x.shape[0], x.shape[1]
    if x.stride(1) == 1 and C > 1:
        xt = x.movedim(1, -1)
        if xt.is_contiguous():
            return xt.reshape(N, -1, C), 2
    return (x.unsqueeze(2) if x.dim() == 2 else x.flatten(2)), 1


def _work_as(t: Tensor, cdim: int) -> Tensor:
    """t (N, C, *) in the working shape for ``cdim`` (copying only if the strides forbid a view)."""
    N, C = t.shape[0], t.shape[1]
    if cdim == 1:
        return t.unsqueeze(2) if t.dim() == 2 else t.flatten(2)
    return t.movedim(1, -1).reshape(N, -1, C)


def _unwork(tw: Tensor, like: Tensor, cdim: int) -> Tensor:
    """Back from the working shape to ``like``'s shape (N, C, *)."""
    if cdim == 1:
        return tw.reshape(like.shape)
    N, C = like.shape[0], like.shape[1]
    return tw.reshape((N,) + tuple(like.shape[2:]) + (C,)).movedim(-1, 1)


def _cb(v: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector (C,) shaped to broadcast against x (N, C, *)."""
    return v.reshape((v.shape[0],) + (1,) * (x.dim() - 2))


def _rd(cdim: int) -> tuple[int, int]:
    """The reduction dims of the working view."""
    return (0, 2) if cdim == 1 else (0, 1)


def _pc(v: Tensor, cdim: int) -> Tensor:
    """A per-channel vector (C,) shaped to broadcast against the working view."""
    return v.unsqueeze(1) if cdim == 1 else v


def _nr(xw: Tensor, cdim: int) -> tuple[int, int]:
    """(N, R) of the working view."""
    return xw.shape[0], xw.shape[2] if cdim == 1 else xw.shape[1]


def _index(cdim: int, n: Tensor, c: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Advanced-index tuple of elements (n, c, r) in the working view."""
    return (n, c, r) if cdim == 1 else (n, r, c)


def _like_layout(g: Tensor, x: Tensor) -> Tensor:
    """``g`` with x's strides (so views and compiled kernels see one layout), copying if needed."""
    if g.stride() == x.stride():
        return g
    return torch.empty_like(x, dtype=g.dtype).copy_(g)  # x's strides if dense, else contiguous


# ---------------------------------------------------------------------------------------------
# kernels. *_fused are written for Inductor (one pass each where possible) and also run eagerly
# as the fallback; *_native use single fused aten kernels on the original (N, C, *) tensors.
# ---------------------------------------------------------------------------------------------
def _l1_stats_fused(xw: Tensor, cdim: int) -> tuple[Tensor, Tensor]:
    """(mean, sum|x - mean|) per channel."""
    xf = xw.to(stats_dtype(xw.dtype))
    mu = xf.mean(_rd(cdim))
    return mu, (xf - _pc(mu, cdim)).abs().sum(_rd(cdim))


def _group_minmax(xw: Tensor, cdim: int, over_batch: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, group max, group min), groups as (C, G): G = N rows or G = R positions."""
    mu = xw.mean(_rd(cdim), dtype=stats_dtype(xw.dtype))
    if over_batch:
        rdim = 2 if cdim == 1 else 1
        return mu, xw.amax(rdim).t(), xw.amin(rdim).t()
    gmax, gmin = xw.amax(0), xw.amin(0)
    return (mu, gmax, gmin) if cdim == 1 else (mu, gmax.t(), gmin.t())


def _affine_fused(xw: Tensor, cdim: int, mu: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``(x - mu) * a + b`` in the input dtype."""
    y = (xw.to(mu.dtype) - _pc(mu, cdim)) * _pc(a, cdim) + _pc(b, cdim)
    return y.to(xw.dtype)


def _affine_native(x: Tensor, mu: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``(x - mu) * a + b`` in x's dtype: one pass of the native eval BatchNorm kernel."""
    return torch.nn.functional.batch_norm(x, mu, torch.ones_like(mu), a, b, False, 0.0, 0.0)


def _scale_shift_fused(gw: Tensor, cdim: int, alpha: Tensor, beta: Tensor,
                       out_dtype: torch.dtype) -> Tensor:
    """``g * alpha + beta`` in ``out_dtype``."""
    return (gw.to(alpha.dtype) * _pc(alpha, cdim) + _pc(beta, cdim)).to(out_dtype)


def _scale_shift_native(g: Tensor, alpha: Tensor, beta: Tensor, out_dtype: torch.dtype
                        ) -> Tensor:
    """``g * alpha + beta`` in ``out_dtype``: one pass of the native eval BatchNorm kernel."""
    zeros = torch.zeros_like(alpha)
    out = torch.nn.functional.batch_norm(g, zeros, torch.ones_like(alpha), alpha, beta, False,
                                         0.0, 0.0)
    return out.to(out_dtype)


def _sums_g_gd_fused(gw: Tensor, xw: Tensor, cdim: int, mu: Tensor) -> tuple[Tensor, Tensor]:
    """(sum g, sum g*(x - mu)) per channel."""
    gf = gw.to(mu.dtype)
    d = xw.to(mu.dtype) - _pc(mu, cdim)
    return gf.sum(_rd(cdim)), (gf * d).sum(_rd(cdim))


def _sums_g_gd_native(g: Tensor, x: Tensor, mu: Tensor) -> tuple[Tensor, Tensor]:
    """(sum g, sum g*(x - mu)) per channel: one pass of BN's native eval-mode backward."""
    ones = torch.ones_like(mu)
    _, sum_gd, sum_g = torch.ops.aten.native_batch_norm_backward(
        g, x, ones, mu, ones, None, None, False, 0.0, [False, True, True])
    return sum_g, sum_gd


def _l1_sums_fused(gw: Tensor, xw: Tensor, cdim: int, mu: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(sum g, sum g*d, sum sign d) per channel."""
    gf = gw.to(mu.dtype)
    d = xw.to(mu.dtype) - _pc(mu, cdim)
    rd = _rd(cdim)
    return gf.sum(rd), (gf * d).sum(rd), torch.sign(d).sum(rd)


def _l1_dx_fused(gw: Tensor, xw: Tensor, cdim: int, mu: Tensor, alpha: Tensor, beta: Tensor,
                 kappa: Tensor) -> Tensor:
    """``g * alpha + beta - kappa * sign(x - mu)`` in x's dtype."""
    d = xw.to(mu.dtype) - _pc(mu, cdim)
    dx = gw.to(mu.dtype) * _pc(alpha, cdim) + _pc(beta, cdim) - _pc(kappa, cdim) * torch.sign(d)
    return dx.to(xw.dtype)


def _l1_coefficients(sum_g: Tensor, sum_gd: Tensor, sum_sign: Tensor, s: Tensor, w: Tensor,
                     n: int) -> tuple[Tensor, Tensor, Tensor]:
    """alpha, beta, kappa with ``dx = alpha*grad_out + beta - kappa*sign(d)``."""
    big_s = w * sum_gd / s                      # sum(g * ybar), g = w * grad_out
    kappa = (C_L1 / n) * big_s / s
    alpha = w / s
    beta = -w * sum_g / (n * s) + kappa * sum_sign / n
    return alpha, beta, kappa


# ---------------------------------------------------------------------------------------------
# top-k selection
# ---------------------------------------------------------------------------------------------
def _topk_full(xw: Tensor, cdim: int, mu: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Reference selection by a full topk: (values (C, k), flat n*R + r indices (C, k))."""
    N, R = _nr(xw, cdim)
    C = mu.shape[0]
    dabs = (xw.to(mu.dtype) - _pc(mu, cdim)).abs()
    per_channel = dabs.transpose(0, 1) if cdim == 1 else dabs.permute(2, 0, 1)
    return per_channel.reshape(C, N * R).topk(k, dim=1)


def _topk_select(xw: Tensor, cdim: int, mu: Tensor, k: int,
                 groups: tuple[Tensor, Tensor, bool] | None = None) -> tuple[Tensor, Tensor]:
    """Exact top-k of |x - mu| from group extrema (see topk_abs_deviation)."""
    N, R = _nr(xw, cdim)
    C = mu.shape[0]
    if groups is None:
        over_batch = _groups_over_batch(N, R, k)
        if over_batch is None:
            return _topk_full(xw, cdim, mu, k)
        _, gmax, gmin = _group_minmax(xw, cdim, over_batch)
    else:
        gmax, gmin, over_batch = groups
    gabs = torch.maximum(gmax.to(mu.dtype) - mu[:, None], mu[:, None] - gmin.to(mu.dtype))
    if over_batch:
        gabs = gabs.contiguous()  # (C, N) from a transposed view; topk is ~3x faster on rows
    if over_batch and R == 1:  # every group is one element: the groups are the answer
        return gabs.topk(k, dim=1)
    top_g = gabs.topk(k, dim=1).indices                      # (C, k) best groups per channel
    c_i = torch.arange(C, device=xw.device)[:, None]
    if over_batch:   # groups are batch rows: members (C, k, R)
        members = xw[top_g, c_i, :] if cdim == 1 else xw[top_g, :, c_i]
        width = R
    else:            # groups are positions: members (N, C, k) -> (C, N, k)
        members = (xw[:, c_i, top_g] if cdim == 1 else xw[:, top_g, c_i]).transpose(0, 1)
        width = k
    dabs = (members.to(mu.dtype) - mu[:, None, None]).abs().reshape(C, -1)
    vals, pos = dabs.topk(k, dim=1)
    outer, inner = pos // width, pos % width
    if over_batch:
        n_i, r_i = top_g.gather(1, outer), inner
    else:
        n_i, r_i = outer, top_g.gather(1, inner)
    return vals, n_i * R + r_i


def _groups_over_batch(N: int, R: int, k: int) -> bool | None:
    """Group choice for the selection: positions (False), batch rows (True) or none (None)."""
    if R >= k and (R > 1 or N == 1):
        return False
    if N >= k:
        return True
    return None


def topk_abs_deviation(x: Tensor, mu: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact per-channel top-k of ``|x - mu|`` without ranking every element.

    Elements are grouped (by spatial position over the batch, or by batch row when there are
    fewer than k positions); one reduction pass gives each group's max and min. Every one of
    the k largest ``|d|`` lies in one of the k groups with the largest extreme ``|d|`` (a group
    outside them has its maximum below the k-th group maximum, itself attained by k distinct
    elements), so only those k groups are gathered and ranked. No full-size temporary, no sort.

    Args:
        x: input (N, C, *).
        mu: per-channel mean (C,) in the accumulation dtype.
        k: 1 <= k <= N * R (R = prod of the spatial dims).

    Returns:
        ``values`` (C, k) of ``|d|`` in mu's dtype, descending, and ``flat`` (C, k) int64 indices
        into the channel's N*R elements (``n = flat // R``, ``r = flat % R``).
    """
    xw, cdim = _work(x)
    return _topk_select(xw, cdim, mu, k, None)


# ---------------------------------------------------------------------------------------------
# autograd Functions
# ---------------------------------------------------------------------------------------------
def _params(x: Tensor, weight: Tensor | None, bias: Tensor | None, acc: torch.dtype
            ) -> tuple[Tensor, Tensor]:
    """weight/bias as (C,) tensors in acc dtype (ones/zeros when None)."""
    C = x.shape[1]
    w = torch.ones(C, dtype=acc, device=x.device) if weight is None else weight.to(acc)
    b = torch.zeros(C, dtype=acc, device=x.device) if bias is None else bias.to(acc)
    return w, b


def _check_n(x: Tensor, who: str) -> int:
    """n = N * prod(spatial), which must exceed 1 in train mode."""
    n = x.numel() // x.shape[1] if x.shape[1] else 0
    if n < 2:
        raise ValueError(f"{who}: expected more than 1 value per channel when training, got "
                         f"input of shape {tuple(x.shape)}; use eval mode or a larger batch")
    return n


def _param_grads(weight: Tensor | None, bias: Tensor | None, sum_g: Tensor, sum_gd: Tensor,
                 s: Tensor, needs: tuple[bool, ...]) -> tuple[Tensor | None, Tensor | None]:
    """grad_weight = sum(grad_out * d)/s, grad_bias = sum(grad_out), in the params' dtypes."""
    gw = (sum_gd / s).to(weight.dtype) if weight is not None and needs[1] else None
    gb = sum_g.to(bias.dtype) if bias is not None and needs[2] else None
    return gw, gb


def _own(y: Tensor) -> Tensor:
    """A Function's output must not be a view (in-place ops on it would be refused): copy the
    rare views that the layout helpers could not avoid."""
    return y.clone(memory_format=torch.preserve_format) if y._is_view() else y


class _L1BatchNormFn(torch.autograd.Function):
    """L1 batch norm: forward returns (y, mu, s_raw); backward in closed form."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
        n = _check_n(x, "L1BatchNorm")
        xw, cdim = _work(x)
        acc = stats_dtype(x.dtype)
        w, b = _params(x, weight, bias, acc)
        if _fused_active(x):
            mu, sum_abs = _call("l1_stats", _l1_stats_fused, xw, cdim)
            s_raw = sum_abs * (C_L1 / n)
            s = s_raw + eps
            y = _unwork(_call("affine", _affine_fused, xw, cdim, mu, w / s, b), x, cdim)
        else:
            mu = xw.mean(_rd(cdim), dtype=acc)
            mu_b = _pc(mu, cdim)
            if x.dtype == acc:  # fp32/fp64: x - mu is exact in sign (Sterbenz), sign it in place
                # the buffer is allocated in x's layout so that the output returned below is a
                # base tensor, not a view (in-place ops after the layer, e.g. ReLU(inplace=True),
                # are forbidden on views created inside a custom Function)
                out = torch.empty_like(x)
                ow, ocdim = _work(out)
                if ocdim != cdim or ow.shape != xw.shape or ow.data_ptr() != out.data_ptr():
                    ow = None
                sgn = (torch.sub(xw, mu_b) if ow is None else torch.sub(xw, mu_b, out=ow)).sign_()
            else:               # fp16/bf16: compare in fp32 (a rounded difference can underflow)
                sgn = torch.gt(xw, mu_b).to(x.dtype).add_(torch.lt(xw, mu_b), alpha=-1)
            sum_sign, sum_abs = _sums_g_gd_native(_unwork(sgn, x, cdim), x, mu)
            s_raw = sum_abs * (C_L1 / n)
            s = s_raw + eps
            ctx.sum_sign = sum_sign
            if x.dtype == acc:  # keep 1 byte/element and reuse the buffer as the output
                ctx.sign = _unwork(sgn.to(torch.int8), x, cdim)
                yw = torch.sub(xw, _pc(mu, cdim), out=sgn)
                yw.mul_(_pc(w / s, cdim)).add_(_pc(b, cdim))
                y = out if ow is not None else _unwork(yw, x, cdim)
            else:               # fp16/bf16: the sign in x's dtype keeps backward on fast kernels
                ctx.sign = _unwork(sgn, x, cdim)
                y = _affine_native(x, mu, w / s, b)
        ctx.save_for_backward(x, weight, bias, mu, s)
        ctx.mark_non_differentiable(mu, s_raw)
        return _own(y), mu, s_raw

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, _gm: Any, _gs: Any
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, weight, bias, mu, s = ctx.saved_tensors
        n = x.numel() // x.shape[1]
        xw, cdim = _work(x)
        w, _ = _params(x, weight, None, mu.dtype)
        grad_y = _like_layout(grad_y, x)  # one layout: native CPU kernels lose bf16 precision
        if _fused_active(x):                # on mixed layouts, compiled ones recompile
            gw = _work_as(grad_y, cdim)
            sum_g, sum_gd, sum_sign = _call("l1_sums", _l1_sums_fused, gw, xw, cdim, mu)
            alpha, beta, kappa = _l1_coefficients(sum_g, sum_gd, sum_sign, s, w, n)
            dxw = _call("l1_dx", _l1_dx_fused, gw, xw, cdim, mu, alpha, beta, kappa)
        else:
            sum_g, sum_gd = _sums_g_gd_native(grad_y, x, mu)
            alpha, beta, kappa = _l1_coefficients(sum_g, sum_gd, ctx.sum_sign, s, w, n)
            dx = _scale_shift_native(grad_y, alpha, beta, x.dtype)
            neg_kappa = -kappa if ctx.sign.dtype == torch.int8 else (-kappa).to(x.dtype)
            dx = dx.addcmul_(ctx.sign, _cb(neg_kappa, x))
            dxw = _work_as(dx, cdim)
        gwt, gbt = _param_grads(weight, bias, sum_g, sum_gd, s, ctx.needs_input_grad)
        dx = _unwork(dxw, x, cdim) if ctx.needs_input_grad[0] else None
        return dx, gwt, gbt, None


class _LinfBatchNormFn(torch.autograd.Function):
    """L-inf/top-k batch norm: forward returns (y, mu, s_raw); backward in closed form."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                k: int, exact_topk: bool) -> tuple[Tensor, Tensor, Tensor]:
        n = _check_n(x, "LinfBatchNorm")
        xw, cdim = _work(x)
        N, R = _nr(xw, cdim)
        k = max(1, min(int(k), n))
        acc = stats_dtype(x.dtype)
        fused = _fused_active(x)
        over_batch = _groups_over_batch(N, R, k)
        if exact_topk or over_batch is None:  # full topk: reference path, or tiny inputs
            mu = xw.mean(_rd(cdim), dtype=acc)
            vals, flat = _topk_full(xw, cdim, mu, k)
        else:
            if N == 1 and not over_batch:  # each position is its own group: no reduction
                mu = xw.mean(_rd(cdim), dtype=acc)
                gmax = gmin = xw[0] if cdim == 1 else xw[0].t()
            elif R == 1 and over_batch:    # each batch row is its own group
                mu = xw.mean(_rd(cdim), dtype=acc)
                gmax = gmin = xw[:, :, 0].t() if cdim == 1 else xw[:, 0, :].t()
            elif fused:
                mu, gmax, gmin = _call("group_minmax", _group_minmax, xw, cdim, over_batch)
            else:
                mu, gmax, gmin = _group_minmax(xw, cdim, over_batch)
            vals, flat = _topk_select(xw, cdim, mu, k, (gmax, gmin, over_batch))
        top_sum = vals.sum(1)
        s_raw = top_sum * (linf_constant(n) / k)
        s = s_raw + eps
        w, b = _params(x, weight, bias, acc)
        if fused:
            y = _unwork(_call("affine", _affine_fused, xw, cdim, mu, w / s, b), x, cdim)
        else:
            y = _affine_native(x, mu, w / s, b)
        ctx.k = k
        ctx.save_for_backward(x, weight, bias, mu, s, flat)
        ctx.mark_non_differentiable(mu, s_raw)
        return _own(y), mu, s_raw

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, _gm: Any, _gs: Any
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        x, weight, bias, mu, s, flat = ctx.saved_tensors
        k = ctx.k
        n = x.numel() // x.shape[1]
        xw, cdim = _work(x)
        N, R = _nr(xw, cdim)
        C = x.shape[1]
        fused = _fused_active(x)
        grad_y = _like_layout(grad_y, x)
        if fused:
            gw = _work_as(grad_y, cdim)
            sum_g, sum_gd = _call("sums_g_gd", _sums_g_gd_fused, gw, xw, cdim, mu)
        else:
            sum_g, sum_gd = _sums_g_gd_native(grad_y, x, mu)
        gwt, gbt = _param_grads(weight, bias, sum_g, sum_gd, s, ctx.needs_input_grad)
        if not ctx.needs_input_grad[0]:
            return None, gwt, gbt, None, None, None
        w, _ = _params(x, weight, None, mu.dtype)
        c_i = torch.arange(C, device=x.device).unsqueeze(1).expand_as(flat)
        idx = _index(cdim, flat // R, c_i, flat % R)
        sel_sign = torch.sign(xw[idx].to(mu.dtype) - mu[:, None])
        coef = (linf_constant(n) / k) * (w * sum_gd / s) / s  # (C(n)/k) * S / s
        alpha = w / s
        beta = -w * sum_g / (n * s) + coef * sel_sign.sum(1) / n
        if fused:
            dxw = _call("scale_shift", _scale_shift_fused, gw, cdim, alpha, beta, x.dtype)
        else:
            dx = _like_layout(_scale_shift_native(grad_y, alpha, beta, x.dtype), x)  # no-op
            dxw = _work_as(dx, cdim)  # a view, or a copy that _unwork turns back
        fix = dxw[idx].to(mu.dtype) - coef[:, None] * sel_sign
        dxw[idx] = fix.to(dxw.dtype)
        return _unwork(dxw, x, cdim), gwt, gbt, None, None, None


# ---------------------------------------------------------------------------------------------
# functional API
# ---------------------------------------------------------------------------------------------
def l1_batch_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                  eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """Train-mode L1 batch norm of ``x`` (N, C, *) with batch statistics.

    Args:
        x: input, channels at dim 1.
        weight: gamma (C,) or None.
        bias: beta (C,) or None.
        eps: added to the scale.

    Returns:
        ``(y, mu, s_raw)``: output in x's dtype, batch mean and ``C_L1 * mean|x - mu|`` (both
        (C,) float32, float64 for float64 inputs; not differentiable).
    """
    return _L1BatchNormFn.apply(x, weight, bias, float(eps))


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
        ``(y, mu, s_raw)`` with ``s_raw = C(n) * mean(top-k |x - mu|)``.
    """
    if int(k) < 1:
        raise ValueError(f"linf_batch_norm: k must be >= 1, got {k}")
    return _LinfBatchNormFn.apply(x, weight, bias, float(eps), int(k), bool(exact_topk))


def _reference_common(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """(d, d as (C, n), n) for the reference formulas."""
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
    """The L1 train formula written directly in autograd ops (slow; for tests)."""
    d, dc, _ = _reference_common(x)
    s = C_L1 * dc.abs().mean(1) + eps
    return _finish(x, d, s, weight, bias)


def linf_reference(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                   eps: float = 1e-5, k: int = 1) -> Tensor:
    """The L-inf/top-k train formula written directly in autograd ops (slow; for tests)."""
    d, dc, n = _reference_common(x)
    k = max(1, min(int(k), n))
    s = linf_constant(n) * dc.abs().topk(k, dim=1).values.mean(1) + eps
    return _finish(x, d, s, weight, bias)
