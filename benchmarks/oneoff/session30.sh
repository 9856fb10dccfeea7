#!/usr/bin/env bash
# Thirtieth session's device calls:
#   peer:  llama.cpp's decode attention kernels against kvbench's, both timed by Nsight Compute at the
#          targets' geometry (benchmarks/peer_attention.py; attnbench-synth for llama.cpp). llama-bench
#          builds in the background (niced) while kvbench's rows run; then llama.cpp's rows.
#          Carry .whl and .devcarry/llamacpp-src.tar.gz. PEER_DEPTHS (default 4096,16384,32768).
#   bound: benchmarks/stream_bound.py (as session28.sh's bound).
#   sweep: the q8_0 streams form (float32 FMAs, no tensor cores) against the rows default, layered, at
#          ctx SWEEP_CTX (16384) on the bench geometry and coder30b's (bench_attention --sweep-impls).
#   all:   llama-bench's build in the background, sweep, kvbench's peer rows, then llama.cpp's.
# Usage on the device: bash benchmarks/oneoff/session30.sh [peer|all] [sweep] [bound]
set -uo pipefail
bash benchmarks/gpu_session.sh nop >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD KVBENCH_CACHE=/tmp/kvcache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
git log --oneline | head -1; nvidia-smi --query-gpu=name --format=csv,noheader; which ncu || ls /usr/local/cuda/bin/ncu
T0=$SECONDS
left() { echo $(( ${CALL_S:-585} - (SECONDS - T0) )); }
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
    sweep)
      for geo in ${SWEEP_GEOS:-bench coder30b}; do
        timeout ${SWEEP_TIMEOUT:-150} python3 benchmarks/bench_attention.py --sweep --geometry $geo --sweep-dtypes q8_0 \
          --sweep-impls rows,streams,streams2 --sweep-keys q8_impl --sweep-layered --ctxs "" --skip-prefill --ctx ${SWEEP_CTX:-16384} \
          --reps 20 --out "$OUT/attention-streams-$geo.json" > "$OUT/sweep-$geo.log" 2>&1
        grep -E "sweep q8_0|decode|Error|error" "$OUT/sweep-$geo.log" | grep -v "^{" | tail -12
      done ;;
    all)
      [ -x /tmp/lcb/bin/llama-bench ] || bash benchmarks/gpu_session.sh lcbuildbg 2>&1 | tail -1
      SWEEP_TIMEOUT=140 bash "$0" sweep 2>&1 | grep -v "^\[" 
      timeout 120 python3 benchmarks/peer_attention.py run --depths ${PEER_DEPTHS:-4096,16384,32768} --reps 6 \
        --out "$OUT/peer_ours.json" > "$OUT/peer_ours.log" 2>&1
      grep -v '^{' "$OUT/peer_ours.log" | tail -14
      echo "[ours: $((SECONDS)) s]"
      LCWAIT_S=$(( $(left) - 150 )) bash benchmarks/gpu_session.sh lcwait 2>&1 | tail -4
      echo "[build joined: ${SECONDS} s, $(left) s left]"
      timeout $(( $(left) - 10 )) python3 benchmarks/peer_attention.py run --bin /tmp/lcb/bin/llama-bench --ours-dtypes "" \
        --depths ${LLAMA_DEPTHS:-4096,16384} --out "$OUT/peer_llama.json" > "$OUT/peer_llama.log" 2>&1
      grep -v '^{' "$OUT/peer_llama.log" | tail -24
      mkdir -p "$OUT/ncu" && cp /tmp/peer_attention/*.csv "$OUT/ncu/" 2>/dev/null; gzip -q "$OUT"/ncu/*.csv 2>/dev/null ;;
    bound)
      timeout ${BOUND_TIMEOUT:-330} python3 benchmarks/stream_bound.py ${BOUND_ARGS:-} --out "$OUT/stream_bound.json" \
        > "$OUT/bound.log" 2>&1
      grep -vE "^\s*$" "$OUT/bound.log" | tail -40 ;;
  esac
  echo "[$step: ${SECONDS} s]"
done
