"""vram: did the engine apply the KV dtype it was asked for, and allocate what it planned?

Contract: after a short prefill + decode (so scratch is live), the check reads observables
only: ``eng.kv_dtypes`` (the dtype each layer's buffers hold: ``q8_0``, or ``k-q8_0.v-bf16``
when K and V differ) against the request (a KV spec, ``engine.kv_spec``: each trunk layer
gets the spec's K and V formats of that layer, tail layers fp32 when a plan splits the model;
every layer otherwise), the applied spec (``eng.kv_spec``, canonical) beside the expected one
in ``info``, runtime KV bytes against the bytes the *requested* per-layer K and V dtypes imply
(DESIGN.md's table: 4, 2 and 34/32 bytes per value), and, once the planner and ledger exist, plan vs runtime per
category and tier, ``unaccounted`` and the expert-cache budget. A mismatch fails the check
and ``detail`` names the first bad layer / category. What the engine cannot report yet is a
skipped metric with the reason, never a guess. KV rows per layer are ``ctx`` unless the plan
lists fewer (``layer_kv_rows``: sliding-window layers hold a ring of window + chunk rows);
the bytes per value always come from the *requested* dtype. A model with sliding-window
layers also gets ``KV bytes global layers`` / ``KV bytes SWA layers`` (runtime, from each
layer cache's ``nbytes``) and ``info["kv_by_kind"]``: per kind, layers, rows per layer
(runtime bytes / bytes per row), runtime, planned and full-ctx bytes.

    [[check]]
    kind = "vram"; ctx = 32768; vram_budget_gib = 12
"""
from __future__ import annotations

from dataclasses import dataclass

from ..schema import CheckConfig, param, threshold
from ..text import prompt_tokens
from engine import formats
from engine.kv_spec import KVSpec, cell_formats, layer_label, parse as parse_kv_spec

from ..engine_api import (CAP_CACHES, CAP_CHAT, CAP_GENERATE, CAP_KV_APPLIED, CAP_KV_BYTES, CAP_PLAN,
                          capabilities_of, missing)
from .base import Check, Outcome, metric, register

BYTES_PER_VALUE = {name: f.bytes_per_value for name, f in formats.KV.items()}   # engine.formats
MIB = 2**20


@dataclass
class VramConfig(CheckConfig):
    exercise_tokens: int = param(32, lo=0, help="prefill length run before reading the ledger")
    max_kv_mismatches: float | dict[str, float] | None = threshold("KV dtype mismatches", "<=", default=0)
    max_kv_bytes_diff_pct: float | dict[str, float] | None = threshold(
        "KV bytes vs requested", "<=", default=0.5)
    max_plan_diff_pct: float | dict[str, float] | None = threshold("Plan vs runtime max diff", "<=",
                                                                   default=1.0)
    max_unaccounted_mib: float | dict[str, float] | None = threshold("Unaccounted", "<=")


def pair_bytes_per_value(cell: str) -> float:
    """Bytes of one K value plus one V value of a layer's cell (``q8_0``: 2 x 34/32,
    ``k-q8_0.v-bf16``: 34/32 + 2)."""
    k, v = cell_formats(cell)
    return BYTES_PER_VALUE[k] + BYTES_PER_VALUE[v]


def expected_cells(kv_dtype: str, tiers: list[str]) -> list[str]:
    """Per layer, the cell the request implies: the spec's (K, V) on trunk layers, fp32 on
    the host tier (the tail)."""
    pairs = parse_kv_spec(kv_dtype).layer_formats(len(tiers))
    return [layer_label(*p) if t == "trunk" else formats.WIDEST_KV for p, t in zip(pairs, tiers)]


def kv_bytes_for(spec, ctx: int | list[int], dtypes: list[str]) -> int:
    """K + V bytes of a cache of ``ctx`` rows per layer (or a row count per layer) at the
    given per-layer cells (``q8_0``, ``k-q8_0.v-bf16``)."""
    rows = ctx if isinstance(ctx, list) else [ctx] * len(dtypes)
    return int(sum(r * spec.kv_dim * pair_bytes_per_value(d) for r, d in zip(rows, dtypes)))


def kv_by_kind(eng, ctx: int, applied: list[str], plan_d: dict | None) -> dict | None:
    """Global vs sliding-window layers' KV (runtime from each cache's ``nbytes``, planned from
    ``plan.layer_kv_bytes``, and what ``ctx`` rows would take); None without SWA layers."""
    spec = eng.spec
    swa = set(spec.swa_layers)
    caches = eng.caches
    if not swa:
        return None
    planned = _get(plan_d, "layer_kv_bytes")
    out = {}
    for kind, layers in (("global", [i for i in range(len(applied)) if i not in swa]),
                         ("swa", sorted(swa))):
        if not layers:
            continue
        per_row = {i: spec.kv_dim * pair_bytes_per_value(applied[i]) for i in layers}
        runtime = [int(caches[i].nbytes) for i in layers]
        out[kind] = {
            "layers": len(layers),
            "rows": sorted({round(b / per_row[i]) for b, i in zip(runtime, layers)}),
            "runtime_bytes": sum(runtime),
            "plan_bytes": sum(planned[i] for i in layers) if planned else None,
            "ctx_bytes": int(sum(ctx * per_row[i] for i in layers)),
            "window": getattr(spec, "sliding_window", None) if kind == "swa" else None,
        }
    return out


def _get(obj, *names, default=None):
    for n in names:
        if obj is None:
            return default
        obj = obj.get(n) if isinstance(obj, dict) else getattr(obj, n, None)
    return default if obj is None else obj


def _row(r) -> dict:
    """A ledger.compare row (tuple or object) as a dict."""
    if isinstance(r, dict):
        return dict(r)
    if isinstance(r, (tuple, list)):
        return dict(zip(("category", "tier", "planned", "runtime", "diff"), r))
    return {k: getattr(r, k, None) for k in ("category", "tier", "planned", "runtime", "diff")}


@register
class Vram(Check):
    kind = "vram"
    config = VramConfig
    needs_baseline = False
    requires = frozenset({CAP_KV_APPLIED, CAP_GENERATE, CAP_CHAT})   # plan / KV bytes when declared
    metrics = (
        metric("KV dtype mismatches", "layers", "lower", "layers whose cache holds another dtype than requested",
               show=("side",)),
        metric("KV bytes (requested)", "MiB", None, "KV bytes the requested dtypes take at ctx"),
        metric("KV bytes (runtime)", "MiB", "lower", "KV bytes the engine holds", show=("side",)),
        metric("KV bytes vs requested", "%", "lower", "runtime vs requested KV bytes"),
        metric("KV bytes global layers", "MiB", "lower", "KV bytes of the global-attention layers"),
        metric("KV bytes SWA layers", "MiB", "lower", "KV bytes of the sliding-window layers (rings)"),
        metric("Plan vs runtime max diff", "%", "lower", "largest plan vs ledger difference of a category"),
        metric("Unaccounted", "MiB", "lower", "device memory outside the ledger"),
        metric("KV bytes (plan)", "MiB", None, "KV bytes the plan priced"),
        metric("Expert-cache budget", "MiB", "higher", "what the plan leaves to the expert cache"),
    )

    def measure(self, eng, cfg: VramConfig, state, ctx) -> Outcome:
        out = Outcome()
        caps = capabilities_of(eng)
        n_ctx = self.load_options(cfg, ctx.suite)["ctx"]
        if cfg.exercise_tokens:
            toks = prompt_tokens(eng.tokenizer, min(cfg.exercise_tokens, n_ctx - 4), ctx.seed)
            eng.generate(toks, 4, stop_at_eos=False)
        plan = eng.plan if CAP_PLAN in caps else None
        ledger = eng.ledger if CAP_PLAN in caps else None
        plan_d, ledger_d = _as_dict(plan), _as_dict(ledger)
        applied = list(eng.kv_dtypes)
        n_layers = len(applied)
        tiers = _get(plan_d, "layer_tiers")
        if tiers is None:      # no plan: every layer is the trunk
            n_gpu = _get(plan_d, "n_gpu_layers")
            trunk = n_layers if n_gpu is None else int(n_gpu)
            tiers = ["trunk" if i < trunk else "host" for i in range(n_layers)]
        expected = expected_cells(ctx.kv_dtype, list(tiers))
        bad = [i for i, (a, e) in enumerate(zip(applied, expected)) if a != e]
        detail = None
        if bad:
            i = bad[0]
            detail = (f"layer {i} holds {applied[i]}, requested {expected[i]}"
                      + (f" (+{len(bad) - 1} more layers)" if len(bad) > 1 else ""))
        out.add("KV dtype mismatches", len(bad), "layers", "lower", detail=detail)
        out.info.update(requested=ctx.kv_dtype, applied=applied, expected=expected,
                        tiers=list(tiers), ctx=n_ctx,
                        expected_spec=str(KVSpec.from_layers(cell_formats(e) for e in expected)),
                        applied_spec=getattr(eng, "kv_spec", None))

        # runtime KV bytes vs what the requested dtypes cost (rows per layer from the plan:
        # a sliding-window layer's ring is smaller than ctx)
        rows = _get(plan_d, "layer_kv_rows")
        rows = list(rows) if rows and len(rows) == n_layers else n_ctx
        want = kv_bytes_for(eng.spec, rows, expected)
        runtime, source = None, None
        led_kv = _tier_sum(_get(ledger_d, "current"), "kv")
        if led_kv is not None:
            runtime, source = led_kv, "ledger"
        elif CAP_KV_BYTES in caps:
            runtime, source = int(eng.kv_bytes), "eng.kv_bytes"
        out.add("KV bytes (requested)", want / MIB, "MiB", None)
        if runtime is None:
            out.skip("KV bytes (runtime)", missing(eng, {CAP_KV_BYTES}), "MiB")
            out.skip("KV bytes vs requested", "no runtime KV bytes", "%", "lower")
        else:
            diff = 100.0 * (runtime - want) / want if want else 0.0
            out.add("KV bytes (runtime)", runtime / MIB, "MiB", "lower")
            out.add("KV bytes vs requested", abs(diff), "%", "lower",
                    detail=f"runtime {runtime / MIB:.1f} MiB ({source}) vs {want / MIB:.1f} MiB "
                           f"for {ctx.kv_dtype}")
        kinds = kv_by_kind(eng, n_ctx, applied, plan_d) if CAP_CACHES in caps else None
        if kinds:
            out.info["kv_by_kind"] = kinds
            for kind, name in (("global", "KV bytes global layers"), ("swa", "KV bytes SWA layers")):
                if kind in kinds:
                    k = kinds[kind]
                    out.add(name, k["runtime_bytes"] / MIB, "MiB", "lower",
                            detail=f"{k['layers']} layers x {'/'.join(map(str, k['rows']))} rows "
                                   f"(ctx {n_ctx}: {k['ctx_bytes'] / MIB:.1f} MiB)")

        # planner and ledger (land with the hybrid issue)
        if plan is None:
            reason = missing(eng, {CAP_PLAN})
            out.not_applicable("Plan vs runtime max diff", reason, "%", "lower")
            out.not_applicable("Unaccounted", reason, "MiB", "lower")
            out.not_applicable("KV bytes (plan)", reason, "MiB")
            out.not_applicable("Expert-cache budget", reason, "MiB", "higher")
        else:
            rows = [_row(r) for r in ledger.compare(plan)]
            worst, worst_row = 0.0, None
            for r in rows:
                p, rt = float(r.get("planned") or 0), float(r.get("runtime") or 0)
                pct = 0.0 if p == rt else 100.0 * abs(rt - p) / max(p, 1.0)
                r["diff_pct"] = pct
                if pct > worst:
                    worst, worst_row = pct, r
            detail = (f"{worst_row['category']}/{worst_row['tier']}: planned {worst_row['planned']} B, "
                      f"runtime {worst_row['runtime']} B" if worst_row else None)
            out.add("Plan vs runtime max diff", worst, "%", "lower", detail=detail)
            out.info["plan_vs_runtime"] = rows
            unacc = _get(ledger_d, "unaccounted")
            if unacc is None:
                out.skip("Unaccounted", "ledger reports no 'unaccounted'", "MiB", "lower")
            else:
                out.add("Unaccounted", float(unacc) / MIB, "MiB", "lower")
            kv_plan = _tier_sum(plan_d, "kv")
            if kv_plan is None:
                out.skip("KV bytes (plan)", "plan has no kv category", "MiB")
            else:
                out.add("KV bytes (plan)", kv_plan / MIB, "MiB")
            ec = _tier_sum(plan_d, "expert_cache")
            if ec is None:
                out.skip("Expert-cache budget", "plan has no expert_cache category", "MiB", "higher")
            else:
                out.add("Expert-cache budget", ec / MIB, "MiB", "higher")
            out.info["plan"] = plan_d
            out.info["ledger"] = ledger_d
        return out


def _as_dict(obj):
    if obj is None:
        return None
    for m in ("to_dict", "as_dict"):
        if hasattr(obj, m):
            return getattr(obj, m)()
    return None


def _tier_sum(d, category: str) -> int | None:
    """``category`` bytes summed over the tiers of a plan / ledger dict
    ({"trunk": {cat: n}, "host": {cat: n}}); None when absent."""
    if not isinstance(d, dict):
        return None
    vals = [d[t][category] for t in ("trunk", "host")
            if isinstance(d.get(t), dict) and isinstance(d[t].get(category), (int, float))]
    return int(sum(vals)) if vals else None
