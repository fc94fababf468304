"""Triton kernels for train-mode L1 and L-inf/top-k batch norm (CUDA, or Triton's interpreter).

Same functions as :func:`normswap.norms._functional.l1_batch_norm` and
:func:`~normswap.norms._functional.linf_batch_norm` (same outputs, same closed-form backward,
see that module for the maths), for float16, bfloat16 and float32 inputs of rank 2 to 5 in
contiguous (NCHW, NCDHW, NCL, NC) or channels-last (NHWC, NDHWC, NLC) layout. Any other layout
is copied to contiguous first. Statistics, coefficients and every intermediate are float32;
``y`` and ``dx`` are written in the input's dtype, ``mu`` and ``s_raw`` are float32 (C,).
:func:`available` says whether an input can take this path.

Layout. A channel's ``n = N * R`` elements (R = prod of the spatial dims) are read through
strides, never transposed: contiguous inputs as an (N, R) matrix per channel (row stride
``C * R``, tiles of BN x BR with BR contiguous elements per row), channels-last inputs as one
(N * R, C) matrix (tiles of BM rows x BC contiguous channels). The reduction over a channel is
split over ``split`` programs (about 4 per SM in all); each writes float32 partial sums to a
``(q, split, C)`` buffer that the next kernel reduces in a fixed order. No atomics: results are
deterministic run to run. Means are accumulated as ``sum(x - x0)`` around the channel's first
element ``x0`` (no cancellation when ``|mean| >> std``).

Kernels and passes over device memory (one pass = reading or writing one tensor of x's size;
the per-channel buffers are C * split floats, negligible):

================  ==========================================  ======  =======================
op                kernels                                     passes  cuDNN BatchNorm
================  ==========================================  ======  =======================
L1 forward        sum(x - x0); sum|x - mu| and sum sign;       3 R 1 W  1-2 R 1 W
                  y = (x - mu) * w/s + b
L1 backward       sum g, sum g*d; dx = a*g + b - k*sign(d)     4 R 1 W  4 R 1 W
L-inf forward     sum(x - x0) + group extrema; finalise        2 R 1 W  1-2 R 1 W
                  (top-k, C programs); y
L-inf backward    sum g, sum g*d; dx = a*g + b; fix k per C    3 R 1 W  4 R 1 W
================  ==========================================  ======  =======================

So an L1 training step moves 9 tensor passes where BatchNorm moves 8 (7 when cuDNN keeps x on
chip between its statistics and its normalisation), L-inf moves 7. L1 needs its second read
because ``sum|x - mu|`` needs the final mean: no one-pass form of the mean absolute deviation
exists. On an H200 (60 MB L2) tensors of up to ~40 MB are re-read from L2 rather than HBM.
Elementwise work is a few float32 operations per element, well under the ~7 (fp16) to ~15
(fp32) operations per byte-limited element that HBM3e bandwidth leaves; all loads are
unit-stride along the tile's inner axis, so Triton vectorises them (16-byte accesses) when the
row length is a multiple of 8.

Exact top-k without sorting (L-inf). The k largest ``|x - mu|`` are among the k largest ``x``
and the k largest ``-x`` (an element above the mean with larger |d| than another is also larger
in x). The first pass, alongside the sum, keeps elementwise running maxima and minima per tile
lane; a *group* is a tile column (NCHW: BN*T elements) or a tile row lane (NHWC: T elements)
of one program. The k best groups of each list (by their extreme, ties by group id) are
selected in each program, and the finalise kernel (one program per channel) selects the k best
of those, gathers their members and takes the exact top-k of ``|x - mu|`` among them: any
element of the true top-k lies in one of the k groups with the largest extremes. The multiset of
selected values, hence ``s_raw``, equals ``torch.topk``'s; among exactly equal ``|x - mu|`` the
choice is deterministic (larger ``|d|``, then ``d > 0``, then the smaller flat index ``n*R + r``)
and may differ from ``torch.topk``'s (whose choice is unspecified): the scale's gradient goes to
exactly k elements either way. Selection works on int64 keys packing value and index so that
each step is one max-reduction; it costs O(k) reductions per program, so it is meant for small k
(1 to 64).

What is verified where: tests/norms/test_triton.py runs every kernel under Triton's interpreter
on the CPU (``TRITON_INTERPRET=1``) against a float64 reference for each dtype, layout and rank;
benchmarks/gpu_check.sh measures them on a GPU (ratios to cuDNN BatchNorm, memory).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...errors import NormswapError
from .._functional import C_L1, _check_n, _like_layout, linf_constant

__all__ = ["available", "l1_batch_norm", "linf_batch_norm", "TritonUnavailableError"]

logger = logging.getLogger(__name__)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# flat per-channel indices are int32 in the kernels (with room for masked tile overhang)
_MAX_PER_CHANNEL = 2**31 - 2**20
# tuning: elements per tile, programs per SM, lane-group limits. ``_TUNING`` entries that are
# not None override the defaults (tests shrink the tiles to cover many tiles and programs).
_TUNING: dict[str, int | None] = {"tile": None, "programs": None, "cmax": None}
_PROGRAMS_PER_SM = 4
_MAX_SPLIT = 4096
_GATHER_MAX = 256          # members per group gathered by the finalise kernel (NCHW: BN*T)
_NHWC_LANE_MIN_T = 8       # at most this many tiles per program before NHWC lane ranking


class TritonUnavailableError(NormswapError, RuntimeError):
    """The Triton path was asked for an input it cannot take (see :func:`available`)."""


# ---------------------------------------------------------------------------------------------
# availability and the kernels module
# ---------------------------------------------------------------------------------------------
_TRITON_IMPORTABLE: bool | None = None
_KERNELS: ModuleType | None = None
_KERNELS_INTERPRETED: bool | None = None


def _interpreter_on() -> bool:
    """Whether Triton's interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _triton_importable() -> bool:
    """Whether ``import triton`` works (checked once)."""
    global _TRITON_IMPORTABLE
    if _TRITON_IMPORTABLE is None:
        if importlib.util.find_spec("triton") is None:
            _TRITON_IMPORTABLE = False
        else:
            try:
                import triton  # noqa: F401
                import triton.language  # noqa: F401
            except Exception as exc:  # noqa: BLE001 - a broken install means "not available"
                logger.info("triton is installed but does not import (%s: %s)",
                            type(exc).__name__, exc)
                _TRITON_IMPORTABLE = False
            else:
                _TRITON_IMPORTABLE = True
    return _TRITON_IMPORTABLE


def available(x: Tensor) -> bool:
    """Whether :func:`l1_batch_norm` / :func:`linf_batch_norm` can run on ``x``.

    True when Triton imports, ``x`` is on a CUDA device (or on the CPU with Triton's
    interpreter switched on by ``TRITON_INTERPRET=1``), its dtype is float16, bfloat16 or
    float32, it has 2 to 5 dims, and each channel has fewer than ~2**31 elements.

    Args:
        x: the input (N, C, *).

    Returns:
        Whether the Triton kernels accept ``x``.
    """
    if not isinstance(x, Tensor) or x.dtype not in _DTYPES or not 2 <= x.dim() <= 5:
        return False
    on_device = x.is_cuda or (x.device.type == "cpu" and _interpreter_on())
    if not on_device or not _triton_importable():
        return False
    c = x.shape[1]
    return c == 0 or x.numel() // c < _MAX_PER_CHANNEL


def _kernels() -> ModuleType:
    """The kernels module, (re)imported so that its jit functions match the interpreter switch."""
    global _KERNELS, _KERNELS_INTERPRETED
    mode = _interpreter_on()
    if _KERNELS is None or _KERNELS_INTERPRETED != mode:
        module = importlib.import_module(f"{__name__}.kernels")
        if _KERNELS is not None:
            module = importlib.reload(module)
        _KERNELS, _KERNELS_INTERPRETED = module, mode
    return _KERNELS


def _require(x: Tensor, who: str) -> None:
    """Raise TritonUnavailableError, naming the reason, when ``x`` cannot take this path."""
    if available(x):
        return
    if not _triton_importable():
        why = "triton is not importable (pip install triton)"
    elif not (x.is_cuda or (x.device.type == "cpu" and _interpreter_on())):
        why = f"x is on {x.device} (CUDA needed, or TRITON_INTERPRET=1 for the CPU)"
    elif x.dtype not in _DTYPES:
        why = f"dtype {x.dtype} (float16, bfloat16 or float32 needed)"
    elif not 2 <= x.dim() <= 5:
        why = f"{x.dim()}-D input (2 to 5 dims needed)"
    else:
        why = f"more than {_MAX_PER_CHANNEL} elements per channel"
    raise TritonUnavailableError(
        f"{who}: the Triton kernels cannot take input of shape {tuple(x.shape)}: {why}; use "
        "normswap.norms._functional instead (check normswap.norms._triton.available(x) first)")


# ---------------------------------------------------------------------------------------------
# launch plan
# ---------------------------------------------------------------------------------------------
def _next_pow2(v: int) -> int:
    """Smallest power of two >= v (1 for v <= 1)."""
    return 1 if v <= 1 else 1 << (int(v) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


@dataclass(frozen=True)
class _Plan:
    """How one input is tiled and split (see the module docstring)."""

    cl: bool         # channels-last kernels ((M, C) matrix) instead of per-channel (N, R)
    N: int
    C: int
    R: int
    M: int           # N * R
    sN: int          # NCHW row stride (C * R)
    sC: int          # channel stride (R, or 1 channels-last)
    sM: int          # channels-last row stride (C)
    ba: int          # BN (NCHW) or BM (NHWC): tile rows
    bb: int          # BR (NCHW) or BC (NHWC): tile columns (the unit-stride axis)
    TR: int          # NCHW: column tiles per row block (1 for NHWC)
    TT: int          # tiles per channel (NCHW) or per channel block (NHWC)
    T: int           # tiles per program
    split: int       # programs per channel (block)
    cblocks: int     # C (NCHW) or ceil(C / BC) (NHWC)
    num_warps: int

    @property
    def grid(self) -> tuple[int, int]:
        """Launch grid of the reduction and elementwise kernels."""
        return (self.cblocks, self.split)

    @property
    def sp(self) -> int:
        """Power of two >= split (the partial-sum vector width)."""
        return _next_pow2(self.split)

    @property
    def n(self) -> int:
        """Elements per channel."""
        return self.N * self.R

    @property
    def group_size(self) -> int:
        """Power-of-two bound on a group's member count (the finalise gather width)."""
        return _next_pow2(self.T) * (self.ba if not self.cl else 1)


def _gpu_tiling(x: Tensor) -> bool:
    """Whether ``x`` gets the GPU tiling (CUDA tensors) or the interpreter's small one."""
    return x.is_cuda


def _tile_elements(x: Tensor) -> int:
    """Elements per tile: 8 KB of input on a GPU, small under the interpreter."""
    if _TUNING["tile"]:
        return int(_TUNING["tile"])
    return 8192 // x.element_size() if _gpu_tiling(x) else 64


def _channel_block(x: Tensor) -> int:
    """Channels per NHWC tile at most: 128 bytes of a row on a GPU, 4 under the interpreter."""
    if _TUNING["cmax"]:
        return int(_TUNING["cmax"])
    return max(16, 128 // x.element_size()) if _gpu_tiling(x) else 4


def _target_programs(x: Tensor) -> int:
    """About how many programs one reduction launch should have."""
    if _TUNING["programs"]:
        return int(_TUNING["programs"])
    return _PROGRAMS_PER_SM * _sm_count(x.device) if _gpu_tiling(x) else 8


_SM_COUNTS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    """Multiprocessor count of a CUDA device (cached)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _row_width(R: int, cap: int) -> int:
    """NCHW tile width: the whole row when it fits, else the widest power of two >= 128 that
    pads the row by at most 1/8 (least padding if none does)."""
    if R <= cap:
        return _next_pow2(R)
    widths = []
    w = cap
    while w >= min(128, cap):
        widths.append(w)
        w //= 2
    for w in widths:
        if _cdiv(R, w) * w * 8 <= R * 9:
            return w
    return min(widths, key=lambda w: (_cdiv(R, w) * w, -w))


def _split(TT: int, cblocks: int, programs: int, t_min: int, t_max: int) -> tuple[int, int]:
    """(tiles per program, programs per channel block) for TT tiles."""
    split = max(1, min(TT, _cdiv(programs, cblocks)))
    T = _cdiv(TT, split)
    T = max(T, min(TT, t_min))
    T = min(T, max(t_max, 1))
    T = max(T, _cdiv(TT, _MAX_SPLIT))
    return T, _cdiv(TT, T)


def _plan(x: Tensor, cl: bool, lanes: bool, k: int = 1) -> _Plan:
    """The tiling of ``x`` (already in its working layout) for one call; ``lanes`` for the
    L-inf selection of ``k`` elements."""
    N, C = int(x.shape[0]), int(x.shape[1])
    R = x.numel() // (N * C)
    tile = _tile_elements(x)
    programs = _target_programs(x)
    warps = 8 if tile >= 4096 else 4
    if cl:
        bc = min(_next_pow2(C), _channel_block(x))
        bm = max(1, min(tile // bc, _next_pow2(N * R)))
        TT = _cdiv(N * R, bm)
        cblocks = _cdiv(C, bc)
        # an NHWC program ranks its BM lane groups per channel in O(k) reductions: amortise
        # that over about k/2 tiles (the streaming part costs ~4 operations per element)
        t_min = min(_NHWC_LANE_MIN_T, max(1, (k + 1) // 2)) if lanes else 1
        t_max = _GATHER_MAX if lanes else TT
        T, split = _split(TT, cblocks, programs, t_min, t_max)
        return _Plan(True, N, C, R, N * R, C * R, 1, C, bm, bc, 1, TT, T, split, cblocks, warps)
    br = _row_width(R, min(tile, 1024))
    bn = max(1, min(tile // br, _next_pow2(N)))
    TR = _cdiv(R, br)
    TT = _cdiv(N, bn) * TR
    t_max = max(1, _GATHER_MAX // bn) if lanes else TT
    T, split = _split(TT, C, programs, 1, t_max)
    return _Plan(False, N, C, R, N * R, C * R, R, C, bn, br, TR, TT, T, split, C, warps)


def _working(x: Tensor) -> tuple[Tensor, bool]:
    """(x in a layout the kernels read, channels_last flag): x itself when it is contiguous or
    dense channels-last, else a contiguous copy."""
    N, C = x.shape[0], x.shape[1]
    R = x.numel() // (N * C)
    if R > 1 and x.is_contiguous():
        return x, False
    if x.movedim(1, -1).is_contiguous():
        return x, True
    x = x.contiguous()
    return x, R == 1


def _device_guard(x: Tensor) -> Any:
    """A context that makes x's CUDA device current (Triton launches on the current device)."""
    import contextlib

    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# launches
# ---------------------------------------------------------------------------------------------
def _stats(p: _Plan, x: Tensor, g: Tensor | None, mu: Tensor | None, pin: Tensor | None,
           pout: Tensor, keys: Tensor | None, mode: int, k: int = 1, kp: int = 2) -> None:
    """Launch the per-channel reduction kernel of ``mode`` (SUM, DEV or BWD)."""
    kern = _kernels()
    gp = g if g is not None else x
    mp = mu if mu is not None else pout
    ip = pin if pin is not None else pout
    kk = keys if keys is not None else pout
    lanes = keys is not None
    common = dict(MODE=mode, LANES=lanes, SP=p.sp, KP=kp, num_warps=p.num_warps)
    if p.cl:
        kern._stats_nhwc[p.grid](x, gp, mp, ip, pout, kk, p.M, p.C, p.sM, p.TT, p.T, p.split,
                                 1.0 / p.n, k, BM=p.ba, BC=p.bb, **common)
    else:
        kern._stats_nchw[p.grid](x, gp, mp, ip, pout, kk, p.N, p.R, p.C, p.sN, p.sC, p.TR, p.TT,
                                 p.T, p.split, 1.0 / p.n, k, BN=p.ba, BR=p.bb, **common)


def _apply(p: _Plan, inp: Tensor, x: Tensor, out: Tensor, weight: Tensor | None,
           bias: Tensor | None, mu: Tensor, sraw: Tensor, ssum: Tensor, pin: Tensor,
           eps: float, cst: float, mode: int, dw: Tensor | None = None,
           db: Tensor | None = None) -> None:
    """Launch the elementwise kernel of ``mode`` (L1_FWD, LINF_FWD, LINF_BWD, L1_BWD)."""
    kern = _kernels()
    wp = weight if weight is not None else mu
    bp = bias if bias is not None else mu
    common = dict(MODE=mode, HAS_W=weight is not None, HAS_B=bias is not None,
                  WANT_DW=dw is not None, WANT_DB=db is not None, SP=p.sp,
                  num_warps=p.num_warps)
    args = (inp, x, out, wp, bp, mu, sraw, ssum, pin, dw if dw is not None else mu,
            db if db is not None else mu)
    if p.cl:
        kern._apply_nhwc[p.grid](*args, p.M, p.C, p.sM, p.TT, p.T, p.split, 1.0 / p.n,
                                 float(p.n), float(eps), float(cst), BM=p.ba, BC=p.bb, **common)
    else:
        kern._apply_nchw[p.grid](*args, p.N, p.R, p.C, p.sN, p.sC, p.TR, p.TT, p.T, p.split,
                                 1.0 / p.n, float(p.n), float(eps), float(cst), BN=p.ba,
                                 BR=p.bb, **common)


def _param_grads_from_partials(part: Tensor, sraw: Tensor, eps: float, weight: Tensor | None,
                               bias: Tensor | None, needs: tuple[bool, ...]
                               ) -> tuple[Tensor | None, Tensor | None]:
    """grad_weight = sum(g*d)/s, grad_bias = sum(g) from the partials (when dx is not needed)."""
    sum_g, sum_gd = part[0].sum(0), part[1].sum(0)
    dw = (sum_gd / (sraw + eps)).to(weight.dtype) if weight is not None and needs[1] else None
    db = sum_g.to(bias.dtype) if bias is not None and needs[2] else None
    return dw, db


def _params(weight: Tensor | None, bias: Tensor | None, C: int, who: str
            ) -> tuple[Tensor | None, Tensor | None]:
    """weight and bias as contiguous (C,) tensors (or None), checked."""
    out = []
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            if t.numel() != C:
                raise ValueError(f"{who}: {name} has {t.numel()} elements, expected {C} (one per "
                                 "channel)")
            t = t.reshape(C).contiguous()
        out.append(t)
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# autograd Functions
# ---------------------------------------------------------------------------------------------
class _TritonL1Fn(torch.autograd.Function):
    """L1 batch norm: forward returns (y, mu, s_raw); closed-form backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
        n = _check_n(x, "L1BatchNorm")
        xk, cl = _working(x)
        p = _plan(xk, cl, lanes=False)
        w, b = _params(weight, bias, p.C, "L1BatchNorm")
        kern = _kernels()
        f32 = dict(dtype=torch.float32, device=x.device)
        part = torch.empty((3, p.split, p.C), **f32)
        mu, sraw, ssum = (torch.empty(p.C, **f32) for _ in range(3))  # ssum: sum sign(d)
        y = torch.empty_like(xk)
        with _device_guard(x):
            _stats(p, xk, None, None, None, part[0], None, kern.SUM)
            _stats(p, xk, None, None, part[0], part[1], None, kern.DEV)
            _apply(p, xk, xk, y, w, b, mu, sraw, ssum, part, eps, C_L1 / n, kern.L1_FWD)
        ctx.plan, ctx.eps = p, float(eps)
        ctx.save_for_backward(xk, w, b, mu, sraw, ssum)
        ctx.mark_non_differentiable(mu, sraw)
        return y, mu, sraw

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor, _gm: Any, _gs: Any
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        xk, w, b, mu, sraw, ssum = ctx.saved_tensors
        p: _Plan = ctx.plan
        kern = _kernels()
        g = _like_layout(grad_y.to(xk.dtype), xk)
        part = torch.empty((2, p.split, p.C), dtype=torch.float32, device=xk.device)
        needs = ctx.needs_input_grad
        with _device_guard(xk):
            _stats(p, xk, g, mu, None, part[0], None, kern.BWD)
            if not needs[0]:
                dw, db = _param_grads_from_partials(part, sraw, ctx.eps, w, b, needs)
                return None, dw, db, None
            dx = torch.empty_like(xk)
            dw = torch.empty_like(w) if w is not None and needs[1] else None
            db = torch.empty_like(b) if b is not None and needs[2] else None
            _apply(p, g, xk, dx, w, None, mu, sraw, ssum, part, ctx.eps, C_L1 / p.n,
                   kern.L1_BWD, dw, db)
        return dx, dw, db, None


class _TritonLinfFn(torch.autograd.Function):
    """L-inf/top-k batch norm: forward returns (y, mu, s_raw); closed-form backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                k: int) -> tuple[Tensor, Tensor, Tensor]:
        n = _check_n(x, "LinfBatchNorm")
        k = max(1, min(int(k), n))
        kp = max(2, _next_pow2(k))
        xk, cl = _working(x)
        p = _plan(xk, cl, lanes=True, k=k)
        w, b = _params(weight, bias, p.C, "LinfBatchNorm")
        kern = _kernels()
        dev = x.device
        part = torch.empty((1, p.split, p.C), dtype=torch.float32, device=dev)
        keys = torch.empty((p.split, p.C, 2, kp), dtype=torch.int64, device=dev)
        # mu, s_raw and the sum of the selected elements' signs
        mu, sraw, ssum = (torch.empty(p.C, dtype=torch.float32, device=dev) for _ in range(3))
        sel = torch.empty((p.C, kp), dtype=torch.int32, device=dev)
        sgn = torch.empty((p.C, kp), dtype=torch.float32, device=dev)
        y = torch.empty_like(xk)
        with _device_guard(x):
            _stats(p, xk, None, None, None, part[0], keys, kern.SUM, k, kp)
            kern._linf_finalise[(p.C,)](
                xk, part, keys, mu, sraw, sel, sgn, ssum, p.C, p.split, 1.0 / n, k,
                linf_constant(n) / k, p.N, p.R, p.sN, p.sC, p.ba, p.bb, p.TR, p.M, p.sM, p.ba,
                p.TT, p.T, CL=p.cl, SP=p.sp, KP=kp, GE=p.group_size, num_warps=4)
            _apply(p, xk, xk, y, w, b, mu, sraw, ssum, part, eps, 0.0, kern.LINF_FWD)
        ctx.plan, ctx.eps, ctx.k, ctx.kp = p, float(eps), k, kp
        ctx.save_for_backward(xk, w, b, mu, sraw, ssum, sel, sgn)
        ctx.mark_non_differentiable(mu, sraw)
        return y, mu, sraw

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor, _gm: Any, _gs: Any
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        xk, w, b, mu, sraw, ssum, sel, sgn = ctx.saved_tensors
        p: _Plan = ctx.plan
        kern = _kernels()
        g = _like_layout(grad_y.to(xk.dtype), xk)
        part = torch.empty((2, p.split, p.C), dtype=torch.float32, device=xk.device)
        needs = ctx.needs_input_grad
        cst = linf_constant(p.n) / ctx.k
        with _device_guard(xk):
            _stats(p, xk, g, mu, None, part[0], None, kern.BWD)
            if not needs[0]:
                dw, db = _param_grads_from_partials(part, sraw, ctx.eps, w, b, needs)
                return None, dw, db, None, None
            dx = torch.empty_like(xk)
            dw = torch.empty_like(w) if w is not None and needs[1] else None
            db = torch.empty_like(b) if b is not None and needs[2] else None
            _apply(p, g, xk, dx, w, None, mu, sraw, ssum, part, ctx.eps, cst, kern.LINF_BWD,
                   dw, db)
            kern._linf_fix[(p.C,)](
                g, dx, w if w is not None else sraw, sraw, ssum, sel, sgn, part, p.C, p.split,
                p.R, p.sN, p.sC, p.sM, float(p.n), ctx.eps, cst, CL=p.cl, HAS_W=w is not None,
                SP=p.sp, KP=ctx.kp, num_warps=2)
        return dx, dw, db, None, None


# ---------------------------------------------------------------------------------------------
# functional API
# ---------------------------------------------------------------------------------------------
def l1_batch_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                  eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """Train-mode L1 batch norm of ``x`` (N, C, *) in Triton kernels.

    ``y = (x - mu) / (s_raw + eps) * weight + bias`` with ``s_raw = sqrt(pi/2) * mean|x - mu|``
    per channel; backward in closed form, as :func:`normswap.norms._functional.l1_batch_norm`.

    Args:
        x: input, channels at dim 1, float16/bfloat16/float32, 2 to 5 dims, on CUDA (or the CPU
            under ``TRITON_INTERPRET=1``).
        weight: gamma (C,) or None.
        bias: beta (C,) or None.
        eps: added to the scale.

    Returns:
        ``(y, mu, s_raw)``: y in x's dtype and layout (contiguous when x was neither contiguous
        nor channels-last), mu and s_raw float32 (C,), not differentiable.

    Raises:
        TritonUnavailableError: ``available(x)`` is False.
        ValueError: fewer than 2 elements per channel, or weight/bias of the wrong size.
    """
    _require(x, "l1_batch_norm")
    return _TritonL1Fn.apply(x, weight, bias, float(eps))


def linf_batch_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                    eps: float = 1e-5, k: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Train-mode L-inf / top-k batch norm of ``x`` (N, C, *) in Triton kernels.

    ``s_raw = C(n) * mean of the k largest |x - mu|`` per channel, ``C(n) = 0.5 * (1 +
    sqrt(pi * ln 4)) / sqrt(2 * ln n)``, k clamped to n; the scale's gradient reaches only the k
    selected elements (ties: see the module docstring), as
    :func:`normswap.norms._functional.linf_batch_norm`.

    Args:
        x: input, channels at dim 1 (see :func:`l1_batch_norm`).
        weight: gamma (C,) or None.
        bias: beta (C,) or None.
        eps: added to the scale.
        k: number of largest ``|x - mu|`` averaged per channel, >= 1 (small k: the selection
            costs O(k) reductions).

    Returns:
        ``(y, mu, s_raw)`` as :func:`l1_batch_norm`.

    Raises:
        TritonUnavailableError: ``available(x)`` is False.
        ValueError: k < 1, fewer than 2 elements per channel, or weight/bias of the wrong size.
    """
    if isinstance(k, bool) or int(k) != k or int(k) < 1:
        raise ValueError(f"linf_batch_norm: k must be an int >= 1, got {k!r}")
    _require(x, "linf_batch_norm")
    return _TritonLinfFn.apply(x, weight, bias, float(eps), int(k))
