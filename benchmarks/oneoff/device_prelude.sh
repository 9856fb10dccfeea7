# shellcheck shell=bash
# Sourced by the oneoff device scripts (session35.sh, session37.sh, session38.sh), from the repository root
# on the device: the carried wheels installed (gpu_session.sh nop), the environment, $OUT, and the card and
# nvcc each call ran with.
set -uo pipefail
bash benchmarks/gpu_session.sh nop >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD KVBENCH_CACHE=/tmp/kvcache PYTHONUNBUFFERED=1
[ -x /usr/local/cuda/bin/nvcc ] && export PATH=$PATH:/usr/local/cuda/bin
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "card: $gpu"
echo "nvcc: $(command -v nvcc) $(nvcc --version 2>/dev/null | tail -2 | head -1)"
