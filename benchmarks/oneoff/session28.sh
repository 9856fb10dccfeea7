#!/usr/bin/env bash
# Twenty-eighth session's device calls (one machine, three calls back to back: SmolLM2 travels in
# three parts, one a call, and gtests needs all three):
#   bound:  benchmarks/stream_bound.py (the one-launch streaming bound against the targets' budgets);
#   ktests: the kernel test files compiled for the device (PDL is on by default since e2882aa);
#   step:   the captured coder30b step, bf16 / q8_0 KV at depth 16384, three repetitions of the
#           defaults (the spread q8_0 >= bf16 is judged against);
#   gtests: every `-m gpu` test under the defaults (SmolLM2's greedy tokens against HF among them).
# Usage on the device: bash benchmarks/oneoff/session28.sh [bound] [ktests] [step] [gtests]
set -uo pipefail
bash benchmarks/gpu_session.sh nop >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD KVBENCH_CACHE=/tmp/kvcache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
git log --oneline | head -1; nvidia-smi --query-gpu=name --format=csv,noheader
for step in "$@"; do
  SECONDS=0
  case $step in
    bound)
      timeout ${BOUND_TIMEOUT:-330} python3 benchmarks/stream_bound.py ${BOUND_ARGS:-} --out "$OUT/stream_bound.json" \
        > "$OUT/bound.log" 2>&1
      grep -vE "^\s*$" "$OUT/bound.log" | tail -40 ;;
    ktests)
      timeout ${KTESTS_TIMEOUT:-400} python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_rope_append.py \
        tests/test_rows_kernels.py tests/test_attn_floor.py tests/test_stream_bound.py > "$OUT/ktests.log" 2>&1
      grep -E "passed|failed|Error" "$OUT/ktests.log" | tail -8 ;;
    step)
      MOE_VARIANTS="default,rep2:KVBENCH_STEP_PDL=auto,rep3:KVBENCH_STEP_PDL=auto" MOE_MAX_S=${MOE_MAX_S:-330} MOE_TAG=-s28 \
        MOE_ARGS="--depths 16384 --profile none" bash benchmarks/gpu_session.sh moevar 2>&1 | tail -30 ;;
    gtests)
      timeout ${GTESTS_TIMEOUT:-540} python3 -m pytest -q -m gpu -p no:cacheprovider tests > "$OUT/gtests.log" 2>&1
      grep -E "passed|failed|FAILED|ERROR" "$OUT/gtests.log" | tail -20 ;;
  esac
  echo "[$step: ${SECONDS} s]"
done
