"""One whole train step of a converted torchvision ResNet-50 against its BatchNorm original (CPU).

Forward, cross-entropy loss, backward and an SGD update of ``normswap.swap(resnet50, method)``
against the same step of the BatchNorm original, interleaved per repetition (each repetition
times the original, then every converted model), the ratio being the median of the
per-repetition ratios. In float32, contiguous and channels_last, and under CPU bfloat16
autocast; random data, batch 16 at 112x112 by default. The converted models use the default
eager path (the fused CPU library where it is available: its status is recorded).

Usage::

    python benchmarks/bench_train_step.py                 # l1 and linf, 7 repetitions
    python benchmarks/bench_train_step.py --batch 8 --size 224 --reps 5

Writes ``benchmarks/results/train_step_cpu.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import normswap  # noqa: E402
from bench_layers import machine  # noqa: E402
from models import randomise_bn  # noqa: E402
from normswap.norms import _cpu_kernels  # noqa: E402


def sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: bool
             ) -> Callable[[], None]:
    """A closure running forward, loss, backward and one SGD update."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return step


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every configuration and return the JSON document."""
    torch.manual_seed(0)
    original = randomise_bn(torchvision.models.resnet50()).train()
    converted = {m: normswap.swap(original, m).train() for m in args.methods}
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    _cpu_kernels.available()
    rows = []
    for config in args.configs:
        fmt = torch.channels_last if config == "fp32 NHWC" else torch.contiguous_format
        autocast = config == "bf16 autocast"
        models = {"bn": copy.deepcopy(original), **{m: copy.deepcopy(c)
                                                    for m, c in converted.items()}}
        for m in models.values():
            m.to(memory_format=fmt)
        xi = x.contiguous(memory_format=fmt)
        steps = {name: sgd_step(m, xi, y, autocast) for name, m in models.items()}
        for fn in steps.values():           # warm-up (and the library's one-time build)
            fn()
            fn()
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.reps):
            for name, fn in steps.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        base = times["bn"]
        row = {"config": config, "bn_ms": statistics.median(base) * 1e3}
        for name in converted:
            ratios = [t / b for t, b in zip(times[name], base)]
            row[name] = {"ms": statistics.median(times[name]) * 1e3,
                         "ratio": statistics.median(ratios)}
        rows.append(row)
        print(f"{config:<14} BN {row['bn_ms']:8.1f} ms  " + "  ".join(
            f"{n} {row[n]['ms']:8.1f} ms ({row[n]['ratio']:.3f}x)" for n in converted))
    return {"machine": machine(), "cpu_kernels": _cpu_kernels.status(), "batch": args.batch,
            "size": args.size, "reps": args.reps, "rows": rows,
            "notes": "ratio = median over repetitions of (converted step / BN step), timed "
                     "interleaved; step = zero_grad, forward, cross-entropy, backward, SGD",
            "load_average_start_end": [args.load_start, os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["l1", "linf"])
    parser.add_argument("--configs", nargs="+",
                        default=["fp32 NCHW", "fp32 NHWC", "bf16 autocast"],
                        choices=["fp32 NCHW", "fp32 NHWC", "bf16 autocast"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "train_step_cpu.json")
    args = parser.parse_args(argv)
    args.load_start = os.getloadavg()
    doc = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
