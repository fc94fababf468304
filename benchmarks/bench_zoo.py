"""Conversion time over the zoo sweep: capture + swap + verify (l1) of every model of
tests/zoo, the slowest five, a ResNet-50 swap + verify and a YOLOv8n
``export_onnx(fold(swap(m, "l1")))``. Writes benchmarks/results/zoo.json.

Every time is put next to the native baseline of the same run: one eval forward of the original
model on the same input (verification alone needs two forwards, so ~2x that forward is a floor).

    nice python benchmarks/bench_zoo.py                   # every zoo
    nice python benchmarks/bench_zoo.py --zoo timm --zoo smp --out /tmp/zoo.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the zoo cases live in tests/zoo

import torch  # noqa: E402

import normswap  # noqa: E402
from models import median_seconds  # noqa: E402  (benchmarks/ is on sys.path as a script)
from tests.zoo._harness import ZooCase, prepare, zoo_threads  # noqa: E402
from tests.zoo.cases import ZOOS, all_cases  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "zoo.json"


def _forward(model: torch.nn.Module, inputs: tuple[Any, ...]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return model(*inputs)
    return run


def bench_case(case: ZooCase, repeat: int) -> dict[str, Any]:
    """Build time, eval forward (baseline) and l1 capture + swap + verify time of one case."""
    t0 = time.perf_counter()
    model, inputs = prepare(case)
    row: dict[str, Any] = {"model": case.id, "build_s": round(time.perf_counter() - t0, 4)}
    fwd = _forward(model, inputs)
    fwd()  # warm-up
    base = median_seconds(fwd, repeat)
    row["forward_s"] = round(base, 4)
    try:
        t = median_seconds(lambda: normswap.swap(model, "l1", example_inputs=inputs), repeat)
    except Exception as exc:  # noqa: BLE001 - a model the swap refuses is recorded, not fatal
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return row
    row["swap_verify_s"] = round(t, 4)
    row["ratio_to_forward"] = round(t / base, 2) if base > 0 else None
    return row


def bench_resnet50(repeat: int) -> dict[str, Any]:
    """torchvision ResNet-50 (randomised BN), 1x3x224x224: l1 swap + verify."""
    import torchvision

    case = ZooCase("torchvision", "resnet50@224",
                   lambda: (torchvision.models.resnet50(), (torch.randn(1, 3, 224, 224),)))
    return bench_case(case, repeat)


def bench_yolov8n_export(repeat: int) -> dict[str, Any]:
    """ultralytics YOLOv8n (from its yaml), 1x3x640x640: swap, fold and fp16 export + ORT
    validation, each timed, and the whole ``export_onnx(fold(swap(m, "l1")))``."""
    from tests.zoo.cases_ultralytics import offline_env

    offline_env()
    from ultralytics.nn.tasks import DetectionModel

    case = ZooCase("ultralytics", "yolov8n@640",
                   lambda: (DetectionModel("yolov8n.yaml", verbose=False),
                            (torch.randn(1, 3, 640, 640),)))
    model, inputs = prepare(case)
    fwd = _forward(model, inputs)
    fwd()
    row: dict[str, Any] = {"model": case.id, "forward_s": round(median_seconds(fwd, 3), 4)}
    steps: dict[str, list[float]] = {"swap_s": [], "fold_s": [], "export_s": [], "total_s": []}
    with tempfile.TemporaryDirectory(prefix="bench-zoo-") as tmp:
        for i in range(repeat):
            t0 = time.perf_counter()
            swapped = normswap.swap(model, "l1", example_inputs=inputs)
            t1 = time.perf_counter()
            folded = normswap.fold(swapped, example_inputs=inputs)
            t2 = time.perf_counter()
            report = normswap.export_onnx(folded, inputs, Path(tmp) / f"y{i}.onnx", fp16=True,
                                          strict=False)
            t3 = time.perf_counter()
            for k, v in (("swap_s", t1 - t0), ("fold_s", t2 - t1), ("export_s", t3 - t2),
                         ("total_s", t3 - t0)):
                steps[k].append(v)
            row["validation_passed"] = bool(report.passed)
    row.update({k: round(statistics.median(v), 3) for k, v in steps.items()})
    row["ratio_to_forward"] = round(row["total_s"] / row["forward_s"], 1)
    return row


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", action="append", choices=sorted(ZOOS))
    p.add_argument("--repeat", type=int, default=1, help="timed repetitions per model")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(zoo_threads())  # see tests/zoo/_harness.py: zoo_threads
    t0 = time.perf_counter()
    warm = ZooCase("torchvision", "warm-up", lambda: (torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)), (torch.randn(2, 3, 8, 8),)))
    bench_case(warm, 1)  # lazy imports and first-call caches out of the first model's time
    rows = []
    for case in all_cases(args.zoo):
        if case.export is not None and "parameters" in case.export:
            continue  # too large for this benchmark too (see the case's reason)
        row = bench_case(case, args.repeat)
        rows.append(row)
        print(json.dumps(row), flush=True)
        gc.collect()
    timed = [r for r in rows if "swap_verify_s" in r]
    slowest = sorted(timed, key=lambda r: -r["swap_verify_s"])[:5]
    result = {
        "machine": _machine(),
        "what": "l1 capture + swap + verify per model (median of --repeat), against one eval "
                "forward of the original on the same input",
        "models": len(rows), "failed": [r for r in rows if "error" in r],
        "swap_verify_total_s": round(sum(r["swap_verify_s"] for r in timed), 2),
        "forward_total_s": round(sum(r["forward_s"] for r in timed), 2),
        "slowest5": slowest,
        "resnet50": bench_resnet50(max(args.repeat, 5)),
        "yolov8n_export": bench_yolov8n_export(max(args.repeat, 2)),
        "per_model": rows,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("models", "swap_verify_total_s", "slowest5",
                                             "resnet50", "yolov8n_export", "wall_s")}, indent=1))


if __name__ == "__main__":
    main()
