"""Triton kernels of the L1 and L-inf/top-k batch norms (design: ``normswap.norms._triton``).

Imported lazily by ``normswap.norms._triton`` (``@triton.jit`` decides at decoration time whether
the kernels are compiled or interpreted, from ``TRITON_INTERPRET``).

Two memory layouts, one kernel family each:

* ``*_nchw``: a channel's elements form an (N, R) matrix with row stride ``sN`` and unit column
  stride (contiguous NCHW/NCDHW/NCL). A program owns one channel and a run of (BN, BR) tiles.
* ``*_nhwc``: the tensor is an (M, C) matrix with row stride ``sM`` and unit channel stride
  (channels-last NHWC/NDHWC/NLC and (N, C)). A program owns BC channels and a run of (BM, BC)
  tiles.

Tiles are numbered per channel (NCHW: ``tau = tn * TR + tr``; NHWC: ``tau`` = row block), and
program ``s`` of a channel (block) owns tiles ``[s*T, min((s+1)*T, TT))``. Per-program partial
sums go to ``part[q, s, c]`` (float32, arrays ``QS = split * C`` apart) and are reduced, in a
fixed order, by each consumer program over ``ROWS`` rows (chunks of SPC rows), or first by
``_combine`` into row 0 (then ROWS = 1) when the consumers' repeated reads would cost more than
one launch. No atomics: every result is deterministic.

Selection keys (L-inf). An ordering on (value, index) is packed into one non-negative int64 so
that one ``max`` reduction finds the best element and its identity (ties: smaller index first):

* group key: ``(ordered(v) + 2**31) * 2**31 + (2**31 - 1 - gid)``, ``ordered`` maps float32 bit
  patterns to integers with the same order;
* element key: ``bits(|d|) * 2**32 + [d > 0] * 2**31 + (2**31 - 1 - flat)`` (|d| >= 0, so its
  bits already sort like the value).

``-1`` is "no entry". Flat indices ``flat = n * R + r`` are int32 (the caller guarantees
N*R < 2**31 - 2**20).
"""

from __future__ import annotations

import triton
import triton.language as tl

# modes of the reduction kernels
SUM = 0    # part0 = sum(x - x0)                    x0 = the channel's first element
DEV = 1    # part0 = sum|x - mu|, part1 = sum sign(x - mu)   mu from the SUM partials
BWD = 2    # part0 = sum g, part1 = sum g * (x - mu)          mu from a (C,) buffer
# modes of the elementwise kernels
L1_FWD = 0     # y = (x - mu) * w / (s_raw + eps) + b, mu and s_raw from SUM/DEV partials
LINF_FWD = 1   # same, mu and s_raw from the finalise kernel
LINF_BWD = 2   # dx = g * alpha + beta (the k selected elements are fixed by _linf_fix)
L1_BWD = 3     # dx = g * alpha + beta - kappa * sign(x - mu)

SPC: tl.constexpr = tl.constexpr(32)   # partial-sum rows reduced per step

# Integer arguments the JIT must not specialise (on ==1 or %16): counts and sizes that only
# bound loops or mask the non-contiguous tile axis; one compiled variant per tile shape keeps
# compile time down. Strides (sN, sM) and the NHWC channel count C stay specialised: their
# divisibility by 16 lets masked loads be 16-byte vectors. The NCHW row length R (also the
# channel stride) is a constexpr: with R known, rows of e.g. 196 = 4 * 49 elements still get
# 8-byte fp16 vectors, which %16 specialisation alone would not give.
_DNS: dict[str, list[str]] = {
    '_combine': ['C', 'SPLIT', 'QS'],
    '_stats_nchw': ['N', 'C', 'TR', 'TT', 'T', 'QS', 'ROWS', 'K'],
    '_stats_nhwc': ['M', 'TT', 'T', 'QS', 'ROWS', 'K'],
    '_linf_finalise': ['C', 'SPLIT', 'ROWS', 'K', 'N', 'R', 'BN', 'BR', 'TR', 'M', 'BM', 'TT',
                       'T'],
    '_linf_fix': ['C', 'QS', 'ROWS', 'R'],
    '_apply_nchw': ['N', 'C', 'TR', 'TT', 'T', 'QS', 'ROWS'],
    '_apply_nhwc': ['M', 'TT', 'T', 'QS', 'ROWS'],
}


# ---------------------------------------------------------------------------------------------
# small helpers (any shape)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _bwd_coefficients(sum_g, sum_gd, w, s, ssum, nf, cst):
    """alpha, beta, kappa of ``dx = alpha*g + beta - kappa*sign`` (L1: sign of every element,
    cst = C_L1/n; L-inf: sign of the selected ones, cst = C(n)/k, ssum = their sign sum)."""
    kappa = cst * (w * sum_gd / s) / s
    alpha = w / s
    beta = -w * sum_g / (nf * s) + kappa * ssum / nf
    return alpha, beta, kappa


@triton.jit
def _ema(ptr, offs, new, factor, mask):
    """``r <- (1 - factor) * r + factor * new`` in float32, stored in r's dtype."""
    r = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr + offs, (r * (1.0 - factor) + new * factor).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _psum1(ptr, c, C, ROWS):
    """sum over s < ROWS of ptr[s * C + c] for one channel c (fixed order)."""
    acc = tl.zeros([SPC], tl.float32)
    for s0 in range(0, ROWS, SPC):
        sp = s0 + tl.arange(0, SPC)
        acc += tl.load(ptr + sp * C + c, mask=sp < ROWS, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _psumv(ptr, cols, C, ROWS, BC: tl.constexpr):
    """sum over s < ROWS of ptr[s * C + cols] for a vector of BC channels (0 past C)."""
    acc = tl.zeros([SPC, BC], tl.float32)
    for s0 in range(0, ROWS, SPC):
        sp = s0 + tl.arange(0, SPC)
        acc += tl.load(ptr + sp[:, None] * C + cols[None, :],
                       mask=(sp < ROWS)[:, None] & (cols < C)[None, :], other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit(do_not_specialize=_DNS["_combine"])
def _combine(part_ptr, C, SPLIT, QS, Q: tl.constexpr, BC: tl.constexpr):
    """part[q, 0, c] <- sum over s < SPLIT of part[q, s, c] for Q arrays (grid: C / BC)."""
    cols = tl.program_id(0) * BC + tl.arange(0, BC)
    for q in tl.static_range(Q):
        total = _psumv(part_ptr + q * QS, cols, C, SPLIT, BC)
        tl.store(part_ptr + q * QS + cols, total, mask=cols < C)


@triton.jit
def _topk_keys(k, K, KP: tl.constexpr):
    """The K largest entries of the 1-D key vector ``k``, descending, as a [KP] vector (-1 pad)."""
    slots = tl.arange(0, KP)
    out = tl.full([KP], -1, tl.int64)
    for j in range(K):
        mk = tl.max(k, axis=0)
        out = tl.where(slots == j, mk, out)
        k = tl.where(k == mk, -1, k)
    return out


@triton.jit
def _topk_groups(v, gid, K, KP: tl.constexpr):
    """Keys of the K best groups (by extreme ``v`` [G], ties by ``gid``) as a [KP] vector."""
    b = v.to(tl.int32, bitcast=True)
    o = tl.where(b < 0, b ^ 0x7FFFFFFF, b)  # float32 order as signed int32 order
    k = (o.to(tl.int64) + 2147483648) * 2147483648 + (2147483647 - gid).to(tl.int64)
    return _topk_keys(k, K, KP)


@triton.jit
def _topk_groups_cols(v, gid, K, KP: tl.constexpr, BC: tl.constexpr):
    """Per column of ``v`` [G, BC] (groups x channels): keys of its K best groups, [KP, BC]."""
    b = v.to(tl.int32, bitcast=True)
    o = tl.where(b < 0, b ^ 0x7FFFFFFF, b)
    k = (o.to(tl.int64) + 2147483648) * 2147483648 + (2147483647 - gid).to(tl.int64)
    slots = tl.arange(0, KP)
    out = tl.full([KP, BC], -1, tl.int64)
    for j in range(K):
        mk = tl.max(k, axis=0)
        out = tl.where(slots[:, None] == j, mk[None, :], out)
        k = tl.where(k == mk[None, :], -1, k)
    return out


# ---------------------------------------------------------------------------------------------
# per-channel reductions
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_DNS["_stats_nchw"])
def _stats_nchw(x_ptr, g_ptr, mu_ptr, pin_ptr, pout_ptr, key_ptr,
                N, C, sN, TR, TT, T, QS, ROWS, inv_n, K, R: tl.constexpr,
                MODE: tl.constexpr, LANES: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                KP: tl.constexpr):
    """Partial sums of one channel over tiles [s*T, (s+1)*T) (NCHW); see the module docstring.

    With LANES (mode SUM only) it also keeps, for every column j of the tile (a *group*: the
    BN*T elements of this program in that column), the largest x and the largest -x, and writes
    the K best groups of each list as keys to ``key[s, c, list, :]``.
    """
    c = tl.program_id(0)
    s = tl.program_id(1)
    coff = c.to(tl.int64) * R  # contiguous: channel stride R
    rn = tl.arange(0, BN)
    rr = tl.arange(0, BR)
    if MODE == 0:
        ref = tl.load(x_ptr + coff).to(tl.float32)
    elif MODE == 1:
        ref = tl.load(x_ptr + coff).to(tl.float32) + _psum1(pin_ptr, c, C, ROWS) * inv_n
    else:
        ref = tl.load(mu_ptr + c)
    acc0 = tl.zeros([BN, BR], dtype=tl.float32)
    acc1 = tl.zeros([BN, BR], dtype=tl.float32)
    lmax = tl.full([BN, BR], float("-inf"), tl.float32)
    lmin = tl.full([BN, BR], float("inf"), tl.float32)
    t0 = s * T
    t1 = tl.minimum(t0 + T, TT)
    for t in range(t0, t1):
        tn = t // TR
        tr = t - tn * TR
        n = tn * BN + rn
        r = tr * BR + rr
        m = (n < N)[:, None] & (r < R)[None, :]
        off = coff + n.to(tl.int64)[:, None] * sN + r[None, :]
        xv = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        if MODE == 0:
            acc0 += tl.where(m, xv - ref, 0.0)
            if LANES:
                lmax = tl.maximum(lmax, tl.where(m, xv, float("-inf")))
                lmin = tl.minimum(lmin, tl.where(m, xv, float("inf")))
        elif MODE == 1:
            acc0 += tl.where(m, tl.abs(xv - ref), 0.0)
            acc1 += tl.where(m, (xv > ref).to(tl.float32) - (xv < ref).to(tl.float32), 0.0)
        else:
            gv = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
            acc0 += gv
            acc1 += gv * (xv - ref)
    o = s * C + c
    tl.store(pout_ptr + o, tl.sum(tl.sum(acc0, axis=1), axis=0))
    if MODE != 0:
        tl.store(pout_ptr + QS + o, tl.sum(tl.sum(acc1, axis=1), axis=0))
    if LANES:
        gid = s * BR + rr
        kb = key_ptr + o.to(tl.int64) * (2 * KP) + tl.arange(0, KP)
        tl.store(kb, _topk_groups(tl.max(lmax, axis=0), gid, K, KP))
        tl.store(kb + KP, _topk_groups(-tl.min(lmin, axis=0), gid, K, KP))


@triton.jit(do_not_specialize=_DNS["_stats_nhwc"])
def _stats_nhwc(x_ptr, g_ptr, mu_ptr, pin_ptr, pout_ptr, key_ptr,
                M, C, sM, TT, T, QS, ROWS, inv_n, K,
                MODE: tl.constexpr, LANES: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
                KP: tl.constexpr):
    """As _stats_nchw for the (M, C) channels-last matrix; a group is one row lane i of the
    tile (the T elements of rows tau*BM + i of this program), per channel."""
    cb = tl.program_id(0)
    s = tl.program_id(1)
    rm = tl.arange(0, BM)
    cols = cb * BC + tl.arange(0, BC)
    cm = cols < C
    if MODE == 0:
        ref = tl.load(x_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    elif MODE == 1:
        ref = (tl.load(x_ptr + cols, mask=cm, other=0.0).to(tl.float32)
               + _psumv(pin_ptr, cols, C, ROWS, BC) * inv_n)
    else:
        ref = tl.load(mu_ptr + cols, mask=cm, other=0.0)
    refb = ref[None, :]
    acc0 = tl.zeros([BM, BC], dtype=tl.float32)
    acc1 = tl.zeros([BM, BC], dtype=tl.float32)
    lmax = tl.full([BM, BC], float("-inf"), tl.float32)
    lmin = tl.full([BM, BC], float("inf"), tl.float32)
    t0 = s * T
    t1 = tl.minimum(t0 + T, TT)
    for t in range(t0, t1):
        rows = t * BM + rm
        m = (rows < M)[:, None] & cm[None, :]
        off = rows.to(tl.int64)[:, None] * sM + cols[None, :]
        xv = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        if MODE == 0:
            acc0 += tl.where(m, xv - refb, 0.0)
            if LANES:
                lmax = tl.maximum(lmax, tl.where(m, xv, float("-inf")))
                lmin = tl.minimum(lmin, tl.where(m, xv, float("inf")))
        elif MODE == 1:
            acc0 += tl.where(m, tl.abs(xv - refb), 0.0)
            acc1 += tl.where(m, (xv > refb).to(tl.float32) - (xv < refb).to(tl.float32), 0.0)
        else:
            gv = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
            acc0 += gv
            acc1 += gv * (xv - refb)
    o = s * C + cols
    tl.store(pout_ptr + o, tl.sum(acc0, axis=0), mask=cm)
    if MODE != 0:
        tl.store(pout_ptr + QS + o, tl.sum(acc1, axis=0), mask=cm)
    if LANES:
        gid = (s * BM + rm)[:, None]
        kb = (key_ptr + (o.to(tl.int64) * (2 * KP))[None, :] + tl.arange(0, KP)[:, None])
        tl.store(kb, _topk_groups_cols(lmax, gid, K, KP, BC), mask=cm[None, :])
        tl.store(kb + KP, _topk_groups_cols(-lmin, gid, K, KP, BC),
                 mask=cm[None, :])


# ---------------------------------------------------------------------------------------------
# L-inf: exact top-k from the group keys
# ---------------------------------------------------------------------------------------------
@triton.jit
def _gather_keys(x_ptr, gk, mu, coff, N, R, sN, BN, BR, TR, M, sM, BM, TT, T,
                 CL: tl.constexpr, GE: tl.constexpr):
    """Element keys (|x - mu|, sign, flat) of every member of the groups ``gk`` ([KP] group
    keys, -1 = none) as a [KP, GE] tile (-1 where there is no element)."""
    gok = gk >= 0
    gid = (2147483647 - (gk & 2147483647)).to(tl.int32)
    e = tl.arange(0, GE)
    if CL:
        sp = gid // BM
        lane = gid - sp * BM
        tau = sp[:, None] * T + e[None, :]
        row = tau * BM + lane[:, None]
        ok = gok[:, None] & (e < T)[None, :] & (tau < TT) & (row < M)
        flat = row
        off = coff + row.to(tl.int64) * sM
    else:
        sp = gid // BR
        j = gid - sp * BR
        t = e // BN
        i = e - t * BN
        tau = sp[:, None] * T + t[None, :]
        tn = tau // TR
        tr = tau - tn * TR
        n = tn * BN + i[None, :]
        r = tr * BR + j[:, None]
        ok = gok[:, None] & (t < T)[None, :] & (tau < TT) & (n < N) & (r < R)
        flat = n * R + r
        off = coff + n.to(tl.int64) * sN + r
    xv = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
    d = xv - mu
    a = tl.abs(d).to(tl.int32, bitcast=True).to(tl.int64)
    key = a * 4294967296 + (d > 0).to(tl.int64) * 2147483648 + (2147483647 - flat).to(tl.int64)
    return tl.where(ok, key, -1)


@triton.jit(do_not_specialize=_DNS["_linf_finalise"])
def _linf_finalise(x_ptr, pin_ptr, key_ptr, mu_ptr, sraw_ptr, sel_ptr, sgn_ptr, ssum_ptr,
                   rm_ptr, rs_ptr, factor, corr, eps,
                   C, SPLIT, ROWS, inv_n, K, cst,
                   N, R, sN, sC, BN, BR, TR, M, sM, BM, TT, T,
                   CL: tl.constexpr, SPK: tl.constexpr, KP: tl.constexpr, GE: tl.constexpr,
                   RUNNING: tl.constexpr):
    """One program per channel: mean, the K best groups of each list over all programs, their
    members, and the exact top-K of |x - mu| among them; writes mu, s_raw = cst * sum(top-K),
    the selected flat indices, their signs and the sum of those signs; with RUNNING, updates the
    running mean and scale (new scale: s_raw * corr + eps)."""
    c = tl.program_id(0)
    coff = c.to(tl.int64) * sC
    mu = tl.load(x_ptr + coff).to(tl.float32) + _psum1(pin_ptr, c, C, ROWS) * inv_n
    e = tl.arange(0, SPK)
    es = e // KP
    kb = (es.to(tl.int64) * C + c) * (2 * KP) + (e - es * KP)
    em = es < SPLIT
    g0 = _topk_keys(tl.load(key_ptr + kb, mask=em, other=-1), K, KP)
    g1 = _topk_keys(tl.load(key_ptr + kb + KP, mask=em, other=-1), K, KP)
    q0 = _gather_keys(x_ptr, g0, mu, coff, N, R, sN, BN, BR, TR, M, sM, BM, TT, T, CL, GE)
    q1 = _gather_keys(x_ptr, g1, mu, coff, N, R, sN, BN, BR, TR, M, sM, BM, TT, T, CL, GE)
    slots = tl.arange(0, KP)
    sel = tl.full([KP], -1, tl.int32)
    sgn = tl.zeros([KP], tl.float32)
    tsum = tl.sum(tl.zeros([KP], tl.float32), axis=0)
    for j in range(K):
        mk = tl.maximum(tl.max(tl.max(q0, axis=1), axis=0), tl.max(tl.max(q1, axis=1), axis=0))
        q0 = tl.where(q0 == mk, -1, q0)   # an element in both lists has one key: both go
        q1 = tl.where(q1 == mk, -1, q1)
        ok = mk >= 0
        absd = (mk >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        pos = ((mk >> 31) & 1) == 1
        flat = (2147483647 - (mk & 2147483647)).to(tl.int32)
        sg = tl.where(absd == 0.0, 0.0, tl.where(pos, 1.0, -1.0))
        here = (slots == j) & ok
        sel = tl.where(here, flat, sel)
        sgn = tl.where(here, sg, sgn)
        tsum += tl.where(ok, absd, 0.0)
    tl.store(mu_ptr + c, mu)
    tl.store(sraw_ptr + c, tsum * cst)
    if RUNNING:
        _ema(rm_ptr, c, mu, factor, True)
        _ema(rs_ptr, c, tsum * cst * corr + eps, factor, True)
    tl.store(sel_ptr + c * KP + slots, sel)
    tl.store(sgn_ptr + c * KP + slots, sgn)
    tl.store(ssum_ptr + c, tl.sum(sgn, axis=0))


@triton.jit(do_not_specialize=_DNS["_linf_fix"])
def _linf_fix(g_ptr, dx_ptr, w_ptr, sraw_ptr, ssum_ptr, sel_ptr, sgn_ptr, pin_ptr,
              C, QS, ROWS, R, sN, sC, sM, nf, eps, cst,
              CL: tl.constexpr, HAS_W: tl.constexpr, KP: tl.constexpr):
    """One program per channel: rewrite dx at the K selected elements with the scale's term,
    ``dx = alpha*g + beta - coef*sign(d)`` (computed from g once, in float32)."""
    c = tl.program_id(0)
    if HAS_W:
        w = tl.load(w_ptr + c).to(tl.float32)
    else:
        w = 1.0
    sum_g = _psum1(pin_ptr, c, C, ROWS)
    sum_gd = _psum1(pin_ptr + QS, c, C, ROWS)
    sc = tl.load(sraw_ptr + c) + eps
    alpha, beta, kappa = _bwd_coefficients(sum_g, sum_gd, w, sc, tl.load(ssum_ptr + c), nf, cst)
    slots = tl.arange(0, KP)
    f = tl.load(sel_ptr + c * KP + slots)
    sg = tl.load(sgn_ptr + c * KP + slots)
    ok = f >= 0
    coff = c.to(tl.int64) * sC
    if CL:
        off = coff + f.to(tl.int64) * sM
    else:
        n = f // R
        off = coff + n.to(tl.int64) * sN + (f - n * R)
    gv = tl.load(g_ptr + off, mask=ok, other=0.0).to(tl.float32)
    dx = gv * alpha + beta - kappa * sg
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# elementwise passes: y = (x - mu) * alpha + beta, dx = g * alpha + beta [- kappa * sign]
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_DNS["_apply_nchw"])
def _apply_nchw(in_ptr, x_ptr, out_ptr, w_ptr, b_ptr, mu_ptr, sraw_ptr, ssum_ptr, pin_ptr,
                dw_ptr, db_ptr, rm_ptr, rs_ptr, factor, corr,
                N, C, sN, TR, TT, T, QS, ROWS, inv_n, nf, eps, cst, R: tl.constexpr,
                MODE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, RUNNING: tl.constexpr,
                BN: tl.constexpr, BR: tl.constexpr):
    """Normalise (L1_FWD, LINF_FWD) or back-propagate (LINF_BWD, L1_BWD) one channel's tiles
    [s*T, (s+1)*T) (NCHW). Program s == 0 writes the per-channel outputs (statistics and, with
    RUNNING in L1_FWD, the running-statistics update; or the parameter gradients)."""
    c = tl.program_id(0)
    s = tl.program_id(1)
    coff = c.to(tl.int64) * R  # contiguous: channel stride R
    if HAS_W:
        w = tl.load(w_ptr + c).to(tl.float32)
    else:
        w = 1.0
    if MODE < 2:
        if HAS_B:
            beta = tl.load(b_ptr + c).to(tl.float32)
        else:
            beta = 0.0
        if MODE == 0:
            mu = tl.load(x_ptr + coff).to(tl.float32) + _psum1(pin_ptr, c, C, ROWS) * inv_n
            s_raw = _psum1(pin_ptr + QS, c, C, ROWS) * cst
            if s == 0:
                tl.store(mu_ptr + c, mu)
                tl.store(sraw_ptr + c, s_raw)
                tl.store(ssum_ptr + c, _psum1(pin_ptr + 2 * QS, c, C, ROWS))
                if RUNNING:
                    _ema(rm_ptr, c, mu, factor, True)
                    _ema(rs_ptr, c, s_raw * corr + eps, factor, True)
        else:
            mu = tl.load(mu_ptr + c)
            s_raw = tl.load(sraw_ptr + c)
        alpha = w / (s_raw + eps)
        kappa = 0.0
    else:
        sum_g = _psum1(pin_ptr, c, C, ROWS)
        sum_gd = _psum1(pin_ptr + QS, c, C, ROWS)
        sc = tl.load(sraw_ptr + c) + eps
        alpha, beta, kappa = _bwd_coefficients(sum_g, sum_gd, w, sc, tl.load(ssum_ptr + c),
                                               nf, cst)
        mu = tl.load(mu_ptr + c)
        if s == 0:
            if WANT_DW:
                tl.store(dw_ptr + c, (sum_gd / sc).to(dw_ptr.dtype.element_ty))
            if WANT_DB:
                tl.store(db_ptr + c, sum_g.to(db_ptr.dtype.element_ty))
    rn = tl.arange(0, BN)
    rr = tl.arange(0, BR)
    t0 = s * T
    t1 = tl.minimum(t0 + T, TT)
    for t in range(t0, t1):
        tn = t // TR
        tr = t - tn * TR
        n = tn * BN + rn
        r = tr * BR + rr
        m = (n < N)[:, None] & (r < R)[None, :]
        off = coff + n.to(tl.int64)[:, None] * sN + r[None, :]
        v = tl.load(in_ptr + off, mask=m, other=0.0).to(tl.float32)
        if MODE < 2:
            o = (v - mu) * alpha + beta
        elif MODE == 2:
            o = v * alpha + beta
        else:
            xv = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
            o = v * alpha + beta - kappa * ((xv > mu).to(tl.float32) - (xv < mu).to(tl.float32))
        tl.store(out_ptr + off, o.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=_DNS["_apply_nhwc"])
def _apply_nhwc(in_ptr, x_ptr, out_ptr, w_ptr, b_ptr, mu_ptr, sraw_ptr, ssum_ptr, pin_ptr,
                dw_ptr, db_ptr, rm_ptr, rs_ptr, factor, corr,
                M, C, sM, TT, T, QS, ROWS, inv_n, nf, eps, cst,
                MODE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, RUNNING: tl.constexpr,
                BM: tl.constexpr, BC: tl.constexpr):
    """As _apply_nchw for the (M, C) channels-last matrix (BC channels per program)."""
    cb = tl.program_id(0)
    s = tl.program_id(1)
    cols = cb * BC + tl.arange(0, BC)
    cm = cols < C
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cm, other=1.0).to(tl.float32)
    else:
        w = tl.full([BC], 1.0, tl.float32)
    if MODE < 2:
        if HAS_B:
            beta = tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        else:
            beta = tl.zeros([BC], tl.float32)
        if MODE == 0:
            mu = (tl.load(x_ptr + cols, mask=cm, other=0.0).to(tl.float32)
                  + _psumv(pin_ptr, cols, C, ROWS, BC) * inv_n)
            s_raw = _psumv(pin_ptr + QS, cols, C, ROWS, BC) * cst
            if s == 0:
                tl.store(mu_ptr + cols, mu, mask=cm)
                tl.store(sraw_ptr + cols, s_raw, mask=cm)
                tl.store(ssum_ptr + cols, _psumv(pin_ptr + 2 * QS, cols, C, ROWS, BC), mask=cm)
                if RUNNING:
                    _ema(rm_ptr, cols, mu, factor, cm)
                    _ema(rs_ptr, cols, s_raw * corr + eps, factor, cm)
        else:
            mu = tl.load(mu_ptr + cols, mask=cm, other=0.0)
            s_raw = tl.load(sraw_ptr + cols, mask=cm, other=1.0)
        alpha = w / (s_raw + eps)
        kappa = tl.zeros([BC], tl.float32)
    else:
        sum_g = _psumv(pin_ptr, cols, C, ROWS, BC)
        sum_gd = _psumv(pin_ptr + QS, cols, C, ROWS, BC)
        sc = tl.load(sraw_ptr + cols, mask=cm, other=1.0) + eps
        ssum = tl.load(ssum_ptr + cols, mask=cm, other=0.0)
        alpha, beta, kappa = _bwd_coefficients(sum_g, sum_gd, w, sc, ssum, nf, cst)
        mu = tl.load(mu_ptr + cols, mask=cm, other=0.0)
        if s == 0:
            if WANT_DW:
                tl.store(dw_ptr + cols, (sum_gd / sc).to(dw_ptr.dtype.element_ty), mask=cm)
            if WANT_DB:
                tl.store(db_ptr + cols, sum_g.to(db_ptr.dtype.element_ty), mask=cm)
    mub = mu[None, :]
    ab = alpha[None, :]
    bb = beta[None, :]
    kb = kappa[None, :]
    rm = tl.arange(0, BM)
    t0 = s * T
    t1 = tl.minimum(t0 + T, TT)
    for t in range(t0, t1):
        rows = t * BM + rm
        m = (rows < M)[:, None] & cm[None, :]
        off = rows.to(tl.int64)[:, None] * sM + cols[None, :]
        v = tl.load(in_ptr + off, mask=m, other=0.0).to(tl.float32)
        if MODE < 2:
            o = (v - mub) * ab + bb
        elif MODE == 2:
            o = v * ab + bb
        else:
            xv = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
            o = v * ab + bb - kb * ((xv > mub).to(tl.float32) - (xv < mub).to(tl.float32))
        tl.store(out_ptr + off, o.to(out_ptr.dtype.element_ty), mask=m)
