#!/usr/bin/env bash
# Twenty-sixth session's device call (reports/h100-2026-12-06g or the device's dated dir): the
# two new selectable forms against the defaults, in one call on one machine.
#   1. compiled kernel tests (q8_0 magnitudes and spread V scales with q8_vnorm split; the bf16
#      stacked form against the float64 oracle);
#   2. decode attention, layered and graph timings, bench (8 KV heads) and coder30b geometries at
#      4096 / 16384 / 32768: the defaults, KVBENCH_DECODE_Q8_VNORM=split, KVBENCH_DECODE_BF16_STACK=1
#      (bf16 tiles 32x2 as default, and 64 keys x 4 warps), KVBENCH_DECODE_FUSE=1 (the combine in the
#      last split program: never timed in a step);
#   3. the captured coder30b step (bf16 / q8_0 KV, depth 16 and 16384): default, vsplit, bstack, fuse.
# Usage on the device: bash benchmarks/oneoff/session26.sh [tests] [attn] [step]
set -uo pipefail
bash benchmarks/gpu_session.sh nop >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD KVBENCH_CACHE=/tmp/kvcache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
git log --oneline | head -1; nvidia-smi --query-gpu=name --format=csv,noheader
steps="${*:-tests attn step}"
for step in $steps; do
  case $step in
    tests)
      python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -s \
        -k "magnitudes or spread or q8_tiles_set or stacked or decode_kernel_matches_ref" > "$OUT/tests.log" 2>&1
      grep -E "vnorm|passed|failed" "$OUT/tests.log" | tail -8 ;;
    attn)
      for v in default "vsplit KVBENCH_DECODE_Q8_VNORM=split" "bstack KVBENCH_DECODE_BF16_STACK=1" \
               "bstack64 KVBENCH_DECODE_BF16_STACK=1 KVBENCH_DECODE_BLOCK_N=64 KVBENCH_DECODE_WARPS=4" \
               "fuse KVBENCH_DECODE_FUSE=1"; do
        set -- $v; name=$1; shift
        env "$@" timeout 120 python3 benchmarks/bench_attention.py --geometries bench,coder30b --skip-prefill \
          --out "$OUT/attn-$name.json" > "$OUT/attn-$name.log" 2>&1
        echo "== $name $*"; grep -E "^(bench|coder30b) " "$OUT/attn-$name.log" | awk '{print $1,$2,$3,$4,$6}'
      done ;;
    step)
      MOE_VARIANTS="default,vsplit:KVBENCH_DECODE_Q8_VNORM=split,bstack:KVBENCH_DECODE_BF16_STACK=1,fuse:KVBENCH_DECODE_FUSE=1" \
        MOE_MAX_S=${MOE_MAX_S:-300} MOE_TAG=-s26 bash benchmarks/gpu_session.sh moevar 2>&1 | tail -30 ;;
  esac
done
