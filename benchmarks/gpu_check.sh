#!/usr/bin/env bash
# GPU check in one command: bash benchmarks/gpu_check.sh [--dry-run] [-o report.json] [--budget SECONDS]
# Runs benchmarks/gpu_check.py (environment, CUDA inference, fp16 model, AMP training steps, one-GPU DDP)
# within a 7-minute budget and writes a JSON report; docs/performance.md, "GPU check", says what it measures.
# Python: $PYTHON if set, else the repository's .venv, else python3 (it needs torch, onnxruntime(-gpu), onnx,
# numpy and pyyaml; SimpleITK is optional here).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
else
    py=python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONUTF8=1
# The script keeps to its own budget; this hard stop (under 8 minutes) only guards against a hang in it.
exec timeout --kill-after=10 470 "$py" benchmarks/gpu_check.py "$@"
