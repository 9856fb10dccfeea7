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


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def free_memory(device) -> int | None:
    """Bytes free now on ``device`` (CUDA: driver free; CPU: MemAvailable), None if unknown."""
    try:
        import torch
        dev = torch.device(device)
        if dev.type == "cuda":
            return int(torch.cuda.mem_get_info(dev)[0])
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except Exception:  # noqa: BLE001 - the message says "unknown" instead
        return None
    return None


def out_of_memory(stage: str, plan, device, exc: BaseException | None = None) -> OutOfMemoryError:
    """An ``OutOfMemoryError`` for an allocator failure during ``stage`` (load, prefill, wave
    prefill): the plan's per-tier totals and budget, the free memory now, and what to change.
    ``plan`` is an ``engine.planner.Plan`` (or None when no plan was made)."""
    free = free_memory(device)
    free_s = _mib(free) if free is not None else "unknown"
    if plan is None:
        numbers = "no plan was made"
        fix = "pass --vram-budget below the free memory, lower --ctx, or use --kv-dtype q8_0"
    else:
        t, h = plan.trunk, plan.host
        numbers = (f"plan for {plan.model}: trunk {_mib(t.total)} (weights {_mib(t.weights)} + kv "
                   f"{plan.kv_dtype} {_mib(t.kv)} + scratch {_mib(t.scratch)} + expert cache "
                   f"{_mib(t.expert_cache)} + reserve {_mib(t.reserve)}) in a budget of "
                   f"{_mib(plan.budget_bytes)} ({plan.budget_source}), host {_mib(h.total)}, "
                   f"{plan.n_gpu_layers}/{plan.n_layers} layers on {plan.device}")
        fewer = max(plan.n_gpu_layers - 1, 0)
        fix = (f"pass --vram-budget below the free memory ({free_s}) so the planner leaves room, "
               f"--n-gpu-layers {fewer}, a smaller --ctx, or --kv-dtype q8_0")
    detail = ""
    if exc is not None and str(exc):
        # torch's CUDA message: "CUDA out of memory. Tried to allocate 256.00 MiB. GPU 0 has ..."
        first = ". ".join(str(exc).splitlines()[0].split(". ")[:2]).rstrip(".")[:160]
        detail = f" [{type(exc).__name__}: {first}]"
    return OutOfMemoryError(f"out of memory on {device} during {stage}{detail}; {numbers}; free now {free_s}",
                            fix)
