"""Engines for a run: which engine answers a case, at most one holding weights at a time, and
the "dtype changed nothing" detector.

Contract: ``EnginePool(device, weight_format, engine="kvbench", engine_kv=None, baseline="fp32",
rows=())`` hands the runner (and checks, through ``CaseContext.load``) an engine for (model,
KV dtype, load options). ``engine`` is ``kvbench``, ``llama.cpp``, ``hf`` or
``openai://HOST:PORT`` (``harness.adapters``): the baseline row always runs on kvbench's own
engine (the yardstick), every other row on the chosen engine, with the engine's own KV
setting for that row (``engine_kv``: ``{"q8_0": "quanto-int4"}`` overrides the default
mapping). Everything that can be known before a case runs is checked in the constructor
(bad input, exit 2): the engine spec, a missing build or package, a server that cannot be
reached, a row the engine has no KV setting for. ``engine_class_for(kv_dtype)`` is the class
whose declared capabilities (``harness.engine_api``) make a case ``n/a`` up front.

``kv_effect(model, kv_dtype, eng) -> (records, failures)`` runs after a case on another
engine: it replays every teacher-forced sequence the case asked the engine for (its
``tape``) on the same engine and weights with each wider KV setting (``twin``), and flags
the row ``not applied?`` when its logits equal one of them bit for bit, or differ by no more
than the engine's own run-to-run noise (the widest setting run twice on the same tokens).
It also records the KV-only cost on that engine (narrowed vs its widest KV, same tokens):
the number to set beside kvbench's own narrowed-vs-fp32 cost. An engine without twins (an
OpenAI-compatible server, whose KV is fixed when it starts) is held against the other rows
of the run instead: two rows that give the same top-k log-probabilities bit for bit are
flagged. kvbench's own engine is not replayed: its applied KV dtype is read from its caches
(the vram check).

    pool = EnginePool("cpu", "auto", engine="llama.cpp", rows=["fp32", "bf16", "q8_0"])
    eng = pool.get("smollm2-135m", "q8_0", {"ctx": 4096})
"""
from __future__ import annotations

import math
from typing import Any

from typing import TYPE_CHECKING

if TYPE_CHECKING:      # torch loads in the functions that use it: a bad input fails fast, in one line
    import torch

from . import adapters
from .adapters.base import Adapter
from .adapters import topk as _topk  # noqa: F401  (registers the topk_argmax check)
from .errors import UsageError


def weight_format_of(eng) -> str:
    """What an engine computes with: kvbench's applied weight format, or the adapter's."""
    return eng.weight_format if isinstance(eng, Adapter) else eng.plan.weight_format


def weight_format_requested_of(eng) -> str:
    return eng.weight_format if isinstance(eng, Adapter) else eng.plan.weight_format_requested


class EnginePool:
    """At most one engine holding weights at a time.

    ``get(model, kv_dtype, opts)`` returns the live engine when it matches; else, for the
    same model, the next kvbench engine takes the live one's weights over (``weights_from``:
    only KV, scratch and expert cache are made anew) when its plan places them the same way;
    otherwise the live engine (kvbench's or an adapter) is closed and its device and pinned
    memory given back first. The first load of a model fixes its weight format (``auto``
    resolves once), so every KV dtype of a model runs on the same weights.
    ``loads``/``rebinds``/``max_live`` count what happened (kvbench's engine)."""

    def __init__(self, device: str, weight_format: str, engine: str | None = None,
                 engine_kv: dict[str, str] | list[str] | None = None, baseline: str = "fp32",
                 rows: list[str] | tuple = ()):
        self.device, self.weight_format = device, weight_format
        self.spec = adapters.parse(engine)
        self.baseline = baseline
        self.kv_map = (adapters.parse_kv_overrides(engine_kv) if isinstance(engine_kv, list)
                       else dict(engine_kv or {}))
        self.adapter_class = adapters.adapter_class(self.spec)
        self.native: dict[str, str] = {}
        if self.adapter_class is None:
            if self.kv_map:
                raise UsageError("--engine-kv maps rows to another engine's KV settings",
                                 "pass --engine llama.cpp, hf or openai://HOST:PORT with it")
        else:
            unknown = sorted(set(self.kv_map) - set(rows)) if rows else []
            if unknown:
                raise UsageError(f"--engine-kv {unknown[0]}=...: {unknown[0]} is not a row of this suite",
                                 f"rows: {', '.join(rows)}")
            if self.kv_map.get(baseline):
                raise UsageError(f"--engine-kv {baseline}=...: the baseline row runs on kvbench's engine",
                                 "map only the narrowed rows")
            for row in rows:
                if row != baseline:
                    self.native[row] = adapters.native_for(self.spec, row, self.kv_map)
            self._check_available()
        self.live, self.key = None, None
        self.formats: dict[str, dict] = {}     # model -> requested / applied / reason (kvbench)
        self.loads = self.rebinds = self.max_live = 0
        self.adapter_loads = 0
        self._digests: dict[tuple[str, str], dict[tuple, str]] = {}   # (model, row) -> tokens -> digest

    def _check_available(self) -> None:
        cls = self.adapter_class
        if self.spec.name == "openai":
            cls.check_available(self.spec.url)
        else:
            cls.check_available()
        if self.spec.name == "hf":
            from .adapters.hf import require_backend
            for native in self.native.values():
                require_backend(native)

    def describe(self) -> dict:
        """The manifest's ``engine`` section: which engine ran which row, with what KV setting."""
        rows = {self.baseline: {"engine": "kvbench", "kv": self.baseline}}
        rows.update({r: {"engine": str(self.spec), "kv": n} for r, n in self.native.items()})
        return {"spec": str(self.spec), "name": self.spec.name, "url": self.spec.url,
                "baseline_engine": "kvbench", "rows": rows}

    def uses_adapter(self, kv_dtype: str) -> bool:
        return self.adapter_class is not None and kv_dtype != self.baseline

    @property
    def engine_class(self):
        """kvbench's engine: the baseline row's, always (imported here: the flags above are
        checked without torch)."""
        from engine import Engine
        return Engine

    def engine_class_for(self, kv_dtype: str):
        """The class that will answer this row (its capabilities decide ``n/a`` up front)."""
        return self.adapter_class if self.uses_adapter(kv_dtype) else self.engine_class

    def kwargs(self, model: str, kv_dtype: str, opts: dict) -> dict:
        kw: dict[str, Any] = {"kv_dtype": kv_dtype, "device": self.device, "ctx": int(opts["ctx"]),
                              "weight_format": self.formats.get(model, {}).get("applied", self.weight_format)}
        if opts.get("vram_budget_gib"):
            kw["vram_budget"] = int(opts["vram_budget_gib"] * 2**30)
        if opts.get("n_gpu_layers") is not None:
            kw["n_gpu_layers"] = int(opts["n_gpu_layers"])
        if opts.get("expert_format"):
            kw["expert_format"] = opts["expert_format"]
        if opts.get("cpu_moe") is not None:
            kw["cpu_moe"] = opts["cpu_moe"]
        if opts.get("host_experts"):
            kw["host_experts"] = opts["host_experts"]
        if opts.get("weight_format"):            # the check's own (CheckConfig.weight_format)
            kw["weight_format"] = opts["weight_format"]
        if opts.get("wave_budget_mib"):
            kw["wave_budget_bytes"] = int(opts["wave_budget_mib"] * 2**20)
        elif opts.get("wave_split"):
            from engine.planner import spec_for_model
            from .checks.wave_prefill import wave_budget_for
            tokens, waves = opts["wave_split"]
            kw["wave_budget_bytes"] = wave_budget_for(spec_for_model(model), tokens, waves)
        return kw

    def get(self, model: str, kv_dtype: str, opts: dict):
        key = (model, kv_dtype, tuple(sorted((k, str(v)) for k, v in opts.items())))
        live = self.live if self.live is not None and self.live.model is not None else None
        if live is not None and key == self.key:
            return live
        if self.uses_adapter(kv_dtype):
            self.release()
            eng = adapters.load(self.spec, model, kv_dtype, opts, self.device, self.kv_map)
            self.adapter_loads += 1
            self.live, self.key = eng, key
            return eng
        return self._get_kvbench(model, kv_dtype, opts, key, None if isinstance(live, Adapter) else live)

    def _get_kvbench(self, model: str, kv_dtype: str, opts: dict, key, live):
        import engine
        from engine.engine import WeightsPlacementError, live_engines
        kw = self.kwargs(model, kv_dtype, opts)
        eng = None
        # weights are taken over only at the format they were read in
        same_weights = kw["weight_format"] in ("auto", getattr(getattr(live, "plan", None), "weight_format", None))
        if live is not None and self.key[0] == model and same_weights:
            try:
                eng = engine.load(model, weights_from=live, **kw)
                self.rebinds += 1
            except WeightsPlacementError:
                eng = None
        if eng is None:
            self.release()
            eng = engine.load(model, **kw)
            self.loads += 1
            if not opts.get("weight_format"):  # the run's format; a check's own is recorded by its cases
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

    # -- the "dtype changed nothing" detector -----------------------------------------------------
    def kv_effect(self, model: str, kv_dtype: str, eng) -> tuple[list[dict], list[str]]:
        """Records (the engine's facts, KV-only cost) and failure lines (``not applied? ...``)
        for a case just run on ``eng``; nothing for kvbench's own engine."""
        import torch
        if not isinstance(eng, Adapter):
            return [], []
        recs: list[dict] = [{"type": "info", "info": {"engine": eng.describe()}}]
        tape, eng.tape = eng.tape, []
        if not tape:
            return recs, []
        if isinstance(tape[0][1], _topk.TopK):
            return recs, self._cross_row(model, kv_dtype, eng, tape)
        refs = eng.references()
        if not refs:
            return recs, []
        n = sum(len(t) for t, _ in tape)
        widest, same = None, []
        for i, ref in enumerate(refs):
            twin = eng.twin(ref)
            try:
                ref_logits = [twin.logits(t) for t, _ in tape]
                if i == 0:        # the engine's own noise: the widest setting again, same tokens
                    again = [twin.logits(t) for t, _ in tape]
                    floor = max(float((a - b).abs().max()) for a, b in zip(ref_logits, again))
            finally:
                twin.close()
            diff = max(float((r.float() - x.float()).abs().max()) for (_, r), x in zip(tape, ref_logits))
            if i == 0:
                widest = (ref, ref_logits, diff)
            if diff <= floor:
                same.append((ref, diff))
        failures = []
        if same:
            how = ("bit for bit" if all(d == 0 for _, d in same) else
                   f"within the engine's run-to-run noise (max abs {max(d for _, d in same):.3g} <= {floor:.3g})")
            failures.append(f"not applied? {kv_dtype} ({eng.kv_native_requested} on {eng.name}): its logits equal "
                            f"{eng.name}'s {' and '.join(r for r, _ in same)} KV logits {how} at all {n} positions: "
                            "the requested KV dtype changed nothing")
        ref, ref_logits, diff = widest
        kld = torch.cat([_kld(x, r) for (_, r), x in zip(tape, ref_logits)])
        what = f"{eng.name} {eng.kv_native_requested} KV vs {eng.name} {ref} KV, same tokens"
        recs += [_metric("KV-only Max abs logit diff", diff, "", "lower", what),
                 _metric("KV-only Mean KLD", float(kld.mean()), "nats", "lower", what),
                 _metric("KV-only 99.0% KLD", float(torch.quantile(kld, 0.99)), "nats", "lower", what),
                 _metric("Engine run-to-run max abs", floor, "", None,
                         f"{eng.name} {ref} KV run twice on the same tokens")]
        return recs, failures

    def _cross_row(self, model: str, kv_dtype: str, eng, tape) -> list[str]:
        mine = {tuple(t): tk.digest() for t, tk in tape}
        self._digests[(model, kv_dtype)] = mine
        for (m, other), theirs in self._digests.items():
            if m != model or other == kv_dtype:
                continue
            shared = [k for k in mine if k in theirs]
            if shared and all(mine[k] == theirs[k] for k in shared):
                n = sum(len(k) for k in shared)
                return [f"not applied? {kv_dtype} on {eng.name}: its top-k log-probabilities equal row {other}'s "
                        f"bit for bit at all {n} positions (one server, one KV type: start one server per "
                        "KV dtype, or run one row per server)"]
        return []


def _kld(test: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """KL(ref || test) per position in nats (float64)."""
    import torch
    lr, lt = torch.log_softmax(ref.double(), -1), torch.log_softmax(test.double(), -1)
    return (lr.exp() * (lr - lt)).sum(-1).clamp_min(0.0)


def _metric(name: str, value: float, unit: str, better: str | None, detail: str) -> dict:
    """A metric record as ``harness.runner.judge`` writes one (not gated)."""
    v = value if isinstance(value, float) and math.isfinite(value) else None
    return {"type": "metric", "metric": name, "value": v, "unit": unit, "better": better, "threshold": None,
            "op": None, "passed": None, "skipped": None if v is not None else "not a finite number",
            "detail": detail}
