"""Peak memory and time of ``export_onnx`` on a ~200 MB model, against a plain export.

Each mode runs in its own subprocess; peak resident memory is ``ru_maxrss`` of that process.
Modes:

* ``baseline``: the model built, ``torch.onnx.export(dynamo=True)``, ``model_proto`` saved
  (what any ONNX export costs);
* ``fp32``: ``export_onnx(fp16=False)`` (export, validation, write);
* ``fp16``: ``export_onnx(fp16=True)`` in memory (range measurement, conversion, ORT CPU
  validation, emulated fp16 on 1 input);
* ``fp16_external``: the same through the external-data path (``external_data_threshold=1``:
  what a > 2 GB model goes through).

Ratios are against ``baseline`` of the same run. Also records, per mode, the model's size.

Usage::

    python benchmarks/bench_export_memory.py [--width 4096] [--layers 3]
        [--out benchmarks/results/export_memory.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("baseline", "fp32", "fp16", "fp16_external")


def _child(mode: str, width: int, layers: int, out_dir: str) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    import torch
    from torch import nn

    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*blocks, nn.Linear(width, 10)).eval()
    x = torch.randn(2, width)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    path = Path(out_dir) / f"{mode}.onnx"
    t0 = time.perf_counter()
    if mode == "baseline":
        import onnx

        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
        onnx.save_model(program.model_proto, str(path))
        size = path.stat().st_size
    else:
        from normswap.export import export_onnx

        kwargs = {"fp16": mode != "fp32", "n_random": 1, "emulate_max_inputs": 1}
        if mode == "fp16_external":
            kwargs["external_data_threshold"] = 1
        report = export_onnx(model, x, path, **kwargs)
        if not report.passed:
            raise SystemExit(f"{mode}: validation failed\n{report.validation.summary()}")
        size = report.file_size_bytes
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.numel() for p in model.parameters())
    return {"peak_rss_mb": peak / 1024, "rss_before_export_mb": base_rss / 1024,
            "seconds": seconds, "file_mb": size / 1e6, "fp32_weights_mb": params * 4 / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/export_memory.json"))
    parser.add_argument("--child", choices=MODES)
    parser.add_argument("--dir")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.width, args.layers, args.dir)))
        return
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        for mode in MODES:
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--dir", d,
                                   "--width", str(args.width), "--layers", str(args.layers)],
                                  capture_output=True, text=True, check=True)
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = results["baseline"]
    print(f"{'mode':<15} {'peak RSS MB':>12} {'x baseline':>11} {'extra MB':>9} "
          f"{'seconds':>8} {'file MB':>8}")
    for mode, r in results.items():
        r["peak_ratio"] = r["peak_rss_mb"] / base["peak_rss_mb"]
        r["extra_over_weights"] = (r["peak_rss_mb"] - r["rss_before_export_mb"]) / r[
            "fp32_weights_mb"]
        print(f"{mode:<15} {r['peak_rss_mb']:>12.0f} {r['peak_ratio']:>11.2f} "
              f"{r['peak_rss_mb'] - r['rss_before_export_mb']:>9.0f} {r['seconds']:>8.1f} "
              f"{r['file_mb']:>8.1f}")
    out = {"machine": platform.platform(), "processor": platform.processor(),
           "width": args.width, "layers": args.layers, "results": results,
           "note": "peak_rss_mb: ru_maxrss of a fresh process per mode; extra_over_weights: "
                   "(peak − RSS after building the model) / fp32 weight size"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
