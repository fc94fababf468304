"""Speed of the normswap norm layers against native BatchNorm (issue "Speed").

For each layer x dtype x layout x batch shape it reports the median time of a train-mode
forward+backward and of an eval-mode forward, the ratio to ``nn.BatchNormXd`` measured
interleaved in the same run (each repetition times BN then the layer, the ratio is the median of
the per-repetition ratios, which cancels most load noise on a shared machine), and the multiple
of a memory-bandwidth floor. The floor is ``8 tensor passes * tensor bytes / bandwidth`` with the
bandwidth measured here by timing a large ``clone`` (read + write).

Usage::

    python benchmarks/bench_layers.py            # full grid, eager and torch.compile paths
    python benchmarks/bench_layers.py --quick    # 32x64x56x56 fp32 only, few repetitions
    python benchmarks/bench_layers.py --no-compile
    python benchmarks/bench_layers.py --no-native  # skip the fused-library-off rows
    python benchmarks/bench_layers.py --thp       # re-run with THP_MEM_ALLOC_ENABLE=1
    python benchmarks/bench_layers.py --keep-heap # re-run with glibc never returning memory
    python benchmarks/bench_layers.py --tile-mb 0 # L1 passes without batch tiles

On glibc, every fresh 25 MB tensor costs ~6k page faults (~10 ms here, more than the kernel that
fills it), so results depend on how many full-size buffers a layer allocates; ``--thp`` turns on
PyTorch's transparent-huge-page allocation, ``--keep-heap`` sets ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` so freed buffers are reused without faults (compute-bound numbers,
the most reproducible ones on a shared machine). The compiled
path is measured for the first shape only by default (``--compile-all`` for every shape): each
new dtype/layout costs a compile.

Each row also records the bytes one train forward saves for backward (``saved_bytes``, and
``bn_saved_bytes`` for native BN). Writes ``benchmarks/results/layers.json`` (rows plus a
machine description, the load average at start and end, and the batch-tile size).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from normswap.norms import _compile, _cpu_kernels, _layout  # noqa: E402
from normswap.norms.lp_batchnorm import (  # noqa: E402
    L1BatchNorm1d,
    L1BatchNorm2d,
    LinfBatchNorm1d,
    LinfBatchNorm2d,
)

logger = logging.getLogger("bench_layers")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHAPES = {
    "32x64x56x56": (32, 64, 56, 56),
    "256x2048 (1d)": (256, 2048),
    "2x64x56x56": (2, 64, 56, 56),
    "1x64x56x56": (1, 64, 56, 56),
}
PASSES_FLOOR = 8


def machine() -> dict[str, Any]:
    """A description of where the numbers were taken."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                   time.gmtime()),
    }


def bandwidth_gbs(reps: int) -> float:
    """Copy bandwidth (GB/s, read + write counted) from timing a 256 MiB clone."""
    src = torch.empty(64 * 1024 * 1024, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    best = min(times[2:])
    return 2 * src.numel() * 4 / best / 1e9


def make_layers(dims: int, with_kalman: bool) -> dict[str, Callable[[], nn.Module]]:
    """Layer factories for 1-d (N, C) or 2-d (N, C, H, W) inputs, C filled in later."""
    layers: dict[str, Callable[..., nn.Module]] = {}
    if dims == 2:
        layers.update({"L1": L1BatchNorm2d, "Linf k=1": LinfBatchNorm2d,
                       "Linf k=10": lambda c: LinfBatchNorm2d(c, k=10)})
    else:
        layers.update({"L1": L1BatchNorm1d, "Linf k=1": LinfBatchNorm1d,
                       "Linf k=10": lambda c: LinfBatchNorm1d(c, k=10)})
    if with_kalman:
        from normswap.norms import kalman

        layers["Kalman"] = kalman.KalmanBatchNorm2d if dims == 2 else kalman.KalmanBatchNorm1d
    return layers


def time_pair(fn_ref: Callable[[], Any], fn: Callable[[], Any], reps: int, warmup: int
              ) -> dict[str, float]:
    """Interleaved timing of ``fn_ref`` (BN) and ``fn`` on two clocks.

    Returns median ms of each on the wall clock and on the process CPU clock
    (``time.process_time``: robust when other jobs share the cores; with several threads it sums
    them), and the median of the per-repetition ratios ``fn / fn_ref`` on each clock.
    """
    for _ in range(warmup):
        fn_ref()
        fn()
    rows: list[tuple[float, float, float, float]] = []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn_ref()
        w1, c1 = time.perf_counter(), time.process_time()
        fn()
        w2, c2 = time.perf_counter(), time.process_time()
        rows.append((w1 - w0, w2 - w1, max(c1 - c0, 1e-9), c2 - c1))
    med = statistics.median
    return {"ref_wall_ms": med(r[0] for r in rows) * 1e3, "wall_ms": med(r[1] for r in rows) * 1e3,
            "ref_cpu_ms": med(r[2] for r in rows) * 1e3, "cpu_ms": med(r[3] for r in rows) * 1e3,
            "ratio_wall": med(r[1] / r[0] for r in rows), "ratio_cpu": med(r[3] / r[2] for r in rows)}


def train_step(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    """A closure running forward + backward (input grad and parameter grads)."""
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        y = module(x)
        torch.autograd.grad(y, [x] + params, g)
    return step


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes a train-mode forward saves for backward (unique storages, via saved_tensors_hooks).

    The input ``x`` counts (native BN saves it too); parameters count; tensors a layer kept
    outside ``save_for_backward`` would escape this count, so the layers keep none.
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


def eval_step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A closure running an eval-mode forward without autograd."""
    def step() -> None:
        with torch.no_grad():
            module(x)
    return step


def bn_for(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Module:
    """Native BatchNorm for the shape, parameters in the input dtype (like ``model.half()``)."""
    cls = nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d
    return cls(shape[1]).to(dtype)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure the grid and return the JSON document."""
    torch.manual_seed(0)
    load_start = os.getloadavg()
    bw = bandwidth_gbs(5 if args.quick else 10)
    print(f"copy bandwidth {bw:.1f} GB/s; floor = {PASSES_FLOOR} passes / bandwidth; "
          f"threads={torch.get_num_threads()}; "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '0')}; "
          f"keep-heap={'MALLOC_TRIM_THRESHOLD_' in os.environ}")
    try:
        from normswap.norms import kalman  # noqa: F401

        with_kalman = hasattr(kalman, "KalmanBatchNorm2d")
    except Exception as exc:  # noqa: BLE001 - another helper's module may be mid-edit
        with_kalman = False
        print(f"note: Kalman row skipped (normswap.norms.kalman not importable: {exc})")
    shapes = {k: SHAPES[k] for k in (["32x64x56x56"] if args.quick else SHAPES)}
    first = next(iter(shapes))
    dtypes = {k: DTYPES[k] for k in (["fp32"] if args.quick else args.dtypes)}
    modes = (["eager"] + ([] if args.no_native else ["native"])
             + ([] if args.no_compile else ["compile"]))
    _cpu_kernels.available()  # builds the library now, outside the timed runs
    fused_status = _cpu_kernels.status()
    print(f"fused CPU kernels: {fused_status}")
    reps, warmup = (5, 2) if args.quick else (args.reps, 3)
    rows: list[dict[str, Any]] = []
    header = (f"{'layer':<10}{'path':<8}{'dtype':<5}{'layout':<7}{'shape':<14}"
              f"{'train ms':>9}{'BN ms':>8}{'r_wall':>7}{'r_cpu':>7}{'xfloor':>7}"
              f"{'eval ms':>8}{'BN ev':>7}{'r_wall':>7}{'r_cpu':>7}{'saved/BN':>9}")
    print(header)
    print("-" * len(header))
    for shape_name, shape in shapes.items():
        layouts = ["NCHW", "NHWC"] if len(shape) == 4 else ["-"]
        for dname, dtype in dtypes.items():
            for layout in layouts:
                fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
                x = torch.randn(shape).mul_(2).add_(1).to(dtype).contiguous(memory_format=fmt)
                x.requires_grad_(True)
                g = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
                floor_ms = PASSES_FLOOR * x.numel() * x.element_size() / (bw * 1e9) * 1e3
                bn = bn_for(shape, dtype).train()
                bn_eval = bn_for(shape, dtype).eval()
                factories = make_layers(len(shape) - 2 if len(shape) == 4 else 1, with_kalman)
                for mode in modes:
                    if mode == "compile" and not (args.compile_all or shape_name == first):
                        continue
                    _compile.set_compile(mode == "compile")
                    _cpu_kernels.set_cpu_kernels(mode == "eager")
                    for lname, factory in factories.items():
                        if mode != "eager" and lname == "Kalman":
                            continue
                        layer = factory(shape[1]).to(dtype).train()
                        layer_eval = factory(shape[1]).to(dtype).eval()
                        row = {"layer": lname, "path": mode, "dtype": dname, "layout": layout,
                               "shape": shape_name}
                        try:
                            tr = time_pair(train_step(bn, x, g), train_step(layer, x, g), reps,
                                           warmup)
                            ev = time_pair(eval_step(bn_eval, x), eval_step(layer_eval, x), reps,
                                           warmup)
                        except Exception as exc:  # noqa: BLE001 - report and continue the grid
                            row["error"] = f"{type(exc).__name__}: {exc}"
                            print(f"{lname:<10}{mode:<8}{dname:<5}{layout:<7}{shape_name:<14} "
                                  f"error: {row['error'][:80]}")
                            rows.append(row)
                            continue
                        row.update({"train": tr, "eval": ev, "floor_ms": floor_ms,
                                    "train_x_floor": tr["cpu_ms"] / floor_ms,
                                    "saved_bytes": saved_bytes(layer, x),
                                    "bn_saved_bytes": saved_bytes(bn, x)})
                        rows.append(row)
                        print(f"{lname:<10}{mode:<8}{dname:<5}{layout:<7}{shape_name:<14}"
                              f"{tr['wall_ms']:9.2f}{tr['ref_wall_ms']:8.2f}"
                              f"{tr['ratio_wall']:7.2f}{tr['ratio_cpu']:7.2f}"
                              f"{tr['cpu_ms'] / floor_ms:7.1f}"
                              f"{ev['wall_ms']:8.2f}{ev['ref_wall_ms']:7.2f}"
                              f"{ev['ratio_wall']:7.2f}{ev['ratio_cpu']:7.2f}"
                              f"{row['saved_bytes'] / row['bn_saved_bytes']:9.4f}")
    _compile.set_compile(False)
    _cpu_kernels.set_cpu_kernels(True)
    return {"machine": machine(), "cpu_kernels": fused_status, "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
            "malloc_keep_heap": "MALLOC_TRIM_THRESHOLD_" in os.environ,
            "copy_bandwidth_gbs": bw, "floor_passes": PASSES_FLOOR,
            "tile_bytes": _layout.TILE_BYTES,
            "reps": reps, "rows": rows,
            "notes": "paths: eager = the default (fused CPU library where it is available), "
                     "native = the native-kernel passes (library off), compile = torch.compile; "
                     "ratio = layer time / nn.BatchNorm time, interleaved per repetition, "
                     "median of per-rep ratios, on the wall and the process-CPU clock; xfloor = "
                     "CPU ms / floor; compile rows exclude compile time (warm-up); saved_bytes = "
                     "bytes saved for backward by one train forward (unique storages, "
                     "saved_tensors_hooks), bn_saved_bytes the same for nn.BatchNorm",
            "load_average_start_end": [load_start, os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape, fp32, few reps")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile path")
    parser.add_argument("--no-native", action="store_true",
                        help="skip the native-kernel path (the fused CPU library turned off)")
    parser.add_argument("--reps", type=int, default=11, help="timed repetitions per cell")
    parser.add_argument("--compile-all", action="store_true",
                        help="measure the compiled path for every shape (slow: compiles)")
    parser.add_argument("--thp", action="store_true",
                        help="re-run under THP_MEM_ALLOC_ENABLE=1 (huge-page allocations)")
    parser.add_argument("--keep-heap", action="store_true",
                        help="re-run with glibc malloc keeping freed memory (no page faults)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--tile-mb", type=float, default=None,
                        help="batch-tile size of the L1 passes in MiB (0: no tiling; default "
                             f"{_layout.TILE_BYTES / 2**20:g})")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/layers[_thp].json)")
    args = parser.parse_args(argv)
    want = {}
    if args.thp:
        want["THP_MEM_ALLOC_ENABLE"] = "1"
    if args.keep_heap:
        want.update(MALLOC_MMAP_THRESHOLD_=str(1 << 40), MALLOC_TRIM_THRESHOLD_=str(1 << 40))
    if any(os.environ.get(k) != v for k, v in want.items()):
        env = dict(os.environ, **want)
        os.execve(sys.executable, [sys.executable, __file__] + (argv or sys.argv[1:]), env)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tile_mb is not None:
        _layout.TILE_BYTES = int(args.tile_mb * 2**20) if args.tile_mb > 0 else 2**62
    doc = run(args)
    if args.out is None:
        name = "layers" + ("_thp" if args.thp else "") + ("_keepheap" if args.keep_heap else "")
        name += ".json"
        args.out = Path(__file__).resolve().parent / "results" / name
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
