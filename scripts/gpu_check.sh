#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (issue 17); at most ~8 minutes on an H100/H200. Run from the
# repository root:   bash scripts/gpu_check.sh --out "$OUT"       (the device tool's run, carrying .whl)
# The GPU machine has torch, lightning, timm, torchmetrics, opencv and onnx but lacks some of this project's
# dependencies: scripts/gpu_wheels.sh downloads them (Python 3.12 wheels) into .whl/ here; this installs them there.
# Arguments go to scripts/gpu_check.py (--device cpu --tiny runs the same flow on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
exec timeout 540 python3 scripts/gpu_check.py "$@"
