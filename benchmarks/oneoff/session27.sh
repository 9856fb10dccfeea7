#!/usr/bin/env bash
# Twenty-seventh session's device call: decode attention's fixed cost and programmatic dependent
# launch (KVBENCH_DECODE_PDL), in one call on one machine.
#   tests: the compiled PDL test (eager and a replayed graph) and the decode kernels' tests;
#   probe: benchmarks/oneoff/fixed_cost_probe.py (production vs PDL vs a read-only floor on the
#          production grid, with and without the combine; fits of fixed cost + GB/s; the split sweep
#          at 4096; profiler kernel durations);
#   attn:  bench_attention's grid (targets) with the defaults and with KVBENCH_DECODE_PDL=1;
#   step:  the captured coder30b step (bf16 / q8_0 KV, depth 16 and 16384): default vs pdl (attention)
#          vs steppdl (KVBENCH_STEP_PDL: every Triton kernel of the step).
# Usage on the device: bash benchmarks/oneoff/session27.sh [tests] [probe] [attn] [step]
set -uo pipefail
bash benchmarks/gpu_session.sh nop >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD KVBENCH_CACHE=/tmp/kvcache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
git log --oneline | head -1; nvidia-smi --query-gpu=name --format=csv,noheader
steps="${*:-tests probe attn step}"
for step in $steps; do
  SECONDS=0
  case $step in
    tests)
      python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -s \
        -k "pdl or decode_kernel_matches_ref or stacked or combine" > "$OUT/tests.log" 2>&1
      python3 -m pytest -q -p no:cacheprovider tests/test_static_decode.py tests/test_attn_floor.py -s -k "pdl or floor" \
        >> "$OUT/tests.log" 2>&1
      grep -E "passed|failed" "$OUT/tests.log" | tail -4 ;;
    probe)
      timeout ${PROBE_TIMEOUT:-420} python3 benchmarks/oneoff/fixed_cost_probe.py ${PROBE_ARGS:-} --out "$OUT/fixed.json" \
        > "$OUT/probe.log" 2>&1
      grep -vE "^\s*$" "$OUT/probe.log" | grep -E "fit|sweep best|profile|4096|error|Error" | tail -60 ;;
    attn)
      for v in default "pdl KVBENCH_DECODE_PDL=1"; do
        set -- $v; name=$1; shift
        env "$@" timeout 150 python3 benchmarks/bench_attention.py --geometries bench,coder30b --skip-prefill \
          --out "$OUT/attn-$name.json" > "$OUT/attn-$name.log" 2>&1
        echo "== $name $*"; grep -E "^(bench|coder30b) " "$OUT/attn-$name.log" | awk '{print $1,$2,$3,$4,$6}'
      done ;;
    step)
      MOE_VARIANTS="default,pdl:KVBENCH_DECODE_PDL=1,steppdl:KVBENCH_STEP_PDL=1" MOE_MAX_S=${MOE_MAX_S:-200} MOE_TAG=-s27 \
        bash benchmarks/gpu_session.sh moevar 2>&1 | tail -30 ;;
  esac
  echo "[$step: ${SECONDS} s]"
done
