"""Engine adapters: other engines behind the interface kvbench's checks use (harness.engine_api).

Contract: ``ENGINES`` names every engine a run can use (``--engine``); ``parse(spec)`` reads
``kvbench``, ``llama.cpp``, ``hf`` or ``openai://HOST:PORT`` into an ``EngineSpec`` (bad
spec: ``UsageError``); ``adapter_class(spec)`` is the class whose declared capabilities the
runner checks before anything loads, and ``native_for(spec, row, overrides)`` the engine's KV
setting that stands for a suite row (llama.cpp ``q8_0`` for row q8_0, HF ``quanto-int4``
when told ``--engine-kv q8_0=quanto-int4``). Modules: ``base`` (what adapters share),
``llamacpp``, ``hf``, ``openai``, ``topk`` (top-k log-probabilities with a tail bucket and the
``topk_argmax`` check).

    spec = parse("llama.cpp")
    eng = load(spec, "smollm2-135m", "q8_0", {"ctx": 4096})
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError

ENGINES = ("kvbench", "llama.cpp", "hf", "openai://HOST:PORT")
_URL = re.compile(r"^openai://([A-Za-z0-9._-]+|\[[0-9A-Fa-f:]+\]):([0-9]{1,5})/?$")


@dataclass(frozen=True)
class EngineSpec:
    name: str                   # kvbench | llama.cpp | hf | openai
    url: str | None = None      # http://host:port for openai

    def __str__(self) -> str:
        return f"openai://{self.url.split('://', 1)[1]}" if self.url else self.name


def parse(text: str | None) -> EngineSpec:
    text = (text or "kvbench").strip()
    if text in ("kvbench", "llama.cpp", "hf"):
        return EngineSpec(text)
    if text.startswith("openai"):
        m = _URL.match(text)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise UsageError(f"--engine {text!r}: expected openai://HOST:PORT", "e.g. openai://127.0.0.1:8000")
        return EngineSpec("openai", f"http://{m.group(1)}:{int(m.group(2))}")
    raise UsageError(f"--engine {text!r} is not an engine", f"use one of {', '.join(ENGINES)}")


def adapter_class(spec: EngineSpec):
    if spec.name == "llama.cpp":
        from .llamacpp import LlamaCpp
        return LlamaCpp
    if spec.name == "hf":
        from .hf import HF
        return HF
    if spec.name == "openai":
        from .openai import OpenAI
        return OpenAI
    return None


def parse_kv_overrides(items: list[str] | None) -> dict[str, str]:
    """``["q8_0=quanto-int4", ...]`` -> {row: engine setting}."""
    out = {}
    for item in items or []:
        row, sep, native = item.partition("=")
        if not sep or not row.strip() or not native.strip():
            raise UsageError(f"--engine-kv {item!r}: expected ROW=SETTING", "e.g. --engine-kv q8_0=quanto-int4")
        out[row.strip()] = native.strip()
    return out


def native_for(spec: EngineSpec, row: str, overrides: dict[str, str]) -> str:
    """The engine's KV setting for suite row ``row`` (UsageError when it has none)."""
    cls = adapter_class(spec)
    native = overrides.get(row) or cls.native_of(row)
    if native is None:
        raise UsageError(f"--engine {spec} has no KV cache in {row}'s format",
                         f"map the row to one of its own: --engine-kv {row}=SETTING, SETTING one of "
                         f"{', '.join(cls.NATIVE)}")
    if not cls.valid_native(native):
        raise UsageError(f"--engine-kv {row}={native}: {spec} has no KV setting {native!r}",
                         f"use one of {', '.join(cls.NATIVE)}")
    return native


def load(spec: EngineSpec, model: str, row: str, opts: dict, device: str = "cpu",
         overrides: dict[str, str] | None = None):
    cls = adapter_class(spec)
    native = native_for(spec, row, overrides or {})
    if spec.name == "openai":
        return cls(model, row, native, opts, device, url=spec.url)
    return cls(model, row, native, opts, device)
