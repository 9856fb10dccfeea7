"""kvbench's reference engine: GGUF models, narrowed KV caches, hybrid GPU/CPU execution.

    import engine
    eng = engine.load("smollm2-135m", kv_dtype="q8_0")
"""
import sys

from . import settings  # noqa: F401  (first: a malformed KVBENCH_* setting fails here, in one line)
from .errors import ConfigError

try:
    settings.validate()
except ConfigError as _e:
    if sys.argv[:1] == ["-m"]:     # `python -m engine|harness ...` (even --help): one line, exit 2
        print(f"error: {_e}", file=sys.stderr)
        raise SystemExit(2) from None
    raise

from .errors import EngineError  # noqa: E402,F401

# ``Engine``, ``load`` and ``ModelSpec`` import torch: resolved on first use, so a CLI that
# only parses arguments or reports an error starts in a fraction of a second
_LAZY = {"Engine": "engine", "load": "engine", "ModelSpec": "spec"}
_SUBMODULES = ("cli", "cuda_graph", "engine", "expert_cache", "gguf_io", "hostmem", "hybrid", "kernels", "kv",
               "kv_ring", "ledger", "model", "models", "planner", "registry", "spec", "synth", "tokenizer")


def __getattr__(name: str):
    import importlib
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")

