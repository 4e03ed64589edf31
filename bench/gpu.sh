#!/usr/bin/env bash
# The one GPU validation script: every GPU path of the project on this machine, in
# under 8 minutes on a one-GPU machine. On a machine without a GPU it runs what it can
# and says what it skipped and why.
#   bench/gpu.sh OUT_DIR     writes OUT_DIR/gpu.json, check.html, calibration.toml,
#                            metrics.txt; prints a summary, JSON on the last line.
# Record what it measured in docs/benchmarks.md; paste calibration.toml's entry into
# src/gpuprovider/proof/calibration.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bench/gpu.sh OUT_DIR}"
python="${PYTHON:-.venv/bin/python}"
if [ ! -x "$python" ]; then
  make .venv/.installed >/dev/null
fi
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv 2>/dev/null \
  || echo "nvidia-smi: not found or no GPU"
exec "$python" bench/gpu.py "$out"
