"""ONNX Runtime latency and file size: fp32 vs range-guarded fp16, for a BN-folded model.

Default model: torchvision ResNet-50 (weights=None) with randomised BatchNorm statistics,
folded with ``normswap.fold``. ``--model-fn module:function`` benchmarks any other model
factory (e.g. an L1-swapped ResNet-50); it is folded as well unless ``--no-fold``.

Usage::

    python benchmarks/bench_onnx.py [--size 224] [--batch 1] [--repeats 20]
        [--model-fn pkg.mod:factory] [--out benchmarks/results/onnx.json]

Prints a table (median latency per provider, file size, ratios fp16/fp32) and writes JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from normswap.export import export_onnx  # noqa: E402
import normswap  # noqa: E402

from models import randomise_bn  # noqa: E402  (benchmarks/ is on sys.path)

log = logging.getLogger("bench_onnx")


def default_model() -> nn.Module:
    """ResNet-50, no pretrained weights, randomised BN statistics."""
    import torchvision

    return randomise_bn(torchvision.models.resnet50(weights=None))


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """Resolve ``package.module:function``."""
    mod_name, _, fn_name = spec.partition(":")
    if not fn_name:
        raise SystemExit(f"--model-fn must look like 'package.module:function', got {spec!r}")
    return getattr(importlib.import_module(mod_name), fn_name)


def latency_ms(path: Path, x: np.ndarray, provider: str, repeats: int, warmup: int) -> dict[str, float]:
    """Median/min/p90 wall time of ``session.run`` in milliseconds."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=[provider])
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "min_ms": times[0],
            "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the JSON record."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-fn", default=None, help="package.module:function returning a model")
    p.add_argument("--no-fold", action="store_true", help="do not fold the model first")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "onnx.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("bench_onnx", "normswap"):
        logging.getLogger(name).setLevel(logging.INFO)
    import onnxruntime as ort

    torch.manual_seed(0)
    model = (load_factory(args.model_fn)() if args.model_fn else default_model()).eval()
    name = args.model_fn or "torchvision.resnet50(randomised BN)"
    x = torch.randn(args.batch, 3, args.size, args.size)
    if not args.no_fold:
        model = normswap.fold(model, example_inputs=(x,))
        fold_report = model.normswap_report
        log.info("folded: %d changes, %d skips", len(fold_report.changes), len(fold_report.skips))
    providers = [pv for pv in ("CPUExecutionProvider", "CUDAExecutionProvider")
                 if pv in ort.get_available_providers()]
    record: dict[str, Any] = {
        "model": name, "folded": not args.no_fold, "input": list(x.shape),
        "repeats": args.repeats, "torch": torch.__version__, "onnxruntime": ort.__version__,
        "machine": platform.platform(), "processor": platform.processor(),
        "threads": torch.get_num_threads(), "variants": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for variant, fp16 in (("fp32", False), ("fp16", True)):
            path = Path(tmp) / f"{variant}.onnx"
            t0 = time.perf_counter()
            report = export_onnx(model, x, path, fp16=fp16, strict=False)
            export_s = time.perf_counter() - t0
            val = report.validation
            entry: dict[str, Any] = {
                "file_size_bytes": path.stat().st_size, "export_s": export_s,
                "validation_passed": report.passed,
                "fp16_initializer_fraction": report.fp16_initializer_fraction,
                "fp32_nodes": len(report.fp32_nodes),
                "cosine_min": min((m.cosine_min for m in val.metrics), default=None) if val else None,
                "max_abs": max((m.max_abs for m in val.metrics), default=None) if val else None,
                "cpu_fp16_fallback_ops": report.cpu_fp16_fallback_ops,
                "latency": {},
            }
            for provider in providers:
                entry["latency"][provider] = latency_ms(path, x.numpy(), provider, args.repeats,
                                                        args.warmup)
            record["variants"][variant] = entry
    fp32, fp16 = record["variants"]["fp32"], record["variants"]["fp16"]
    record["ratios_fp16_over_fp32"] = {
        "file_size": fp16["file_size_bytes"] / fp32["file_size_bytes"],
        **{f"latency_{pv}": fp16["latency"][pv]["median_ms"] / fp32["latency"][pv]["median_ms"]
           for pv in providers},
    }
    rows = [("variant", "size MB", *[f"{pv.replace('ExecutionProvider', '')} median ms"
                                     for pv in providers], "cos min", "valid")]
    for variant in ("fp32", "fp16"):
        e = record["variants"][variant]
        rows.append((variant, f"{e['file_size_bytes'] / 1e6:.2f}",
                     *[f"{e['latency'][pv]['median_ms']:.2f}" for pv in providers],
                     f"{e['cosine_min']:.7f}" if e["cosine_min"] is not None else "-",
                     str(e["validation_passed"])))
    ratios = record["ratios_fp16_over_fp32"]
    rows.append(("fp16/fp32", f"{ratios['file_size']:.3f}",
                 *[f"{ratios[f'latency_{pv}']:.3f}" for pv in providers], "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{name}, input {tuple(x.shape)}, {args.repeats} repeats"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    sys.stdout.write("\n".join(lines) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    sys.stdout.write(f"wrote {args.out}\n")
    return record


if __name__ == "__main__":
    main()
