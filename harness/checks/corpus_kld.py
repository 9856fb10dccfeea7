"""corpus_kld: teacher-forced KLD over a real, pinned corpus at long context, per depth bucket.

Contract: the text is a fixed corpus (``harness.corpus``: pinned by sha256, fetched like the
models, recorded in the manifest's ``inputs``). ``depths`` (default ``[512, 4096, "trained"]``,
``"trained"`` = the model's trained context ``ctx_train``, capped at ``trained_cap``) cut the
first ``max(depths)`` tokens of the tokenized corpus into buckets ``[0, d1)``, ``[d1, d2)``, ...
One teacher-forced pass over those tokens (``eng.logits``: causal, so position p sees exactly
p earlier tokens, as a pass of p + 1 tokens would; long passes go through the engine's wave
prefill, ``Waves`` says how many) is made on the baseline (fp32) engine in ``prepare`` and on
each narrowed dtype in ``measure``, on the *same tokens*; ``harness.metrics.logit_stats``
compares them per bucket and over all scored positions: ``Mean KLD``, ``99.0% KLD``,
``Maximum KLD``, ``Same top p``, ``Top-1 in top-k``, ``Mean PPL(Q)/PPL(base)``, ``RMS Δp``.
Per-bucket metrics are named ``<statistic> @ <lo>-<hi>`` (descriptive); the gates are on the
overall statistics and on ``Mean KLD (deepest bucket)``. ``positions_per_bucket`` (0 = all)
scores at most that many evenly spaced positions per bucket, so the reference kept in memory
stays bounded at 32k context (the pass itself still holds one [T, vocab] logit matrix).
On the baseline row, with ``noise_floor`` on, the same statistics compare fp32 in one pass
with fp32 prefilled in chunks of ``noise_chunk`` tokens (the platform's noise floor).
The engine is reloaded (weights taken over) with ``ctx`` >= the deepest depth when the
suite's ``ctx`` is smaller.

    [[check]]
    kind = "corpus_kld"; depths = [512, 4096, "trained"]; max_mean_kld = { bf16 = 0.01, q8_0 = 0.01 }
"""
from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

if TYPE_CHECKING:      # torch loads in the functions that use it: a bad input fails fast, in one line
    import torch

from .. import corpus as corpora
from ..engine_api import CAP_ATTN_MATH, CAP_CHUNKED_LOGITS, CAP_LOGITS, CAP_PREFILL_STATS, capabilities_of
from ..errors import HarnessError, SuiteError
from ..metric_registry import metric
from ..metrics import logit_stats
from ..schema import CheckConfig, param, threshold
from .base import Check, Outcome, register

BUCKET_STATS = ("Mean KLD", "99.0% KLD", "Maximum KLD", "Same top p", "Top-1 in top-{k}",
                "Mean PPL(Q)/PPL(base)", "RMS Δp")
UNITS = {"Mean KLD": "nats", "99.0% KLD": "nats", "Maximum KLD": "nats", "Median KLD": "nats",
         "Same top p": "%", "RMS Δp": "%"}
BETTER = {"Mean KLD": "lower", "99.0% KLD": "lower", "Maximum KLD": "lower", "Median KLD": "lower",
          "Same top p": "higher", "Mean PPL(Q)/PPL(base)": "lower", "RMS Δp": "lower",
          "Max abs logit diff": "lower"}


def check_depth_list(values, path, key: str, what: str) -> None:
    """Each entry a positive integer >= 2 or ``"trained"``, no repeats (SuiteError otherwise)."""
    if not values:
        raise SuiteError(path, key, f"needs at least one {what}", 'integers >= 2 or "trained"')
    seen = set()
    for i, v in enumerate(values):
        if isinstance(v, str) and v != "trained":
            raise SuiteError(path, f"{key}[{i}]", f"unknown {what} {v!r}", 'an integer >= 2 or "trained"')
        if isinstance(v, int) and v < 2:
            raise SuiteError(path, f"{key}[{i}]", f"{what} {v} is too short", 'an integer >= 2 or "trained"')
        if v in seen:
            raise SuiteError(path, f"{key}[{i}]", f"repeated {what} {v!r}")
        seen.add(v)


def resolve_lengths(values, spec, cap: int) -> tuple[list[int], list[int]]:
    """(kept, dropped): ``"trained"`` -> min(ctx_train, cap); lengths beyond it are dropped
    (error there is the model's, not the KV cache's)."""
    trained = min(int(spec.ctx_train or cap), cap)
    want = sorted({trained if v == "trained" else int(v) for v in values})
    return [d for d in want if d <= trained], [d for d in want if d > trained]


def bucket_positions(edges: list[int], per_bucket: int) -> list[list[int]]:
    """Scored positions per bucket ``[edges[i], edges[i+1])``: all, or ``per_bucket`` evenly
    spaced ones (first and last included) when the bucket is larger."""
    out = []
    for lo, hi in zip(edges, edges[1:]):
        n = hi - lo
        if per_bucket <= 0 or n <= per_bucket:
            out.append(list(range(lo, hi)))
        else:
            out.append(sorted({lo + (i * (n - 1)) // (per_bucket - 1) for i in range(per_bucket)}))
    return out


def bucket_name(lo: int, hi: int) -> str:
    return f"{lo}-{hi}"


@dataclass
class CorpusKldConfig(CheckConfig):
    corpus: str = param(corpora.DEFAULT, help="registry name in harness.corpus, or a UTF-8 text file")
    corpus_sha256: str | None = param(None, help="pin for a local corpus file")
    depths: list[int | str] = param(default_factory=lambda: [512, 4096, "trained"],
                                    help='bucket edges in tokens; "trained" = the model\'s context')
    trained_cap: int = param(32768, lo=2, help='"trained" never exceeds this many tokens')
    positions_per_bucket: int = param(4096, lo=0, help="scored positions per bucket (0 = all)")
    top_k: int = param(5, lo=1)
    noise_floor: bool = True
    noise_chunk: int = param(1024, lo=1, help="prefill chunk of the fp32 noise-floor pass")
    min_top_k_pct: float | dict[str, float] | None = threshold("Top-1 in top-{top_k}", ">=", hi=100.0)
    min_same_top_pct: float | dict[str, float] | None = threshold("Same top p", ">=", hi=100.0)
    max_mean_kld: float | dict[str, float] | None = threshold("Mean KLD", "<=")
    max_mean_kld_deepest: float | dict[str, float] | None = threshold("Mean KLD (deepest bucket)", "<=")
    max_kld_99: float | dict[str, float] | None = threshold("99.0% KLD", "<=")
    max_ppl_ratio: float | dict[str, float] | None = threshold("Mean PPL(Q)/PPL(base)", "<=")
    attn_math: list[str] = param(default_factory=lambda: ["exact"],
                                 help='kernel precisions of the narrowed rows: "exact" (storage error '
                                      'alone) and/or "ggml-cpu" (the query converted to K\'s dot type, '
                                      'as llama.cpp\'s CPU kernels do)')

    def validate(self, path, where: str) -> None:
        check_depth_list(self.depths, path, f"{where}.depths", "depth")
        from engine.attn_math import MODES
        if "exact" not in self.attn_math or any(m not in MODES for m in self.attn_math) \
                or len(set(self.attn_math)) != len(self.attn_math):
            raise SuiteError(path, f"{where}.attn_math", f"{self.attn_math!r} must list \"exact\" and may add "
                             f"others, each once", f"from {', '.join(MODES)}")
        if self.corpus not in corpora.CORPORA and not self.corpus.strip():
            raise SuiteError(path, f"{where}.corpus", "must not be empty", ", ".join(corpora.CORPORA))
        if self.corpus_sha256 is not None and (len(self.corpus_sha256) != 64 or
                                               any(c not in "0123456789abcdefABCDEF" for c in self.corpus_sha256)):
            raise SuiteError(path, f"{where}.corpus_sha256", f"{self.corpus_sha256!r} is not a sha256",
                             "64 hex digits")
        if self.corpus_sha256 is not None and self.corpus in corpora.CORPORA:
            raise SuiteError(path, f"{where}.corpus_sha256", f"corpus {self.corpus!r} is pinned by the "
                             "registry already", "remove corpus_sha256, or give a file path as corpus")


def ensure_ctx(check: Check, eng, cfg: CheckConfig, ctx, need: int):
    """The engine to use: ``eng``, or one reloaded (weights taken over) with ctx >= ``need``."""
    have = check.load_options(cfg, ctx.suite)["ctx"]
    return eng if need <= have else ctx.load(ctx=need)


def _guard_memory(T: int, kept: int, vocab: int) -> None:
    from engine.hostmem import available
    need = 4 * vocab * (T + 2 * kept)
    ram = available()
    if ram.bytes and need > ram.bytes:
        raise HarnessError(f"corpus_kld: {T} positions x {vocab} logits need about {need / 2**30:.1f} GiB "
                           f"of host memory, {ram.bytes / 2**30:.1f} GiB are available ({ram.source})",
                           "lower the check's depths / trained_cap / positions_per_bucket, or run on a larger host")


@register
class CorpusKld(Check):
    kind = "corpus_kld"
    metrics = (
        metric("Mean KLD", "nats", "lower", "KL(baseline || narrowed) over the corpus, mean", show=("table",)),
        metric("Median KLD", "nats", "lower"),
        metric("99.0% KLD", "nats", "lower"),
        metric("Maximum KLD", "nats", "lower"),
        metric("Same top p", "%", "higher", show=("table",)),
        metric("Top-1 in top-{k}", "%", "higher"),
        metric("Max abs logit diff", "", "lower"),
        metric("Mean PPL(Q)/PPL(base)", "", "lower", show=("table",)),
        metric("RMS Δp", "%", "lower"),
        metric("Mean KLD (deepest bucket)", "nats", "lower", "Mean KLD over the deepest depth bucket"),
        *(metric(f"{stat} @ {{bucket}}", unit, better, f"{stat} over the positions of one depth bucket")
          for stat, unit, better in (("Mean KLD", "nats", "lower"), ("99.0% KLD", "nats", "lower"),
                                     ("Maximum KLD", "nats", "lower"), ("Same top p", "%", "higher"),
                                     ("Top-1 in top-{k}", "%", "higher"), ("Mean PPL(Q)/PPL(base)", "", "lower"),
                                     ("RMS Δp", "%", "lower"))),
        metric("Mean KLD ({maths} maths)", "nats", "lower",
               "Mean KLD with the attention kernel's precision set to that mode (engine.attn_math)"),
        metric("Mean KLD SE ({maths} maths)", "nats", None),
        metric("Kernel maths share of Mean KLD ({maths})", "%", None,
               "(Mean KLD under that maths - Mean KLD exact) / Mean KLD under that maths"),
        metric("Tokens", "tokens", None, "corpus tokens teacher-forced"),
        metric("Scored positions", "positions", None),
        metric("Waves", "", None, "waves of the longest prefill"),
    )
    config = CorpusKldConfig
    requires = frozenset({CAP_LOGITS})       # chunked logits: the baseline row's noise floor only

    def inputs(self, cfg: CorpusKldConfig) -> dict:
        return {"corpus": corpora.load(cfg.corpus, cfg.corpus_sha256).manifest}

    def unmeasured_on_baseline(self, cfg: CorpusKldConfig):
        if cfg.noise_floor:
            return {}
        why = "noise_floor = false: the baseline row has nothing to compare with"
        return {cfg.gate(n)[0]: why for n in cfg.threshold_fields()}

    def prepare(self, eng, cfg: CorpusKldConfig, ctx):
        import torch
        text = corpora.load(cfg.corpus, cfg.corpus_sha256)
        depths, dropped = resolve_lengths(cfg.depths, eng.spec, cfg.trained_cap)
        if not depths:
            raise HarnessError(f"corpus_kld: every depth {sorted(dropped)} exceeds {ctx.model}'s trained "
                               f"context ({eng.spec.ctx_train})", "give smaller depths")
        T = depths[-1]
        ids = corpora.tokens(eng.tokenizer, text, T + 1)      # + 1: the token after the last position
        edges = [0, *depths]
        buckets = bucket_positions(edges, cfg.positions_per_bucket)
        idx = torch.tensor([p for b in buckets for p in b], dtype=torch.long)
        _guard_memory(T, len(idx), int(eng.spec.vocab_size))
        eng = ensure_ctx(self, eng, cfg, ctx, T)
        base, stats = _pass(eng, ids[:T], idx)
        return {"ids": ids, "T": T, "depths": depths, "dropped": dropped, "edges": edges,
                "buckets": buckets, "idx": idx, "logits": base, "stats": stats,
                "corpus": text.manifest}

    def measure(self, eng, cfg: CorpusKldConfig, state, ctx) -> Outcome:
        out = Outcome()
        T, idx = state["T"], state["idx"]
        no_floor = ctx.is_baseline and (not cfg.noise_floor or CAP_CHUNKED_LOGITS not in capabilities_of(eng))
        if no_floor:
            why = (None if cfg.noise_floor else self.unmeasured_on_baseline(cfg))
            for metric in (cfg.gate(n)[0] for n in cfg.threshold_fields()):
                out.skip(metric, why[metric] if why else f"engine {eng.name} cannot prefill in chunks: no noise "
                         "floor", UNITS.get(metric, ""), BETTER.get(metric))
            test, stats = None, state["stats"]
        else:
            eng = ensure_ctx(self, eng, cfg, ctx, T)
            test, stats = _pass(eng, state["ids"][:T], idx, chunk=cfg.noise_chunk if ctx.is_baseline else None)
        targets = [state["ids"][p + 1] for p in idx.tolist()]
        k_name = f"Top-1 in top-{cfg.top_k}"
        buckets_info = []
        if test is not None:
            base = state["logits"]
            allst = logit_stats(base, test, cfg.top_k, targets)
            for name in ("Mean KLD", "Median KLD", "99.0% KLD", "Maximum KLD", "Same top p", k_name,
                         "Max abs logit diff", "Mean PPL(Q)/PPL(base)", "RMS Δp"):
                if name in allst.scalars:
                    out.add(name, allst.scalars[name], UNITS.get(name, "%" if name == k_name else ""),
                            BETTER.get(name, "higher" if name == k_name else None))
                if f"{name} SE" in allst.scalars:      # the +/- llama-perplexity prints (harness.stats)
                    out.add(f"{name} SE", allst.scalars[f"{name} SE"], UNITS.get(name, ""))
            start = 0
            for (lo, hi), pos in zip(zip(state["edges"], state["edges"][1:]), state["buckets"]):
                sl = slice(start, start + len(pos))
                start += len(pos)
                st = logit_stats(base[sl], test[sl], cfg.top_k, targets[sl])
                row = {"lo": lo, "hi": hi, "positions": len(pos)}
                for name in BUCKET_STATS:
                    name = name.format(k=cfg.top_k)
                    v = st.scalars.get(name)
                    row[name] = v
                    if st.scalars.get(f"{name} SE") is not None:
                        row[f"{name} SE"] = st.scalars[f"{name} SE"]
                    if v is not None:
                        out.add(f"{name} @ {bucket_name(lo, hi)}", v, UNITS.get(name, "%" if name == k_name else ""),
                                BETTER.get(name, "higher" if name == k_name else None))
                buckets_info.append(row)
            out.add("Mean KLD (deepest bucket)", buckets_info[-1]["Mean KLD"], "nats", "lower",
                    detail=f"positions {bucket_name(buckets_info[-1]['lo'], buckets_info[-1]['hi'])}")
            out.series = {"kld": allst.series["kld"], "position": idx.tolist()}
        else:
            buckets_info = [{"lo": lo, "hi": hi, "positions": len(pos)}
                            for (lo, hi), pos in zip(zip(state["edges"], state["edges"][1:]), state["buckets"])]
        if test is not None and not ctx.is_baseline:
            _maths_axis(out, eng, cfg, state, targets, allst.scalars.get("Mean KLD"))
        out.add("Tokens", T, "tokens")
        out.add("Scored positions", int(idx.numel()), "positions")
        if stats.get("waves") is not None:
            out.add("Waves", int(stats["waves"]), "")
        out.info.update({
            "corpus": state["corpus"], "depths": state["depths"], "dropped_depths": state["dropped"],
            "buckets": buckets_info, "prefill": stats, "baseline_prefill": state["stats"],
            "reference": (f"{ctx.baseline} one pass vs {ctx.baseline} prefilled in chunks of {cfg.noise_chunk} "
                          "(noise floor)" if ctx.is_baseline else f"{ctx.kv_dtype} vs {ctx.baseline}, same tokens")})
        return out


def _maths_axis(out: Outcome, eng, cfg: CorpusKldConfig, state, targets, exact_kld) -> None:
    """The kernel-precision axis: each extra ``attn_math`` mode's pass on the narrowed row, its
    Mean KLD (+/- SE) and the share the maths adds to the storage error (``exact``)."""
    extra = [m for m in cfg.attn_math if m != "exact"]
    if not extra:
        return
    if CAP_ATTN_MATH not in capabilities_of(eng):
        for m in extra:
            out.skip(f"Mean KLD ({m} maths)", f"engine {eng.name} cannot set its attention maths: its "
                     "own kernels' precision is in every number it gives", "nats", "lower")
        return
    from engine.errors import ConfigError
    for m in extra:
        try:
            eng.set_attn_math(m)
        except ConfigError as exc:
            out.skip(f"Mean KLD ({m} maths)", str(exc.args[0] if exc.args else exc), "nats", "lower")
            continue
        try:
            test, _ = _pass(eng, state["ids"][:state["T"]], state["idx"])
        finally:
            eng.set_attn_math("exact")
        st = logit_stats(state["logits"], test, cfg.top_k, targets).scalars
        kld = st.get("Mean KLD")
        out.add(f"Mean KLD ({m} maths)", kld, "nats", "lower")
        if st.get("Mean KLD SE") is not None:
            out.add(f"Mean KLD SE ({m} maths)", st["Mean KLD SE"], "nats")
        if kld and exact_kld is not None:
            out.add(f"Kernel maths share of Mean KLD ({m})", 100.0 * (kld - exact_kld) / kld, "%")
        out.info.setdefault("attn_math", {})[m] = {"Mean KLD": kld, "Mean KLD SE": st.get("Mean KLD SE")}


def _pass(eng, ids: list[int], idx: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, dict]:
    """Logits at the scored positions of one teacher-forced pass, and its prefill stats."""
    import time
    t0 = time.perf_counter()
    logits = eng.logits(ids, chunk=chunk) if chunk else eng.logits(ids)
    seconds = time.perf_counter() - t0
    kept = logits.index_select(0, idx).clone()
    del logits
    stats = {"tokens": len(ids), "seconds": round(seconds, 3), "chunk": chunk}
    if CAP_PREFILL_STATS in capabilities_of(eng):
        st = eng.last_prefill_stats or {}
        stats.update({k: st.get(k) for k in ("waves", "wave_rows", "peak_scratch_bytes")})
    return kept, stats


# -- report section -------------------------------------------------------------------------

def corpus_kld_section(report, names: list[str]) -> None:
    """Per check: the corpus and its pin, a table per model x dtype x depth bucket (how the
    error grows with context) and a plot of Mean KLD per bucket."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from ..report import COLORS, _slug, md_table
    report.md.append("## Long context over a real corpus (teacher-forced, per depth bucket)\n")
    for chk in names:
        report.md.append(f"### `{chk}`\n")
        for m in report.models:
            info = report.res.info(m, report.baseline, chk) or next(
                (report.res.info(m, d, chk) for d in report.dtypes if report.res.info(m, d, chk)), {})
            c = info.get("corpus") or {}
            one_pass = info.get("baseline_prefill") or info.get("prefill") or {}
            if c:
                report.md.append(f"`{m}`: corpus **{c.get('name')}** ("
                                 + (f"{c.get('package')}=={c.get('version')} `{c.get('member')}`, "
                                    if c.get("package") else f"{c.get('path')}, ")
                                 + f"bytes {c.get('byte_range')}, sha256 `{c.get('sha256')}`); depths "
                                 f"{info.get('depths')}" + (f", dropped beyond the trained context: "
                                                            f"{info.get('dropped_depths')}"
                                                            if info.get("dropped_depths") else "")
                                 + f"; {one_pass.get('waves')} wave(s) of at most {one_pass.get('wave_rows')} "
                                 f"rows in the {one_pass.get('tokens')}-token pass ({one_pass.get('seconds')} s "
                                 f"for {report.baseline}).\n")
            rows = []
            for d in report.dtypes:
                inf = report.res.info(m, d, chk)
                for b in inf.get("buckets") or []:
                    row = {"model": m, "dtype": report.label(d, "noise floor"),
                           "positions": f"{b['lo']}-{b['hi']}", "scored": b.get("positions")}
                    for k, v in b.items():
                        if k in ("lo", "hi", "positions") or k.endswith(" SE"):
                            continue
                        se = b.get(f"{k} SE")
                        row[k] = (f"{_fmt(v)} ± {_fmt(se)}" if se is not None and v is not None
                                  and se == se else v)
                    rows.append(row)
            if not rows:
                continue
            df = pd.DataFrame(rows).dropna(axis=1, how="all")
            report.md.append(md_table(df) + "\n")
            _maths_table(report, m, chk)
            if "Mean KLD" not in df:
                continue
            fig, ax = plt.subplots(figsize=(6.5, 3.2))
            for d in report.dtypes:
                bs = [b for b in report.res.info(m, d, chk).get("buckets") or [] if b.get("Mean KLD") is not None]
                if not bs:
                    continue
                xs = list(range(len(bs)))
                zero = not any(b["Mean KLD"] for b in bs)
                ax.plot(xs, [max(b["Mean KLD"], 1e-12) for b in bs], marker="o", color=COLORS.get(d),
                        label=report.label(d, "noise floor") + (": exactly 0 (drawn at 1e-12)" if zero else ""))
                ax.set_xticks(xs, [f"{b['lo']}-{b['hi']}" for b in bs])
            ax.set_yscale("log")
            ax.set_xlabel("positions (depth bucket)")
            ax.set_ylabel("Mean KLD (nats)")
            ax.set_title(f"{m}, {chk}: Mean KLD per depth bucket")
            ax.legend(fontsize=8)
            report.save(fig, f"{_slug(chk)}_buckets_{_slug(m)}.png", f"Mean KLD per depth bucket, {m}")


def _maths_table(report, m: str, chk: str) -> None:
    """Storage error vs kernel error (issue 15 item 8): per narrowed dtype, the whole text's
    Mean KLD with exact maths (the storage alone) beside each extra ``attn_math`` mode's, and
    the share the maths adds. Nothing when the check ran no extra mode."""
    from ..report import md_table
    rows = []
    for d in report.dtypes:
        extra = (report.res.info(m, d, chk) or {}).get("attn_math") or {}
        for mode, st in extra.items():
            exact, exact_se = report.value(m, d, chk, "Mean KLD"), report.value(m, d, chk, "Mean KLD SE")
            kld, se = st.get("Mean KLD"), st.get("Mean KLD SE")
            rows.append({"model": m, "dtype": d,
                         "Mean KLD, exact maths (storage)": _pm(exact, exact_se),
                         "maths": mode, "Mean KLD, with the maths": _pm(kld, se),
                         "maths share %": (f"{100.0 * (kld - exact) / kld:.0f}" if kld and exact is not None
                                           else "-")})
    if rows:
        import pandas as pd
        report.md.append("Storage error vs kernel error: the same narrowed cache read with exact "
                         "float32 maths, and with the query converted to K's dot type as llama.cpp's "
                         "CPU kernels do (`ggml-cpu`); the share is what the kernel's maths add.\n")
        report.md.append(md_table(pd.DataFrame(rows)) + "\n")


def _pm(v, se) -> str:
    if v is None:
        return "-"
    return f"{_fmt(v)} ± {_fmt(se)}" if se is not None and se == se else _fmt(v)


def _fmt(v) -> str:
    from ..report import _num
    return _num(float(v))


def _register_section() -> None:
    from ..report import register_section
    register_section("corpus_kld")(corpus_kld_section)


_register_section()
