#!/usr/bin/env bash
# Thirtieth session's device calls:
#   peer:  llama.cpp's decode attention kernels against kvbench's, both timed by Nsight Compute at the
#          targets' geometry (benchmarks/peer_attention.py; attnbench-synth for llama.cpp). llama-bench
#          builds in the background (niced) while kvbench's rows run; then llama.cpp's rows.
#          Carry .whl and .devcarry/llamacpp-src.tar.gz. PEER_DEPTHS (default 4096,16384,32768).
#   bound: benchmarks/stream_bound.py (as session28.sh's bound).
# Usage on the device: bash benchmarks/oneoff/session30.sh [peer] [bound]
set -uo pipefail
bash benchmarks/gpu_session.sh nop >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD KVBENCH_CACHE=/tmp/kvcache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
git log --oneline | head -1; nvidia-smi --query-gpu=name --format=csv,noheader; which ncu || ls /usr/local/cuda/bin/ncu
for step in "$@"; do
  SECONDS=0
  case $step in
    peer)
      [ -x /tmp/lcb/bin/llama-bench ] || bash benchmarks/gpu_session.sh lcbuildbg 2>&1 | tail -1
      timeout ${OURS_TIMEOUT:-200} python3 benchmarks/peer_attention.py run --depths ${PEER_DEPTHS:-4096,16384,32768} \
        --out "$OUT/peer_ours.json" > "$OUT/peer_ours.log" 2>&1
      grep -v '^{' "$OUT/peer_ours.log" | tail -14
      echo "[ours: ${SECONDS} s]"
      LCWAIT_S=${LCWAIT_S:-360} bash benchmarks/gpu_session.sh lcwait 2>&1 | tail -4
      echo "[build joined: ${SECONDS} s]"
      timeout ${LLAMA_TIMEOUT:-280} python3 benchmarks/peer_attention.py run --bin /tmp/lcb/bin/llama-bench --ours-dtypes "" \
        --depths ${PEER_DEPTHS:-4096,16384,32768} --out "$OUT/peer_llama.json" > "$OUT/peer_llama.log" 2>&1
      grep -v '^{' "$OUT/peer_llama.log" | tail -24
      mkdir -p "$OUT/ncu" && cp /tmp/peer_attention/*.csv "$OUT/ncu/" 2>/dev/null; gzip -q "$OUT"/ncu/*.csv 2>/dev/null ;;
    bound)
      timeout ${BOUND_TIMEOUT:-330} python3 benchmarks/stream_bound.py ${BOUND_ARGS:-} --out "$OUT/stream_bound.json" \
        > "$OUT/bound.log" 2>&1
      grep -vE "^\s*$" "$OUT/bound.log" | tail -40 ;;
  esac
  echo "[$step: ${SECONDS} s]"
done
