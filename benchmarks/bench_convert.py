"""Conversion speed: swap + verification of ResNet-50, and the whole torchvision sweep.

Prints a table and writes benchmarks/results/convert.json. Conversion time is compared with the
native baseline of the same run: one eval forward of the original model on the same input (the
verification needs two forwards, so ~2x that forward is its floor).

    python benchmarks/bench_convert.py            # ResNet-50, l1/linf/kalman
    python benchmarks/bench_convert.py --sweep    # + every torchvision classifier with BN (l1)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torchvision

import normswap
from models import median_seconds, randomise_bn  # benchmarks/ is on sys.path when run as a script

SKIP_SWEEP = {"regnet_y_128gf"}


def bench_resnet50(repeat: int, size: int) -> list[dict[str, object]]:
    model = randomise_bn(torchvision.models.resnet50()).eval()
    x = torch.randn(1, 3, size, size)

    def fwd() -> None:
        with torch.no_grad():
            model(x)

    base = median_seconds(fwd, repeat, warmup=1)
    rows = []
    for method in ("l1", "linf", "kalman"):
        t = median_seconds(lambda: normswap.swap(model, method, example_inputs=x), repeat,
                           warmup=1)
        noverify = median_seconds(lambda: normswap.swap(model, method, verify=False), repeat,
                                  warmup=1)
        rows.append({"model": "resnet50", "method": method, "input": list(x.shape),
                     "swap_verify_s": round(t, 4), "swap_only_s": round(noverify, 4),
                     "forward_s": round(base, 4), "ratio_to_forward": round(t / base, 2)})
    return rows


def bench_sweep() -> dict[str, object]:
    from torch.nn.modules.batchnorm import _BatchNorm

    names = torchvision.models.list_models(module=torchvision.models)
    per: dict[str, float] = {}
    rel: dict[str, float] = {}
    t0 = time.perf_counter()
    for name in names:
        if name in SKIP_SWEEP:
            continue
        model = torchvision.models.get_model(name, weights=None).eval()
        if not any(isinstance(m, _BatchNorm) for m in model.modules()):
            continue
        randomise_bn(model)
        size = 224 if name == "maxvit_t" else 96
        t = time.perf_counter()
        out = normswap.swap(model, "l1", example_inputs=torch.randn(1, 3, size, size))
        per[name] = round(time.perf_counter() - t, 3)
        rel[name] = float(out.normswap_report.metrics["verify.rel"])
    return {"models": len(per), "total_s": round(time.perf_counter() - t0, 1),
            "swap_verify_total_s": round(sum(per.values()), 1), "per_model_s": per,
            "verify_rel": rel, "max_verify_rel": max(rel.values()),
            "skipped": sorted(SKIP_SWEEP)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "convert.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = bench_resnet50(args.repeat, args.size)
    print(f"{'model':<10} {'method':<7} {'swap+verify s':>13} {'swap only s':>11} "
          f"{'1 forward s':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:<10} {r['method']:<7} {r['swap_verify_s']:>13} {r['swap_only_s']:>11} "
              f"{r['forward_s']:>11} {r['ratio_to_forward']:>6}")
    result: dict[str, object] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "resnet50": rows}
    if args.sweep:
        sweep = bench_sweep()
        result["sweep"] = sweep
        print(f"torchvision sweep (l1, swap + verify): {sweep['models']} models in "
              f"{sweep['total_s']} s including model construction "
              f"({sweep['swap_verify_total_s']} s in swap); worst eval relative error "
              f"{sweep['max_verify_rel']:.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
