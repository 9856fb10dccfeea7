"""Exceptions raised by the engine: one line that names what was wrong and how to fix it.

Contract: every user-facing failure (bad file, bad setting, missing model, a dtype that
cannot be applied) is an ``EngineError`` subclass whose ``str()`` is a single line. The
CLIs print ``error: <message>`` and exit with code 2; they never show a traceback for these.

    from engine.errors import ModelFileError
    raise ModelFileError(path, "not a GGUF file (magic b'PK\\x03\\x04')", "pass a .gguf file")
"""
from __future__ import annotations


class EngineError(Exception):
    """Base class. ``message`` is one line; ``fix`` (optional) says what to do."""

    def __init__(self, message: str, fix: str | None = None):
        message = " ".join(str(message).split())
        if fix:
            message = f"{message}; {' '.join(fix.split())}"
        super().__init__(message)


class ModelFileError(EngineError):
    """A GGUF file that cannot be read or does not describe a model we can run."""

    def __init__(self, path, problem: str, fix: str | None = None):
        self.path = str(path)
        super().__init__(f"{path}: {problem}", fix)


class UnsupportedModelError(ModelFileError):
    """Readable GGUF, but an architecture or tensor type the engine does not implement."""


class ModelNotFoundError(EngineError):
    """A registry name that is unknown, or a user-provided model file that is absent."""


class ConfigError(EngineError):
    """An engine setting (kv_dtype, device, ctx, budget, ...) that cannot be applied."""


class KVGeometryError(ConfigError):
    """A KV dtype that the layer's geometry cannot hold (e.g. q8_0 needs rows % 32 == 0)."""


class ContextOverflowError(ConfigError):
    """More tokens than the KV cache was allocated for."""


class ChatTemplateError(EngineError):
    """A chat prompt for a model without a template, or a template that raised."""


class OutOfMemoryError(EngineError):
    """The device ran out of memory; the message carries the plan's numbers."""
