#!/usr/bin/env bash
# Make what a GPU-machine session carries (benchmarks/gpu_session.sh reads them), from nothing,
# on this machine (it reaches the package registries; the GPU machine reaches nothing):
#   .whl/                          gguf's wheel (the device image has every other dependency)
#   .devcarry/llamacpp-src.tar.gz  llama.cpp as vendored in llama-cpp-python's PyPI sdist,
#                                  trimmed to what builds llama-bench (bench_llamacpp.py pack)
#   .devcarry/smolpart.00 .. .02   SmolLM2-135M's GGUF (94 MiB) in three parts: a call carries at
#                                  most 64 MiB with the tracked tree (18 MiB), so one part per
#                                  call, three calls back to back while the machine stays warm
#   .devcarry/corpora/             the pinned corpus (suites/long.toml, nightly.toml)
# All are ignored (.git/info/exclude) and none is in a session's fresh checkout: run this first.
# llama-bench itself is built on the device (gpu_session.sh lcbuildbg / lcwait, ~5 min there);
# its xz'd parts (llama-bench.xz.part*, 42 MB in all) come back in $OUT: copy them into
# .devcarry/lcxz/ and carry that folder (cpumoe and coderpeer unpack it). The gzip'd parts
# (.devcarry/lcbin/, 44 MB) no longer fit the 64 MiB carry beside the tracked tree.
# Usage: bash benchmarks/gpu_carry.sh            (PY=python with kvbench installed; default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LCP_VERSION=${LCP_VERSION:-0.3.36}
mkdir -p .git/info
for p in /.whl/ /.devcarry/; do
  grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude
done
mkdir -p .whl .devcarry

# 1. gguf, the version installed here (pure Python: one wheel for any platform)
v=$($PY -c "import importlib.metadata as m; print(m.version('gguf'))")
rm -f .whl/gguf-*.whl
$PY -m pip download -q --no-deps --only-binary=:all: -d .whl "gguf==$v"
ls -la .whl

# 2. llama.cpp sources from the sdist (pip prepares its metadata in an isolated build
# environment on the way: ~30 s)
if [ ! -f .devcarry/llamacpp-src.tar.gz ]; then
  tmp=$(mktemp -d)
  $PY -m pip download -q --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$LCP_VERSION"
  $PY benchmarks/bench_llamacpp.py pack "$tmp"/llama_cpp_python-"$LCP_VERSION".tar.gz .devcarry/llamacpp-src.tar.gz
  rm -rf "$tmp"
fi
ls -la .devcarry/llamacpp-src.tar.gz

# 3. SmolLM2 in two halves (the registry fetches and checks it when the cache lacks it)
smol=$($PY -c "from engine.models import resolve; print(resolve('smollm2-135m'))")
SMOL_PARTS=${SMOL_PARTS:-3}
if [ "$(ls .devcarry/smolpart.* 2>/dev/null | wc -l)" != "$SMOL_PARTS" ]; then
  rm -f .devcarry/smolpart.*
  split -n "$SMOL_PARTS" -d -a 2 "$smol" .devcarry/smolpart.
fi
cat .devcarry/smolpart.* | cmp - "$smol"
ls -la .devcarry/smolpart.*

# 4. the pinned corpus
cdir=$($PY -c "from harness import corpus; c = corpus.load(); print(corpus.corpora_dir())")
mkdir -p .devcarry/corpora && cp -rn "$cdir"/. .devcarry/corpora/
du -sh .whl .devcarry .devcarry/corpora
echo "carry: .whl and one of .devcarry/smolpart.00/.01/.02 per call (three calls back to back), plus what a step needs"
