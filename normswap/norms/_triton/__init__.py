"""Triton kernels for train-mode L1 and L-inf/top-k batch norm (CUDA, or Triton's interpreter).

The same functions as :func:`normswap.norms._functional.l1_batch_norm` and
:func:`~normswap.norms._functional.linf_batch_norm` (same outputs, same closed-form backward;
that module states the maths) for float16, bfloat16 and float32 inputs of 2 to 5 dims, contiguous
(NC, NCL, NCHW, NCDHW) or channels-last (NLC, NHWC, NDHWC); other layouts are copied to
contiguous first. Statistics, coefficients and intermediates are float32; ``y`` and ``dx`` are
written in the input's dtype and layout, ``mu`` and ``s_raw`` are float32 (C,). Check
:func:`available` before calling. Optionally the layers' running-statistics update is fused in
(``running_mean=``, ``running_scale=``, ``factor=``), saving the ~8 small kernels of an eager
update per call.

Layout and work split
---------------------
Inputs are read through strides, never transposed. Contiguous inputs: a channel's n = N*R
elements (R = prod of the spatial dims) form an (N, R) matrix with row stride C*R; a program
owns one channel and a run of T tiles of BN x BR (BR contiguous elements per row, rows of up to
1024). Channels-last inputs: one (N*R, C) matrix; a program owns BC channels (32 to 128 bytes
of a row, at least 4 channel blocks when C allows) and T tiles of BM rows. A tile is 8 KB of
input. Each channel (block) is split over ``split`` programs, about 4 per SM in all; each
program writes float32 partial sums to a ``(q, split, C)`` buffer that the next kernel reduces
in a fixed order (or, when split * split * C would make those repeated reads cost more than a
launch, one small ``_combine`` kernel reduces them first). No atomics: results are
bit-identical run to run. Means accumulate ``sum(x - x0)`` around the channel's first element
(no cancellation when |mean| >> std). Triton compiles one variant per dtype, layout, mode, tile
shape and, for contiguous inputs, row length R (a compile-time constant, see kernels.py); sizes
and counts are runtime arguments.

Kernels and passes over device memory
-------------------------------------
One pass reads or writes one tensor of x's size; the per-channel buffers (C * split floats,
plus C * split * 4k int64 keys for L-inf) are negligible.

============  =================================================  ========  ==================
op            kernels (launches)                                 passes    cuDNN BatchNorm
============  =================================================  ========  ==================
L1 forward    sum(x - x0) | sum|x - mu|, sum sign | normalise    3 R, 1 W  1-2 R, 1 W
L1 backward   sum g, sum g*d | dx = a*g + b - kappa*sign(d)      4 R, 1 W  2-4 R, 1 W
Linf forward  sum + group extrema | finalise (top-k, C progr.)    2 R, 1 W  1-2 R, 1 W
              | normalise
Linf backwd   sum g, sum g*d | dx = a*g + b | fix k elements/C   3 R, 1 W  2-4 R, 1 W
============  =================================================  ========  ==================

A training step moves 9 tensor passes for L1 and 7 for L-inf, where cuDNN moves 8 (5 when its
persistent kernels keep the tensor on chip). L1's extra read is unavoidable: ``sum|x - mu|``
needs the final mean, and no one-pass form of the mean absolute deviation exists. Tensors
smaller than the L2 (60 MB on an H200) are re-read from L2 within a step, not from HBM. Work per
element is a handful of float32 instructions, under the ~8 instructions per byte that HBM3e
leaves; loads are unit-stride along the tile's inner axis and compile to vector loads (read in
the PTX by benchmarks/gpu_check.py ``triton_aot``): 16-byte ones for rows of a multiple of 16
elements (R for contiguous inputs, C channels-last), 8-byte fp16 ones for R = 196 (14 x 14),
scalar ones for odd R such as 49 (7 x 7). Host overhead: 5 launches per L1 step (8 with the channels-last
combines), 6 per L-inf step (7), plus the autograd Function; for tensors of a few MB a step is
bound by that overhead, not by memory. The L-inf finalise kernel is latency-bound: about 4k
dependent reductions in one program per channel.

Exact top-k without sorting (L-inf)
-----------------------------------
The k largest ``|x - mu|`` are among the k largest x and the k largest -x (above the mean,
larger x means larger |d|), so the first pass finds both lists alongside the sum, before mu is
known. It keeps elementwise running maxima and minima per tile lane; a *group* is a tile column
(contiguous inputs: BN*T elements) or a tile row lane (channels-last: T elements) of one
program. Each program selects its k best groups per list (by their extreme), the finalise kernel
(one program per channel) the k best over all programs, gathers their members and takes the
exact top-k of ``|x - mu|`` among them. This is exact because each element of the true top-k
lies in one of the k groups with the largest extremes (fewer than k groups can beat its own).
The multiset of selected values, hence ``s_raw``, is ``torch.topk``'s. Among exactly equal
``|x - mu|`` the choice is deterministic (positive deviations first) but, like
``torch.topk``'s, unspecified; the scale's gradient reaches exactly k elements either way.
Selections run on int64 keys packing value and index, so each step is one max-reduction; a
selection costs k reductions per program, meant for small k (1 to 64).

Verification: tests/norms/test_triton.py runs every kernel under Triton's interpreter on the
CPU (``TRITON_INTERPRET=1``, set before triton is imported) against float64 reference formulas
for each dtype, layout and rank, and compiled on a GPU when one is present;
benchmarks/gpu_check.sh times them against cuDNN BatchNorm and compiles every variant ahead of
time for the device (registers, spills, vector loads).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...errors import NormswapError
from .._functional import C_L1, _check_n as _check_count, linf_constant
from .._layout import like_layout as _like_layout


def _check_n(x: Tensor, who: str) -> int:
    """Elements per channel of ``x``, checked as the CPU path checks them."""
    n = x.numel() // max(int(x.shape[1]), 1)
    _check_count(n, x, who)
    return n

__all__ = ["TritonUnavailableError", "available", "l1_batch_norm", "linf_batch_norm"]

logger = logging.getLogger(__name__)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# flat per-channel indices are int32 in the kernels (with room for masked tile overhang)
_MAX_PER_CHANNEL = 2**31 - 2**20
# tuning: elements per tile, programs per SM, lane-group limits. ``_TUNING`` entries that are
# not None override the defaults (tests shrink the tiles to cover many tiles and programs).
_TUNING: dict[str, int | None] = {"tile": None, "programs": None, "cmax": None}
_PROGRAMS_PER_SM = 4
_MAX_SPLIT = 4096
_COMBINE_READS = 2**18     # partial-sum floats read by all consumers beyond which we combine
_KEYS_PER_LIST = 1024      # L-inf: split * KP group keys per channel and list, at most
_GATHER_MAX = 256          # members per group gathered by the finalise kernel (NCHW: BN*T)
_NHWC_LANE_MIN_T = 8       # at most this many tiles per program before NHWC lane ranking


# a fused running-statistics update: (running_mean, running_scale, factor, scale_correction)
_Running = tuple[Tensor, Tensor, float, float]


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
    combine: bool    # reduce the partial sums once (_combine) before their consumers

    @property
    def grid(self) -> tuple[int, int]:
        """Launch grid of the reduction and elementwise kernels."""
        return (self.cblocks, self.split)

    @property
    def qs(self) -> int:
        """Elements between two partial-sum arrays (split * C)."""
        return self.split * self.C

    @property
    def rows(self) -> int:
        """Partial-sum rows a consumer reduces: 1 after _combine, else split."""
        return 1 if self.combine else self.split

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


def _channel_block(x: Tensor) -> tuple[int, int]:
    """(least, most) channels per NHWC tile: 32 to 128 bytes of a row on a GPU, 4 under the
    interpreter (or the ``cmax`` override)."""
    if _TUNING["cmax"]:
        return int(_TUNING["cmax"]), int(_TUNING["cmax"])
    if not _gpu_tiling(x):
        return 4, 4
    return 32 // x.element_size(), 128 // x.element_size()


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


def _split(TT: int, cblocks: int, programs: int, t_min: int, t_max: int,
           max_split: int = 4096) -> tuple[int, int]:
    """(tiles per program, programs per channel block) for TT tiles: about ``programs`` in
    all, at least ``t_min`` and at most ``t_max`` tiles each, at most ``max_split`` programs
    per channel block (this bound wins)."""
    split = max(1, min(TT, _cdiv(programs, cblocks)))
    T = _cdiv(TT, split)
    T = max(T, min(TT, t_min))
    T = min(T, max(t_max, 1))
    T = max(T, _cdiv(TT, max(1, min(max_split, _MAX_SPLIT))))
    return T, _cdiv(TT, T)


def _combines(split: int, C: int) -> bool:
    """Whether the consumers' own reads of the partial sums (split * split * C floats in all)
    would cost more than one _combine launch (about a megabyte of L2 reads)."""
    return split > 1 and split * split * C > _COMBINE_READS


def _plan(x: Tensor, cl: bool, lanes: bool, k: int = 1) -> _Plan:
    """The tiling of ``x`` (already in its working layout) for one call; ``lanes`` for the
    L-inf selection of ``k`` elements. Cached: the host work per call stays small."""
    gpu = _gpu_tiling(x)
    key = (tuple(x.shape), x.element_size(), x.device, gpu, cl, lanes, k,
           tuple(_TUNING.values()), _PROGRAMS_PER_SM, _COMBINE_READS, _KEYS_PER_LIST)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= 1024:
            _PLANS.clear()
        plan = _PLANS[key] = _make_plan(x, cl, lanes, k)
    return plan


_PLANS: dict[tuple[Any, ...], _Plan] = {}


def _make_plan(x: Tensor, cl: bool, lanes: bool, k: int) -> _Plan:
    """See :func:`_plan`."""
    N, C = int(x.shape[0]), int(x.shape[1])
    R = x.numel() // (N * C)
    tile = _tile_elements(x)
    programs = _target_programs(x)
    warps = 8 if tile >= 4096 else 4
    kp = max(2, _next_pow2(k))
    max_split = max(1, _KEYS_PER_LIST // kp) if lanes else _MAX_SPLIT
    if cl:
        # a 32-byte sector per row at least, up to 128 bytes, and >= 4 channel blocks if C allows
        lo, hi = _channel_block(x)
        bc = min(_next_pow2(C), max(lo, min(hi, _next_pow2(C) // 4)))
        bm = max(1, min(tile // bc, _next_pow2(N * R)))
        TT = _cdiv(N * R, bm)
        cblocks = _cdiv(C, bc)
        # an NHWC program ranks its BM lane groups per channel in O(k) reductions: amortise
        # that over about k/2 tiles (the streaming part costs ~4 operations per element)
        t_min = min(_NHWC_LANE_MIN_T, max(1, (k + 1) // 2)) if lanes else 1
        t_max = _GATHER_MAX if lanes else TT
        T, split = _split(TT, cblocks, programs, t_min, t_max, max_split)
        return _Plan(True, N, C, R, N * R, C * R, 1, C, bm, bc, 1, TT, T, split, cblocks, warps,
                     _combines(split, C))
    br = _row_width(R, min(tile, 1024))
    bn = max(1, min(tile // br, _next_pow2(N)))
    TR = _cdiv(R, br)
    TT = _cdiv(N, bn) * TR
    t_max = max(1, _GATHER_MAX // bn) if lanes else TT
    T, split = _split(TT, C, programs, 1, t_max, max_split)
    return _Plan(False, N, C, R, N * R, C * R, R, C, bn, br, TR, TT, T, split, C, warps,
                 _combines(split, C))


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
    common = dict(MODE=mode, LANES=lanes, KP=kp, num_warps=p.num_warps)
    if p.cl:
        kern._stats_nhwc[p.grid](x, gp, mp, ip, pout, kk, p.M, p.C, p.sM, p.TT, p.T, p.qs,
                                 p.rows, 1.0 / p.n, k, BM=p.ba, BC=p.bb, **common)
    else:
        kern._stats_nchw[p.grid](x, gp, mp, ip, pout, kk, p.N, p.C, p.sN, p.TR, p.TT, p.T, p.qs,
                                 p.rows, 1.0 / p.n, k, R=p.R, BN=p.ba, BR=p.bb, **common)


def _combine(p: _Plan, part: Tensor, arrays: int) -> None:
    """Reduce ``arrays`` partial-sum arrays starting at ``part`` into their row 0, if planned."""
    if p.combine:
        _kernels()._combine[(_cdiv(p.C, 128),)](part, p.C, p.split, p.qs, Q=arrays, BC=128,
                                                num_warps=4)


def _apply(p: _Plan, inp: Tensor, x: Tensor, out: Tensor, weight: Tensor | None,
           bias: Tensor | None, mu: Tensor, sraw: Tensor, ssum: Tensor, pin: Tensor,
           eps: float, cst: float, mode: int, dw: Tensor | None = None,
           db: Tensor | None = None, running: _Running | None = None) -> None:
    """Launch the elementwise kernel of ``mode`` (L1_FWD, LINF_FWD, LINF_BWD, L1_BWD)."""
    kern = _kernels()
    wp = weight if weight is not None else mu
    bp = bias if bias is not None else mu
    common = dict(MODE=mode, HAS_W=weight is not None, HAS_B=bias is not None,
                  WANT_DW=dw is not None, WANT_DB=db is not None, RUNNING=running is not None,
                  num_warps=p.num_warps)
    rm, rs, factor, corr = running if running is not None else (mu, mu, 0.0, 1.0)
    args = (inp, x, out, wp, bp, mu, sraw, ssum, pin, dw if dw is not None else mu,
            db if db is not None else mu, rm, rs, float(factor), float(corr))
    if p.cl:
        kern._apply_nhwc[p.grid](*args, p.M, p.C, p.sM, p.TT, p.T, p.qs, p.rows, 1.0 / p.n,
                                 float(p.n), float(eps), float(cst), BM=p.ba, BC=p.bb, **common)
    else:
        kern._apply_nchw[p.grid](*args, p.N, p.C, p.sN, p.TR, p.TT, p.T, p.qs, p.rows,
                                 1.0 / p.n, float(p.n), float(eps), float(cst), R=p.R, BN=p.ba,
                                 BR=p.bb, **common)


def _running(x: Tensor, running_mean: Tensor | None, running_scale: Tensor | None,
             factor: float, scale_correction: float, who: str) -> _Running | None:
    """The running-statistics update to fuse, checked (None when there is none)."""
    if running_mean is None and running_scale is None:
        return None
    C = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_scale", running_scale)):
        if t is None or t.numel() != C or not t.is_contiguous() or t.device != x.device \
                or not t.is_floating_point():
            raise ValueError(f"{who}: {name} must be a contiguous floating (C,) = ({C},) tensor "
                             f"on {x.device} when running statistics are updated, got "
                             f"{None if t is None else (tuple(t.shape), t.dtype, str(t.device))}")
    if not 0.0 <= float(factor) <= 1.0:
        raise ValueError(f"{who}: factor must be in [0, 1], got {factor!r}")
    return (running_mean, running_scale, float(factor), float(scale_correction))


def _param_grads_from_partials(part: Tensor, rows: int, sraw: Tensor, eps: float,
                               weight: Tensor | None, bias: Tensor | None,
                               needs: tuple[bool, ...]) -> tuple[Tensor | None, Tensor | None]:
    """grad_weight = sum(g*d)/s, grad_bias = sum(g) from the partials (when dx is not needed)."""
    sum_g, sum_gd = part[0, :rows].sum(0), part[1, :rows].sum(0)
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
                eps: float, running: _Running | None) -> tuple[Tensor, Tensor, Tensor]:
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
            _combine(p, part[0], 1)
            _stats(p, xk, None, None, part[0], part[1], None, kern.DEV)
            _combine(p, part[1], 2)
            _apply(p, xk, xk, y, w, b, mu, sraw, ssum, part, eps, C_L1 / n, kern.L1_FWD,
                   running=running)
        ctx.plan, ctx.eps = p, float(eps)
        ctx.save_for_backward(xk, w, b, mu, sraw, ssum)
        ctx.mark_non_differentiable(mu, sraw)
        return y, mu, sraw

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor, _gm: Any, _gs: Any
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        xk, w, b, mu, sraw, ssum = ctx.saved_tensors
        p: _Plan = ctx.plan
        kern = _kernels()
        g = _like_layout(grad_y.to(xk.dtype), xk)
        part = torch.empty((2, p.split, p.C), dtype=torch.float32, device=xk.device)
        needs = ctx.needs_input_grad
        with _device_guard(xk):
            _stats(p, xk, g, mu, None, part[0], None, kern.BWD)
            _combine(p, part, 2)
            if not needs[0]:
                dw, db = _param_grads_from_partials(part, p.rows, sraw, ctx.eps, w, b, needs)
                return None, dw, db, None, None, None
            dx = torch.empty_like(xk)
            dw = torch.empty_like(w) if w is not None and needs[1] else None
            db = torch.empty_like(b) if b is not None and needs[2] else None
            _apply(p, g, xk, dx, w, None, mu, sraw, ssum, part, ctx.eps, C_L1 / p.n,
                   kern.L1_BWD, dw, db)
        return dx, dw, db, None, None


class _TritonLinfFn(torch.autograd.Function):
    """L-inf/top-k batch norm: forward returns (y, mu, s_raw); closed-form backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                k: int, running: _Running | None) -> tuple[Tensor, Tensor, Tensor]:
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
        rm, rs, factor, corr = running if running is not None else (mu, mu, 0.0, 1.0)
        with _device_guard(x):
            _stats(p, xk, None, None, None, part[0], keys, kern.SUM, k, kp)
            kern._linf_finalise[(p.C,)](
                xk, part, keys, mu, sraw, sel, sgn, ssum, rm, rs, float(factor), float(corr),
                float(eps), p.C, p.split, p.split, 1.0 / n, k, linf_constant(n) / k, p.N, p.R,
                p.sN, p.sC, p.ba, p.bb, p.TR, p.M, p.sM, p.ba, p.TT, p.T, CL=p.cl,
                SPK=_next_pow2(p.split) * kp, KP=kp,
                GE=p.group_size, RUNNING=running is not None, num_warps=4)
            _apply(p, xk, xk, y, w, b, mu, sraw, ssum, part, eps, 0.0, kern.LINF_FWD)
        ctx.plan, ctx.eps, ctx.k, ctx.kp = p, float(eps), k, kp
        ctx.save_for_backward(xk, w, b, mu, sraw, ssum, sel, sgn)
        ctx.mark_non_differentiable(mu, sraw)
        return y, mu, sraw

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor, _gm: Any, _gs: Any
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        xk, w, b, mu, sraw, ssum, sel, sgn = ctx.saved_tensors
        p: _Plan = ctx.plan
        kern = _kernels()
        g = _like_layout(grad_y.to(xk.dtype), xk)
        part = torch.empty((2, p.split, p.C), dtype=torch.float32, device=xk.device)
        needs = ctx.needs_input_grad
        cst = linf_constant(p.n) / ctx.k
        with _device_guard(xk):
            _stats(p, xk, g, mu, None, part[0], None, kern.BWD)
            _combine(p, part, 2)
            if not needs[0]:
                dw, db = _param_grads_from_partials(part, p.rows, sraw, ctx.eps, w, b, needs)
                return None, dw, db, None, None, None
            dx = torch.empty_like(xk)
            dw = torch.empty_like(w) if w is not None and needs[1] else None
            db = torch.empty_like(b) if b is not None and needs[2] else None
            _apply(p, g, xk, dx, w, None, mu, sraw, ssum, part, ctx.eps, cst, kern.LINF_BWD,
                   dw, db)
            kern._linf_fix[(p.C,)](
                g, dx, w if w is not None else sraw, sraw, ssum, sel, sgn, part, p.C, p.qs,
                p.rows, p.R, p.sN, p.sC, p.sM, float(p.n), ctx.eps, cst, CL=p.cl,
                HAS_W=w is not None, KP=ctx.kp, num_warps=2)
        return dx, dw, db, None, None, None


# ---------------------------------------------------------------------------------------------
# functional API
# ---------------------------------------------------------------------------------------------
def l1_batch_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                  eps: float = 1e-5, *, running_mean: Tensor | None = None,
                  running_scale: Tensor | None = None, factor: float = 0.0,
                  scale_correction: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Train-mode L1 batch norm of ``x`` (N, C, *) in Triton kernels.

    ``y = (x - mu) / (s_raw + eps) * weight + bias`` with ``s_raw = sqrt(pi/2) * mean|x - mu|``
    per channel; backward in closed form, as :func:`normswap.norms._functional.l1_batch_norm`.

    Args:
        x: input, channels at dim 1, float16/bfloat16/float32, 2 to 5 dims, on CUDA (or the CPU
            under ``TRITON_INTERPRET=1``).
        weight: gamma (C,) or None.
        bias: beta (C,) or None.
        eps: added to the scale.
        running_mean: optional (C,) buffer updated in place, fused into the kernels, as
            ``r <- (1 - factor) * r + factor * mu`` (float32 arithmetic, stored in its dtype).
        running_scale: optional (C,) buffer updated likewise towards
            ``s_raw * scale_correction + eps`` (the L1 layer passes ``sqrt(n / (n - 1))``).
        factor: the update's weight (momentum, or 1/count for a cumulative average).
        scale_correction: multiplies s_raw in the running-scale update.

    Returns:
        ``(y, mu, s_raw)``: y in x's dtype and layout (contiguous when x was neither contiguous
        nor channels-last), mu and s_raw float32 (C,), not differentiable.

    Raises:
        TritonUnavailableError: ``available(x)`` is False.
        ValueError: fewer than 2 elements per channel, weight/bias/running buffers of the wrong
            size, or a factor outside [0, 1].
    """
    _require(x, "l1_batch_norm")
    running = _running(x, running_mean, running_scale, factor, scale_correction,
                       "l1_batch_norm")
    return _TritonL1Fn.apply(x, weight, bias, float(eps), running)


def linf_batch_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                    eps: float = 1e-5, k: int = 1, *, running_mean: Tensor | None = None,
                    running_scale: Tensor | None = None, factor: float = 0.0,
                    scale_correction: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
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
        running_mean: optional running buffer, see :func:`l1_batch_norm`.
        running_scale: optional running buffer (the L-inf layer passes
            ``scale_correction=1``).
        factor: the update's weight.
        scale_correction: multiplies s_raw in the running-scale update.

    Returns:
        ``(y, mu, s_raw)`` as :func:`l1_batch_norm`.

    Raises:
        TritonUnavailableError: ``available(x)`` is False.
        ValueError: k < 1, fewer than 2 elements per channel, weight/bias/running buffers of
            the wrong size, or a factor outside [0, 1].
    """
    if isinstance(k, bool) or int(k) != k or int(k) < 1:
        raise ValueError(f"linf_batch_norm: k must be an int >= 1, got {k!r}")
    _require(x, "linf_batch_norm")
    running = _running(x, running_mean, running_scale, factor, scale_correction,
                       "linf_batch_norm")
    return _TritonLinfFn.apply(x, weight, bias, float(eps), int(k), running)
