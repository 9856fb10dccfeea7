"""Engines for a run: which engine answers a case, and at most one holding weights at a time.

Contract: ``EnginePool(device, weight_format)`` hands the runner (and checks, through
``CaseContext.load``) an engine for (model, KV dtype, load options). ``engine_class`` is the
class it loads (kvbench's ``engine.Engine`` today); its declared capabilities
(``harness.engine_api``) are known before anything loads, so the runner can declare a case
``n/a`` up front. See ``EnginePool`` for the takeover / release rules.

    pool = EnginePool("cuda", "auto")
    eng = pool.get("coder30b-synth", "q8_0", {"ctx": 4096})
"""
from __future__ import annotations

from typing import Any


class EnginePool:
    """At most one engine holding weights at a time.

    ``get(model, kv_dtype, opts)`` returns the live engine when it matches; else, for the
    same model, the next engine takes the live one's weights over (``weights_from``: only KV,
    scratch and expert cache are made anew) when its plan places them the same way; otherwise
    the live engine is closed and its device and pinned memory given back first. The first
    load of a model fixes its weight format (``auto`` resolves once), so every KV dtype of a
    model runs on the same weights. ``loads``/``rebinds``/``max_live`` count what happened."""

    def __init__(self, device: str, weight_format: str):
        from engine import Engine
        self.engine_class = Engine          # what it loads: its capabilities are known up front
        self.device, self.weight_format = device, weight_format
        self.live, self.key = None, None
        self.formats: dict[str, dict] = {}     # model -> requested / applied / reason
        self.loads = self.rebinds = self.max_live = 0

    def kwargs(self, model: str, kv_dtype: str, opts: dict) -> dict:
        kw: dict[str, Any] = {"kv_dtype": kv_dtype, "device": self.device, "ctx": int(opts["ctx"]),
                              "weight_format": self.formats.get(model, {}).get("applied", self.weight_format)}
        if opts.get("vram_budget_gib"):
            kw["vram_budget"] = int(opts["vram_budget_gib"] * 2**30)
        if opts.get("n_gpu_layers") is not None:
            kw["n_gpu_layers"] = int(opts["n_gpu_layers"])
        if opts.get("wave_budget_mib"):
            kw["wave_budget_bytes"] = int(opts["wave_budget_mib"] * 2**20)
        elif opts.get("wave_split"):
            from engine.planner import spec_for_model
            from .checks.wave_prefill import wave_budget_for
            tokens, waves = opts["wave_split"]
            kw["wave_budget_bytes"] = wave_budget_for(spec_for_model(model), tokens, waves)
        return kw

    def get(self, model: str, kv_dtype: str, opts: dict):
        import engine
        from engine.engine import WeightsPlacementError, live_engines
        key = (model, kv_dtype, tuple(sorted((k, str(v)) for k, v in opts.items())))
        live = self.live if self.live is not None and self.live.model is not None else None
        if live is not None and key == self.key:
            return live
        kw = self.kwargs(model, kv_dtype, opts)
        eng = None
        if live is not None and self.key[0] == model:
            try:
                eng = engine.load(model, weights_from=live, **kw)
                self.rebinds += 1
            except WeightsPlacementError:
                eng = None
        if eng is None:
            self.release()
            eng = engine.load(model, **kw)
            self.loads += 1
            self.formats.setdefault(model, {"requested": self.weight_format,
                                            "applied": eng.plan.weight_format,
                                            "reason": eng.plan.weight_format_reason})
        self.live, self.key = eng, key
        self.max_live = max(self.max_live, live_engines())
        return eng

    def release(self) -> None:
        from engine.hostmem import release_cached
        if self.live is not None:
            self.live.close()
        self.live, self.key = None, None
        release_cached()
