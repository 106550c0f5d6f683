#!/usr/bin/env bash
# The GPU check (issue 15): learn time, segment time, peak GPU memory, pgcd-dapd/ft cost, AMP on and off.
# Runs in one go on any machine with a GPU, under 10 minutes, without downloads. Needs a Python with torch
# (a CUDA build), MONAI, SimpleITK, safetensors, nibabel, scipy and tqdm: the project's .venv, or
# CIMIS_PYTHON=/path/to/python. Figures go to OUT (default gpu_check/): gpu_check.md and gpu_check.json.
#   Testing/Benchmarks/gpu_check.sh [OUT] [extra options of gpu_check.py]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-gpu_check}
shift || true
python=${CIMIS_PYTHON:-}
[ -n "$python" ] || { [ -x .venv/bin/python ] && python=.venv/bin/python; } || python=python3
export PYTHONPATH="$PWD/CIMISLearner/Logic${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$python" -c "import torch, monai, SimpleITK, safetensors, nibabel, scipy, tqdm" 2>/dev/null || {
  echo "error: $python lacks the engine's packages (torch, monai, SimpleITK, safetensors, nibabel, scipy, tqdm)" >&2; exit 2; }
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "error: torch sees no GPU here" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec timeout 590 "$python" Testing/Benchmarks/gpu_check.py --out "$out" "$@"
