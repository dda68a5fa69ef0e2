#!/usr/bin/env bash
# GPU readiness check (bench/gpu_check.py, docs/scale.md#gpu-readiness-check): offline, from any directory.
#   bench/gpu_check.sh                    # one CUDA GPU: every check, <= 8 minutes on an H200
#   bench/gpu_check.sh --device cpu       # the dry run at tiny shapes
# Prints one table; the figures go to runs/gpu_check/gpu_check.json (--json PATH to change).
# Exit status: 0 every bar met, 1 a numerical bar failed, 3 a required check errored or timed out.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
