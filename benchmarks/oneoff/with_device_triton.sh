#!/usr/bin/env bash
# Run a command with the GPU machine's Triton on this (GPU-less) box, so an offline compile
# (benchmarks/oneoff/q8_regs_offline.py: Triton -> PTX -> ptxas -> cuobjdump) sees what the device
# compiles. The twenty-fourth session found the .venv's Triton (3.9) and the device's (3.6, pinned by
# torch 2.11+cu130 there) allocate and schedule the q8_0 rows kernel differently: 225 against 255
# registers, and the int16-word forms 19-29% fewer loop instructions under 3.9 but 2-8% more under
# 3.6, which is what the device timed (reports/cpu-2026-12-06d). Under 3.6 the offline registers
# equal the device's for every variant timed there.
#
# Usage: bash benchmarks/oneoff/with_device_triton.sh python benchmarks/oneoff/q8_regs_offline.py --out x.json
# DEVICE_TRITON (default 3.6.0) picks the version; it is installed once into .tri/<version>/
# (git-ignored) from the package index with no dependencies.
set -euo pipefail
ver=${DEVICE_TRITON:-3.6.0}
here=$(cd "$(dirname "$0")/../.." && pwd)
dest="$here/.tri/$ver"
py="$here/.venv/bin/python"
[ -x "$py" ] || py=python3
if [ ! -f "$dest/triton/__init__.py" ]; then
  echo "installing triton==$ver into $dest (once) ..." >&2
  "$py" -m pip install -q --no-deps --target "$dest" "triton==$ver"
fi
got=$(PYTHONPATH="$dest" "$py" -c "import triton; print(triton.__version__)")
[ "$got" = "$ver" ] || { echo "error: $dest holds triton $got, not $ver; remove it and rerun" >&2; exit 2; }
cmd=("$@")
[ "${cmd[0]:-}" = python ] && cmd[0]="$py"
cd "$here"
TRITON_INTERPRET=0 PYTHONPATH="$dest:$here${PYTHONPATH:+:$PYTHONPATH}" exec "${cmd[@]}"
