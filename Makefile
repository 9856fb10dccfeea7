# kvbench: `make bench` and `make test` set everything up from nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODEL  ?= smollm2-135m
SUITE  ?= suites/kv_dtype.toml
# empty: the suite decides (device auto = CUDA when there is one; weights auto = f32 when it
# needs at most half the host RAM, else bf16); e.g. make bench DEVICE=cpu WEIGHTS=bf16
DEVICE  ?=
WEIGHTS ?=
# empty: kvbench's own engine; llama.cpp (needs `make llama-cpp`), hf, or openai://HOST:PORT run
# the narrowed rows on that engine, with kvbench's fp32 engine as the baseline row
ENGINE  ?=
# torch 2.13.0 is the CPU build this machine kind ships on disk; elsewhere pip picks one.
TORCH_SPEC ?= torch==2.13.0
# Two stamps: the runtime (what `make bench` needs) and the dev extras on top (pytest,
# transformers, ...: `make test`, `make setup`, ENGINE=hf). A fresh clone's `make bench` skips
# the extras: 46 s instead of 81 s of pip on the 2-core box (2026-12-04).
BASE_STAMP := $(VENV)/.installed-base
STAMP  := $(VENV)/.installed

.PHONY: setup test bench engine-bench clean llama-cpp test-engines test-gpu

$(BASE_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" 2>/dev/null || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e .
	@touch $(BASE_STAMP)

$(STAMP): $(BASE_STAMP)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

# Two pytest-xdist workers (CI has 2 cores), one torch thread each; a file runs whole on one
# worker (its module fixtures built once), the slowest files first (tests/conftest.py,
# @pytest.mark.slow(seconds=N)). TEST_JOBS=0 runs everything in one process.
TEST_JOBS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q --durations=15 $(if $(filter-out 0,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder) tests

fuzz: $(STAMP)
	KVBENCH_FUZZ_EXAMPLES=10000 $(PY) -m pytest -q tests/test_fuzz_gguf.py

# The default suite over fp32/bf16/q8_0 KV on MODEL, then the markdown report.
bench: $(BASE_STAMP) $(if $(filter hf,$(ENGINE)),$(STAMP))
	$(PY) -m harness run $(SUITE) --model $(MODEL) --report $(if $(DEVICE),--device $(DEVICE)) \
		$(if $(WEIGHTS),--weight-format $(WEIGHTS)) $(if $(ENGINE),--engine $(ENGINE))

# Engine-only numbers: load, a greedy chat answer, pp512 / tg64 throughput.
engine-bench: $(BASE_STAMP)
	$(PY) -m engine bench --model $(MODEL)

# llama.cpp for the engine adapters (harness/adapters): llama-cpp-python built from its PyPI
# sdist with CMake, llama.cpp's tools, tests, examples, server and the multimodal library off
# (the Python package's own OpenAI-compatible server is the [server] extra, pure Python).
# About 6 minutes on 2 cores the first time; pip caches the built wheel, so later runs and
# fresh venvs reuse it. JOBS sets the build's parallelism.
LLAMA_CPP_SPEC ?= llama-cpp-python[server]==0.3.36
JOBS ?= 2
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
llama-cpp: $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) \
		$(PY) -m pip install "$(LLAMA_CPP_SPEC)"
	$(PY) -m pip install -q -e ".[engines]"

# The engine adapters against the real engines: llama.cpp in-process and behind its own
# OpenAI-compatible server on loopback, HF transformers with its quantized caches, and the
# default suite with llama.cpp's KV forced to f16 (must fail naming the case).
# On a CUDA machine: the GPU-marked tests, then the kernel tests whole (on CUDA each kernel runs
# compiled against its torch reference and a float64 oracle: defects only a real GPU shows,
# e.g. float16 subnormals lost on the tensor-core path, which the interpreter keeps).
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests
	$(PY) -m pytest -q tests/test_kernels.py tests/test_rope_append.py tests/test_rows_kernels.py

test-engines: llama-cpp
	$(PY) -m pytest -q --durations=15 -m engines tests/test_engines_*.py tests/test_adapter_*.py

clean:
	rm -rf $(VENV) .pytest_cache
