#!/usr/bin/env bash
# The thirty-fifth session's device call: the CUDA C++ q8_0 decode kernel (q8_impl "cuda",
# engine/kernels/cuda/q8_decode.cu), built on the device with its nvcc.
#   tests: its GPU tests against the torch reference (groups 1-8, head_dim 64/128, device position,
#          CUDA graph) and the float64-oracle magnitude test with the form in its list
#   grid:  bench_attention's decode grid (both geometries, 4096 / 16384 / 32768) with q8_0 through the
#          CUDA form, then the default (rows) in the same call, for the same-card ratios
#   step:  the captured coder30b step at 16384, bf16 / q8_0 KV, q8_0 by rows and by the CUDA form
#   bound: on an H200 only, the one-launch bound (session28.sh bound with the H200 arguments)
# Carry .whl. Usage on the device: bash benchmarks/oneoff/session35.sh tests grid bound
# (the thirty-sixth session's call adds the tensor-core form through the environment:
#  GRID_VARIANTS="mma:cuda_mma:2 ..." STEP_VARIANTS="default,mma:KVBENCH_DECODE_Q8_IMPL=cuda_mma,...")
source benchmarks/oneoff/device_prelude.sh
for step in "$@"; do
  SECONDS=0
  case $step in
    tests) timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -s --durations=5 ${TESTS:-tests/test_cuda_q8.py \
             "tests/test_kernels.py::test_q8_decode_kernel_across_magnitudes_and_at_a_device_position"} > "$OUT/tests.log" 2>&1
           grep -E "cuda q8_0|'cuda'|passed|failed|FAILED|Error|error" "$OUT/tests.log" | tail -30 ;;
    grid)  # GRID_VARIANTS: name:q8_impl:programs_per_sm (q8_0's rows only differ between variants that
           # share programs_per_sm; a variant at 3 moves the fp32 / bf16 launches too: read only its q8_0 rows)
           for v in ${GRID_VARIANTS:-cuda:cuda:2 cuda3:cuda:3 rows:rows:2}; do
             IFS=: read -r name impl ppsm <<< "$v"
             KVBENCH_DECODE_Q8_IMPL=$impl KVBENCH_DECODE_PROGRAMS_PER_SM=$ppsm timeout ${GRID_TIMEOUT:-230} \
               python3 benchmarks/bench_attention.py --skip-prefill --reps ${REPS:-20} --out "$OUT/attention-$name.json" \
               > "$OUT/attention-$name.log" 2>&1
             echo "== $name: q8_impl $impl, programs_per_sm $ppsm (rc $?)"
             grep -E "q8_0|targets.*layered" "$OUT/attention-$name.log" | grep -v "^{" | tail -14
           done ;;
    step)  # the captured coder30b step at depth 16384 (all on the GPU), bf16 / q8_0 KV: the default q8_0 form
           # against the CUDA one, each twice, alternating (issue 14: q8_0 KV >= bf16 KV at 16384)
           MOE_VARIANTS=${STEP_VARIANTS:-default,cuda:KVBENCH_DECODE_Q8_IMPL=cuda,rep2:KVBENCH_STEP_PDL=auto,cuda2:KVBENCH_DECODE_Q8_IMPL=cuda} \
             MOE_MAX_S=${MOE_MAX_S:-300} MOE_TAG=-s35 MOE_ARGS="--depths 16384 --profile none" \
             bash benchmarks/gpu_session.sh moevar 2>&1 | tail -30 ;;
    bound) if [[ $gpu == *H200* ]]; then
             BOUND_ARGS="--ctxs 4096,16384,32768 --chunks 2048,8192,32768 --blocks 1024,4096 --reps 10" \
               BOUND_TIMEOUT=${BOUND_TIMEOUT:-200} bash benchmarks/oneoff/session28.sh bound 2>&1 | tail -30
           else echo "bound: not an H200, skipped"; fi ;;
  esac
  echo "[$step: ${SECONDS} s]"
done
