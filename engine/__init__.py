"""kvbench's reference engine: GGUF models, narrowed KV caches, hybrid GPU/CPU execution.

    import engine
    eng = engine.load("smollm2-135m", kv_dtype="q8_0")
"""
from .engine import Engine, load  # noqa: F401
from .errors import EngineError  # noqa: F401
from .spec import ModelSpec  # noqa: F401

try:  # synthetic models register themselves in the registry
    from . import synth  # noqa: F401
except ImportError:
    pass
