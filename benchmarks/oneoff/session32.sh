#!/usr/bin/env bash
# The next session's first device call (planned in docs/perf-notes.md, "Thirty-first session"):
# why q8_0 only ties bf16 at coder30b's geometry (4 KV heads x 128, G 8) while it beats it at G 4.
#   g8ncu:   Nsight Compute's counters for the q8_0 rows kernel and bf16's at G 8, ctx 16384
#   terms:   a layered sweep of q8_terms at --geometry coder30b, ctx 16384 (offline: (1, 1) -19% loop
#            instructions at G 8, more registers)
#   split:   g8_split_probe.py: the G 8 call against two G 4 calls over the same cache (predicted to lose)
#   stack:   the rows kernel's stacked float16 terms (q8_stack): its compiled tests, then layered sweeps of
#            q8_stack at coder30b's geometry (4096 / 16384 / 32768) and the bench one (16384)
#   stackncu: Nsight Compute's counters for the stacked rows kernel against the default at G 8 and G 4 (ctx 16384)
#   stacktests: the stacked rows kernel's compiled tests, whole (call 6 of reports/h100-2026-12-07c was cut
#            by its 150 s timeout after five passes, after the kernel's last change): the next session's first call
#   h200:    on an H200 (needs_h200): the one-launch bound (session31.sh's arguments) and the default
#            decode tables of both geometries at 4096 / 16384 / 32768, for the H200 rows
# Carry .whl. Usage on the device: bash benchmarks/oneoff/session32.sh g8ncu terms split
set -uo pipefail
bash benchmarks/gpu_session.sh nop >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD KVBENCH_CACHE=/tmp/kvcache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
for step in "$@"; do
  SECONDS=0
  case $step in
    g8ncu) timeout ${NCU_TIMEOUT:-200} python3 benchmarks/oneoff/streams_ncu.py run --hkv 4 --variants rows,bf16 \
             --out "$OUT/g8_ncu.json" 2>&1 | tail -6 ;;
    terms) timeout ${TERMS_TIMEOUT:-200} python3 benchmarks/bench_attention.py --sweep --geometry coder30b --sweep-dtypes q8_0 \
             --sweep-impls rows --sweep-keys q8_terms --sweep-layered --ctxs "" --skip-prefill --ctx 16384 --reps 20 \
             --out "$OUT/terms-coder30b-16384.json" > "$OUT/terms.log" 2>&1
           grep -E "sweep q8_0|decode|triton" "$OUT/terms.log" | grep -v "^{" | tail -14 ;;
    h200)  BOUND_ARGS="--ctxs 4096,16384,32768 --chunks 2048,8192,32768 --blocks 1024,4096 --reps 10" \
             BOUND_TIMEOUT=${BOUND_TIMEOUT:-260} bash benchmarks/oneoff/session28.sh bound 2>&1 | tail -30
           timeout ${ATTN_TIMEOUT:-240} python3 benchmarks/bench_attention.py --skip-prefill --out "$OUT/attention-h200.json" \
             > "$OUT/attention-h200.log" 2>&1; grep -vE "^\{|^\s*$" "$OUT/attention-h200.log" | tail -40 ;;
    stack) OUT=$OUT STACK_TEST_TIMEOUT=${STACK_TEST_TIMEOUT:-200} bash "$0" stacktests | grep -v "^\[" | tail -8
           for gc in coder30b:16384 coder30b:4096 coder30b:32768 bench:16384; do
             timeout ${STACK_SWEEP_TIMEOUT:-100} python3 benchmarks/bench_attention.py --sweep --geometry ${gc%%:*} \
               --sweep-dtypes q8_0 --sweep-keys q8_stack --sweep-layered --ctxs "" --skip-prefill --ctx ${gc##*:} --reps 20 \
               --out "$OUT/stack-${gc%%:*}-${gc##*:}.json" > "$OUT/stack-${gc%%:*}-${gc##*:}.log" 2>&1
             echo "== $gc"; grep -E "^(fp32|bf16|q8_0) +triton|default is" "$OUT/stack-${gc%%:*}-${gc##*:}.log"
             python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [print(r['us'], {k: v for k, v in r.items() if k not in ('us', 'GBps', 'depth', 'timing')}) for r in d['decode']['q8_0']['sweep'][:6]]" \
               "$OUT/stack-${gc%%:*}-${gc##*:}.json" 2>&1 | tail -6
           done ;;
    stackncu) for hkv in 4 8; do timeout ${NCU_TIMEOUT:-200} python3 benchmarks/oneoff/streams_ncu.py run --hkv $hkv \
                --variants rows,stack64,stack32 --out "$OUT/stack_ncu_hkv$hkv.json" 2>&1 | tail -4; done ;;
    stacktests) timeout ${STACK_TEST_TIMEOUT:-400} python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
             -k "stack or q8_decode_kernel_across or v_scales_spread or decode_kernel_matches_ref" > "$OUT/stacktests.log" 2>&1
           grep -E "passed|failed|FAILED|Error" "$OUT/stacktests.log" | tail -8 ;;
    split) timeout ${SPLIT_TIMEOUT:-150} python3 benchmarks/oneoff/g8_split_probe.py --out "$OUT/g8_split.json" 2>&1 | tail -6 ;;
  esac
  echo "[$step: ${SECONDS} s]"
done
