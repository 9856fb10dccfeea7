"""wave_prefill: one long prefill (> 4096 tokens) through the multi-wave attention path.

Contract: the engine is loaded with a small wave (scratch) budget, so attention over the
prefill runs in several waves of query rows. One call of ``eng.logits`` over ``tokens``
tokens of seeded prose (chat-templated); logits at positions ``>= compare_from`` are held
against the baseline's (fp32, same wave budget): fp32 top-1 in the top-k, max-abs, mean
KLD. ``Waves`` and ``Peak scratch`` are read from ``eng.last_prefill_stats`` (observables:
``Waves`` must exceed 1 or the wave path was not exercised); ``Prefill tok/s`` is timed.
The wave budget is ``wave_budget_mib`` when given, else derived from the model's attention
geometry so the prefill takes about ``waves`` waves (``wave_budget_for``): a fixed budget
that suits SmolLM2 (9 heads x 64) is below the smallest wave of Qwen3-Coder (32 x 128).
On the baseline row, when ``reference_run`` is on, the comparison is fp32 at the small
budget against fp32 at ``reference_wave_budget_mib`` (default: the engine's own default,
i.e. as few waves as it takes): the wave split must not change the logits.

    [[check]]
    kind = "wave_prefill"; tokens = 6169; waves = 4
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import SuiteError
from ..metrics import logit_stats
from ..schema import CheckConfig, param, threshold
from ..text import prompt_tokens
from ..engine_api import CAP_CHAT, CAP_LOGITS, CAP_PREFILL_STATS
from .base import Check, Outcome, metric, register

@dataclass
class WavePrefillConfig(CheckConfig):
    tokens: int = param(6169, lo=2)
    waves: int = param(4, lo=2, help="waves to split the prefill into when no wave_budget_mib is "
                       "given: the budget is derived from the model's geometry")
    compare_from: int = param(4096, lo=0, help="first position compared")
    top_k: int = param(5, lo=1)
    reference_run: bool = True
    reference_wave_budget_mib: float | None = param(None, lo=0, lo_open=True,
                                                    help="budget of the fp32 reference (None: engine default)")
    min_top_k_pct: float | dict[str, float] | None = threshold(
        "Top-1 in top-{top_k}", ">=", default=100.0, hi=100.0)
    max_abs: float | dict[str, float] | None = threshold("Max abs logit diff", "<=")
    max_mean_kld: float | dict[str, float] | None = threshold("Mean KLD", "<=")
    min_waves: float | dict[str, float] | None = threshold("Waves", ">=", default=2)

    def validate(self, path, where: str) -> None:
        if self.compare_from >= self.tokens:
            raise SuiteError(path, f"{where}.compare_from", f"{self.compare_from} leaves no position "
                             f"to compare in a prefill of {self.tokens} tokens",
                             f"0 .. {self.tokens - 1}")
        if self.ctx is not None and self.ctx < self.tokens:
            raise SuiteError(path, f"{where}.ctx", f"{self.ctx} cannot hold the {self.tokens}-token "
                             "prefill", f">= {self.tokens}")


def wave_budget_for(spec, tokens: int, waves: int) -> int:
    """The smallest wave (scratch) budget in bytes that prefills ``tokens`` tokens of a model
    of ``spec``'s attention geometry in at most ``waves`` waves (so about that many: any less
    would take more). Searched over ``engine``'s own wave planner, so it follows its rules."""
    from engine.errors import ConfigError
    from engine.kernels.prefill_attention import plan_waves

    def n_waves(budget: int) -> int:
        try:
            return plan_waves(tokens, 0, spec.n_heads, spec.n_kv_heads, spec.head_dim, budget).n_waves
        except ConfigError:
            return tokens + 1           # below the smallest wave
    lo, hi = 1, 1 << 20
    while n_waves(hi) > waves:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if n_waves(mid) <= waves:
            hi = mid
        else:
            lo = mid + 1
    return hi


def _prefill(eng, tokens: list[int], compare_from: int):
    t0 = time.perf_counter()
    tail = eng.logits(tokens, first=compare_from)   # only what is compared: [T - from, V]
    seconds = time.perf_counter() - t0
    stats = dict(eng.last_prefill_stats or {})
    stats.setdefault("seconds", seconds)
    return tail, stats


@register
class WavePrefill(Check):
    kind = "wave_prefill"
    config = WavePrefillConfig
    requires = frozenset({CAP_LOGITS, CAP_PREFILL_STATS, CAP_CHAT})
    metrics = (
        metric("Top-1 in top-{k}", "%", "higher", "reference top-1 within the waves' top-k", show=("table",)),
        metric("Max abs logit diff", "", "lower", "largest logit difference from the reference", show=("table",)),
        metric("Mean KLD", "nats", "lower", "KL(reference || waves), mean over positions", show=("table",)),
        metric("Waves", "", None, "waves the prefill ran in"),
        metric("Peak scratch", "MiB", "lower", "largest attention scratch of a wave"),
        metric("Prefill tok/s", "tok/s", "higher", "the whole prefill, one timing", show=("table",)),
        metric("Tokens", "tokens", None, "prefill length"),
    )

    def load_options(self, cfg: WavePrefillConfig, suite):
        opts = super().load_options(cfg, suite)
        opts["ctx"] = max(opts["ctx"], cfg.tokens)
        if not opts.get("wave_budget_mib"):      # derived per model: see wave_budget_for
            opts["wave_split"] = (cfg.tokens, cfg.waves)
        return opts

    def unmeasured_on_baseline(self, cfg):
        if cfg.reference_run:
            return {}
        why = "reference_run = false: the baseline row has nothing to compare with"
        return {f"Top-1 in top-{cfg.top_k}": why, "Max abs logit diff": why, "Mean KLD": why}

    def prepare(self, eng, cfg: WavePrefillConfig, ctx):
        tokens = prompt_tokens(eng.tokenizer, cfg.tokens, ctx.seed)
        logits, stats = _prefill(eng, tokens, cfg.compare_from)
        stats["wave_budget_bytes"] = eng.wave_budget_bytes
        state = {"tokens": tokens, "logits": logits, "stats": stats, "ref": None}
        if cfg.reference_run and ctx.measure_baseline:
            # the reference drops the derived split too: its budget is the engine's default
            ref = ctx.load(wave_budget_mib=cfg.reference_wave_budget_mib, wave_split=None)
            state["ref"], state["ref_stats"] = _prefill(ref, tokens, cfg.compare_from)
            state["ref_stats"]["wave_budget_bytes"] = ref.wave_budget_bytes
            del ref
        return state

    def measure(self, eng, cfg: WavePrefillConfig, state, ctx) -> Outcome:
        out = Outcome()
        k_name = f"Top-1 in top-{cfg.top_k}"
        if ctx.is_baseline:
            test, stats = state["logits"], state["stats"]
            ref = state["ref"]
            ref_waves = (state.get("ref_stats") or {}).get("waves")
            ref_budget = (f"{cfg.reference_wave_budget_mib:g} MiB" if cfg.reference_wave_budget_mib
                          else "the engine's default wave budget")
            out.info["reference"] = (f"{ctx.baseline} at the small wave budget vs {ctx.baseline} at "
                                     f"{ref_budget} ({ref_waves} waves)" if ref is not None
                                     else "no reference run (reference_run = false)")
        else:
            test, stats = _prefill(eng, state["tokens"], cfg.compare_from)
            stats["wave_budget_bytes"] = eng.wave_budget_bytes
            ref = state["logits"]
            out.info["reference"] = f"{ctx.kv_dtype} vs {ctx.baseline}, both in waves, same tokens"
        ref_stats = state.get("ref_stats") or {}
        same_split = False
        if ctx.is_baseline and ref is not None:
            a, b = ref_stats.get("layer_splits"), stats.get("layer_splits")
            if a is not None and b is not None and len(a) == len(b):
                # per layer: a sliding-window ring's chunks do not follow the budget, so the
                # maximum over layers can be equal while the global layers' splits differ
                moved = sum(x != y for x, y in zip(a, b))
                out.info["layers_split_differently"] = f"{moved} of {len(a)}"
                same_split = moved == 0
            else:
                same_split = ((ref_stats.get("waves"), ref_stats.get("wave_rows"))
                              == (stats.get("waves"), stats.get("wave_rows")))
        if ref is None or same_split:
            why = ("reference_run is off" if ref is None else
                   f"the reference ran the same {stats.get('waves')} waves in every layer: comparing them "
                   f"would be vacuous")
            for n, b in ((k_name, "higher"), ("Max abs logit diff", "lower"), ("Mean KLD", "lower")):
                out.skip(n, why, "%" if n == k_name else "", b)
        else:
            st = logit_stats(ref, test, cfg.top_k)
            out.add(k_name, st.scalars[k_name], "%", "higher")
            out.add("Max abs logit diff", st.scalars["Max abs logit diff"], "", "lower")
            out.add("Mean KLD", st.scalars["Mean KLD"], "nats", "lower")
            out.series = {"max_abs": st.series["max_abs"], "kld": st.series["kld"]}
            if ctx.is_baseline:
                out.info["ref_stats"] = state.get("ref_stats")
        waves = stats.get("waves")
        if waves is None:
            out.skip("Waves", "engine does not report waves (last_prefill_stats['waves'] is None)",
                     "", "higher")
        else:
            out.add("Waves", int(waves), "", None)
        scratch = stats.get("peak_scratch_bytes")
        if scratch is None:
            out.skip("Peak scratch", "engine does not report peak_scratch_bytes", "MiB", "lower")
        else:
            out.add("Peak scratch", scratch / 2**20, "MiB", "lower")
        out.add("Prefill tok/s", len(state["tokens"]) / max(stats["seconds"], 1e-9), "tok/s", "higher")
        out.add("Tokens", len(state["tokens"]), "tokens")
        out.info["compare_from"] = cfg.compare_from
        out.info["wave_budget_mib"] = stats.get("wave_budget_bytes", 0) / 2**20 or cfg.wave_budget_mib
        out.info["prefill_stats"] = {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}
        return out
