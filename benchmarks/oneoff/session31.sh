#!/usr/bin/env bash
# Thirty-first session's call 7 (reports/h100-2026-12-07b): the one-launch bound at the twenty-ninth
# session's arguments, through session28.sh's bound step. Carry .whl.
# (Its peer step was dropped: the llama-bench carry, .devcarry/lcxz at 42 MB, no longer fits the
# 64 MiB carry beside the ~33 MB tracked tree; session30.sh all builds llama-bench in the call.)
# Usage on the device: bash benchmarks/oneoff/session31.sh bound
export BOUND_TIMEOUT=${BOUND_TIMEOUT:-260}
export BOUND_ARGS=${BOUND_ARGS:---ctxs 4096,16384,32768 --chunks 2048,8192,32768 --blocks 1024,4096 --reps 10}
exec bash "$(dirname "$0")/session28.sh" bound
