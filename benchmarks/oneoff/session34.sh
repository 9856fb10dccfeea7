#!/usr/bin/env bash
# The thirty-fourth session's device call, whichever card comes:
#   on an H200: session32.sh h200 (the one-launch bound and the default decode tables of both
#               geometries at 4096 / 16384 / 32768: issue 14's H200 rows, unmeasured since 2026-12-06)
#   on an H100: the headline command at HEAD (`make bench MODEL=coder30b-synth` minus the venv:
#               gpu_session.sh coder), last run on the GPU in reports/h100-2026-12-06e
# Carry .whl. Usage on the device: bash benchmarks/oneoff/session34.sh
set -uo pipefail
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $gpu"
if [[ $gpu == *H200* ]]; then
  bash benchmarks/oneoff/session32.sh h200
else
  SUITE_TIMEOUT=${SUITE_TIMEOUT:-420} bash benchmarks/gpu_session.sh coder 2>&1 | grep -v "^SmolLM2 parts" | tail -60
fi
