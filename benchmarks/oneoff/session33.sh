#!/usr/bin/env bash
# The next session's first device call (planned in docs/perf-notes.md, "Thirty-second session"):
#   stacktests: the stacked rows kernel's compiled tests, whole (the thirty-second session's call 6
#               was cut by its 150 s timeout after five passes, after the kernel's last change)
#   h200:       on an H200 (needs_h200): session32.sh's h200 step (the one-launch bound, the default
#               decode tables of both geometries), for the H200 rows
# Carry .whl. Usage on the device: bash benchmarks/oneoff/session33.sh stacktests [h200]
set -uo pipefail
bash benchmarks/gpu_session.sh nop >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD KVBENCH_CACHE=/tmp/kvcache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
for step in "$@"; do
  SECONDS=0
  case $step in
    stacktests) timeout ${STACK_TEST_TIMEOUT:-400} python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
                  -k "stack or q8_decode_kernel_across or v_scales_spread or decode_kernel_matches_ref" > "$OUT/stacktests.log" 2>&1
                grep -E "passed|failed|FAILED|Error" "$OUT/stacktests.log" | tail -8 ;;
    h200) bash benchmarks/oneoff/session32.sh h200 ;;
  esac
  echo "[$step: ${SECONDS} s]"
done
