#!/usr/bin/env bash
# The thirty-seventh session's device call: q8_0's CUDA C++ tensor-core kernel (q8_impl "cuda_mma") as the
# default ("auto") and its launch space (2-4 stages, 1-4 programs a SM).
#   tests: its GPU tests (every geometry at 3 stages, two at 2 and 4, the device position, the CUDA graph,
#          auto's choices), the float64-oracle magnitude test (rows by name and cuda_mma at 2/3/4 stages)
#   steptests: the GPU tests of the captured dense and MoE steps (their q8_0 KV now through auto's cuda_mma)
#   sweep: bench_attention's q8_0 sweep of cuda_mma's launches, layered, position on the device, at 4096 /
#          16384 / 32768 keys, both geometries
#   grid:  bench_attention's decode grid at the default (auto: cuda_mma, packed terms at G <= 4), with q8_impl
#          rows, and with cuda_mma's PDL launch (KVBENCH_DECODE_PDL=1), for the targets
#          and with cuda_mma's warp softmax (KVBENCH_DECODE_Q8_SOFTMAX=warp)
#          (GRID_VARIANTS: name:q8_impl:q8_pack:geometries:KVBENCH_DECODE_PDL:KVBENCH_DECODE_Q8_SOFTMAX)
#   step:  the captured coder30b step at depth 16 and 16384, bf16 / q8_0 KV: the default (auto: cuda_mma)
#          against rows, cuda_mma's PDL launch and 3 programs a SM (KVBENCH_DECODE_Q8_TILES moves q8_0's only)
#   bound: on an H200 only, the one-launch bound (as session35.sh)
# Carry .whl. Usage on the device: bash benchmarks/oneoff/session37.sh tests grid step sweep steptests bound
source benchmarks/oneoff/device_prelude.sh
for step in "$@"; do
  SECONDS=0
  case $step in
    tests) timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -s --durations=8 tests/test_cuda_q8.py \
             "tests/test_kernels.py::test_q8_decode_kernel_across_magnitudes_and_at_a_device_position" > "$OUT/tests.log" 2>&1
           grep -E "cuda_mma|passed|failed|FAILED|Error" "$OUT/tests.log" | tail -40 ;;
    steptests) timeout ${STEPTEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -m gpu --durations=8 \
             tests/test_static_decode.py tests/test_moe_decode.py > "$OUT/tests-steps.log" 2>&1
           tail -12 "$OUT/tests-steps.log" ;;
    sweep) for geo in coder30b bench; do
             timeout ${SWEEP_TIMEOUT:-150} python3 benchmarks/bench_attention.py --sweep --geometry $geo --sweep-dtypes q8_0 \
               --sweep-impls cuda_mma --sweep-layered --sweep-depths 4096,16384,32768 --ctxs "" --skip-prefill \
               --reps ${REPS:-20} --out "$OUT/attention-sweep-$geo.json" > "$OUT/sweep-$geo.log" 2>&1
             echo "== sweep $geo (rc $?)"; grep -E "sweep|us" "$OUT/sweep-$geo.log" | grep -v "^{" | tail -40
           done ;;
    grid)  # name:q8_impl:q8_pack:geometries (the packed terms serve G <= 4: the bench geometry only)
           # (pdl: KVBENCH_DECODE_PDL=1, cuda_mma's programmatic dependent launch, which auto does not take yet)
           for v in ${GRID_VARIANTS:-auto:auto:auto:bench,coder30b:0:tile rows:rows:auto:bench,coder30b:0:tile pdl:auto:auto:bench,coder30b:1:tile warp:cuda_mma:auto:bench,coder30b:0:warp}; do
             IFS=: read -r name impl pack geos pdl softmax <<< "$v"
             KVBENCH_DECODE_Q8_IMPL=$impl KVBENCH_DECODE_Q8_PACK=$pack KVBENCH_DECODE_PDL=$pdl \
               KVBENCH_DECODE_Q8_SOFTMAX=$softmax timeout ${GRID_TIMEOUT:-200} \
               python3 benchmarks/bench_attention.py --skip-prefill --geometries $geos \
               --reps ${REPS:-20} --out "$OUT/attention-$name.json" > "$OUT/attention-$name.log" 2>&1
             echo "== grid $name (rc $?)"; grep -E "q8_0|targets.*layered" "$OUT/attention-$name.log" | grep -v "^{" | tail -14
           done ;;
    step)  MOE_VARIANTS=${STEP_VARIANTS:-default,rows:KVBENCH_DECODE_Q8_IMPL=rows,pdl:KVBENCH_DECODE_PDL=1,warp:KVBENCH_DECODE_Q8_SOFTMAX=warp,p3:KVBENCH_DECODE_Q8_TILES=64x3x4x3} \
             MOE_MAX_S=${MOE_MAX_S:-330} MOE_TAG=-s37 MOE_ARGS="${STEP_ARGS:---profile none}" \
             bash benchmarks/gpu_session.sh moevar 2>&1 | tail -34 ;;
    bound) bash benchmarks/oneoff/session35.sh bound ;;     # on an H200 only: the one-launch bound
  esac
  echo "[$step: ${SECONDS} s]"
done
