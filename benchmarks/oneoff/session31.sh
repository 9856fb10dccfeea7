#!/usr/bin/env bash
# Thirty-first session's device calls (an H200 wanted: the H100's are in reports/h100-2026-12-07b):
#   bound: benchmarks/stream_bound.py at the twenty-ninth session's arguments (the one-launch bound).
#   peer:  benchmarks/peer_attention.py, kvbench's rows and llama.cpp's at PEER_DEPTHS, with the
#          llama-bench carried in .devcarry/lcxz (built in reports/h100-2026-12-07b's call 1).
# Carry .whl and .devcarry/lcxz. Usage on the device: bash benchmarks/oneoff/session31.sh bound peer
set -uo pipefail
bash benchmarks/gpu_session.sh nop >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD KVBENCH_CACHE=/tmp/kvcache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
git log --oneline | head -1; nvidia-smi --query-gpu=name --format=csv,noheader
for step in "$@"; do
  SECONDS=0
  case $step in
    bound)
      timeout ${BOUND_TIMEOUT:-260} python3 benchmarks/stream_bound.py \
        ${BOUND_ARGS:---ctxs 4096,16384,32768 --chunks 2048,8192,32768 --blocks 1024,4096 --reps 10} \
        --out "$OUT/stream_bound.json" > "$OUT/bound.log" 2>&1
      grep -vE "^\s*$" "$OUT/bound.log" | tail -30 ;;
    peer)
      if [ ! -x /tmp/lcb/bin/llama-bench ] && ls .devcarry/lcxz/llama-bench.xz* >/dev/null 2>&1; then
        mkdir -p /tmp/lcb/bin && cat .devcarry/lcxz/llama-bench.xz* | xz -dc > /tmp/lcb/bin/llama-bench \
          && chmod +x /tmp/lcb/bin/llama-bench
      fi
      timeout ${PEER_TIMEOUT:-240} python3 benchmarks/peer_attention.py run --bin /tmp/lcb/bin/llama-bench \
        --depths ${PEER_DEPTHS:-4096,16384,32768} --reps 6 --out "$OUT/peer_attention.json" > "$OUT/peer.log" 2>&1
      grep -v '^{"command' "$OUT/peer.log" | tail -26 ;;
  esac
  echo "[$step: ${SECONDS} s]"
done
