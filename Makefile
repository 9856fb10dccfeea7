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
# torch 2.13.0 is the CPU build this machine kind ships on disk; elsewhere pip picks one.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup test bench engine-bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" 2>/dev/null || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

fuzz: $(STAMP)
	KVBENCH_FUZZ_EXAMPLES=10000 $(PY) -m pytest -q tests/test_fuzz_gguf.py

# The default suite over fp32/bf16/q8_0 KV on MODEL, then the markdown report.
bench: $(STAMP)
	$(PY) -m harness run $(SUITE) --model $(MODEL) --report $(if $(DEVICE),--device $(DEVICE)) \
		$(if $(WEIGHTS),--weight-format $(WEIGHTS))

# Engine-only numbers: load, a greedy chat answer, pp512 / tg64 throughput.
engine-bench: $(STAMP)
	$(PY) -m engine bench --model $(MODEL)

clean:
	rm -rf $(VENV) .pytest_cache
