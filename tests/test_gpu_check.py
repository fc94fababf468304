"""benchmarks/gpu_check.py must run end to end: its dry run (tiny sizes on the CPU, CUDA-only
checks recorded as skipped) is run here so that the GPU machine finds no crash-level bug.

The dry run's numbers mean nothing; the real run is ``bash benchmarks/gpu_check.sh`` on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CHECKS = {"env", "triton_tests", "layers", "memory", "resnet50_step", "onnx_cuda",
          "fp16_training", "triton_aot"}
CUDA_ONLY = {"triton_tests", "memory", "resnet50_step", "onnx_cuda"}


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run",
                           "--out", str(out)], cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["dry_run"] is True and data["passed"] is True
    checks = data["checks"]
    assert set(checks) == CHECKS
    for name, res in checks.items():
        assert res["status"] in ("pass", "info", "skip"), (name, res)
        assert res["status"] != "skip" or res["reason"], name
    for name in CUDA_ONLY:
        assert checks[name]["status"] == "skip", name
    assert data["env"]["torch"] == torch.__version__
    layers = checks["layers"]["items"]
    names = {i["name"].split(" ")[0] for i in layers}
    assert {"l1", "linf-k1", "linf-k10", "kalman"} <= names
    assert all(isinstance(i["value"], float) and i["value"] > 0 and i["ms"] > 0 for i in layers)
    assert all(i["pass"] is None for i in layers)  # dry-run timings are never judged
    try:
        import triton  # noqa: F401
    except ImportError:
        assert checks["triton_aot"]["status"] == "skip"
    else:  # one kernel variant compiled for sm_90 with Triton's real compiler
        assert {"l1-triton-fn", "linf-k10-triton-fn"} <= names
        aot = checks["triton_aot"]["items"]
        assert aot and aot[0]["value"] == "compiled" and aot[0]["registers"] is not None
    assert "check" in proc.stdout and "all checks passed: True" in proc.stdout
