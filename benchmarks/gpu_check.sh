#!/usr/bin/env bash
# GPU figures for the torch scoring backend: tokens/s and MFU on a random SmolLM2-1.7B-shaped
# model. For a machine with an NVIDIA GPU, torch and transformers (no vLLM, Ray or polars needed);
# nothing is downloaded. One run takes under 8 minutes on an H100/H200 (model build ~1 min).
#
#   bash benchmarks/gpu_check.sh [--tokens 2000000] [--tokens-per-forward 16384 65536]
#   RESULTS=/some/dir bash benchmarks/gpu_check.sh     # where gpu_check.json goes
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RESULTS=${RESULTS:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
PYTHONPATH=. PYTHONUNBUFFERED=1 "$PYTHON" benchmarks/gpu_torch_throughput.py \
  --out "$RESULTS/gpu_check.json" "$@"
