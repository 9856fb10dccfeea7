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

from .engine import Engine, load  # noqa: E402,F401
from .errors import EngineError  # noqa: E402,F401
from .spec import ModelSpec  # noqa: E402,F401

