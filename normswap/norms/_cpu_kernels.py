"""Fused CPU passes for the L1 and L-inf layers: a small C++ library built on this machine on first use.

The eager L1 passes of :mod:`._kernels` chain several native kernels (a sign, then a reduction
over it; an affine, then a sign term) and, on channels_last or half tensors, cost about twice
native BatchNorm. The library in ``_cpu/kernels.cpp`` does each pass in one read of its inputs:
per-channel sums (``sum x``; ``sum sign(x - mu)`` with ``sum |x - mu|``; ``sum g`` with
``sum g*(x - mu)``) and element-wise passes (``(x - mu)*a + b``;
``a*g + b - k*sign(x - mu)``) and, for the L-inf layer's top-k selection, the group max/min
tables with the channel sum in the same pass and, on (N, C) inputs, the top-k itself; for float32/float16/bfloat16 in contiguous and channels_last
layouts, accumulating in float32 over blocks of 4096 elements and in float64 across blocks.

It has no torch headers: the first call compiles it with the system C++ compiler
(``$CXX``, else ``c++``/``g++``/``clang++``) with ``-O3 -march=native -fopenmp`` in about two
seconds, into ``$NORMSWAP_KERNEL_CACHE`` (default ``~/.cache/normswap``; a temporary directory
when that is not writable), keyed by the source, the compiler, its flags and this CPU's feature
flags; later processes load the cached file. It is loaded with :mod:`ctypes` (the calls release
the GIL) and, linked against ``libgomp.so.1``, shares PyTorch's OpenMP threads where PyTorch
uses libgomp. It is used only when it built with its vector path (x86-64 with AVX2, F16C and
FMA); otherwise, or when ``NORMSWAP_CPU_KERNELS=0``, or after a failed build (one warning with
the compiler's message), the native-kernel passes run instead (same maths).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["available", "status", "set_cpu_kernels", "cpu_kernels_enabled", "usable",
           "channel_mean", "group_extrema", "topk_rows", "topk_abs", "topk_members", "l1_sums", "gradient_sums", "affine", "l1_input_gradient",
           "MIN_ELEMENTS"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_cpu") / "kernels.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
MIN_ELEMENTS = 1 << 15
"""Below this many elements the native-kernel passes are as fast; the library is not used."""

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ENABLED: bool = os.environ.get("NORMSWAP_CPU_KERNELS", "1").lower() not in ("0", "false", "no",
                                                                              "off")
_LOCK = threading.Lock()
_LIB: Any = None
_TRIED = False
_STATUS = "not built yet"

_i64, _int, _ptr, _dptr, _fptr = (ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                                  ctypes.POINTER(ctypes.c_double), ctypes.c_void_p)
_SIGNATURES = {
    "ns_simd": [],
    "ns_openmp": [],
    "ns_channel_sum": [_int, _ptr, _i64, _i64, _i64, _int, _ptr, _int],
    "ns_l1_sums": [_int, _ptr, _ptr, _i64, _i64, _i64, _int, _ptr, _ptr, _int],
    "ns_gradient_sums": [_int, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int, _ptr, _ptr, _int],
    "ns_group_extrema": [_int, _ptr, _i64, _i64, _i64, _int, _int, _ptr, _ptr, _ptr, _int],
    "ns_topk_rows": [_int, _ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _int],
    "ns_topk_members": [_int, _ptr, _ptr, _i64, _i64, _i64, _int, _ptr, _i64, _i64, _ptr, _ptr,
                        _int],
    "ns_topk_planes": [_int, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _int],
    "ns_affine": [_int, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int, _int],
    "ns_l1_input_gradient": [_int, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64,
                             _int, _int],
}


def set_cpu_kernels(enabled: bool = True) -> None:
    """Use the fused CPU library for the L1 layer when it is available (default: on).

    Args:
        enabled: False to run the native-kernel passes only (the reference path).
    """
    global _ENABLED
    _ENABLED = bool(enabled)


def cpu_kernels_enabled() -> bool:
    """Whether the fused CPU library may be used (it may still be unavailable)."""
    return _ENABLED


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_features() -> str:
    """This CPU's feature flags (``-march=native`` builds for them)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    configured = os.environ.get("NORMSWAP_KERNEL_CACHE")
    candidates = [Path(configured)] if configured else []
    candidates.append(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "normswap")
    candidates.append(Path(tempfile.gettempdir()) / f"normswap-{os.getuid()}"
                      if hasattr(os, "getuid") else Path(tempfile.gettempdir()) / "normswap")
    refused = []
    for path in candidates:
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            if os.access(path, os.W_OK) and _private(path):
                return path
            refused.append(str(path))
        except OSError:
            continue
    raise OSError("no private writable cache directory (owned by this user, not writable by "
                  f"others; refused: {', '.join(refused) or 'none'}); set NORMSWAP_KERNEL_CACHE")


def _private(path: Path) -> bool:
    """Whether only this user can write ``path``: a library loaded from a directory or file
    that others can write would run their code."""
    if not hasattr(os, "getuid"):
        return True
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _build() -> Any:
    """Compile (or find the cached build of) the library and load it."""
    cxx = _compiler()
    if cxx is None:
        raise OSError("no C++ compiler found (set CXX)")
    source = SOURCE.read_bytes()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    key = hashlib.sha256(b"\0".join([source, cxx.encode(), version.encode(),
                                     " ".join(FLAGS).encode(), platform.machine().encode(),
                                     _cpu_features().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"normswap_cpu_{key}.so"
    if not target.exists():
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)  # mode 0600
        os.close(fd)
        try:
            proc = subprocess.run([cxx, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True,
                                  text=True, timeout=300)
            if proc.returncode != 0:   # e.g. Apple clang: no OpenMP; then single-threaded
                serial = [f for f in FLAGS if f != "-fopenmp"]
                retry = subprocess.run([cxx, *serial, "-o", tmp, str(SOURCE)],
                                       capture_output=True, text=True, timeout=300)
                if retry.returncode != 0:
                    raise OSError(f"{cxx} failed: "
                                  f"{(proc.stderr or proc.stdout).strip()[-800:]}")
            os.chmod(tmp, 0o755)     # the linker's mode follows the umask
            os.replace(tmp, target)  # atomic: a concurrent build replaces it with the same file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if not _private(target):
        raise OSError(f"{target} is not owned by this user or is writable by others; "
                      "not loading it (delete it to rebuild)")
    lib = ctypes.CDLL(str(target))
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = ctypes.c_int if name in ("ns_simd", "ns_openmp") else None
    return lib


def _library() -> Any:
    global _LIB, _TRIED, _STATUS
    if _TRIED:
        return _LIB
    with _LOCK:
        if _TRIED:
            return _LIB
        try:
            lib = _build()
            if lib.ns_simd() != 1:
                _STATUS = ("built without its vector path (needs x86-64 with AVX2, F16C and "
                           "FMA): not used")
                lib = None
            else:
                _STATUS = "in use" + ("" if lib.ns_openmp() else " (single-threaded: no OpenMP)")
            _LIB = lib
        except Exception as exc:  # noqa: BLE001 - any build failure means the native passes
            _STATUS = f"unavailable: {exc}"
            logger.warning("normswap: the fused CPU kernels of the L1 layer are unavailable "
                           "(%s); the native-kernel passes run instead (same results, slower "
                           "on channels_last and half tensors). NORMSWAP_CPU_KERNELS=0 "
                           "silences this.", exc)
            _LIB = None
        _TRIED = True
    return _LIB


def available() -> bool:
    """Whether the library is built (building it now if needed) and has its vector path."""
    return _ENABLED and _library() is not None


def status() -> str:
    """A one-line description: in use, disabled, not built yet, or why it is unavailable."""
    if not _ENABLED:
        return "disabled (set_cpu_kernels(False) or NORMSWAP_CPU_KERNELS=0)"
    return _STATUS


def _dims(x: Tensor) -> tuple[int, int, int, int] | None:
    """(N, C, R, cdim) when x is a dense contiguous or channels-innermost (N, C, *) tensor."""
    N, C = x.shape[0], x.shape[1]
    R = x.numel() // max(1, N * C)
    if x.is_contiguous():
        return N, C, R, (2 if R == 1 else 1)  # (N, C): rows of C channels
    if x.dim() < 3:
        return None
    # channels innermost (channels_last and its 1-d/3-d kin): from the strides, no view built;
    # size-1 dims may have any stride, as in is_contiguous
    shape, strides = x.shape, x.stride()
    expected = 1
    for d in (1, *range(x.dim() - 1, 1, -1), 0):
        if shape[d] != 1 and strides[d] != expected:
            return None
        expected *= shape[d]
    return N, C, R, 2


def usable(*tensors: Tensor) -> bool:
    """Whether the fused passes take these tensors: CPU, float32/float16/bfloat16, one shared
    dense layout, at least :data:`MIN_ELEMENTS` elements, outside ``torch.compile`` and
    ``torch.jit.trace``."""
    x = tensors[0]
    if not _ENABLED or x.device.type != "cpu" or x.dtype not in _CODES:
        return False
    if (x.numel() < MIN_ELEMENTS or x.dim() < 2 or torch.compiler.is_compiling()
            or torch.jit.is_tracing()):   # a trace would record no op for a foreign call
        return False
    if any(t.dtype != x.dtype or t.stride() != x.stride() or t.device != x.device
           or t.shape != x.shape for t in tensors[1:]):
        return False
    if _dims(x) is None or any(type(t) is not Tensor and not isinstance(t, torch.nn.Parameter)
                               for t in tensors):
        return False  # tensor subclasses (FakeTensor, functorch wrappers) keep the aten path
    return _library() is not None


def _require() -> Any:
    """The loaded library; RuntimeError naming the reason when it is unavailable."""
    lib = _library() if _ENABLED else None
    if lib is None:
        raise RuntimeError(f"normswap's fused CPU kernels: {status()}")
    return lib


def _vec(v: Tensor) -> Tensor:
    if v.dtype == torch.float32 and not v.requires_grad and v.is_contiguous():
        return v
    return v.detach().to(torch.float32).contiguous()


def _layout(x: Tensor) -> tuple[int, int, int, int]:
    dims = _dims(x)
    if dims is None:
        raise ValueError(f"normswap's fused CPU kernels take contiguous or channels-last "
                         f"tensors, got shape {tuple(x.shape)} with strides {x.stride()}")
    return dims


def channel_mean(x: Tensor) -> Tensor:
    """Per-channel mean (float32) of x (a tensor :func:`usable` accepts)."""
    N, C, R, cdim = _layout(x)
    out = torch.empty(C, dtype=torch.float64)
    _require().ns_channel_sum(_CODES[x.dtype], x.data_ptr(), N, C, R, cdim, out.data_ptr(),
                        torch.get_num_threads())
    return (out / (N * R)).to(torch.float32)


def group_extrema(x: Tensor, by_rows: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(per-channel mean, group max, group min) of x, the tables (C, G) float32 (views): groups
    are positions (max over the batch) or, with ``by_rows``, batch rows (max over positions)."""
    N, C, R, cdim = _layout(x)
    sums = torch.empty(C, dtype=torch.float64)
    G = N if by_rows else R
    rows_first = by_rows or cdim == 2         # tables (G, C) in memory, else (C, G)
    shape = (G, C) if rows_first else (C, G)
    gmax, gmin = torch.empty(shape), torch.empty(shape)
    _require().ns_group_extrema(_CODES[x.dtype], x.data_ptr(), N, C, R, cdim, int(by_rows),
                          sums.data_ptr(), gmax.data_ptr(), gmin.data_ptr(),
                          torch.get_num_threads())
    mu = (sums / (N * R)).to(torch.float32)
    return (mu, gmax.t(), gmin.t()) if rows_first else (mu, gmax, gmin)


def topk_rows(x: Tensor, mu: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-channel top-k of ``|x - mu|`` of an (N, C) tensor (any (N, C, 1, ...) too): values
    (C, k) float32 descending and row indices (C, k) int64; ties go to the lower row, a NaN
    ranks as +inf (its value, NaN, is returned)."""
    N, C, R, cdim = _layout(x)
    if R != 1 or not 1 <= k <= N:
        raise ValueError(f"topk_rows: needs an (N, C) tensor and 1 <= k <= N, got shape "
                         f"{tuple(x.shape)} and k={k}")
    m = _vec(mu)
    vals = torch.empty(C, k)
    idx = torch.empty(C, k, dtype=torch.int64)
    _require().ns_topk_rows(_CODES[x.dtype], x.data_ptr(), m.data_ptr(), N, C, k,
                            vals.data_ptr(), idx.data_ptr(), torch.get_num_threads())
    return vals, idx


def topk_abs(x: Tensor, mu: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-channel top-k of ``|x - mu|`` over all of x's ``N*R`` elements of a channel, in one
    pass: values (C, k) float32 descending, flat ``n*R + r`` indices (C, k) int64; ties go to
    the lower index, a NaN ranks as +inf. The work is one compare per element plus one
    insertion into a k-list per new candidate (about ``k*ln(n/k)`` on shuffled data, at most
    ``n`` on data whose ``|x - mu|`` grows along memory)."""
    N, C, R, cdim = _layout(x)
    if not 1 <= k <= N * R:
        raise ValueError(f"topk_abs: needs 1 <= k <= N*R, got k={k} for shape {tuple(x.shape)}")
    if cdim == 2:
        vals, rows = topk_rows(x if R == 1 else x.movedim(1, -1).reshape(N * R, C), mu, k)
        return vals, rows
    m = _vec(mu)
    vals = torch.empty(C, k)
    idx = torch.empty(C, k, dtype=torch.int64)
    _require().ns_topk_planes(_CODES[x.dtype], x.data_ptr(), m.data_ptr(), N, C, R, k,
                              vals.data_ptr(), idx.data_ptr(), torch.get_num_threads())
    return vals, idx


def topk_members(x: Tensor, mu: Tensor, groups: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-channel top-k of ``|x - mu|`` among the elements at positions ``groups`` (C, kg) of
    every sample: values (C, k) float32 descending, flat ``n*R + r`` indices (C, k) int64."""
    N, C, R, cdim = _layout(x)
    kg = groups.shape[1]
    if groups.shape[0] != C or not 1 <= k <= N * kg:
        raise ValueError(f"topk_members: groups must be (C, kg) and 1 <= k <= N*kg, got "
                         f"{tuple(groups.shape)} and k={k} for shape {tuple(x.shape)}")
    g = groups.to(torch.int64).contiguous()
    if g.numel() and not 0 <= int(g.min()) <= int(g.max()) < R:
        raise ValueError(f"topk_members: positions must lie in [0, {R})")
    m = _vec(mu)
    vals = torch.empty(C, k)
    flat = torch.empty(C, k, dtype=torch.int64)
    _require().ns_topk_members(_CODES[x.dtype], x.data_ptr(), m.data_ptr(), N, C, R, cdim,
                               g.data_ptr(), kg, k, vals.data_ptr(), flat.data_ptr(),
                               torch.get_num_threads())
    return vals, flat


def l1_sums(x: Tensor, mu: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum sign(x - mu), sum |x - mu|)`` per channel (float32)."""
    N, C, R, cdim = _layout(x)
    m = _vec(mu)
    sign_sum, abs_sum = torch.empty(C, dtype=torch.float64), torch.empty(C, dtype=torch.float64)
    _require().ns_l1_sums(_CODES[x.dtype], x.data_ptr(), m.data_ptr(), N, C, R, cdim,
                    sign_sum.data_ptr(), abs_sum.data_ptr(), torch.get_num_threads())
    return sign_sum.to(torch.float32), abs_sum.to(torch.float32)


def gradient_sums(g: Tensor, x: Tensor, mu: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum g, sum g*(x - mu))`` per channel (float32); g has x's dtype and strides."""
    N, C, R, cdim = _layout(x)
    m = _vec(mu)
    g_sum, gd_sum = torch.empty(C, dtype=torch.float64), torch.empty(C, dtype=torch.float64)
    _require().ns_gradient_sums(_CODES[x.dtype], g.data_ptr(), x.data_ptr(), m.data_ptr(), N, C, R,
                          cdim, g_sum.data_ptr(), gd_sum.data_ptr(), torch.get_num_threads())
    return g_sum.to(torch.float32), gd_sum.to(torch.float32)


def affine(x: Tensor, mu: Tensor, a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``(x - mu)*a + b`` per channel in x's dtype and layout (into ``out`` when given)."""
    N, C, R, cdim = _layout(x)
    out = torch.empty_like(x) if out is None else out
    m, av, bv = _vec(mu), _vec(a), _vec(b)
    _require().ns_affine(_CODES[x.dtype], x.data_ptr(), out.data_ptr(), m.data_ptr(), av.data_ptr(),
                   bv.data_ptr(), N, C, R, cdim, torch.get_num_threads())
    return out


def l1_input_gradient(g: Tensor, x: Tensor, mu: Tensor, alpha: Tensor, beta: Tensor,
                      kappa: Tensor) -> Tensor:
    """``alpha*g + beta - kappa*sign(x - mu)`` per channel in x's dtype and layout."""
    N, C, R, cdim = _layout(x)
    dx = torch.empty_like(x)
    m, av, bv, kv = _vec(mu), _vec(alpha), _vec(beta), _vec(kappa)
    _require().ns_l1_input_gradient(_CODES[x.dtype], g.data_ptr(), x.data_ptr(), dx.data_ptr(),
                              m.data_ptr(), av.data_ptr(), bv.data_ptr(), kv.data_ptr(), N, C, R,
                              cdim, torch.get_num_threads())
    return dx
