"""Triton kernels of the L1 and L-inf/top-k batch norms: on the CPU under Triton's interpreter,
or compiled on a CUDA GPU when one is present (benchmarks/gpu_check.sh runs this file there).

Every dtype x layout x rank combination is checked, forward and backward, against the train
formulas written directly in float64 autograd (independent of the library), and against the
CPU implementation in ``normswap.norms._functional`` in the same dtype. The interpreter must be
on (``TRITON_INTERPRET=1``) before triton is first imported: tests/conftest.py sets it on
machines without CUDA. Speed is measured by benchmarks/gpu_check.sh, not here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator

import pytest
import torch

pytest.importorskip("triton")

from normswap.norms import _triton

from ..conftest import rel_err

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRET,
    reason="no CUDA device and TRITON_INTERPRET is not 1 (tests/conftest.py sets it before "
           "triton is imported)")

F64 = torch.float64
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# max|out - ref| / max|ref| for y and dx (output rounding of the dtype) ...
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# ... and for mu, s_raw, grad_weight, grad_bias (float32 statistics of the rounded input)
STAT_TOL = 2e-5
EPS = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _fast_interpreter() -> Iterator[None]:
    """Under the interpreter, few large programs (each program costs a Python loop); on a GPU
    the real tiling. Tests that need many tiles and programs ask for ``tiny_tiles``."""
    tuning = {"tile": 4096, "programs": 1, "cmax": None} if DEVICE == "cpu" else dict(
        _triton._TUNING)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_triton, "_TUNING", tuning)
        yield


# ---------------------------------------------------------------------------------------------
# float64 reference formulas (the train formulas of normswap/norms/_functional.py)
# ---------------------------------------------------------------------------------------------
def _per_channel(t: torch.Tensor) -> torch.Tensor:
    """(C, n) view of an (N, C, *) tensor's channels."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _finish(x: torch.Tensor, d: torch.Tensor, s: torch.Tensor, w: torch.Tensor | None,
            b: torch.Tensor | None) -> torch.Tensor:
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    y = d / s.reshape(shape)
    if w is not None:
        y = y * w.reshape(shape)
    if b is not None:
        y = y + b.reshape(shape)
    return y


def ref_l1(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mu, s_raw): s_raw = sqrt(pi/2) * mean|x - mu| per channel."""
    mu = _per_channel(x).mean(1)
    d = x - mu.reshape((1, -1) + (1,) * (x.dim() - 2))
    s_raw = math.sqrt(math.pi / 2) * _per_channel(d).abs().mean(1)
    return _finish(x, d, s_raw + eps, w, b), mu, s_raw


def ref_linf(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float,
             k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mu, s_raw): s_raw = C(n) * mean of the k largest |x - mu| (k clamped to n)."""
    mu = _per_channel(x).mean(1)
    d = x - mu.reshape((1, -1) + (1,) * (x.dim() - 2))
    n = d.numel() // d.shape[1]
    cn = 0.5 * (1 + math.sqrt(math.pi * math.log(4))) / math.sqrt(2 * math.log(n))
    s_raw = cn * _per_channel(d).abs().topk(min(k, n), dim=1).values.mean(1)
    return _finish(x, d, s_raw + eps, w, b), mu, s_raw


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` in the named memory layout (same values)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "strided":  # neither: a slice of a wider tensor (the kernels copy it)
        wide = torch.cat([t, t], dim=-1)
        return wide[..., ::2]
    raise ValueError(layout)


def _separated(x: torch.Tensor, k: int) -> bool:
    """Whether every channel's k-th and (k+1)-th largest |x - mean| are clearly apart (so that
    the selection does not depend on rounding)."""
    dc = _per_channel(x - _per_channel(x).mean(1).reshape((1, -1) + (1,) * (x.dim() - 2)))
    top = dc.abs().sort(dim=1, descending=True).values
    if top.shape[1] <= k:
        return True
    return bool(((top[:, k - 1] - top[:, k]) > 1e-3 * top[:, 0]).all())


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, layout: str, seed: int = 0,
            k: int | None = None, scale: float = 2.0, shift: float = 0.5
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, weight, bias, upstream gradient): random, x in ``dtype``/``layout``, affine float32."""
    for attempt in range(50):
        g = torch.Generator().manual_seed(1000 * seed + attempt)
        x = (torch.randn(shape, generator=g, dtype=F64) * scale + shift).to(dtype)
        if k is None or _separated(x.double(), k):
            break
    else:
        raise AssertionError("could not draw a well-separated input")
    c = shape[1]
    w = torch.rand(c, generator=g) + 0.5
    b = torch.randn(c, generator=g) * 0.3
    gy = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    return _layout(x, layout), w, b, _layout(gy, layout)


Fn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _run(fn: Fn, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None,
         gy: torch.Tensor, *extra: object) -> dict[str, torch.Tensor | None]:
    """Forward and backward of ``fn``; outputs and gradients."""
    xa = _same_strides(x.detach(), x.device).requires_grad_()
    wa = None if w is None else w.detach().clone().requires_grad_()
    ba = None if b is None else b.detach().clone().requires_grad_()
    y, mu, s_raw = fn(xa, wa, ba, EPS, *extra)
    y.backward(gy.to(y.dtype))
    out = {"y": y.detach(), "mu": mu, "s_raw": s_raw, "dx": xa.grad,
           "dw": None if wa is None else wa.grad, "db": None if ba is None else ba.grad}
    return {k: None if v is None else v.cpu() for k, v in out.items()}


def _same_strides(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A copy of ``t`` on ``device`` with the same strides (clone/to make non-dense ones
    contiguous)."""
    return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device).copy_(t)


def _dev(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` on the test device, strides kept."""
    return None if t is None else _same_strides(t, DEVICE)


def _reference(kind: str, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None,
               gy: torch.Tensor, k: int) -> dict[str, torch.Tensor | None]:
    """The float64 reference, run on the (rounded) inputs upcast to float64."""
    f64 = (lambda t: None if t is None else t.detach().double())
    if kind == "l1":
        return _run(ref_l1, f64(x), f64(w), f64(b), f64(gy))
    return _run(ref_linf, f64(x), f64(w), f64(b), f64(gy), k)


def _triton_run(kind: str, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None,
                gy: torch.Tensor, k: int) -> dict[str, torch.Tensor | None]:
    x, w, b, gy = _dev(x), _dev(w), _dev(b), _dev(gy)
    if kind == "l1":
        return _run(_triton.l1_batch_norm, x, w, b, gy)
    return _run(_triton.linf_batch_norm, x, w, b, gy, k)


def _assert_matches(out: dict[str, torch.Tensor | None], ref: dict[str, torch.Tensor | None],
                    dtype: torch.dtype, x: torch.Tensor, factor: float = 1.0) -> None:
    """Every output and gradient within the dtype's tolerance of the reference."""
    for name in ("y", "dx"):
        assert out[name] is not None and out[name].dtype == dtype, name
        assert out[name].shape == x.shape, name
        assert torch.isfinite(out[name].float()).all(), name
        err = rel_err(out[name], ref[name])
        assert err <= TOL[dtype] * factor, f"{name}: relative error {err:.2e}"
    for name in ("mu", "s_raw", "dw", "db"):
        if ref[name] is None:
            assert out[name] is None, name
            continue
        assert out[name] is not None, name
        if name in ("mu", "s_raw"):
            assert out[name].dtype == torch.float32 and out[name].shape == (x.shape[1],), name
        err = rel_err(out[name], ref[name])
        assert err <= STAT_TOL * factor, f"{name}: relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------
# the sweep: dtype x layout x rank, L1 and L-inf (k = 3)
# ---------------------------------------------------------------------------------------------
CASES = [
    ("2d", (7, 3), "contiguous"),
    ("1d-NCL", (3, 3, 5), "contiguous"),
    ("1d-NLC", (3, 3, 5), "channels_last"),
    ("2d-NCHW", (3, 3, 4, 6), "contiguous"),
    ("2d-NHWC", (3, 3, 4, 6), "channels_last"),
    ("3d-NCDHW", (2, 3, 2, 3, 4), "contiguous"),
    ("3d-NDHWC", (2, 3, 2, 3, 4), "channels_last"),
    ("2d-strided", (2, 3, 4, 5), "strided"),
]


@pytest.mark.parametrize("kind", ["l1", "linf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_float64_reference(kind: str, dtype: torch.dtype,
                                   case: tuple[str, tuple[int, ...], str]) -> None:
    _, shape, layout = case
    k = 3
    x, w, b, gy = _inputs(shape, dtype, layout, seed=len(shape), k=k if kind == "linf" else None)
    if layout == "strided":  # neither layout the kernels read: copied first
        assert _triton._working(x)[0] is not x
    out = _triton_run(kind, x, w, b, gy, k)
    _assert_matches(out, _reference(kind, x, w, b, gy, k), dtype, x)
    if layout == "channels_last":  # outputs keep the input's layout
        assert out["y"].stride() == x.stride() and out["dx"].stride() == x.stride()
    else:
        assert out["y"].is_contiguous()


@pytest.mark.parametrize("kind", ["l1", "linf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_agrees_with_cpu_implementation(kind: str, dtype: torch.dtype) -> None:
    """Same numbers as normswap.norms._functional (the CPU kernels) in the same dtype."""
    from normswap.norms import _functional

    x, w, b, gy = _inputs((4, 3, 3, 5), dtype, "channels_last", seed=7, k=2)
    cpu: Fn = (_functional.l1_batch_norm if kind == "l1"
               else (lambda *a: _functional.linf_batch_norm(*a)))
    extra = () if kind == "l1" else (2,)
    out = _triton_run(kind, x, w, b, gy, 2)
    want = _run(cpu, x, w, b, gy, *extra)
    _assert_matches(out, want, dtype, x, factor=2.0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("k", [1, 4])
def test_linf_k_values(layout: str, k: int) -> None:
    x, w, b, gy = _inputs((4, 3, 2, 5), torch.float32, layout, seed=k, k=k)
    out = _triton_run("linf", x, w, b, gy, k)
    _assert_matches(out, _reference("linf", x, w, b, gy, k), torch.float32, x)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_linf_k_clamped_to_n(layout: str) -> None:
    """k > n per channel averages all n deviations."""
    x, w, b, gy = _inputs((2, 3, 2, 2), torch.float32, layout, seed=3)
    out = _triton_run("linf", x, w, b, gy, 50)
    _assert_matches(out, _reference("linf", x, w, b, gy, 8), torch.float32, x)


# ---------------------------------------------------------------------------------------------
# many tiles, many programs per channel, ragged tiles, several channel blocks
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def tiny_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of 16 elements and up to 16 programs per channel, 4 channels per NHWC program."""
    monkeypatch.setattr(_triton, "_TUNING", {"tile": 16, "programs": 16, "cmax": 4})


@pytest.mark.parametrize("kind,k", [("l1", 1), ("linf", 1), ("linf", 5)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_many_tiles_and_programs(tiny_tiles: None, kind: str, k: int, layout: str) -> None:
    shape = (3, 5, 3, 7)  # R = 21: ragged 16-wide tiles; C = 5: two NHWC channel blocks
    x, w, b, gy = _inputs(shape, torch.float32, layout, seed=11, k=k if kind == "linf" else None)
    xk, cl = _triton._working(x)
    plan = _triton._plan(xk, cl, lanes=kind == "linf", k=k)
    assert plan.split > 1 and plan.T > 1 and plan.TT > plan.T and not plan.combine, plan
    out = _triton_run(kind, x, w, b, gy, k)
    _assert_matches(out, _reference(kind, x, w, b, gy, k), torch.float32, x)
    again = _triton_run(kind, x, w, b, gy, k)
    for name in ("y", "dx", "mu", "s_raw", "dw", "db"):  # no atomics: bit-identical reruns
        assert torch.equal(out[name], again[name]), name


@pytest.mark.parametrize("kind,k", [("l1", 1), ("linf", 3)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_combined_partial_sums(tiny_tiles: None, monkeypatch: pytest.MonkeyPatch, kind: str,
                               k: int, layout: str) -> None:
    """Partial sums reduced once by _combine (planned for large splits) give the same result,
    also for the parameter-only backward."""
    monkeypatch.setattr(_triton, "_COMBINE_READS", 0)
    x, w, b, gy = _inputs((3, 5, 3, 7), torch.float32, layout, seed=14,
                          k=k if kind == "linf" else None)
    xk, cl = _triton._working(x)
    assert _triton._plan(xk, cl, lanes=kind == "linf", k=k).combine
    out = _triton_run(kind, x, w, b, gy, k)
    ref = _reference(kind, x, w, b, gy, k)
    _assert_matches(out, ref, torch.float32, x)
    wa, ba = _dev(w).requires_grad_(), _dev(b).requires_grad_()
    fn = _triton.l1_batch_norm if kind == "l1" else _triton.linf_batch_norm
    fn(_dev(x), wa, ba, EPS, *(() if kind == "l1" else (k,)))[0].backward(_dev(gy))
    assert rel_err(wa.grad.cpu(), ref["dw"]) <= STAT_TOL
    assert rel_err(ba.grad.cpu(), ref["db"]) <= STAT_TOL


def test_linf_extremes_in_one_group_and_at_the_edges(tiny_tiles: None) -> None:
    """The k largest |d| of a channel inside one tile column, one program, or the ragged last
    tile: the group selection must still find all of them."""
    x, w, b, gy = _inputs((4, 3, 2, 9), torch.float32, "contiguous", seed=5)
    with torch.no_grad():
        x[:, 0, 0, 3] = torch.tensor([9.0, -8.5, 8.0, -7.5])     # one column, all rows
        x[3, 1, 1, 8] = 11.0                                      # last element (ragged tile)
        x[3, 1, 1, 7] = -10.5
        x[0, 2, 0, 0] = -12.0                                     # first element
        x[0, 2, 0, 1] = 11.5
    for k in (1, 4):
        out = _triton_run("linf", x, w, b, gy, k)
        _assert_matches(out, _reference("linf", x, w, b, gy, k), torch.float32, x)


# ---------------------------------------------------------------------------------------------
# ties, constant channels, large fp16 values, affine variants
# ---------------------------------------------------------------------------------------------
def _tie_input(layout: str) -> torch.Tensor:
    """Channels whose values are symmetric about an exactly representable mean of 0."""
    base = torch.tensor([-3.0, 3.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0] * 3)  # n = 24, mean 0
    chans = [base, base.flip(0), base.roll(5)]
    x = torch.stack(chans).reshape(3, 2, 3, 4).transpose(0, 1).contiguous()  # (2, 3, 3, 4)
    return _layout(x, layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("k", [1, 3])
def test_linf_ties_select_exactly_k_elements(layout: str, k: int) -> None:
    """With ties (|d| = 3 six times per channel, three with d = +3), s_raw is exact and the
    scale's gradient goes to exactly k elements, all with d = +3 (largest |d|, d > 0 first);
    dx is the closed form for that selection."""
    x = _tie_input(layout)
    n = x.numel() // x.shape[1]
    w = torch.tensor([1.0, 0.5, 2.0])
    gy = _layout(torch.linspace(-1, 1, x.numel()).reshape(x.shape), layout)
    out = _triton_run("linf", x, w, None, gy, k)
    cn = 0.5 * (1 + math.sqrt(math.pi * math.log(4))) / math.sqrt(2 * math.log(n))
    assert torch.allclose(out["s_raw"], torch.full((3,), 3.0 * cn), rtol=1e-6)
    xc, gc = _per_channel(x).double(), _per_channel(gy).double()
    dxc = _per_channel(out["dx"]).double()
    s = out["s_raw"].double() + EPS
    for c in range(3):
        d, g = xc[c], w[c].double() * gc[c]
        coef = cn / k * (g * d / s[c]).sum()  # (C(n)/k) * sum(g * ybar)
        # s*dx - (g - mean g) is coef*sum(sign_K)/n everywhere but at the selected elements
        resid = dxc[c] * s[c] - (g - g.mean())
        common = resid.median()
        picked = torch.nonzero((resid - common).abs() > 1e-4 * coef.abs()).flatten()
        assert len(picked) == k, f"channel {c}: {len(picked)} elements got the scale's gradient"
        assert bool((d[picked] == 3.0).all()), d[picked]
        sign = torch.zeros_like(d)
        sign[picked] = 1.0
        want = (g - g.mean() - coef * (sign - sign.sum() / n)) / s[c]
        assert rel_err(dxc[c], want) <= 1e-5


@pytest.mark.parametrize("kind", ["l1", "linf"])
def test_constant_channel(kind: str) -> None:
    """A constant channel has s_raw = 0: y = bias, gradients finite, as the reference."""
    x, w, b, gy = _inputs((3, 3, 2, 4), torch.float32, "contiguous", seed=2)
    x[:, 1] = 0.75
    out = _triton_run(kind, x, w, b, gy, 2)
    assert out["s_raw"][1] == 0
    assert torch.equal(out["y"][:, 1], torch.full_like(out["y"][:, 1], float(b[1])))
    _assert_matches(out, _reference(kind, x, w, b, gy, 2), torch.float32, x)


@pytest.mark.parametrize("kind", ["l1", "linf"])
def test_fp16_large_values_stay_finite(kind: str) -> None:
    """Pure fp16 tensors of magnitude ~1e3 (Hoffer's case): fp32 statistics, no overflow."""
    x, w, b, gy = _inputs((4, 3, 3, 3), torch.float16, "channels_last", seed=4,
                          k=2 if kind == "linf" else None, scale=400.0, shift=700.0)
    out = _triton_run(kind, x, w, b, gy, 2)
    _assert_matches(out, _reference(kind, x, w, b, gy, 2), torch.float16, x)


@pytest.mark.parametrize("kind", ["l1", "linf"])
@pytest.mark.parametrize("affine", ["none", "weight_only"])
def test_without_affine(kind: str, affine: str) -> None:
    x, w, _, gy = _inputs((3, 3, 5), torch.float32, "contiguous", seed=6,
                          k=2 if kind == "linf" else None)
    w = None if affine == "none" else w
    out = _triton_run(kind, x, w, None, gy, 2)
    _assert_matches(out, _reference(kind, x, w, None, gy, 2), torch.float32, x)


@pytest.mark.parametrize("kind", ["l1", "linf"])
def test_parameter_gradients_only(kind: str) -> None:
    """x not requiring grad: only grad_weight and grad_bias are computed."""
    x, w, b, gy = _inputs((3, 3, 4), torch.float16, "contiguous", seed=8,
                          k=2 if kind == "linf" else None)
    wa, ba = _dev(w).requires_grad_(), _dev(b).requires_grad_()
    fn = _triton.l1_batch_norm if kind == "l1" else _triton.linf_batch_norm
    y, _, _ = fn(_dev(x), wa, ba, EPS, *(() if kind == "l1" else (2,)))
    y.backward(_dev(gy))
    ref = _reference(kind, x, w, b, gy, 2)
    assert rel_err(wa.grad.cpu(), ref["dw"]) <= STAT_TOL
    assert rel_err(ba.grad.cpu(), ref["db"]) <= STAT_TOL


@pytest.mark.parametrize("kind", ["l1", "linf"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_running_statistics_update(kind: str, layout: str) -> None:
    """running_mean/running_scale (fp16 buffers here) updated in the kernels as the layers do:
    r <- (1 - f) r + f new, new = mu and s_raw * correction + eps, in float32."""
    x, w, b, gy = _inputs((3, 3, 2, 4), torch.float32, layout, seed=13, k=2)
    g = torch.Generator().manual_seed(3)
    rm0 = torch.randn(3, generator=g).half()
    rs0 = (torch.rand(3, generator=g) + 0.5).half()
    rm, rs = _dev(rm0.clone()), _dev(rs0.clone())
    fn = _triton.l1_batch_norm if kind == "l1" else _triton.linf_batch_norm
    extra = () if kind == "l1" else (2,)
    _, mu, s_raw = fn(_dev(x), _dev(w), _dev(b), EPS, *extra, running_mean=rm, running_scale=rs,
                      factor=0.25, scale_correction=1.5)
    mu, s_raw = mu.cpu(), s_raw.cpu()
    want_m = (rm0.float() * 0.75 + mu * 0.25).half()
    want_s = (rs0.float() * 0.75 + (s_raw * 1.5 + EPS) * 0.25).half()
    # fp16 buffers: the float32 update may round either way on a GPU (FMA contraction)
    torch.testing.assert_close(rm.cpu().float(), want_m.float(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(rs.cpu().float(), want_s.float(), rtol=1e-3, atol=1e-3)
    assert not torch.equal(rm.cpu(), rm0) and not torch.equal(rs.cpu(), rs0)
    ref = _reference(kind, x, w, b, gy, 2)
    assert rel_err(mu, ref["mu"]) <= STAT_TOL and rel_err(s_raw, ref["s_raw"]) <= STAT_TOL
    with pytest.raises(ValueError, match="running_scale must be a contiguous floating"):
        fn(_dev(x), None, None, EPS, *extra, running_mean=rm, running_scale=None, factor=0.1)


@pytest.mark.parametrize("kind", ["l1", "linf"])
def test_half_parameters(kind: str) -> None:
    """model.half(): fp16 input, weight and bias; parameter gradients come back in fp16."""
    x, w, b, gy = _inputs((4, 3, 2, 3), torch.float16, "contiguous", seed=15,
                          k=2 if kind == "linf" else None)
    w, b = w.half(), b.half()
    out = _triton_run(kind, x, w, b, gy, 2)
    ref = _reference(kind, x, w, b, gy, 2)
    assert out["dw"].dtype == torch.float16 and out["db"].dtype == torch.float16
    for name in ("y", "dx", "dw", "db"):
        assert rel_err(out[name], ref[name]) <= TOL[torch.float16], name


def test_expanded_upstream_gradient() -> None:
    """y.sum().backward() hands the Function a stride-0 gradient: it is materialised."""
    x, w, b, _ = _inputs((3, 3, 2, 2), torch.float32, "channels_last", seed=16, k=2)
    for kind in ("l1", "linf"):
        xa = _dev(x).requires_grad_()
        fn = _triton.l1_batch_norm if kind == "l1" else _triton.linf_batch_norm
        fn(xa, _dev(w), _dev(b), EPS, *(() if kind == "l1" else (2,)))[0].sum().backward()
        ref = _reference(kind, x, w, b, torch.ones_like(x), 2)
        # d(sum y)/dx is zero up to rounding: compare against the scale of the affine terms
        assert (xa.grad.cpu() - ref["dx"]).abs().max() <= 1e-5, kind


def test_gradient_in_another_layout() -> None:
    """A contiguous upstream gradient for a channels-last input is laid out like the input."""
    x, w, b, gy = _inputs((3, 3, 2, 4), torch.float32, "channels_last", seed=9, k=2)
    for kind in ("l1", "linf"):
        out = _triton_run(kind, x, w, b, gy.contiguous(), 2)
        _assert_matches(out, _reference(kind, x, w, b, gy, 2), torch.float32, x)


def test_output_is_not_a_view_and_takes_inplace_ops() -> None:
    x, w, b, _ = _inputs((3, 3, 4), torch.float32, "contiguous", seed=10)
    xa = _dev(x).requires_grad_()
    y, mu, s_raw = _triton.l1_batch_norm(xa, _dev(w), _dev(b), EPS)
    assert not y._is_view() and not mu.requires_grad and not s_raw.requires_grad
    torch.relu_(y).sum().backward()
    assert xa.grad is not None and torch.isfinite(xa.grad).all()


@pytest.mark.filterwarnings("ignore:Input #.*double precision")
def test_gradcheck_float32() -> None:
    """torch.autograd.gradcheck of both Functions (float32: the kernels have no float64 path;
    finite differences with a coarse step, tolerances to match)."""
    x, w, b, _ = _inputs((3, 2, 2), torch.float32, "contiguous", seed=12, k=2)
    xa = _dev(x).requires_grad_()
    wa, ba = _dev(w).requires_grad_(), _dev(b).requires_grad_()
    kw = dict(eps=1e-2, atol=2e-3, rtol=2e-2, fast_mode=True)
    assert torch.autograd.gradcheck(lambda t, u, v: _triton.l1_batch_norm(t, u, v, EPS)[0],
                                    (xa, wa, ba), **kw)
    assert torch.autograd.gradcheck(lambda t, u, v: _triton.linf_batch_norm(t, u, v, EPS, 2)[0],
                                    (xa, wa, ba), **kw)


# ---------------------------------------------------------------------------------------------
# availability, errors, the interpreter switch
# ---------------------------------------------------------------------------------------------
def test_available(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(2, 3, 4, device=DEVICE)
    assert _triton.available(x)
    assert _triton.available(x.half()) and _triton.available(x.bfloat16())
    assert not _triton.available(x.double())
    assert not _triton.available(torch.zeros(4, device=DEVICE))
    assert not _triton.available(torch.zeros(1, 2, 1, 1, 1, 1, device=DEVICE))
    assert not _triton.available(torch.zeros(2, 3, dtype=torch.int64, device=DEVICE))
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not _triton.available(x)  # CPU tensors need the interpreter
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        assert not _triton.available(x.cpu())
    monkeypatch.setattr(_triton, "_TRITON_IMPORTABLE", False)
    assert not _triton.available(x)


def test_errors_name_the_function_and_the_remedy(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(4, 3, 5, device=DEVICE)
    with pytest.raises(_triton.TritonUnavailableError, match="l1_batch_norm.*float64.*_functional"):
        _triton.l1_batch_norm(x.double())
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        _triton.l1_batch_norm(torch.randn(1, 3, device=DEVICE))
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        _triton.linf_batch_norm(x, k=0)
    with pytest.raises(ValueError, match="weight has 2 elements, expected 3"):
        _triton.linf_batch_norm(x, torch.ones(2, device=DEVICE), None, EPS, 1)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(_triton.TritonUnavailableError, match="TRITON_INTERPRET=1"):
        _triton.linf_batch_norm(x.cpu())


@pytest.mark.skipif(not INTERPRET, reason="checks the switch from the interpreter's side")
def test_kernels_follow_the_interpreter_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The jit functions are rebuilt when TRITON_INTERPRET changes (decided at decoration)."""
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(_triton._kernels()._stats_nchw, InterpretedFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not isinstance(_triton._kernels()._stats_nchw, InterpretedFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert isinstance(_triton._kernels()._stats_nchw, InterpretedFunction)


@pytest.mark.parametrize("R,cap,want", [(24, 64, 32), (3136, 1024, 256), (49, 1024, 64),
                                        (100352, 1024, 1024), (1000, 512, 512)])
def test_row_width(R: int, cap: int, want: int) -> None:
    assert _triton._row_width(R, cap) == want


def test_split_bounds() -> None:
    T, split = _triton._split(TT=26, cblocks=64, programs=528, t_min=1, t_max=26)
    assert T * split >= 26 and (split - 1) * T < 26 and split == 9
    T, split = _triton._split(TT=4, cblocks=32, programs=528, t_min=8, t_max=256)
    assert (T, split) == (4, 1)
