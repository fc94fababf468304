#!/usr/bin/env bash
# Run every example's full version, one after another (two trainings at once on a 2-core
# machine made each 5-8x slower), timing each. Results land in examples/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
for name in fp16_hoffer bwn_hoffer microbatch_kalman selu_snn normprop_arpit convert_checkpoint; do
    echo "== examples/${name}.py"
    start=$(date +%s)
    mkdir -p examples/out
    "$PY" "examples/${name}.py" "$@" 2>&1 | tee "examples/out/${name}.log"
    echo "== ${name}: $(( $(date +%s) - start )) s"
done
