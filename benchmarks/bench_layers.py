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

Writes ``benchmarks/results/layers.json`` (rows plus a machine description).
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

from normswap.norms import _functional as lp_functional  # noqa: E402
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
              ) -> tuple[float, float, float]:
    """Interleaved timing: (median ms of ref, median ms of fn, median of per-rep ratios)."""
    for _ in range(warmup):
        fn_ref()
        fn()
    t_ref, t_fn, ratios = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn_ref()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        t_ref.append((t1 - t0) * 1e3)
        t_fn.append((t2 - t1) * 1e3)
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(t_ref), statistics.median(t_fn), statistics.median(ratios)


def train_step(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    """A closure running forward + backward (input grad and parameter grads)."""
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        y = module(x)
        torch.autograd.grad(y, [x] + params, g)
    return step


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
    bw = bandwidth_gbs(5 if args.quick else 10)
    print(f"copy bandwidth {bw:.1f} GB/s; floor = {PASSES_FLOOR} passes / bandwidth")
    try:
        from normswap.norms import kalman  # noqa: F401

        with_kalman = hasattr(kalman, "KalmanBatchNorm2d")
    except Exception as exc:  # noqa: BLE001 - another helper's module may be mid-edit
        with_kalman = False
        print(f"note: Kalman row skipped (normswap.norms.kalman not importable: {exc})")
    shapes = {k: SHAPES[k] for k in (["32x64x56x56"] if args.quick else SHAPES)}
    dtypes = {k: DTYPES[k] for k in (["fp32"] if args.quick else args.dtypes)}
    modes = ["eager"] + ([] if args.no_compile else ["compile"])
    reps, warmup = (5, 2) if args.quick else (args.reps, 3)
    rows: list[dict[str, Any]] = []
    header = (f"{'layer':<11}{'path':<8}{'dtype':<6}{'layout':<7}{'shape':<15}"
              f"{'train ms':>9}{'BN ms':>8}{'ratio':>7}{'xfloor':>8}"
              f"{'eval ms':>9}{'BN ev':>8}{'ratio':>7}")
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
                    lp_functional.set_compile(mode == "compile")
                    for lname, factory in factories.items():
                        if mode == "compile" and lname == "Kalman":
                            continue
                        layer = factory(shape[1]).to(dtype).train()
                        layer_eval = factory(shape[1]).to(dtype).eval()
                        row = {"layer": lname, "path": mode, "dtype": dname, "layout": layout,
                               "shape": shape_name}
                        try:
                            tb, tl, r = time_pair(train_step(bn, x, g), train_step(layer, x, g),
                                                  reps, warmup)
                            eb, el, er = time_pair(eval_step(bn_eval, x), eval_step(layer_eval, x),
                                                   reps, warmup)
                        except Exception as exc:  # noqa: BLE001 - report and continue the grid
                            row["error"] = f"{type(exc).__name__}: {exc}"
                            print(f"{lname:<11}{mode:<8}{dname:<6}{layout:<7}{shape_name:<15} "
                                  f"error: {row['error'][:80]}")
                            rows.append(row)
                            continue
                        row.update({"train_ms": tl, "bn_train_ms": tb, "train_ratio": r,
                                    "floor_ms": floor_ms, "train_x_floor": tl / floor_ms,
                                    "eval_ms": el, "bn_eval_ms": eb, "eval_ratio": er})
                        rows.append(row)
                        print(f"{lname:<11}{mode:<8}{dname:<6}{layout:<7}{shape_name:<15}"
                              f"{tl:9.2f}{tb:8.2f}{r:7.2f}{tl / floor_ms:8.1f}"
                              f"{el:9.2f}{eb:8.2f}{er:7.2f}")
    lp_functional.set_compile(False)
    return {"machine": machine(), "copy_bandwidth_gbs": bw, "floor_passes": PASSES_FLOOR,
            "reps": reps, "rows": rows,
            "notes": "ratio = layer time / nn.BatchNorm time, interleaved per repetition, "
                     "median; compile rows exclude compile time (warm-up)"}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape, fp32, few reps")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile path")
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions per cell")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "layers.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    doc = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
