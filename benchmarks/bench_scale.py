"""Peak memory and time of convert and export as the model grows: timm's RegNetY ladder.

Every measurement runs in a fresh interpreter (``--child``), so its peak resident memory (the
kernel's high-water mark ``VmHWM``, what ``ru_maxrss`` reports) is its own. Steps, each on ``timm.create_model(NAME, pretrained=False)`` with
randomised BatchNorm statistics and a 1x3x64x64 input (activations stay small next to the
weights):

* ``convert``: ``normswap.swap(model, "l1", example_inputs=x)`` (capture, swap, verification);
* ``cli``: ``normswap convert ckpt.pt --arch timm:NAME --to l1 -o out.pt --input-shape
  1,3,64,64`` in process (build the model, read the checkpoint, swap + verify, write), from a
  checkpoint a ``ckpt`` child writes first;
* ``export``: ``normswap.export_onnx(normswap.fold(model), x, path, fp16=True)`` (fold with its
  verification, ONNX export, range measurement, fp16 conversion, validation in ONNX Runtime
  and emulated fp16, write; past 2 GB through the external-data path);
* native baselines of the same run: ``copy``: ``copy.deepcopy(model)`` and one eval forward
  of each (the floor of a verified conversion); ``onnx``: ``torch.onnx.export(dynamo=True)``
  and ``ONNXProgram.save`` (what any ONNX export costs).

Per step: (a) the peak RSS of the process, (b) the model's fp32 parameter size, (c) the peak
minus the RSS just after the model was built (what the step itself costs), the ratios
(a)/(b) and (c)/(b), the wall time, and a timeline: RSS at each of normswap's progress stages
and the peak RSS between consecutive stage events (``VmHWM``, reset through
``/proc/self/clear_refs`` at each event), which says where the memory goes. For ``cli``, (c) is taken against the RSS after building of the ``convert`` child of
the same model (same imports, same model): the CLI builds the model itself.

Usage::

    python benchmarks/bench_scale.py --quick              # the two smallest models
    python benchmarks/bench_scale.py --max-params 700e6   # the whole ladder, up to regnety_1280
        [--steps convert,cli,export,copy,onnx] [--repeats N] [--out benchmarks/results/scale.json]
    python benchmarks/bench_scale.py --plot-only          # redraw scale.png from scale.json

Run big models with ``nice`` on a quiet machine: regnety_1280 is 2.6 GB of fp32 weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# (name, parameters): timm's RegNetY from 4 to 128 GFLOPs
LADDER = (("regnety_040", 20.6e6), ("regnety_080", 39.2e6), ("regnety_160", 83.6e6),
          ("regnety_320", 145.0e6), ("regnety_640", 281.4e6), ("regnety_1280", 644.8e6))
STEPS = ("convert", "cli", "export", "copy", "onnx")
SIZE = 64


# --------------------------------------------------------------------------- child process
def _rss_mb() -> float:
    return _status_mb()[0]


def _status_mb() -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset) of this process, in MiB."""
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                fields[line.split(":")[0]] = int(line.split()[1]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


class _Timeline(logging.Handler):
    """RSS at every progress event of normswap and the peak RSS since the previous event.

    The peak is the kernel's own high-water mark (``VmHWM``), reset at each event: exact,
    also for spikes inside one C call that holds the GIL (a sampling thread misses those).
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[dict[str, Any]] = []
        self.peak_mb = _status_mb()[1]
        self.resets = _reset_peak()
        self._t0 = time.perf_counter()

    def mark(self, label: str) -> None:
        rss, peak = _status_mb()
        self.peak_mb = max(self.peak_mb, peak)
        self.events.append({"event": label, "t_s": round(time.perf_counter() - self._t0, 2),
                            "rss_mb": round(rss), "peak_since_last_mb": round(peak)})
        if self.resets:
            _reset_peak()

    def emit(self, record: logging.LogRecord) -> None:
        self.mark(record.getMessage())


def _build(name: str) -> Any:
    import timm
    import torch

    from models import randomise_bn  # benchmarks/ is on sys.path when run as a script

    torch.manual_seed(0)
    return randomise_bn(timm.create_model(name, pretrained=False)).eval()


def _child(step: str, name: str, work: Path, repeat_index: int) -> dict[str, Any]:
    import gc

    import timm  # noqa: F401 - imported before the baseline, as the CLI imports it
    import torch

    import normswap
    import normswap.cli

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    timeline = _Timeline()
    progress = logging.getLogger("normswap.progress")
    progress.setLevel(logging.INFO)
    progress.addHandler(timeline)
    progress.propagate = False
    x = torch.randn(1, 3, SIZE, SIZE)
    out: dict[str, Any] = {"step": step, "model": name}
    ckpt = work / f"{name}.pt"
    if step == "cli":
        timeline.mark("imports done")
        out["rss_before_mb"] = _rss_mb()
        dest = work / f"{name}_l1_{repeat_index}.pt"
        t0 = time.perf_counter()
        code = normswap.cli.main(["convert", str(ckpt), "--arch", f"timm:{name}", "--to", "l1",
                                  "-o", str(dest), "--input-shape", f"1,3,{SIZE},{SIZE}", "-q",
                                  "--force"])
        out["seconds"] = time.perf_counter() - t0
        if code != 0:
            raise SystemExit(f"normswap convert exited {code}")
        timeline.mark("cli done")
        out["output_mb"] = dest.stat().st_size / 1e6
        dest.unlink()
        params = sum(p.numel() for p in _meta_model(name).parameters())
    else:
        model = _build(name)
        params = sum(p.numel() for p in model.parameters())
        gc.collect()
        out["rss_before_mb"] = _rss_mb()
        timeline.mark("model built")
        out["peak_during_build_mb"] = timeline.peak_mb
        t0 = time.perf_counter()
        if step == "ckpt":
            torch.save(model.state_dict(), ckpt)
        elif step == "convert":
            result = normswap.swap(model, "l1", example_inputs=x)
            out["verify_rel"] = float(result.normswap_report.metrics["verify.rel"])
        elif step == "copy":
            import copy

            twin = copy.deepcopy(model)
            with torch.no_grad():
                model(x)
                twin(x)
        elif step == "export":
            folded = normswap.fold(model, example_inputs=x)
            out["fold_seconds"] = time.perf_counter() - t0
            timeline.mark("fold returned")
            path = work / f"{name}_{repeat_index}.onnx"
            report = normswap.export_onnx(folded, x, path, fp16=True, force=True)
            if not report.passed:
                raise SystemExit(f"{name}: export validation failed\n"
                                 f"{report.validation.summary()}")
            out["export_seconds"] = time.perf_counter() - t0 - out["fold_seconds"]
            out["file_mb"] = report.file_size_bytes / 1e6
            out["external_data"] = bool(report.external_data_path)
            out["export_timings_s"] = {k: round(v, 2) for k, v in report.timings.items()}
            out["verdict"] = report.validation.verdict() if report.validation else ""
            for p in (path, path.parent / f"{path.name}.data"):
                p.unlink(missing_ok=True)
        elif step == "onnx":
            path = work / f"{name}_native_{repeat_index}.onnx"
            program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                        dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
            program.save(str(path), external_data=params * 4 > 2 ** 31 - 2 ** 26)
            for p in (path, path.parent / f"{path.name}.data"):
                p.unlink(missing_ok=True)
        else:
            raise SystemExit(f"unknown step {step}")
        out["seconds"] = time.perf_counter() - t0
        timeline.mark(f"{step} done")
    out.update(params=params, fp32_mb=params * 4 / 2 ** 20,
               peak_rss_mb=max(timeline.peak_mb, _status_mb()[1]),
               timeline=timeline.events)
    return out


def _meta_model(name: str) -> Any:
    import timm
    import torch

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


# --------------------------------------------------------------------------- parent
def _run_child(step: str, name: str, work: Path, index: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", step, "--model", name, "--dir", str(work),
           "--index", str(index)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"step": step, "model": name, "error": f"exit {proc.returncode}",
                "stderr_tail": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summarise(runs: list[dict[str, Any]], built_mb: float | None) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[-1].get("error"), "stderr_tail": runs[-1].get("stderr_tail")}
    med = {k: statistics.median(r[k] for r in ok) for k in ("seconds", "peak_rss_mb")}
    first = ok[0]
    before = built_mb if first["step"] == "cli" and built_mb else statistics.median(
        r["rss_before_mb"] for r in ok)
    fp32 = first["fp32_mb"]
    row = {"params": first["params"], "fp32_mb": round(fp32, 1), "runs": len(ok),
           "seconds": round(med["seconds"], 2), "seconds_all": [round(r["seconds"], 2) for r in ok],
           "peak_rss_mb": round(med["peak_rss_mb"]), "rss_after_build_mb": round(before),
           "step_mb": round(med["peak_rss_mb"] - before),
           "peak_over_fp32": round(med["peak_rss_mb"] / fp32, 2),
           "step_over_fp32": round((med["peak_rss_mb"] - before) / fp32, 2),
           "timeline": first["timeline"]}
    for key in ("fold_seconds", "export_seconds", "file_mb", "external_data", "export_timings_s",
                "verdict", "verify_rel", "output_mb", "peak_during_build_mb"):
        if key in first:
            value = first[key]
            row[key] = round(statistics.median(r[key] for r in ok), 2) if key.endswith(
                "seconds") else value
    if first["step"] == "cli":
        row["rss_after_build_note"] = "RSS after building of the convert child (same model)"
    return row


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpu.splitlines()
                           if line.startswith("model name"))
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_gib"] = round(int(mem) / 2 ** 20, 1)
    except (OSError, StopIteration):
        pass
    import onnx
    import onnxruntime
    import timm
    import torch

    info.update(torch=torch.__version__, timm=timm.__version__, onnx=onnx.__version__,
                onnxruntime=onnxruntime.__version__,
                threads=int(os.environ.get("BENCH_THREADS", "2")))
    return info


def _print_table(results: dict[str, dict[str, Any]]) -> None:
    print(f"{'model':<14} {'params':>8} {'fp32 MB':>8} {'step':<8} {'s':>8} {'peak MB':>8} "
          f"{'peak/fp32':>9} {'step MB':>8} {'step/fp32':>9}")
    for name, steps in results.items():
        for step, r in steps.items():
            if "error" in r:
                print(f"{name:<14} {'':>8} {'':>8} {step:<8} ERROR {r['error']}")
                continue
            print(f"{name:<14} {r['params'] / 1e6:>7.1f}M {r['fp32_mb']:>8.0f} {step:<8} "
                  f"{r['seconds']:>8.1f} {r['peak_rss_mb']:>8.0f} {r['peak_over_fp32']:>9.2f} "
                  f"{r['step_mb']:>8.0f} {r['step_over_fp32']:>9.2f}")


def plot(data: dict[str, Any], path: Path) -> None:
    """Parameters against time and against peak-memory ratios, log-log, one line per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"convert": "o-", "cli": "s-", "export": "^-", "copy": "o:", "onnx": "^:"}
    labels = {"convert": "swap l1 + verify", "cli": "normswap convert (CLI)",
              "export": "fold + export_onnx fp16", "copy": "native: deepcopy + 2 forwards",
              "onnx": "native: torch.onnx.export"}
    rows = data["results"]
    for step in STEPS:
        pts = [(r[step]["params"], r[step]) for r in rows.values()
               if step in r and "error" not in r[step]]
        if not pts:
            continue
        ps = [p for p, _ in pts]
        ax_t.loglog(ps, [r["seconds"] for _, r in pts], styles[step], label=labels[step])
        if step in ("convert", "cli", "export"):
            ax_m.loglog(ps, [r["step_over_fp32"] for _, r in pts], styles[step],
                        label=f"{labels[step]}: (peak − built) / fp32")
            ax_m.loglog(ps, [r["peak_over_fp32"] for _, r in pts], styles[step], alpha=0.35,
                        label=f"{labels[step]}: peak / fp32")
    if rows:
        all_p = [r[s]["params"] for r in rows.values() for s in r if "error" not in r[s]]
        lo, hi = min(all_p), max(all_p)
        ref = next((r["convert"] for r in rows.values() if "convert" in r
                    and "error" not in r["convert"]), None)
        if ref is not None:
            ax_t.loglog([lo, hi], [ref["seconds"] * lo / ref["params"],
                                   ref["seconds"] * hi / ref["params"]], "k--", lw=0.8,
                        label="linear in parameters")
        ax_m.axhline(2.5, color="r", lw=0.8, ls="--", label="2.5× target")
    ax_t.set(xlabel="parameters", ylabel="wall time (s)", title="time")
    ax_m.set(xlabel="parameters", ylabel="× fp32 parameter size", title="peak RSS")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_xticks([m[1] for m in LADDER])
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:.0f}M"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.suptitle(f"timm RegNetY, 1×3×{SIZE}×{SIZE}, {data['machine'].get('cpus')} CPUs",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-params", type=float, default=700e6)
    parser.add_argument("--quick", action="store_true", help="the two smallest models")
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--models", help="comma-separated names (default: the ladder)")
    parser.add_argument("--repeats", type=int, default=0,
                        help="runs per step (default: 3 below 100M parameters, else 1)")
    parser.add_argument("--out", default=str(RESULTS / "scale.json"))
    parser.add_argument("--merge", action="store_true",
                        help="keep the models of an existing --out that this run does not redo")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--child")
    parser.add_argument("--model")
    parser.add_argument("--dir")
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(_child(args.child, args.model, Path(args.dir), args.index)))
        return
    out = Path(args.out)
    if args.plot_only:
        plot(json.loads(out.read_text()), out.with_suffix(".png"))
        return
    ladder = [(n, p) for n, p in LADDER if p <= args.max_params]
    if args.quick:
        ladder = ladder[:2]
    if args.models:
        wanted = args.models.split(",")
        ladder = [(n, p) for n, p in LADDER if n in wanted]
    steps = [s for s in STEPS if s in args.steps.split(",")]
    old = json.loads(out.read_text()) if args.merge and out.exists() else None
    results: dict[str, dict[str, Any]] = dict(old["results"]) if old else {}
    loads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench_scale_", dir=os.environ.get("TMPDIR")) as d:
        work = Path(d)
        for name, params in ladder:
            repeats = args.repeats or (3 if params < 100e6 else 1)
            row: dict[str, Any] = dict(results.get(name, {})) if args.merge else {}
            if "cli" in steps:
                ck = _run_child("ckpt", name, work, 0)
                if "error" in ck:
                    row["cli"] = {"error": "could not write the checkpoint: " + ck["error"],
                                  "stderr_tail": ck.get("stderr_tail")}
            for step in steps:
                if step == "cli" and "error" in row.get("cli", {}):
                    continue
                runs = []
                for i in range(repeats):
                    loads.append(os.getloadavg()[0])
                    print(f"{name} {step} run {i + 1}/{repeats} (load {loads[-1]:.1f})",
                          file=sys.stderr, flush=True)
                    runs.append(_run_child(step, name, work, i))
                    if "error" in runs[-1]:
                        break
                built = row.get("convert", {}).get("rss_after_build_mb")
                row[step] = _summarise(runs, built)
            (work / f"{name}.pt").unlink(missing_ok=True)
            results[name] = row
            data = {"machine": _machine(), "input": [1, 3, SIZE, SIZE],
                    "load_average_during_runs": [round(x, 1) for x in loads],
                    "results": results,
                    "note": "peak_rss_mb: peak RSS (VmHWM) of a fresh process per run; step_mb: peak "
                            "minus the RSS just after the model was built; *_over_fp32: over "
                            "the fp32 parameter size (fp32_mb, MiB); seconds: median of the "
                            "runs; timeline: RSS at normswap's progress events and the peak RSS "
                            "since the previous event (first run)"}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(data, indent=1))
    _print_table(results)
    plot(data, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
