#!/usr/bin/env bash
# The thirty-eighth session's device call (what the thirty-seventh wrote and could not measure, and the
# early loads under PDL): cuda_mma's PDL launch waiting first and with its first tiles' loads before the
# wait (q8_early), its warp softmax, and the step at the default.
#   tests: test_cuda_q8.py whole (every form, the CUDA graph, auto, PDL waiting first / early, early
#          behind the append of the newest key) and the float64-oracle magnitude test
#   grid:  bench_attention's decode grid per variant (GRID_VARIANTS: name:ENV=VAL+ENV=VAL, "-" for none):
#          auto (the default), pdl (PDL, early loads: q8_early auto), pdlwait (PDL waiting first), warp (warp
#          softmax); e.g. also rows:KVBENCH_DECODE_Q8_IMPL=rows, warppdl:KVBENCH_DECODE_Q8_SOFTMAX=warp+KVBENCH_DECODE_PDL=1
#   step:  the captured coder30b step at depth 16384 (STEP_ARGS), bf16 / q8_0 KV, per STEP_VARIANTS: default,
#          pdl (early loads), pdlwait, warp, rows
#   sweep: bench_attention's cuda_mma launch sweep, layered, position on the device (both geometries)
#   steptests: the GPU tests of the captured dense and MoE steps
#   bound: on an H200 only, the one-launch bound (as session35.sh)
# Carry .whl. Usage on the device, two calls of ~400-550 s each (one call is capped at 600 s):
#   bash benchmarks/oneoff/session38.sh tests grid        then        bash benchmarks/oneoff/session38.sh step sweep steptests
source benchmarks/oneoff/device_prelude.sh
for step in "$@"; do
  SECONDS=0
  case $step in
    tests|steptests|bound)      # as session37.sh's (bound: H200 only)
           TEST_TIMEOUT=${TEST_TIMEOUT:-240} bash benchmarks/oneoff/session37.sh $step ;;
    grid)  for v in ${GRID_VARIANTS:-auto:- pdl:KVBENCH_DECODE_PDL=1 pdlwait:KVBENCH_DECODE_PDL=1+KVBENCH_DECODE_Q8_EARLY=0 warp:KVBENCH_DECODE_Q8_SOFTMAX=warp}; do
             name=${v%%:*}; envs=${v#*:}; [ "$envs" = "-" ] && envs=""
             env ${envs//+/ } timeout ${GRID_TIMEOUT:-120} python3 benchmarks/bench_attention.py --skip-prefill \
               --geometries ${GEOS:-bench,coder30b} --reps ${REPS:-20} --out "$OUT/attention-$name.json" > "$OUT/attention-$name.log" 2>&1
             echo "== grid $name [${envs}] (rc $?)"; grep -E "q8_0|targets.*layered" "$OUT/attention-$name.log" | grep -v "^{" | tail -14
           done ;;
    step)  MOE_VARIANTS=${STEP_VARIANTS:-default,pdl:KVBENCH_DECODE_PDL=1,pdlwait:KVBENCH_DECODE_PDL=1+KVBENCH_DECODE_Q8_EARLY=0,warp:KVBENCH_DECODE_Q8_SOFTMAX=warp,rows:KVBENCH_DECODE_Q8_IMPL=rows} \
             MOE_MAX_S=${MOE_MAX_S:-240} MOE_TAG=-s38 MOE_ARGS="${STEP_ARGS:---profile none --depths 16384}" \
             bash benchmarks/gpu_session.sh moevar 2>&1 | tail -34 ;;
    sweep) for geo in coder30b bench; do
             timeout ${SWEEP_TIMEOUT:-150} python3 benchmarks/bench_attention.py --sweep --geometry $geo --sweep-dtypes q8_0 \
               --sweep-impls cuda_mma --sweep-layered --sweep-depths ${SWEEP_DEPTHS:-16384,32768} --ctxs "" --skip-prefill \
               --reps ${REPS:-20} --out "$OUT/attention-sweep-$geo.json" > "$OUT/sweep-$geo.log" 2>&1
             echo "== sweep $geo (rc $?)"; grep -E "sweep|us" "$OUT/sweep-$geo.log" | grep -v "^{" | tail -40
           done ;;
  esac
  echo "[$step: ${SECONDS} s]"
done
