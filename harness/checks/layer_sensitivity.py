"""layer_sensitivity: which layers (and K or V) carry a narrowed KV dtype's error (issue 15.6).

Contract: for the row's KV dtype ``d`` (a suite row: a dtype, or a KV spec of ``engine.kv_spec``,
whose formats at layer ``l`` are ``(K_l, V_l)``) and each layer ``l`` of ``layers`` (all by
default), the engine is loaded (weights taken over) with fp32 KV everywhere except layer ``l``,
in up to three ways (``parts``): ``kv`` (K and V of layer ``l`` narrowed: ``fp32.d@l``), ``k``
(K alone: ``fp32.k-d@l``) and ``v`` (V alone), and runs the same teacher-forced pass over the
first ``tokens`` tokens of a fixed corpus (``harness.corpus``, as ``corpus_kld``: pinned by
sha256, recorded in the manifest's ``inputs``). Each run's Mean KLD against the fp32 run
(``prepare`` on the baseline engine) is ``harness.metrics.logit_stats``'s, with its standard
error over positions (``harness.stats``). The row's own engine (``d`` on every layer) gives
``Mean KLD (uniform)``; ``Layer KLD sum`` adds the per-layer K+V KLDs, and ``Layer KLD sum /
uniform`` says how additive the layers' errors are (1: independent small errors; reported,
never gated). ``Largest layer KLD`` names the worst (layer, part); the report draws a per-layer
bar chart (K+V, K, V with error bars) and a table, and names the ``top`` layers by their share
of the sum: the ones to keep wide (``q8_0.fp32@0,23``).

Every run's engine must have applied what was asked: its ``kv_spec`` observable (read from the
buffers) against the spec the request gives the model (tail layers of a hybrid split hold fp32
KV, so a layer there is listed as not narrowable, not measured). ``KV dtype mismatches`` counts
the runs that did not (gated ``<= 0`` by default: a planted ``ignore_kv_dtype`` or
``skip_narrow_layer:N`` fails the case naming the layer); ``Zero-KLD layers`` counts narrowed
runs whose KLD is exactly 0 (a narrowing that changed nothing; optional gate). On the baseline
row nothing is narrowed: only the engine's applied dtypes are checked.

Cost: ``1 + len(layers) * len(parts)`` passes of ``tokens`` tokens per narrowed row (every
layer x 3 parts by default); bound it with ``tokens`` and ``layers``.

    [[check]]
    kind = "layer_sensitivity"; tokens = 512; layers = []; parts = ["kv", "k", "v"]
"""
from __future__ import annotations

from dataclasses import dataclass

from engine import formats
from engine.kv_spec import KVSpec, cell_formats, parse as parse_kv_spec

from .. import corpus as corpora
from ..engine_api import CAP_KV_APPLIED, CAP_LOGITS, CAP_PLAN
from ..errors import HarnessError, SuiteError
from ..metric_registry import metric
from ..metrics import logit_stats
from ..schema import CheckConfig, param, threshold
from .base import Check, Outcome, register
from .vram import expected_cells

PARTS = {"kv": "K+V", "k": "K", "v": "V"}     # config name -> label in metrics and reports
WIDE = formats.WIDEST_KV


@dataclass
class LayerSensitivityConfig(CheckConfig):
    corpus: str = param(corpora.DEFAULT, help="registry name in harness.corpus, or a UTF-8 text file")
    corpus_sha256: str | None = param(None, help="pin for a local corpus file")
    tokens: int = param(512, lo=2, help="teacher-forced positions per pass")
    layers: list[int] = param(default_factory=list, help="layers narrowed one at a time ([] = every layer)")
    parts: list[str] = param(default_factory=lambda: ["kv", "k", "v"],
                             help="what is narrowed at a layer: kv (K and V), k (K alone), v (V alone)")
    top: int = param(3, lo=1, help="layers the report names as the largest contributions")
    max_kv_mismatches: float | dict[str, float] | None = threshold("KV dtype mismatches", "<=", default=0)
    max_layer_kld: float | dict[str, float] | None = threshold("Largest layer KLD", "<=")
    max_zero_kld_layers: float | dict[str, float] | None = threshold("Zero-KLD layers", "<=")

    def validate(self, path, where: str) -> None:
        if not self.parts:
            raise SuiteError(path, f"{where}.parts", "needs at least one part", ", ".join(PARTS))
        for i, p in enumerate(self.parts):
            if p not in PARTS:
                raise SuiteError(path, f"{where}.parts[{i}]", f"unknown part {p!r}", ", ".join(PARTS))
        if len(set(self.parts)) != len(self.parts):
            raise SuiteError(path, f"{where}.parts", f"repeated part in {self.parts}")
        for i, layer in enumerate(self.layers):
            if layer < 0:
                raise SuiteError(path, f"{where}.layers[{i}]", f"layer {layer} is negative", "0 .. n_layers - 1")
        if len(set(self.layers)) != len(self.layers):
            raise SuiteError(path, f"{where}.layers", f"repeated layer in {self.layers}")
        if self.corpus_sha256 is not None and self.corpus in corpora.CORPORA:
            raise SuiteError(path, f"{where}.corpus_sha256", f"corpus {self.corpus!r} is pinned by the "
                             "registry already", "remove corpus_sha256, or give a file path as corpus")


def run_spec(k: str, v: str, layer: int) -> str:
    """The canonical spec of fp32 everywhere but ``layer``'s (``k``, ``v``)."""
    return str(KVSpec(WIDE, WIDE, ((layer, k, v),) if (k, v) != (WIDE, WIDE) else ()))


def part_formats(k: str, v: str, part: str) -> tuple[str, str]:
    """(K, V) of a layer narrowed in ``part`` from its row formats (``k``, ``v``)."""
    return {"kv": (k, v), "k": (k, WIDE), "v": (WIDE, v)}[part]


def _applied_vs_expected(eng, spec: str) -> tuple[str | None, str]:
    """(applied ``kv_spec``, expected): the request on the engine's plan (tail layers fp32)."""
    tiers = list(eng.plan.layer_tiers)
    expected = str(KVSpec.from_layers(cell_formats(c) for c in expected_cells(spec, tiers)))
    return getattr(eng, "kv_spec", None), expected


@register
class LayerSensitivity(Check):
    kind = "layer_sensitivity"
    config = LayerSensitivityConfig
    requires = frozenset({CAP_LOGITS, CAP_KV_APPLIED, CAP_PLAN})   # reloads with per-layer KV specs: kvbench
    metrics = (
        metric("KV dtype mismatches", "runs", "lower", "passes whose engine did not apply the per-layer "
               "spec it was asked for (read from its buffers)"),
        metric("Mean KLD (uniform)", "nats", "lower", "the row's dtype on every layer vs fp32 KV",
               show=("table",)),
        metric("Layer KLD sum", "nats", "lower", "sum over layers of the K+V Mean KLD with one layer narrowed",
               show=("table",)),
        metric("Layer KLD sum / uniform", "", None, "1: the layers' errors add up; reported, never gated",
               show=("table",)),
        metric("Largest layer KLD", "nats", "lower", "the largest Mean KLD of one narrowed layer (any part)",
               show=("table",)),
        metric("Largest layer share", "%", None, "the top layer's share of the layer KLD sum"),
        metric("Zero-KLD layers", "runs", "lower", "narrowed passes whose KLD is exactly 0 (changed nothing)"),
        metric("Layers measured", "layers", None),
        metric("Positions", "tokens", None, "teacher-forced positions per pass"),
        metric("Mean KLD @ layer {layer} {part}", "nats", None, "Mean KLD with only this layer's part narrowed"),
    )

    def inputs(self, cfg: LayerSensitivityConfig) -> dict:
        return {"corpus": corpora.load(cfg.corpus, cfg.corpus_sha256).manifest}

    def unmeasured_on_baseline(self, cfg: LayerSensitivityConfig) -> dict[str, str]:
        why = "the baseline row narrows nothing"
        return {"Largest layer KLD": why, "Zero-KLD layers": why}

    def load_options(self, cfg: LayerSensitivityConfig, suite) -> dict:
        opts = super().load_options(cfg, suite)
        opts["ctx"] = max(int(opts["ctx"]), cfg.tokens)
        return opts

    def prepare(self, eng, cfg: LayerSensitivityConfig, ctx):
        text = corpora.load(cfg.corpus, cfg.corpus_sha256)
        ids = corpora.tokens(eng.tokenizer, text, cfg.tokens + 1)   # + 1: the token after the last
        return {"ids": ids, "logits": eng.logits(ids[:cfg.tokens]), "corpus": text.manifest}

    def measure(self, eng, cfg: LayerSensitivityConfig, state, ctx) -> Outcome:
        out = Outcome()
        n_layers = eng.spec.n_layers
        ids, base = state["ids"], state["logits"]
        T = cfg.tokens
        targets = ids[1:T + 1]
        mismatches: list[str] = []
        applied, expected = _applied_vs_expected(eng, ctx.kv_dtype)
        if applied != expected:
            mismatches.append(f"{ctx.kv_dtype} on every layer: applied {applied}, requested {expected}")
        out.info.update(corpus=state["corpus"], tokens=T, n_layers=n_layers, row_spec=ctx.kv_dtype,
                        applied_spec=applied)
        if ctx.is_baseline:
            out.add("KV dtype mismatches", len(mismatches), "runs", "lower",
                    detail=mismatches[0] if mismatches else None)
            for name, why in self.unmeasured_on_baseline(cfg).items():   # n/a: a number gates the other rows
                out.not_applicable(name, why, "nats" if name == "Largest layer KLD" else "runs", "lower")
            out.add("Positions", T, "tokens")
            out.info["reference"] = f"{ctx.baseline}: nothing narrowed"
            return out

        uni = logit_stats(base, eng.logits(ids[:T]), 5, targets).scalars
        out.add("Mean KLD (uniform)", uni["Mean KLD"], "nats", "lower")
        out.add("Mean KLD (uniform) SE", uni.get("Mean KLD SE"), "nats")
        row = parse_kv_spec(ctx.kv_dtype).layer_formats(n_layers, ctx.model)
        layers = list(cfg.layers) or list(range(n_layers))
        bad = [x for x in layers if x >= n_layers]
        if bad:
            raise HarnessError(f"layer_sensitivity: layer {bad[0]} is out of range ({ctx.model} has {n_layers} "
                               f"layers)", f"list layers 0 .. {n_layers - 1}, or [] for all")
        tiers = list(eng.plan.layer_tiers)
        runs, skipped = [], []
        for layer in layers:
            if tiers[layer] != "trunk":
                skipped.append({"layer": layer, "why": "host tier: a hybrid's tail keeps fp32 KV"})
                continue
            for part in cfg.parts:
                k, v = part_formats(*row[layer], part)
                if (k, v) == (WIDE, WIDE):
                    skipped.append({"layer": layer, "part": PARTS[part], "why": f"{ctx.kv_dtype} keeps "
                                    f"this layer's {PARTS[part]} at {WIDE}"})
                    continue
                spec = run_spec(k, v, layer)
                e = ctx.load(kv_dtype=spec)
                got, want = _applied_vs_expected(e, spec)
                st = logit_stats(base, e.logits(ids[:T]), 5, targets).scalars
                runs.append({"layer": layer, "part": PARTS[part], "spec": spec, "applied": got,
                             "mean_kld": st["Mean KLD"], "se": st.get("Mean KLD SE"),
                             "same_top_p": st.get("Same top p")})
                if got != want:
                    mismatches.append(f"layer {layer} {PARTS[part]}: applied {got}, requested {want}")
        out.add("KV dtype mismatches", len(mismatches), "runs", "lower",
                detail=(mismatches[0] + (f" (+{len(mismatches) - 1} more)" if len(mismatches) > 1 else ""))
                if mismatches else None)
        for r in runs:
            name = f"Mean KLD @ layer {r['layer']} {r['part']}"
            out.add(name, r["mean_kld"], "nats", None)
            if r["se"] is not None:
                out.add(f"{name} SE", r["se"], "nats")
        kv_runs = [r for r in runs if r["part"] == "K+V"]
        total = sum(r["mean_kld"] for r in kv_runs)
        if kv_runs:
            out.add("Layer KLD sum", total, "nats", "lower", detail=f"{len(kv_runs)} layers, K and V narrowed")
            ratio = total / uni["Mean KLD"] if uni["Mean KLD"] else None
            if ratio is None:
                out.skip("Layer KLD sum / uniform", "the uniform run's Mean KLD is 0", "")
            else:
                out.add("Layer KLD sum / uniform", ratio, "")
        else:
            why = "parts has no 'kv' (K and V together)"
            out.skip("Layer KLD sum", why, "nats", "lower")
            out.skip("Layer KLD sum / uniform", why, "")
        if runs:
            worst = max(runs, key=lambda r: r["mean_kld"])
            out.add("Largest layer KLD", worst["mean_kld"], "nats", "lower",
                    detail=f"layer {worst['layer']} {worst['part']} ({worst['spec']})")
            zero = [r for r in runs if r["mean_kld"] == 0.0]
            out.add("Zero-KLD layers", len(zero), "runs", "lower",
                    detail=(f"layer {zero[0]['layer']} {zero[0]['part']} ({zero[0]['spec']}): KLD exactly 0"
                            if zero else None))
        else:
            why = "no layer could be narrowed (all on the host tier, or kept fp32 by the row's spec)"
            out.skip("Largest layer KLD", why, "nats", "lower")
            out.skip("Zero-KLD layers", why, "runs", "lower")
        ranked = sorted(kv_runs or runs, key=lambda r: -r["mean_kld"])
        denom = total if kv_runs else sum(r["mean_kld"] for r in runs)
        top = [{"layer": r["layer"], "part": r["part"], "mean_kld": r["mean_kld"], "se": r["se"],
                "share_pct": 100.0 * r["mean_kld"] / denom if denom else None} for r in ranked[:cfg.top]]
        if top and top[0]["share_pct"] is not None:
            out.add("Largest layer share", top[0]["share_pct"], "%", None,
                    detail=f"layer {top[0]['layer']} {top[0]['part']}")
        out.add("Layers measured", len({r["layer"] for r in runs}), "layers")
        out.add("Positions", T, "tokens")
        # the layers worth keeping wide: among the top ones, those carrying more than twice an
        # even share of the sum
        even = 100.0 / max(1, len({r["layer"] for r in ranked}))
        keep_wide = sorted({t["layer"] for t in top if t["share_pct"] is not None and t["share_pct"] > 2 * even})
        out.info.update(runs=runs, skipped=skipped, top=top, mismatches=mismatches,
                        uniform={"mean_kld": uni["Mean KLD"], "se": uni.get("Mean KLD SE")},
                        keep_wide=keep_wide,
                        suggestion=(str(KVSpec.from_layers([(WIDE, WIDE) if i in keep_wide else row[i]
                                                            for i in range(n_layers)]))
                                    if keep_wide else None),
                        reference=f"fp32 KV except one layer's {'/'.join(PARTS[p] for p in cfg.parts)} in "
                                  f"{ctx.kv_dtype}'s format, vs {ctx.baseline}, same tokens")
        return out


# -- report section -------------------------------------------------------------------------

def layer_sensitivity_section(report, names: list[str]) -> None:
    """Per check, model and narrowed row: the per-layer table (Mean KLD ± SE of K+V, K, V and
    each layer's share of the K+V sum), the layers with the largest contributions and a bar
    chart of KLD per layer with error bars."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from ..report import _num, _slug, md_table
    report.md.append("## Per-layer sensitivity (one layer narrowed at a time)\n")
    for chk in names:
        report.md.append(f"### `{chk}`\n")
        for m in report.models:
            for d in report.dtypes:
                if d == report.baseline:
                    continue
                info = report.res.info(m, d, chk) or {}
                runs = info.get("runs") or []
                if not runs:
                    continue
                uni = info.get("uniform") or {}
                parts = list(dict.fromkeys(r["part"] for r in runs))
                layers = sorted({r["layer"] for r in runs})
                by = {(r["layer"], r["part"]): r for r in runs}
                total = sum(r["mean_kld"] for r in runs if r["part"] == "K+V")
                rows = []
                for layer in layers:
                    row = {"layer": layer}
                    for p in parts:
                        r = by.get((layer, p))
                        row[f"{p} Mean KLD"] = (None if r is None else
                                                f"{_num(r['mean_kld'])} ± {_num(r['se'])}" if r.get("se") is not None
                                                else r["mean_kld"])
                    kv = by.get((layer, "K+V"))
                    if kv is not None and total:
                        row["share of K+V sum %"] = 100.0 * kv["mean_kld"] / total
                    rows.append(row)
                top = info.get("top") or []
                line = ", ".join(f"layer {t['layer']} {t['part']} ({_num(t['mean_kld'])} nats"
                                 + (f", {t['share_pct']:.0f}% of the sum)" if t.get("share_pct") is not None else ")")
                                 for t in top)
                report.md.append(
                    f"`{m}` **{d}**: uniform Mean KLD {_num(uni.get('mean_kld') or 0.0)}"
                    + (f" ± {_num(uni['se'])}" if uni.get("se") is not None else "")
                    + (f"; sum of per-layer K+V KLD {_num(total)}" if total else "")
                    + (f" ({total / uni['mean_kld']:.2f}x the uniform)" if total and uni.get("mean_kld") else "")
                    + f"; {info.get('tokens')} positions. Largest contributions: {line or 'none'}"
                    + (f"; keeping them wide: `{info['suggestion']}`" if info.get("suggestion") else "") + ".\n")
                if info.get("mismatches"):
                    report.md.append(f"⚠️ not applied as asked: {'; '.join(info['mismatches'][:3])}\n")
                report.md.append(md_table(pd.DataFrame(rows)) + "\n")
                fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(layers) + 2), 3.4))
                width = 0.8 / len(parts)
                colors = {"K+V": "#7f3c8d", "K": "#11a579", "V": "#3969ac"}
                for j, p in enumerate(parts):
                    xs = [i + (j - (len(parts) - 1) / 2) * width for i in range(len(layers))]
                    ys = [by[(x, p)]["mean_kld"] if (x, p) in by else 0.0 for x in layers]
                    es = [(by[(x, p)].get("se") or 0.0) if (x, p) in by else 0.0 for x in layers]
                    ax.bar(xs, ys, width, yerr=es, capsize=2, color=colors.get(p), label=p)
                ax.set_xticks(range(len(layers)), [str(x) for x in layers])
                ax.set_xlabel("layer narrowed (all others fp32)")
                ax.set_ylabel("Mean KLD (nats) ± SE")
                ax.set_title(f"{m}, {d}: KLD per layer")
                ax.legend(fontsize=8)
                report.save(fig, f"{_slug(chk)}_{_slug(m)}_{_slug(d)}.png", f"KLD per layer, {m}, {d}")


def _register_section() -> None:
    from ..report import register_section
    register_section("layer_sensitivity")(layer_sensitivity_section)


_register_section()
