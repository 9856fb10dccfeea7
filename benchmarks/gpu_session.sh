#!/usr/bin/env bash
# One GPU-machine session: set up, run the GPU tests and benchmarks, keep logs in $OUT.
# Expects: .whl/ (the gguf wheel) carried, SmolLM2 parts already copied to /tmp/smolparts
# (benchmarks/gpu_carry.sh makes .whl and .devcarry/ from nothing; run it first each session).
# Steps needing the corpus (long, nightly) need .devcarry/corpora carried too.
# Usage on the device: bash benchmarks/gpu_session.sh [steps...]   (default: all)
set -uo pipefail
export PYTHONUNBUFFERED=1 KVBENCH_CACHE=/tmp/kvcache
mkdir -p "$KVBENCH_CACHE" "${OUT:=/tmp/out}"
if [ ! -d /tmp/site/gguf ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
# carried inputs: the corpus (the device reaches no package index) and SmolLM2 in SMOL_PARTS parts
# (default 3, one per call: the tree that travels is capped at 64 MiB, the tracked files take 18)
[ -d .devcarry/corpora ] && mkdir -p "$KVBENCH_CACHE/corpora" && cp -rn .devcarry/corpora/. "$KVBENCH_CACHE/corpora/"
mkdir -p /tmp/smolparts && for p in .devcarry/smolpart.0*; do [ -f "$p" ] && cp -n "$p" /tmp/smolparts/; done
SMOL=$KVBENCH_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$SMOL" ] && [ "$(ls /tmp/smolparts/smolpart.* 2>/dev/null | wc -l)" = "${SMOL_PARTS:-3}" ]; then
  cat /tmp/smolparts/smolpart.* > "$SMOL"
fi
echo "SmolLM2 parts here: $(ls /tmp/smolparts 2>/dev/null | tr '\n' ' ')"
[ -f "$SMOL" ] && sha256sum "$SMOL"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
# a llama-bench carried from an earlier call (benchmarks/gpu_carry.sh, lcwait): .devcarry/lcxz/llama-bench.xz*
# (42 MB: fits the 64 MiB carry beside the tracked tree) or the older gzip parts in .devcarry/lcbin/
carried_llamabench() {
  [ -x /tmp/lcb/bin/llama-bench ] && return 0
  mkdir -p /tmp/lcb/bin
  if ls .devcarry/lcxz/llama-bench.xz* >/dev/null 2>&1; then
    cat .devcarry/lcxz/llama-bench.xz* | xz -dc > /tmp/lcb/bin/llama-bench
  elif [ -f .devcarry/lcbin/llama-bench.gz.part00 ]; then
    cat .devcarry/lcbin/llama-bench.gz.part* | gunzip > /tmp/lcb/bin/llama-bench
  else
    return 0
  fi
  chmod +x /tmp/lcb/bin/llama-bench
}
steps="${*:-tests attn hybrid bench}"
for step in $steps; do
  echo "=== $step ==="
  case $step in
    tests)  python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
            # the kernels compiled against their references (make test-gpu's second half)
            python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_rope_append.py tests/test_rows_kernels.py 2>&1 | tee -a "$OUT/gpu-tests.log" | tail -8 ;;
    kernels) # tests/test_kernels.py whole (not only -m gpu): on CUDA its kernel-vs-reference cases run
            # the Triton kernels compiled for the device instead of TRITON_INTERPRET (other files'
            # unmarked tests force Triton on CPU tensors and belong to the CPU run)
            python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$OUT/gpu-kernel-tests.log" | tail -25 ;;
    attn)   timeout ${ATTN_TIMEOUT:-590} python3 benchmarks/bench_attention.py --sweep ${ATTN_ARGS:-} --out "$OUT/attention.json" 2>&1 | tee "$OUT/bench-attention.log" | tail -40 ;;
    moevar) # issue 14.2: the captured decode step with each change on and off (bf16/q8_0 KV, depth 16 and 16384)
            python3 -c "from engine import synth; synth.ensure('coder30b-synth')" 2>&1 | tail -1
            # MOE_ARGS: e.g. "--expert-format blocks --weight-format q8_0" (llama.cpp's bytes: Q4_0 experts, Q8_0 attention)
            python3 benchmarks/bench_moe_decode.py --kv bf16,q8_0 --depths 16,16384 --paths cuda_graph --timing both \
              --variants ${MOE_VARIANTS:-default,no_fused_gemv,moeloop:KVBENCH_MOE_UNROLL=0} --no-sweep ${MOE_ARGS:-} \
              --max-seconds ${MOE_MAX_S:-330} --out "$OUT/moe_decode_variants${MOE_TAG:-}.json" 2>&1 | grep -v "^\s*$" \
              | tee "$OUT/moe-variants${MOE_TAG:-}.log" | tail -40 ;;
    q8occ)  # the occupancy model's bet (reports/cpu-2026-12-06d): q8_0's batched form at the 4-7 programs a
            # SM its registers allow, predicted 21-23 us against the rows default's 28.8 (coder30b, ctx 16384).
            # 1) the sweep as a step pays it (layered, position on the device); 2) the captured coder30b step
            # with the best three launches as variants (KVBENCH_DECODE_Q8_TILES moves q8_0's launch only)
            timeout ${ATTN_TIMEOUT:-200} python3 benchmarks/bench_attention.py --sweep --geometry coder30b \
              --sweep-dtypes q8_0 --sweep-impls rows,batched --sweep-keys q8_impl --sweep-layered --sweep-depths 16384 \
              --ctxs "" --skip-prefill --out "$OUT/attention-q8occ.json" 2>&1 | grep -v "^{" | tee "$OUT/q8occ-attn.log" | tail -25
            python3 -c "from engine import synth; synth.ensure('coder30b-synth')" 2>&1 | tail -1
            python3 benchmarks/bench_moe_decode.py --kv bf16,q8_0 --depths 16,16384 --paths cuda_graph --timing both \
              --variants "${Q8OCC_VARIANTS:-default,b16x7:KVBENCH_DECODE_Q8_IMPL=batched+KVBENCH_DECODE_Q8_TILES=16x7x2x2,b32x6:KVBENCH_DECODE_Q8_IMPL=batched+KVBENCH_DECODE_Q8_TILES=32x6x2x2,b32x4:KVBENCH_DECODE_Q8_IMPL=batched+KVBENCH_DECODE_Q8_TILES=32x4x4x2}" \
              --no-sweep ${MOE_ARGS:-} --max-seconds ${MOE_MAX_S:-300} --out "$OUT/moe_decode_q8occ.json" 2>&1 \
              | grep -v "^\s*$" | tee "$OUT/moe-q8occ.log" | tail -40 ;;
    lcbuildbg) # start the llama-bench CUDA build in the background (niced), so GPU steps run meanwhile; lcwait joins it
            (SECONDS=0; nice -n 19 python3 benchmarks/bench_llamacpp.py build .devcarry/llamacpp-src.tar.gz /tmp/lcb \
               > /tmp/lcbuild.out 2>&1; echo "llama-bench build: ${SECONDS} s (background, niced)" >> /tmp/lcbuild.out) &
            echo "lcbuild started in the background (pid $!)" ;;
    lcwait) w=0; while [ ! -x /tmp/lcb/bin/llama-bench ] && pgrep -f "bench_llamacpp.py build" >/dev/null \
              && [ $w -lt ${LCWAIT_S:-240} ]; do sleep 5; w=$((w+5)); done
            sleep 2; tail -3 /tmp/lcbuild.out | tee "$OUT/lcbuild.log"; ls -la /tmp/lcb/bin/llama-bench | tee -a "$OUT/lcbuild.log"
            strip -o /tmp/llama-bench.stripped /tmp/lcb/bin/llama-bench 2>/dev/null && ls -la /tmp/llama-bench.stripped | tee -a "$OUT/lcbuild.log"
            [ "$(stat -c %s /tmp/llama-bench.stripped 2>/dev/null || echo 99999999999)" -lt 45000000 ] \
              && split -b 15000000 -d /tmp/llama-bench.stripped "$OUT/llama-bench.part"
            # compressed, it comes back under the 64 MiB limit: later sessions carry it instead of building
            gzip -9 -c /tmp/llama-bench.stripped > /tmp/llama-bench.gz && ls -la /tmp/llama-bench.gz | tee -a "$OUT/lcbuild.log"
            # xz'd it is 42 MB: .devcarry/lcxz/ fits a later call's 64 MiB carry only beside a tracked tree
            # under ~22 MB (it was ~33 MB on 2026-12-07, so then the call builds llama-bench instead)
            xz -9 -T0 -c /tmp/llama-bench.stripped > /tmp/llama-bench.xz && split -b 15000000 -d /tmp/llama-bench.xz "$OUT/llama-bench.xz.part" ;;
    hybrid) python3 benchmarks/bench_hybrid.py --out "$OUT/hybrid.json" 2>&1 | tee "$OUT/bench-hybrid.log" | tail -30 ;;
    bench)  for kv in fp32 bf16 q8_0; do python3 -m engine bench --device cuda --kv-dtype $kv --decode-tokens 128 2>&1 | tail -1; done | tee "$OUT/engine-bench.jsonl" ;;
    suite)  rm -rf /tmp/suite && mkdir -p /tmp/suite
            python3 -m harness run suites/kv_dtype.toml --device cuda --out /tmp/suite/results \
              --report /tmp/suite/report --no-progress 2>&1 | tee "$OUT/suite.log" | tail -40
            tar czf "$OUT/suite.tgz" -C /tmp/suite results report ;;
    coder)  # the headline command on the real geometry: `make bench MODEL=coder30b-synth` minus the venv
            # (the GPU machine has no package index): device auto, weight format auto, default suite
            rm -rf /tmp/coder && mkdir -p /tmp/coder
            python3 -c "from engine import synth; synth.ensure('coder30b-synth')" 2>&1 | tail -2
            free -g | head -2
            SECONDS=0
            timeout ${SUITE_TIMEOUT:-470} python3 -m harness run suites/kv_dtype.toml --model coder30b-synth \
              --out /tmp/coder/results --report /tmp/coder/report --no-progress 2>&1 \
              | grep -v "^\s*$" | tee "$OUT/coder-suite.log" | tail -45
            echo "suite wall time: ${SECONDS} s" | tee -a "$OUT/coder-suite.log"
            tar czf "$OUT/coder-suite.tgz" -C /tmp/coder results report ;;
    gemma3) # issue 14.5: the default suite on the gemma3 stand-in (Gemma-3-270M geometry, random Q8_0
            # weights, made on the device): sliding-window decode through the Triton kernel
            rm -rf /tmp/g3 && mkdir -p /tmp/g3
            python3 -c "from engine import synth; synth.ensure('gemma3-synth')" 2>&1 | tail -1
            SECONDS=0
            timeout ${SUITE_TIMEOUT:-400} python3 -m harness run suites/kv_dtype.toml --model gemma3-synth \
              --out /tmp/g3/results --report /tmp/g3/report --no-progress 2>&1 | grep -v "^\s*$" \
              | tee "$OUT/gemma3-suite.log" | tail -40
            echo "gemma3-synth suite wall time: ${SECONDS} s" | tee -a "$OUT/gemma3-suite.log"
            (cd /tmp/g3 && tar czf "$OUT/gemma3-suite.tgz" $(ls -d results report 2>/dev/null)) ;;
    nightly) # one shard of suites/nightly.toml: NIGHTLY_MODELS="coder30b-synth olmoe-synth" (stand-ins)
            # NIGHTLY_RESUME=1: continue the shard's results (left in /tmp by an earlier call on this
            # machine, or carried back as .devcarry/nightly-<tag>.tgz) with --resume
            tag=$(echo "${NIGHTLY_MODELS:-smollm2-135m}" | tr ' ' '_')
            rargs=""
            if [ "${NIGHTLY_RESUME:-0}" = 1 ]; then
              if [ ! -f "/tmp/nightly/$tag/results/manifest.json" ] && [ -f ".devcarry/nightly-$tag.tgz" ]; then
                mkdir -p "/tmp/nightly/$tag" && tar xzf ".devcarry/nightly-$tag.tgz" -C "/tmp/nightly/$tag"
              fi
              rargs="--resume"
            else
              rm -rf "/tmp/nightly/$tag" && mkdir -p "/tmp/nightly/$tag"
            fi
            margs=""; for m in ${NIGHTLY_MODELS:-smollm2-135m}; do margs="$margs --model $m"; done
            [ "$tag" = coder30b-synth ] && python3 -c "from engine import synth; synth.ensure('coder30b-synth')" 2>&1 | tail -1
            SECONDS=0
            timeout ${SUITE_TIMEOUT:-470} python3 -m harness run suites/nightly.toml $margs $rargs \
              --out "/tmp/nightly/$tag/results" --report "/tmp/nightly/$tag/report" --no-progress 2>&1 \
              | grep -v "^\s*$" | tee "$OUT/nightly-$tag.log" | tail -40
            echo "nightly shard $tag wall time: ${SECONDS} s" | tee -a "$OUT/nightly-$tag.log"
            # (a shard stopped by the timeout has results but no report yet)
            (cd "/tmp/nightly/$tag" && tar czf "$OUT/nightly-$tag.tgz" $(ls -d results report 2>/dev/null)) ;;
    lcbuild) # llama-bench with CUDA for this GPU from the carried sources (.devcarry/llamacpp-src.tar.gz,
            # made by bench_llamacpp.py pack); ~5 min on 16 cores; the binary comes back in <16 MiB parts
            SECONDS=0
            python3 benchmarks/bench_llamacpp.py build .devcarry/llamacpp-src.tar.gz /tmp/lcb 2>&1 | tail -3
            echo "llama-bench build: ${SECONDS} s" | tee "$OUT/lcbuild.log"
            ls -la /tmp/lcb/bin/llama-bench | tee -a "$OUT/lcbuild.log"
            split -b 15000000 -d /tmp/lcb/bin/llama-bench "$OUT/llama-bench.part" ;;
    lcbench) # llama.cpp and kvbench on the same files: smollm2-synth (Q8_0 SmolLM2 geometry) and coder30b-synth
            # LCB_ONLY=smollm2 or LCB_ONLY=coder: one of the two
            carried_llamabench
            S=$KVBENCH_CACHE/synth
            if [ "${LCB_ONLY:-}" != coder ]; then
              python3 -c "from engine import models; models.resolve('smollm2-synth')" 2>&1 | tail -1
              python3 benchmarks/bench_llamacpp.py bench $S/smollm2-synth.gguf --bin /tmp/lcb/bin/llama-bench \
                --ctk f16,bf16,q8_0 --depths 16,4096,16384 --reps 5 --tg 64 --out "$OUT/llamacpp-smollm2${LCB_TAG:-}.json" 2>&1 | tail -12
            fi
            if [ "${LCB_ONLY:-}" != smollm2 ]; then
              python3 -c "from engine import models; models.resolve('coder30b-synth')" 2>&1 | tail -1
              python3 benchmarks/bench_llamacpp.py bench $S/coder30b-synth.gguf --bin /tmp/lcb/bin/llama-bench \
                --ctk f16,q8_0 --depths 0,16384 --reps 5 --tg 64 --out "$OUT/llamacpp-coder.json" 2>&1 | tail -6
              python3 benchmarks/bench_llamacpp.py bench $S/coder30b-synth.gguf --bin /tmp/lcb/bin/llama-bench \
                --ctk f16 --depths 0 --reps 5 --tg 64 --n-cpu-moe 17 --out "$OUT/llamacpp-coder-ncmoe17.json" 2>&1 | tail -3
            fi ;;
    newk)   # recent kernels compiled for the GPU: RoPE + append, the combine over the used splits, q8_0's fma form
            python3 -m pytest -q -p no:cacheprovider tests/test_rope_append.py 2>&1 | tail -2 | tee "$OUT/newk-tests.log"
            python3 -m pytest -q -p no:cacheprovider -k "combine or short_depth or q8_decode or decode_kernel_matches or launch_config" tests/test_kernels.py 2>&1 | tail -2 | tee -a "$OUT/newk-tests.log"
            python3 -m pytest -q -m gpu -k settings_on_match_off -p no:cacheprovider tests/test_static_decode.py 2>&1 | tail -2 | tee -a "$OUT/newk-tests.log" ;;
    cpumoe) # llama.cpp's placement on both engines, same file, same call: experts of the first N MoE layers on
            # the CPU, the rest (Q4_0 blocks) and all attention/KV on the GPU. CPUMOE_N: llama.cpp's counts
            # (17: 46.8 tok/s at ~12 GiB, issue 14); kvbench at 12 GiB (auto) and at the same counts
            carried_llamabench
            python3 -c "from engine import models; models.resolve('coder30b-synth')" 2>&1 | tail -1
            # a freshly written 18 GB file is still being flushed: llama.cpp's CPU layers timed during
            # that ran at 34-40 tok/s with +/-8-22 (reports/h100-2026-12-05c call 4) against 81 quiet
            sync
            # (CPUMOE_LCB=0: kvbench's cases alone, e.g. a second variant in a call that timed llama.cpp already)
            for n in ${CPUMOE_N:-17 22}; do
              [ "${CPUMOE_LCB:-1}" = 1 ] && [ -x /tmp/lcb/bin/llama-bench ] && python3 benchmarks/bench_llamacpp.py bench $KVBENCH_CACHE/synth/coder30b-synth.gguf \
                --bin /tmp/lcb/bin/llama-bench --ctk f16,q8_0 --depths ${CPUMOE_DEPTHS:-16,1024} --reps ${LCB_REPS:-3} --tg 32 --n-cpu-moe $n \
                --out "$OUT/llamacpp-coder-ncmoe$n.json" 2>&1 | tail -4
            done
            # CPUMOE_KV (default bf16: the placements first; CPUMOE_KV=bf16,q8_0 for the KV dtypes too)
            timeout ${CPUMOE_TIMEOUT:-420} python3 benchmarks/bench_cpu_moe.py --model coder30b-synth \
              --cases ${CPUMOE_CASES:-12GiB:auto:q8_0:pcie,12GiB:auto:q8_0:dma,12GiB:auto:q8_0,12GiB:auto,$(for n in ${CPUMOE_N:-17 22}; do printf 'none:%s,' $n; done)none:0} --kv ${CPUMOE_KV:-bf16} --depths ${CPUMOE_DEPTHS:-16,1024} --tokens 32 --reps 3 \
              --threads ${CPUMOE_THREADS:-4,8,16} --gpu-shares ${CPUMOE_SHARES:-0} ${CPUMOE_ARGS:-} --out "$OUT/cpu_moe${CPUMOE_TAG:-}.json" 2>&1 \
              | tee "$OUT/cpu-moe${CPUMOE_TAG:-}.log" | tail -20 ;;
    loadprof) # where coder30b-synth's load goes (issue 14: <= 20 s; 21.9 s in reports/h200-2026-12-04c)
            python3 -c "from engine import synth; synth.ensure('coder30b-synth')" 2>&1 | tail -1
            # LOAD_ARGS: e.g. "--weight-format q8_0 --expert-format blocks --cold" (llama.cpp's bytes, page cache dropped)
            python3 benchmarks/profile_load.py --model coder30b-synth --device cuda --top 30 ${LOAD_ARGS:-} \
              --out "$OUT/load_profile.json" 2>&1 | tee "$OUT/load-profile.log" | tail -35 ;;
    q8test) # q8_0's decode kernels compiled, every form, with each form's error printed
            python3 -m pytest -q -s -p no:cacheprovider -k "q8_decode_kernel_across or decode_kernel_matches" tests/test_kernels.py 2>&1 | grep -v "^\s*$" | tail -60 | tee "$OUT/q8-tests.log" ;;
    q8wtest) # the static step over Q8_0 weights, fused gemv on vs off, compiled (its error printed)
            python3 -m pytest -q -s -p no:cacheprovider -k "fused_gemv" tests/test_qweights.py tests/test_gemv.py 2>&1 \
              | grep -v "^\s*$" | tail -30 | tee "$OUT/q8w-tests.log" ;;
    smolprof) # where the dense (SmolLM2-geometry) captured decode step's time goes: profile + timing
            # SMOL_DEPTHS (16,16384), SMOL_STEPS (steps per repetition, 32), SMOL_TAG (file-name suffix: a
            # second run in one call keeps the first's files), SMOL_ARGS (e.g. "--weight-format q8_0": the
            # file's Q8_0 weights as llama.cpp reads them, half the bf16 bytes)
            python3 benchmarks/bench_moe_decode.py --model smollm2-synth --kv ${SMOL_KV:-bf16,q8_0} --depths ${SMOL_DEPTHS:-16,16384} \
              --paths cuda_graph --timing both --variants ${SMOL_VARIANTS:-default,no_rope_append:KVBENCH_DECODE_ROPE_APPEND=0,cb128:KVBENCH_DECODE_COMBINE_BLOCK=128} \
              --steps ${SMOL_STEPS:-32} --no-sweep --no-kernel-bench --max-seconds ${SMOL_MAX_S:-240} ${SMOL_ARGS:-} \
              --out "$OUT/smollm2_decode_step${SMOL_TAG:-}.json" 2>&1 | grep -v "^\s*$" | tee "$OUT/smollm2-step${SMOL_TAG:-}.log" | tail -40 ;;
    ropetest) # the q/k/v GEMV's RoPE epilogue compiled for this GPU: kernel tests and the captured step on vs off
            python3 -m pytest -q -p no:cacheprovider -k "rope" tests/test_gemv.py 2>&1 | tail -3 | tee "$OUT/rope-tests.log"
            python3 -m pytest -q -m gpu -k settings_on_match_off -p no:cacheprovider tests/test_static_decode.py 2>&1 | tail -3 | tee -a "$OUT/rope-tests.log" ;;
    gemv)   # engine.kernels.gemv vs cuBLAS (+ the op it fuses) per projection shape, and its tests compiled for the GPU
            python3 -m pytest -q -p no:cacheprovider tests/test_gemv.py tests/test_qweights.py 2>&1 | tail -3 | tee "$OUT/gemv-tests.log"
            python3 -m pytest -q -m gpu -k settings_on_match_off -p no:cacheprovider tests/test_static_decode.py 2>&1 | tail -3 | tee -a "$OUT/gemv-tests.log"
            ;&       # then the bench, as gemvbench
    moeblocks) # the Q4_0-expert MoE kernels' tile/form sweep (alone, HBM-bound), then the coder30b step at
            # llama.cpp's bytes with the default, the old per-value form, and the sweep's best (moevar)
            timeout ${MOEB_TIMEOUT:-300} python3 benchmarks/bench_moe_blocks.py --max-seconds ${MOEB_MAX_S:-240} ${MOEB_ARGS:-} \
              --out "$OUT/moe_blocks.json" 2>&1 | tee "$OUT/moe-blocks.log" | grep -v "^\s*$" | tail -30
            best=$(sed -n 's/^export //p' "$OUT/moe_blocks.env" 2>/dev/null | paste -sd+)
            export MOE_ARGS="--expert-format blocks --weight-format q8_0" MOE_MAX_S=${MOE_MAX_S:-240} \
              MOE_VARIANTS="${MOEB_VARIANTS:-default,gather:KVBENCH_MOE_BLOCKS_FORM=gather}${best:+,best:$best}"
            echo "moevar variants: $MOE_VARIANTS"
            # MOEB_NO_STEP=1: the sweep alone (e.g. --placement pinned, whose best tiles are not the step's)
            [ "${MOEB_NO_STEP:-0}" = 1 ] || bash "$0" moevar ;;
    coderpeer) # issue 14's headline row in one call: coder30b-synth all on the GPU at llama.cpp's bytes
            # (our captured step, default tiles) and llama-bench on the same file (carried binary:
            # .devcarry/lcxz/llama-bench.xz, or one built by lcbuild in this call), same depths
            carried_llamabench
            MOE_ARGS="--expert-format blocks --weight-format q8_0" MOE_VARIANTS=${MOE_VARIANTS:-default} \
              MOE_MAX_S=${MOE_MAX_S:-150} MOE_TAG=${MOE_TAG:-_coderpeer} bash "$0" moevar
            ;&       # then llama-bench on the same file, as lccoder
    lccoder) # llama-bench alone on coder30b-synth (after moeblocks, whose step at the default is ours in the same call)
            carried_llamabench
            python3 -c "from engine import synth; synth.ensure('coder30b-synth')" 2>&1 | tail -1
            sync     # a fresh file's writeback competes with llama.cpp's host threads (see cpumoe)
            [ -x /tmp/lcb/bin/llama-bench ] && python3 benchmarks/bench_llamacpp.py bench $KVBENCH_CACHE/synth/coder30b-synth.gguf \
              --bin /tmp/lcb/bin/llama-bench --ctk f16,q8_0 --depths 16,16384 --reps ${LCB_REPS:-3} --tg 32 \
              --out "$OUT/llamacpp-coder.json" 2>&1 | tail -8 | tee "$OUT/llamacpp-coder.log" ;;
    q8diag) # the q8_0 rows kernel's GPU precision (tests/test_kernels.py magnitude test): the test with
            # each form's error, then whether float16 tensor-core dots accumulate as float32 does
            bash "$0" q8test
            python3 benchmarks/oneoff/tc_accum.py 2>&1 | tee "$OUT/tc-accum.log" ;;
    verify) # what the seventeenth and eighteenth sessions changed without a GPU: the row kernels and the exact power
            # of two compiled (their tests), the q8_0 rows kernel's magnitude test and error map, and
            # the fast prefill against HF at 8192 / 16384 (bench_peer, prefill rows only), then its profile
            python3 -m pytest -q -p no:cacheprovider tests/test_rows_kernels.py 2>&1 | tail -3 | tee "$OUT/rows-tests.log"
            # the eighteenth session's: the mapped embedding (a CUDA view of registered host memory in
            # a graph; the cpu_moe graph against eager on it) and the prefill lending its scratch
            python3 -m pytest -q -s -m gpu -p no:cacheprovider -k "mapped or host_experts_matches_eager or lends" \
              tests/test_expert_placement.py tests/test_ledger.py 2>&1 | grep -v "^\s*$" | tail -8 | tee "$OUT/gpu18-tests.log"
            bash "$0" q8test
            timeout 120 python3 benchmarks/oneoff/q8_rows_map.py 2>&1 | tee "$OUT/q8-rows-map.log" | grep -v "^head" | tail -40
            timeout 240 python3 benchmarks/bench_peer.py --model smollm2-synth --weight-formats bf16 --kv bf16 --no-decode \
              --ctx 16 --out "$OUT/peer-prefill.json" 2>&1 | grep -v "Converting\|Warning\|warn" | tee "$OUT/peer-prefill.log" | tail -12
            bash "$0" pfprof ;;
    cputier) # (first: engine.native built on this host and timed against torch's int4 path, no GPU needed)
            # (CT_NATIVE_BENCH=0 skips it, CT_PASSIVE=0 the passive-OpenMP profile at the end)
            [ "${CT_NATIVE_BENCH:-1}" = 1 ] && timeout 120 python3 benchmarks/oneoff/native_experts_bench.py --layers 3 --threads 16,8 --also-march haswell \
              --out "$OUT/native_experts.json" 2>&1 | tee "$OUT/native-experts.log" | tail -4
            # where a cpu-tier step's host round trip goes (the split's no-gain, perf-notes nineteenth
            # session): the lending and clock GPU tests, then cpu_tier_profile.py at each thread count and
            # share, and again with passive OpenMP workers (spinning ones may starve the launching thread)
            python3 -m pytest -q -s -m gpu -p no:cacheprovider -k "lends or clock or split_step or auto_host_experts or native or host_nodes" \
              tests/test_ledger.py tests/test_cpu_experts.py tests/test_expert_placement.py 2>&1 | grep -v "^\s*$" | tail -12 | tee "$OUT/cputier-tests.log"
            python3 -c "from engine import synth; synth.ensure('coder30b-synth')" 2>&1 | tail -1
            sync
            timeout ${CT_TIMEOUT:-300} python3 benchmarks/oneoff/cpu_tier_profile.py --budget ${CT_BUDGET:-11468MiB} \
              --threads ${CT_THREADS:-16,8} --shares ${CT_SHARES:-0,2,4,6} --native ${CT_NATIVE:-0,1} --host-nodes ${CT_NODES:-0} --node-waits ${CT_WAITS:-sleep} --node-runs ${CT_RUNS:-callback} \
              --out "$OUT/cpu_tier_profile.json" 2>&1 \
              | grep -v "^\s*$" | tee "$OUT/cpu-tier-profile.log" | tail -40
            [ "${CT_PASSIVE:-1}" = 1 ] && OMP_WAIT_POLICY=PASSIVE timeout ${CT_TIMEOUT:-300} python3 benchmarks/oneoff/cpu_tier_profile.py \
              --budget ${CT_BUDGET:-11468MiB} --threads 16 --shares ${CT_SHARES:-0,2,4,6} --profile-steps 0 --tag passive \
              --out "$OUT/cpu_tier_profile_passive.json" 2>&1 | grep -v "^\s*$" | tee "$OUT/cpu-tier-profile-passive.log" | tail -8 ;;
    hostprobe) # where a host node's time goes: a no-op host node's round trip, the native job on the main
            # thread / a second thread / alternating (two OpenMP teams), and as N nodes in one graph
            timeout ${HP_TIMEOUT:-180} python3 benchmarks/oneoff/host_node_probe.py --nodes ${HP_NODES:-20} \
              --out "$OUT/host_node_probe.json" 2>&1 | tee "$OUT/host-node-probe.log" | tail -6 ;;
    doorbell) # would a doorbell beat the cpu tier's round trip? the round trip as now (sync + launch) against
            # cuStreamWriteValue32 / cuStreamWaitValue32 on page-locked flags, no work on either side
            timeout ${DB_TIMEOUT:-120} python3 benchmarks/oneoff/doorbell_probe.py --rounds 20 \
              --out "$OUT/doorbell.json" 2>&1 | tee "$OUT/doorbell.log" | tail -3 ;;
    contention) # do the CPU's int4 experts and the GPU's PCIe reads share one limit? (the split's
            # no-gain in reports/h100-2026-12-05e): each alone and both at once, per split of k=8
            timeout ${CONT_TIMEOUT:-240} python3 benchmarks/oneoff/host_contention.py ${CONT_ARGS:---layers 6} \
              --out "$OUT/host_contention.json" 2>&1 | tee "$OUT/host-contention.log" | tail -12 ;;
    blocksuite) # the default suite's throughput_blocks check alone on coder30b-synth (tg32 at depth 0 and
            # 4096 per KV dtype: what the speed column says a KV dtype costs, on the engine's fast path)
            python3 benchmarks/oneoff/blocks_suite.py /tmp/blocks.toml
            python3 -c "from engine import synth; synth.ensure('coder30b-synth')" 2>&1 | tail -1
            rm -rf /tmp/bsuite && SECONDS=0
            timeout ${SUITE_TIMEOUT:-300} python3 -m harness run /tmp/blocks.toml --model coder30b-synth \
              --out /tmp/bsuite/results --report /tmp/bsuite/report --no-progress 2>&1 | grep -v "^\s*$" \
              | tee "$OUT/blocks-suite.log" | tail -15
            echo "wall ${SECONDS} s" >> "$OUT/blocks-suite.log"
            tar czf "$OUT/blocks-suite.tgz" -C /tmp/bsuite . ;;
    gemvbench) # bench_gemv alone (no tests): GEMV_ARGS picks weights, geometry, tiles and Q8_0 forms
            python3 benchmarks/bench_gemv.py ${GEMV_ARGS:---weights bf16,q8_0 --q8-forms blocks --variants default,2x512,4x256,8x256,8x512,16x512} \
              --out "$OUT/gemv${GEMV_TAG:-}.json" 2>&1 | tee "$OUT/bench-gemv${GEMV_TAG:-}.log" | tail -40 ;;
    pfprof) python3 benchmarks/profile_prefill.py --model smollm2-synth --out "$OUT/prefill_profile.json" 2>&1 \
              | grep -v "Converting\|Loading weights\|UserWarning\|_warn_once\|warnings.warn" | tee "$OUT/prefill-profile.log" | tail -80 ;;
    long)   # suites/long.toml on SmolLM2-135M at full size (trained context 8192) on the GPU
            rm -rf /tmp/long && mkdir -p /tmp/long
            SECONDS=0
            timeout ${SUITE_TIMEOUT:-470} python3 -m harness run suites/long.toml --model smollm2-135m --device cuda \
              --out /tmp/long/results --report /tmp/long/report --no-progress ${LONG_ARGS:-} 2>&1 | grep -v "^\s*$" \
              | tee "$OUT/long-suite.log" | tail -40
            echo "long suite wall time: ${SECONDS} s" | tee -a "$OUT/long-suite.log"
            (cd /tmp/long && tar czf "$OUT/long-suite.tgz" $(ls -d results report 2>/dev/null)) ;;
    peersynth) python3 benchmarks/bench_peer.py --model smollm2-synth --out "$OUT/peer-smollm2-synth.json" 2>&1 \
              | grep -v Converting | tee "$OUT/bench-peer-synth.log" | tail -30 ;;
    peer)   python3 benchmarks/bench_peer.py --out "$OUT/peer.json" 2>&1 | grep -v Converting | tee "$OUT/bench-peer.log" | tail -25 ;;
    unacc)  python3 benchmarks/bench_hybrid.py --models smollm2-135m --kv fp32,q8_0 --decode 8 \
              --out "$OUT/hybrid-unaccounted.json" 2>&1 | tee "$OUT/hybrid-unaccounted.log" | tail -8 ;;
  esac
done
# The device returns at most 8 files from $OUT: past that, pack the small ones (logs, JSON,
# suite tarballs) into one archive so nothing is left behind; big parts (llama-bench) stay apart.
n=$(find "$OUT" -maxdepth 1 -type f | wc -l)
if [ "$n" -gt 8 ]; then
  small=$(cd "$OUT" && find . -maxdepth 1 -type f -size -8M -printf "%f\n" | sort)
  (cd "$OUT" && tar czf session-files.tgz $small && rm -f $small)
  echo "packed $(echo $small | wc -w) files into session-files.tgz (more than 8 in \$OUT)"
fi
