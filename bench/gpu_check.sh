#!/usr/bin/env bash
# Every GPU check in one device call (docs/gpu.md). On the GPU machine, from the repo root, with
# gpu_wheels/ carried (made here by `python bench/gpu_wheels.py`):
#     bash bench/gpu_check.sh [gpu_check.py run options]      # report and logs in $OUT
# The budget covers the install too: GPU_CHECK_BUDGET_S (default 450 s) from this script's start.
set -uo pipefail
START=$(date +%s)
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
WHEELS=${GPU_CHECK_WHEELS:-gpu_wheels}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

# The packages the image lacks, installed beside it (never over it): --target + PYTHONPATH.
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$WHEELS"/*.whl > "$OUT/install.log" 2>&1; then
        echo "gpu_check: installing gpu_wheels/ failed (install.log); the stages that need them will fail" >&2
    fi
else
    echo "no $WHEELS/*.whl: run 'python bench/gpu_wheels.py' where the package index is reachable" \
        > "$OUT/install.log"
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$OUT/install.log" 2>&1 || true

LEFT=$(( BUDGET_S - ($(date +%s) - START) ))
exec "$PY" bench/gpu_check.py run --out "$OUT" --budget-s "$LEFT" "$@"
