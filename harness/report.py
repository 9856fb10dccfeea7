"""Reports: a markdown page with tables and PNG plots, built from a results directory alone.

Contract: ``build_report(results_dir, out_dir=None) -> Path`` reads only what the run wrote
(manifest.json + records.jsonl) and writes ``<out_dir>/report.md`` (default
``reports/<run>/``) plus PNGs beside it, linked relatively so the page renders on GitHub.
Sections: run facts, the verdict table (model x check x dtype, the failing number in each
failed cell), memory (KV bytes, expert-cache budget, applied dtypes, plan vs runtime; for a
model with sliding-window layers, KV per layer kind: global vs SWA rings, with a plot),
accuracy (llama.cpp KLD statistics with the fp32 noise floor, per-position max-abs / KLD
curves, top-k containment), wave prefill, throughput (pp/tg bars), coherence samples, and
every metric that was skipped with its reason. Tables are pandas frames; plots matplotlib
(Agg backend, ``savefig`` then ``plt.close``). It can be rebuilt at any time. Which metrics
the accuracy, wave and coherence tables list is the checks' declaration (``show=("table",)``
in ``harness.metric_registry``), as the run's manifest recorded it.

    path = build_report("results/kv-dtype-smollm2-135m-20250101-120000")
    print(path)    # reports/kv-dtype-smollm2-135m-20250101-120000/report.md
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pandas as pd

# Plots are files (Agg), whoever imports pyplot first (a check's own section does too).
os.environ.setdefault("MPLBACKEND", "Agg")


class _Pyplot:
    """``matplotlib.pyplot``, imported at the first plot: a CLI call that only fails on bad
    input, or never plots, skips matplotlib's ~0.7 s import (every ``harness`` command imports
    this module)."""

    def __getattr__(self, name):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
        self.__dict__.update(pyplot.__dict__)        # later look-ups are plain attributes
        return getattr(pyplot, name)


plt = _Pyplot()

from . import metric_registry  # noqa: E402
from . import stats as _stats  # noqa: E402
from .results import Results, atomic_write, load_results, nothing_measured, origins_note  # noqa: E402

SPEED_RE = re.compile(r"(pp|tg)\d+(@d\d+)?")     # throughput's measures: pp<N>, tg<N>, tg<N>@d<D>

COLORS = {"fp32": "#555555", "bf16": "#1f77b4", "q8_0": "#ff7f0e"}
# check kind -> section(report, check_names): a check module outside this file adds the
# section of its kind here (``register_section``); ``build`` calls it after the built-in ones
SECTIONS: dict = {}
# name -> section(report, every check name): run-wide sections placed after the verdict table
TOP_SECTIONS: dict = {}


def register_section(kind: str, *, top: bool = False):
    """Decorator: ``@register_section("needle") def needle(report, names): ...``; the
    function appends markdown to ``report.md`` and saves plots with ``report.save``.
    ``top=True``: a run-wide section (``kind`` is only its name, e.g. the summary), placed
    right after the verdict table and called with every check of the run, whatever its kind."""
    def deco(fn):
        (TOP_SECTIONS if top else SECTIONS)[kind] = fn
        return fn
    return deco
ICON = {"pass": "✅ pass", "fail": "❌ **FAIL**", "error": "⚠️ **error**",
        "incomplete": "⚠️ **incomplete**", "n/a": "➖ n/a"}
TEXT_CHARS = 320


def md_table(df: pd.DataFrame, index: bool = False) -> str:
    """A GitHub markdown table of ``df`` (pipes and newlines in cells escaped)."""
    if index:
        df = df.reset_index()
    cols = [str(c) for c in df.columns]

    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return _num(v)
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def _num(v: float) -> str:
    if v == 0:
        return "0"
    if float(v).is_integer() and abs(v) < 1e15:
        return f"{int(v):,}" if abs(v) >= 10000 else str(int(v))
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
    return f"{v:.3g}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(text).name if text.endswith(".gguf") else text)


class _Report:
    def __init__(self, res: Results, out: Path):
        self.res, self.out = res, out
        m = res.manifest.get("matrix") or {}
        cases = res.cases()
        self.models = m.get("models") or list(dict.fromkeys(c["model"] for c in cases))
        self.dtypes = m.get("dtypes") or list(dict.fromkeys(c["kv_dtype"] for c in cases))
        self.checks = m.get("checks") or list(dict.fromkeys(c["check"] for c in cases))
        self.baseline = (res.manifest.get("suite", {}).get("suite", {}).get("baseline")
                         or (self.dtypes[0] if self.dtypes else "fp32"))
        self.kinds = {c["check"]: c["kind"] for c in cases}
        self.case = {(c["model"], c["kv_dtype"], c["check"]): c for c in cases}
        self.df = res.metrics()
        # which metrics a table lists: the declarations the run recorded (harness.metric_registry),
        # else the live ones (results written before the registry)
        self.declared = metric_registry.from_json(res.manifest.get("metrics"))
        self.md: list[str] = []
        self.images: list[str] = []

    # -- helpers ------------------------------------------------------------------------
    def checks_of(self, kind: str) -> list[str]:
        return [c for c in self.checks if self.kinds.get(c) == kind]

    def value(self, model: str, dtype: str, check: str, metric: str):
        df = self.df
        if df.empty:
            return None
        sel = df[(df.model == model) & (df.kv_dtype == dtype) & (df.check == check) & (df.metric == metric)]
        if sel.empty:
            return None
        v = sel.iloc[0]["value"]
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    def label(self, dtype: str, what: str = "") -> str:
        return f"{dtype} ({what})" if dtype == self.baseline and what else dtype

    def save(self, fig, name: str, alt: str) -> None:
        fig.tight_layout()
        fig.savefig(self.out / name, dpi=110)
        plt.close(fig)
        self.images.append(name)
        self.md.append(f"![{alt}]({name})\n")

    # -- sections -----------------------------------------------------------------------
    def header(self) -> None:
        man = self.res.manifest
        suite = man.get("suite", {})
        git = man.get("git") or {}
        dev = man.get("device") or {}
        ver = man.get("versions") or {}
        sha = (git.get("sha") or "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
        device = dev.get("gpu") or dev.get("cpu") or dev.get("requested") or "unknown"
        self.md += [f"# kvbench report: {self.res.name}\n",
                    f"- suite: `{suite.get('suite', {}).get('name', '?')}` ({suite.get('path', '?')}, "
                    f"sha256 {str(suite.get('sha256', ''))[:12]})",
                    f"- models: {', '.join(f'`{m}`' for m in self.models)}; KV dtypes: "
                    f"{', '.join(self.dtypes)} (baseline {self.baseline})",
                    f"- device: {dev.get('requested', '?')} = {device}"
                    + (f", {dev['gpu_memory_gib']} GiB" if dev.get("gpu_memory_gib") else "")
                    + (f", {dev['cpu_count']} CPU threads" if dev.get("cpu_count") else ""),
                    f"- git: {sha}; python {ver.get('python')}, torch {ver.get('torch')}, "
                    f"triton {ver.get('triton')}, gguf {ver.get('gguf')}",
                    f"- command: `{man.get('command', '?')}`",
                    f"- started {man.get('started')}, finished {man.get('finished') or 'not finished'}"
                    + (f"; shard {man['shard']}" if man.get("shard") not in (None, "0/1") else "")]
        resumed = [r for r in man.get("resumed") or [] if isinstance(r, dict)]
        if resumed:     # the run's other sessions: their cases may come from other code or machines
            self.md.append(f"- resumed {len(resumed)} time(s): " + ", ".join(
                f"{r.get('at')} (git {((r.get('git') or {}).get('sha') or 'unknown')[:12]}"
                + (" dirty" if (r.get("git") or {}).get("dirty") else "") + ")" for r in resumed)
                + "; which process measured each case is named under any table that mixes them")
        if dev.get("resolved"):
            self.md.append(f"- ran on: **{dev['resolved']}** (requested `{dev.get('requested')}`)"
                           + (f"; host RAM {dev['host_ram_available'] / 2**30:.1f} GiB available of "
                              f"{dev['host_ram_total'] / 2**30:.1f} GiB ({dev.get('host_ram_source')})"
                              if dev.get("host_ram_total") else ""))
        wf = man.get("weight_format") or {}
        if wf.get("models"):
            self.md.append("- weights: " + "; ".join(
                f"`{m}` **{f.get('applied')}** (requested {f.get('requested')}"
                + (f": {f['reason']})" if f.get("reason") else ")") for m, f in wf["models"].items())
                + "".join(f"; check `{c}` at **{fmt}** (its own)" for c, fmt in (wf.get("checks") or {}).items()))
        for p in man.get("processes") or []:
            gib = lambda n: f"{(n or 0) / 2**30:.2f} GiB"   # noqa: E731
            self.md.append(f"- process {p.get('pid')} ({p.get('cases_run')} cases, {p.get('at')}): peak host "
                           f"{gib(p.get('host_peak_anon_bytes'))} resident (RSS peak with mapped files "
                           f"{gib(p.get('host_peak_rss_bytes'))})"
                           + (f", peak GPU {gib(p.get('gpu_peak_allocated_bytes'))} allocated / "
                              f"{gib(p.get('gpu_peak_reserved_bytes'))} reserved"
                              if str(dev.get("resolved", "")).startswith("cuda") else "")
                           + "; engine loads "
                           f"{p.get('engine_loads')}, weight takeovers {p.get('engine_rebinds')}, at most "
                           f"{p.get('max_live_engines')} engine(s) holding weights at once")
        if man.get("settings"):        # declared settings (engine/settings.py): the non-default ones
            env = {k: v["value"] for k, v in man["settings"].items() if v.get("set")}
            numerics = {k for k, v in man["settings"].items() if v.get("set") and v.get("numerics")}
        else:                          # manifests written before settings were declared
            env = {k: v for k, v in (man.get("env") or {}).items() if v not in (None, "")}
            numerics = set()
        fault = env.pop("KVBENCH_FAULT", None)
        if fault:
            self.md.append(f"- **fault injected: `KVBENCH_FAULT={fault}`** (this run is expected to fail)")
        if env:
            self.md.append("- settings (non-default): " + ", ".join(
                f"`{k}={v}`" + (" (changes numerics)" if k in numerics else "") for k, v in env.items()))
        if man.get("runtime_env"):     # allocator, threads, OpenMP, GPU choice: what memory and speed ran under
            self.md.append("- runtime environment: " + ", ".join(f"`{k}={v}`" for k, v in man["runtime_env"].items()))
        self.md.append("")

    def verdict(self) -> None:
        self.md.append("## Verdict\n")
        rows = []
        for m in self.models:
            for chk in self.checks:
                row = {"model": m, "check": chk}
                for d in self.dtypes:
                    c = self.case.get((m, d, chk))
                    if c is None:
                        row[self.label(d, "baseline")] = "— not run"
                        continue
                    cell = ICON.get(c["status"], c["status"])
                    if c["status"] == "fail":
                        cell += ": " + "; ".join(c.get("failures") or [])
                    elif c["status"] == "error":
                        cell += ": " + str(c.get("error"))
                    elif c["status"] == "incomplete":
                        cell += ": " + "; ".join(c.get("unmeasured") or [])
                    elif c["status"] == "n/a":
                        cell += f" ({c.get('reason')})"
                    skipped = self._skipped_count(m, d, chk)
                    if skipped:
                        cell += f" ({skipped} skipped)"
                    row[self.label(d, "baseline")] = cell
                rows.append(row)
        self.md.append(md_table(pd.DataFrame(rows)) + "\n")
        cases = self.res.cases()
        total = len(self.models) * len(self.dtypes) * len(self.checks)
        count = {k: sum(c["status"] == k for c in cases) for k in ("pass", "fail", "error", "incomplete", "n/a")}
        self.md.append(f"{len(cases)} of {total} cases recorded: {count['pass']} passed, {count['fail']} failed, "
                       f"{count['incomplete']} incomplete (a gate not measured), {count['error']} errors, "
                       f"{count['n/a']} not applicable.\n")
        if cases and nothing_measured(c["status"] for c in cases):
            self.md.append("**Nothing measured**: every case is n/a, so this run passed nothing "
                           "(the CLI's verdict \"nothing measured\", exit 1).\n")
        na_gates = [(c, r) for c in cases if c["status"] != "n/a" for r in self.res.of_type("metric")
                    if (r["model"], r["kv_dtype"], r["check"]) == (c["model"], c["kv_dtype"], c["check"])
                    and r.get("na") and r.get("threshold") is not None]
        if na_gates:
            self.md.append("Gates that cannot apply to the engine or model of a case (declared `n/a` by the "
                           "check: not judged, so not part of that case's pass):\n")
            self.md += [f"- {c['model']} {c['kv_dtype']} {c['check']}: {r['metric']}: {r['na']}"
                        for c, r in na_gates]
            self.md.append("")
        optional = [(c, r) for c in cases for r in self._optional_gates(c)]
        if optional:
            self.md.append("Gates allowed to go unmeasured (`optional` in the suite):\n")
            self.md += [f"- {c['model']} {c['kv_dtype']} {c['check']}: {r['metric']}: {r['optional']}"
                        for c, r in optional]
            self.md.append("")

    def _optional_gates(self, c: dict) -> list[dict]:
        return [r for r in self.res.of_type("metric")
                if (r["model"], r["kv_dtype"], r["check"]) == (c["model"], c["kv_dtype"], c["check"])
                and r.get("optional") and r.get("passed") is None]

    def _skipped_count(self, m, d, chk) -> int:
        df = self.df
        if df.empty or "skipped" not in df:
            return 0
        sel = df[(df.model == m) & (df.kv_dtype == d) & (df.check == chk)]
        return int(sel["skipped"].notna().sum())

    def memory(self) -> None:
        names = self.checks_of("vram")
        if not names:
            return
        self.md.append("## Memory: KV bytes, expert-cache budget, applied dtypes\n")
        chk = names[0]
        rows = []
        for m in self.models:
            for d in self.dtypes:
                info = self.res.info(m, d, chk)
                applied = info.get("applied") or []
                counts = pd.Series(applied).value_counts() if applied else pd.Series(dtype=int)
                rows.append({"model": m, "requested": d,
                             "applied per layer": " + ".join(f"{n}× {k}" for k, n in counts.items()),
                             "ctx": info.get("ctx"),
                             "KV MiB (requested)": self.value(m, d, chk, "KV bytes (requested)"),
                             "KV MiB (runtime)": self.value(m, d, chk, "KV bytes (runtime)"),
                             "KV MiB (plan)": self.value(m, d, chk, "KV bytes (plan)"),
                             "expert cache MiB": self.value(m, d, chk, "Expert-cache budget"),
                             "plan vs runtime %": self.value(m, d, chk, "Plan vs runtime max diff"),
                             "unaccounted MiB": self.value(m, d, chk, "Unaccounted"),
                             "dtype mismatches": self.value(m, d, chk, "KV dtype mismatches")})
        df = pd.DataFrame(rows)
        self.md.append(md_table(df.dropna(axis=1, how="all")) + "\n")
        for m in self.models:
            fig, ax = plt.subplots(figsize=(6, 3.2))
            xs = list(range(len(self.dtypes)))
            for off, (col, name) in enumerate((("KV MiB (requested)", "requested"),
                                                ("KV MiB (runtime)", "runtime"),
                                                ("expert cache MiB", "expert-cache budget"))):
                vals = [df[(df.model == m) & (df.requested == d)][col].iloc[0] for d in self.dtypes]
                vals = [float(v) if v is not None and not pd.isna(v) else 0.0 for v in vals]
                if any(vals):
                    bars = ax.bar([x + (off - 1) * 0.27 for x in xs], vals, width=0.27, label=name)
                    ax.bar_label(bars, fmt="%.0f", fontsize=7)
            ax.set_xticks(xs, self.dtypes)
            ax.set_ylabel("MiB")
            ax.set_title(f"{m}: KV cache and expert-cache budget")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            self.save(fig, f"memory_{_slug(m)}.png", f"KV bytes per dtype, {m}")
            self.plan_bars(m, chk)
        self.kv_kinds(chk)

    def kv_kinds(self, chk: str) -> None:
        """Global vs sliding-window layers' KV (vram info ``kv_by_kind``), where a model has both."""
        rows = []
        for m in self.models:
            for d in self.dtypes:
                info = self.res.info(m, d, chk)
                for kind, k in (info.get("kv_by_kind") or {}).items():
                    name = ("global (ctx rows)" if kind == "global" else
                            f"sliding window {k.get('window')} (ring)")
                    rows.append({"model": m, "requested": d, "layers": name, "n": k.get("layers"),
                                 "rows per layer": "/".join(str(r) for r in k.get("rows") or []),
                                 "KV MiB (runtime)": _mib(k.get("runtime_bytes")),
                                 "KV MiB (plan)": _mib(k.get("plan_bytes")),
                                 f"KV MiB at ctx {info.get('ctx')} rows": _mib(k.get("ctx_bytes"))})
        if not rows:
            return
        self.md.append("### KV per layer kind: global vs sliding-window layers\n")
        self.md.append("Sliding-window layers only need the last `window` keys: their cache is a ring "
                       "of window + chunk rows instead of ctx rows (engine/kv_ring.py), priced so by "
                       "the planner.\n")
        df = pd.DataFrame(rows)
        self.md.append(md_table(df.dropna(axis=1, how="all")) + "\n")
        full_col = [c for c in df.columns if c.startswith("KV MiB at ctx")][0]
        for m in self.models:
            t = df[df.model == m]
            if t.empty:
                continue
            fig, ax = plt.subplots(figsize=(6, 3.2))
            dts = list(dict.fromkeys(t.requested))
            xs = list(range(len(dts)))
            bottom = [0.0] * len(dts)
            for kind, color in (("global", "#555555"), ("sliding", "#2ca02c")):
                sel = t[t.layers.str.startswith(kind)]
                if sel.empty:
                    continue
                vals = [float(sel[sel.requested == d]["KV MiB (runtime)"].sum()) for d in dts]
                bars = ax.bar(xs, vals, 0.5, bottom=bottom, color=color, label=sel.layers.iloc[0])
                if kind == "global":
                    ax.bar_label(bars, fmt="%.1f", label_type="center", fontsize=7, color="white")
                else:       # a thin segment on top: label above it
                    ax.bar_label(bars, labels=[f"+{v:.1f}" for v in vals], fontsize=7, padding=2)
                bottom = [b + v for b, v in zip(bottom, vals)]
            swa = t[t.layers.str.startswith("sliding")]
            if not swa.empty:
                glob = t[t.layers.str.startswith("global")]
                alt = [float(glob[glob.requested == d]["KV MiB (runtime)"].sum())
                       + float(swa[swa.requested == d][full_col].sum()) for d in dts]
                ax.scatter(xs, alt, marker="_", s=900, color="#d62728", zorder=3,
                           label="if SWA layers held ctx rows")
                for x, a in zip(xs, alt):
                    ax.annotate(f"{a:.0f}", (x, a), textcoords="offset points", xytext=(0, 4),
                                ha="center", fontsize=7, color="#d62728")
                ax.set_ylim(0, max(alt) * 1.25)
            ax.set_xticks(xs, dts)
            ax.set_ylabel("MiB (runtime)")
            ax.set_title(f"{m}: KV per layer kind")
            ax.legend(fontsize=7, loc="upper right")
            self.save(fig, f"kv_kinds_{_slug(m)}.png", f"KV per layer kind, {m}")

    def plan_bars(self, m: str, chk: str) -> None:
        per_dtype = {d: self.res.info(m, d, chk).get("plan_vs_runtime") for d in self.dtypes}
        per_dtype = {d: r for d, r in per_dtype.items() if r}
        if not per_dtype:
            self.md.append(f"Plan vs runtime for `{m}`: not available (the engine reports no plan/ledger "
                           "yet; see skipped metrics).\n")
            return
        fig, axes = plt.subplots(1, len(per_dtype), figsize=(4.2 * len(per_dtype), 3.4), squeeze=False)
        for ax, (d, rows) in zip(axes[0], per_dtype.items()):
            rows = [r for r in rows if r.get("planned") or r.get("runtime")]   # empty categories: no bar
            labels = [f"{r.get('category')}\n{r.get('tier')}" for r in rows]
            xs = list(range(len(rows)))
            ax.bar([x - 0.2 for x in xs], [float(r.get("planned") or 0) / 2**20 for r in rows], 0.4,
                   label="plan")
            ax.bar([x + 0.2 for x in xs], [float(r.get("runtime") or 0) / 2**20 for r in rows], 0.4,
                   label="runtime")
            ax.set_xticks(xs, labels, fontsize=7, rotation=30)
            ax.set_title(f"{d}")
            ax.set_ylabel("MiB")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{m}: plan vs runtime per category and tier")
        self.save(fig, f"plan_vs_runtime_{_slug(m)}.png", f"plan vs runtime, {m}")

    def accuracy(self) -> None:
        names = self.checks_of("argmax")
        if not names:
            return
        self.md.append("## Accuracy: teacher-forced logits against the baseline\n")
        self.md.append(f"The `{self.baseline}` row is the noise floor: {self.baseline} in one pass "
                       f"against {self.baseline} prefilled in chunks (same maths, different batching). "
                       "KLD is KL(baseline ‖ dtype) in nats, as llama.cpp's perplexity tool reports it.\n")
        metrics = None
        for chk in names:
            rows = []
            for m in self.models:
                for d in self.dtypes:
                    if (m, d, chk) not in self.case:
                        continue
                    df = self.df[(self.df.model == m) & (self.df.kv_dtype == d) & (self.df.check == chk)]
                    metrics = metric_registry.shown("argmax", "table", df.metric, self.declared)
                    row = {"model": m, "dtype": self.label(d, "noise floor")}
                    for x in metrics:
                        row[x] = self.value(m, d, chk, x)
                    _with_uncertainty(self, row, m, d, chk)
                    rows.append(row)
            if rows:
                self.md.append(f"### `{chk}`\n")
                self.md.append(md_table(pd.DataFrame(rows)) + "\n")
                if any(r.get("significant") for r in rows) or any("±" in str(v) for r in rows for v in r.values()):
                    self.md.append("Values are mean ± standard error over positions (binomial for Same top p). "
                                   "**significant**: the dtype's delta exceeds the noise floor row by more than "
                                   f"{_stats.Z_SIGNIFICANT:g} combined standard errors (`harness.stats.significant`); "
                                   "other deltas are within noise.\n")
            for m in self.models:
                self.curves(m, chk, "max_abs", "max |logit diff|", log=False)
                self.curves(m, chk, "kld", "KLD (nats)", log=True)
                self.containment(m, chk)

    def curves(self, m: str, chk: str, series: str, ylabel: str, log: bool, title: str = "") -> None:
        data = {d: self.res.series(m, d, chk).get(series) for d in self.dtypes}
        data = {d: v for d, v in data.items() if v}
        if not data:
            return
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for d, vals in data.items():
            start = self.res.info(m, d, chk).get("compare_from", 0)
            ys = [max(float(v), 1e-12) if log else float(v) for v in vals]
            label = self.label(d, "noise floor" if self.kinds.get(chk) == "argmax" else "reference")
            if not any(float(v) for v in vals):
                label += ": exactly 0" + (" (drawn at 1e-12)" if log else "")
            ax.plot(range(start, start + len(ys)), ys, lw=0.9, color=COLORS.get(d), label=label)
            forced = self.res.series(m, d, chk).get("max_abs_routes_forced") if series == "max_abs" else None
            if forced and any(float(v) != float(w) for v, w in zip(forced, vals)):
                ax.plot(range(start, start + len(forced)), [float(v) for v in forced], lw=0.8, ls="--",
                        color=COLORS.get(d), label=f"{d}: baseline's experts forced (gated)")
            flips = self.res.series(m, d, chk).get("route_flip") if series == "max_abs" else None
            if flips and any(flips):        # argmax on a MoE: positions whose expert routing flipped
                xs = [i for i, f in enumerate(flips) if f and i < len(ys)]
                ax.scatter([start + i for i in xs], [ys[i] for i in xs], marker="x", s=14, lw=0.8,
                           color=COLORS.get(d), label=f"{d}: routing flip ({len(xs)})")
        if log:
            ax.set_yscale("log")
        segs = self.res.info(m, next(iter(data)), chk).get("segments") or []
        pos = 0
        for s in segs[:-1]:
            pos += s["tokens"]
            ax.axvline(pos, color="#bbbbbb", lw=0.6, ls="--")
        ax.set_xlabel("position")
        ax.set_ylabel(ylabel)
        ax.set_title(title or f"{m}, {chk}: {ylabel} per position")
        ax.legend(fontsize=8)
        self.save(fig, f"{_slug(chk)}_{series}_{_slug(m)}.png", f"{ylabel} per position, {m}")

    def containment(self, m: str, chk: str) -> None:
        rows = []
        for d in self.dtypes:
            k = [x for x in self.df[(self.df.model == m) & (self.df.kv_dtype == d) & (self.df.check == chk)].metric
                 if str(x).startswith("Top-1 in")] if not self.df.empty else []
            if k:
                rows.append((d, k[0], self.value(m, d, chk, k[0]), self.value(m, d, chk, "Same top p")))
        rows = [r for r in rows if r[2] is not None]
        if not rows:
            return
        fig, ax = plt.subplots(figsize=(6, 3))
        xs = list(range(len(rows)))
        ax.bar([x - 0.2 for x in xs], [r[2] for r in rows], 0.4, label=rows[0][1])
        ax.bar([x + 0.2 for x in xs], [r[3] or 0 for r in rows], 0.4, label="Same top p")
        ax.set_xticks(xs, [self.label(r[0], "noise floor") for r in rows])
        lo = min(min(r[2] for r in rows), min(r[3] or 0 for r in rows))
        ax.set_ylim(max(0, lo - 5), 100.5)
        ax.set_ylabel("% of positions")
        ax.set_title(f"{m}: baseline top-1 containment")
        ax.legend(fontsize=8, loc="lower left")
        self.save(fig, f"{_slug(chk)}_containment_{_slug(m)}.png", f"top-k containment, {m}")

    def waves(self) -> None:
        names = self.checks_of("wave_prefill")
        if not names:
            return
        self.md.append("## Wave prefill: one long prefill through the multi-wave attention path\n")
        for chk in names:
            refs = {self.res.info(m, self.baseline, chk).get("reference") for m in self.models} - {None}
            for ref in sorted(refs):
                self.md.append(f"`{self.baseline}` row: {ref}.\n")
            rows = []
            for m in self.models:
                for d in self.dtypes:
                    if (m, d, chk) not in self.case:
                        continue
                    info = self.res.info(m, d, chk)
                    row = {"model": m, "dtype": self.label(d, "reference"),
                           "tokens": self.value(m, d, chk, "Tokens"),
                           "compared from": info.get("compare_from"),
                           "wave budget MiB": info.get("wave_budget_mib"),
                           "waves": self.value(m, d, chk, "Waves"),
                           "peak scratch MiB": self.value(m, d, chk, "Peak scratch")}
                    df = self.df[(self.df.model == m) & (self.df.kv_dtype == d) & (self.df.check == chk)]
                    for x in metric_registry.shown("wave_prefill", "table", df.metric, self.declared):
                        row[x] = self.value(m, d, chk, x)
                    rows.append(row)
            self.md.append(md_table(pd.DataFrame(rows)) + "\n")
            for m in self.models:
                self.curves(m, chk, "max_abs", "max |logit diff|", log=False,
                            title=f"{m}, {chk}: max |logit diff| past the compare point")

    def throughput(self) -> None:
        names = self.checks_of("throughput")
        if not names:
            return
        self.md.append("## Throughput (llama-bench style: pp = prefill, tg = decode)\n")
        for chk in names:
            rows = []
            for m in self.models:
                for d in self.dtypes:
                    df = self.df[(self.df.model == m) & (self.df.kv_dtype == d) & (self.df.check == chk)]
                    if df.empty:
                        continue
                    row = {"model": m, "dtype": d}
                    for x in df.metric:
                        if SPEED_RE.fullmatch(str(x)):
                            row[f"{x} tok/s"] = self.value(m, d, chk, x)
                    rows.append(row)
            if not rows:
                continue
            table = pd.DataFrame(rows)
            self.md.append(f"`{chk}`" + self._applied_line(chk) + "\n")   # two throughput checks: which is which
            self.md.append(md_table(table) + "\n")
            note = self.origins_note([(m, d, chk) for m in self.models for d in self.dtypes])
            if note:
                self.md.append(note + "\n")
            cols = [c for c in table.columns if c.endswith("tok/s")]
            for m in self.models:
                t = table[table.model == m]
                if t.empty:
                    continue
                fig, axes = plt.subplots(1, len(cols), figsize=(3.4 * len(cols), 3), squeeze=False)
                for ax, c in zip(axes[0], cols):
                    ax.bar(list(t.dtype), [float(v) if not pd.isna(v) else 0 for v in t[c]],
                           color=[COLORS.get(d, "#888888") for d in t.dtype])
                    ax.set_title(c)
                    ax.set_ylabel("tok/s")
                fig.suptitle(f"{m}: {chk} per KV dtype")
                self.save(fig, f"{_slug(chk)}_{_slug(m)}.png", f"{chk}, {m}")

    def origins_note(self, cells: list) -> str | None:
        """``results.origins_note`` over the cases of ``cells`` ((model, dtype, check) triples), each
        row named by its dtype (and model, where the report has several)."""
        cases = {(f"{m} {d}" if len(self.models) > 1 else d): self.case.get((m, d, chk)) for m, d, chk in cells}
        return origins_note(self.res.manifest, {k: c for k, c in cases.items() if c is not None})

    def _applied_line(self, chk: str) -> str:
        """What the check's engines applied (weights, experts, decode path), per model, from the
        case records: ": coder30b-synth: weights q8_0, experts q4_0 (cpu_moe 0), decode cuda_graph"."""
        parts = []
        for m in self.models:
            eng = next((self.case[(m, d, chk)].get("engine") or {} for d in self.dtypes
                        if (m, d, chk) in self.case), {})
            bits = [f"weights {eng['weight_format']}"] if eng.get("weight_format") else []
            if eng.get("expert_format"):
                ef = eng["expert_format"]
                bits.append(("experts at the weights' format" if ef == "weights" else f"experts {ef}")
                            + (f" (cpu_moe {eng['cpu_moe']})" if eng.get("cpu_moe") is not None else ""))
            if eng.get("decode_path"):
                bits.append(f"decode {eng['decode_path']}")
            if bits:
                parts.append(f"{m}: {', '.join(bits)}")
        return (": " + "; ".join(parts)) if parts else ""

    def coherence(self) -> None:
        names = self.checks_of("coherence")
        if not names:
            return
        self.md.append("## Coherence: greedy answers through the chat template\n")
        for chk in names:
            rows = []
            for m in self.models:
                na = {self.case[(m, d, chk)].get("reason") for d in self.dtypes
                      if self.case.get((m, d, chk), {}).get("status") == "n/a"}
                for why in na:
                    self.md.append(f"`{m}`: not applicable: {why}\n")
                for d in self.dtypes:
                    if (m, d, chk) not in self.case or self.case[(m, d, chk)]["status"] == "n/a":
                        continue
                    rows.append({"model": m, "dtype": d,
                                 **{x: self.value(m, d, chk, x) for x in
                                    metric_registry.shown("coherence", "table", table=self.declared)}})
            if rows:
                self.md.append(md_table(pd.DataFrame(rows).dropna(axis=1, how="all")) + "\n")
                if any(r.get("Collapse excess") is not None for r in rows):
                    self.md.append("Rates are gated, not single answers: an *excess* (percentage points) is the "
                                   "dtype's rate minus the one-sided 95% Clopper-Pearson upper bound of the "
                                   f"reference's ({self.baseline}'s collapses; zero divergences for "
                                   "divergences), so it fails only when > 0. A divergence is a *near-tie flip* "
                                   f"when {self.baseline}'s top-1/top-2 logit margin at that step is within the "
                                   "suite's `tie_margin`: reported, not a failure.\n")
                how = []
                for m in self.models:
                    for d in self.dtypes:
                        g = self.res.info(m, d, chk).get("generation") if (m, d, chk) in self.case else None
                        if g:
                            how.append(f"`{m}` {d}: " + (
                                f"decoded together, {'+'.join(map(str, g.get('batches') or []))} prompts per "
                                f"step, {g.get('decode_steps', '?')} steps" if g.get("path") == "batched"
                                else f"one prompt at a time ({g.get('decode_path', 'the engine')} path)"))
                if how:
                    self.md.append("Answers: " + "; ".join(how) + ".\n")
            for m in self.models:
                samples = {d: self.res.info(m, d, chk).get("samples") or [] for d in self.dtypes}
                n = max((len(s) for s in samples.values()), default=0)
                for i in range(n):
                    prompt = next((s[i]["prompt"] for s in samples.values() if len(s) > i), "")
                    self.md.append(f"**{m}**, prompt {i + 1}: _{_clip(prompt, 160)}_\n")
                    for d, s in samples.items():
                        if len(s) <= i:
                            continue
                        x = s[i]
                        same = ("" if d == self.baseline else
                                f", identical to {self.baseline} for {x['identical_prefix']} tokens")
                        if x.get("flip"):
                            same += (f", **{x['flip']}** flip at step {x['diverged_at']} ({self.baseline} "
                                     f"margin {x['fp32_margin']:.3g})")
                        if x.get("collapsed"):
                            same += f", **collapsed** (repeat run {x.get('repeat_run')})"
                        self.md.append(f"- `{d}` ({x['tokens']} tokens, stop: {x['stop']}{same}):\n")
                        self.md.append("  ```text\n  " + _clip(x["text"], TEXT_CHARS).replace("`", "'")
                                       .replace("\n", "\n  ") + "\n  ```")
                    self.md.append("")

    def skipped(self) -> None:
        df = self.df
        if df.empty or "skipped" not in df:
            return
        sk = df[df.skipped.notna()]
        if sk.empty:
            return
        self.md.append("## Not measured (skipped metrics)\n")
        g = (sk.groupby(["check", "metric", "skipped"])
               .apply(lambda x: ", ".join(sorted(set(x.kv_dtype))), include_groups=False)
               .reset_index(name="dtypes"))
        g = g.rename(columns={"skipped": "reason"})
        self.md.append(md_table(g) + "\n")

    def build(self) -> Path:
        self.header()
        engines_side_by_side(self)          # only when another engine ran the narrowed rows
        self.verdict()
        for section in TOP_SECTIONS.values():      # run-wide sections defined elsewhere (summary)
            section(self, list(self.checks))
        self.memory()
        self.accuracy()
        self.waves()
        self.throughput()
        self.coherence()
        for kind, section in SECTIONS.items():     # sections of check kinds defined elsewhere
            names = self.checks_of(kind)
            if names:
                section(self, names)
        self.skipped()
        path = self.out / "report.md"
        atomic_write(path, "\n".join(self.md).rstrip() + "\n")
        return path


def _with_uncertainty(r: "_Report", row: dict, m: str, d: str, chk: str) -> None:
    """Accuracy row in place: ``value ± SE`` where the check recorded ``"<metric> SE"``, and a
    ``significant`` column naming the metrics whose delta beats the noise floor (the baseline
    row) by the rule of ``harness.stats.significant``. Runs without SE metrics are untouched."""
    names = [x for x in _stats.DELTAS if x in row]
    vals = {x: r.value(m, d, chk, x) for n in names for x in (n, _stats.DELTAS[n][1])}
    vals["Mean ln(PPL(Q)/PPL(base))"] = r.value(m, d, chk, "Mean ln(PPL(Q)/PPL(base))")
    vals["Mean ln(PPL(Q)/PPL(base)) SE"] = r.value(m, d, chk, "Mean ln(PPL(Q)/PPL(base)) SE")
    for x in names:
        se = vals.get(_stats.DELTAS[x][1])
        if row[x] is not None and se is not None:
            row[x] = f"{_num(float(row[x]))} ± {_num(float(se))}"
    if d == r.baseline or not any(v is not None for k, v in vals.items() if k.endswith(" SE")):
        return
    floor = {k: r.value(m, r.baseline, chk, k) for k in vals}
    sig = _stats.significance(vals, floor)
    row["significant"] = ", ".join(x for x in names if sig.get(x)) or "none"


def _mib(n) -> float | None:
    return None if n is None else float(n) / 2**20


def _clip(text: str, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n].rstrip() + " …"


# metrics set side by side per row when another engine ran it: (check kind, metric, column)
SIDE_BY_SIDE = (("argmax", "Mean KLD", "Mean KLD vs baseline"),
                ("argmax", "Max abs logit diff", "Max abs vs baseline"),
                ("argmax", "Same top p", "Same top p"),
                ("argmax", "KV-only Mean KLD", "KV-only Mean KLD (same engine)"),
                ("argmax", "KV-only Max abs logit diff", "KV-only max abs (same engine)"),
                ("topk_argmax", "Mean KLD (top-{k}+tail)", "Mean KLD top-{k}+tail vs baseline (lower bound)"),
                ("vram", "KV bytes (runtime)", "KV MiB (runtime)"))


def engines_side_by_side(r: "_Report") -> None:
    """Which engine ran each row (the manifest's ``engine``: the baseline on kvbench's engine,
    the narrowed rows on the chosen one) and, per model and row, its cost against the baseline
    beside the KV-only cost on its own engine (narrowed vs that engine's widest KV, same
    tokens), the KV setting it was asked for and what it applied, and what the engine kept in
    full precision or did not use. Nothing when kvbench's engine ran every row."""
    eng = r.res.manifest.get("engine") or {}
    if (eng.get("name") or "kvbench") == "kvbench":
        return
    rows_cfg = eng.get("rows") or {}
    infos: dict = {}
    for rec in r.res.of_type("info"):
        if isinstance(rec.get("info"), dict) and isinstance(rec["info"].get("engine"), dict):
            infos.setdefault((rec.get("model"), rec.get("kv_dtype")), rec["info"]["engine"])
    df = r.df
    ks = {}
    for chk in r.checks_of("topk_argmax"):
        sel = df[(df.check == chk) & df.metric.astype(str).str.startswith("Mean KLD (top-")] if not df.empty else df
        if not sel.empty:
            ks[chk] = str(sel.iloc[0]["metric"]).split("top-")[1].split("+")[0]
    table, notes = [], []
    for m in r.models:
        for d in r.dtypes:
            cfg = rows_cfg.get(d) or {}
            info = infos.get((m, d), {})
            row = {"model": m, "KV row": r.label(d, "baseline"), "engine": cfg.get("engine", "kvbench"),
                   "engine KV": cfg.get("kv", d), "applied": ", ".join(info.get("kv_applied") or []) or None}
            for kind, metric, col in SIDE_BY_SIDE:
                for chk in r.checks_of(kind):
                    k = ks.get(chk, "")
                    v = r.value(m, d, chk, metric.format(k=k))
                    if v is not None:
                        row[col.format(k=k)] = v
            flags = [f for c in r.res.cases() if (c["model"], c["kv_dtype"]) == (m, d)
                     for f in c.get("failures") or [] if f.startswith("not applied?")]
            row["not applied?"] = "⚠️ yes" if flags else ("no" if d != r.baseline else None)
            table.append(row)
            for n in [info.get("kv_note"), *(info.get("notes") or [])]:
                if n and f"{d}: {n}" not in notes:
                    notes.append(f"{d}: {n}")
    r.md += ["## Engines side by side\n",
             f"Baseline row `{r.baseline}` on kvbench's engine; narrowed rows on **{eng.get('spec')}**. "
             "'vs baseline' holds the engine's narrowed KV against kvbench fp32 (engine and KV together); "
             "'KV-only' holds it against the same engine's widest KV on the same tokens (what the format "
             "costs on that engine). A top-k+tail KLD keeps the engine's top-k tokens and one tail bucket: a "
             "lower bound of the full KLD.\n",
             md_table(pd.DataFrame(table)) + "\n"]
    if notes:
        r.md += ["Engine notes:\n", *[f"- {n}" for n in notes], ""]


def build_report(results_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write report.md + PNGs for ``results_dir``; returns the path of report.md."""
    res = load_results(results_dir)
    out = Path(out_dir) if out_dir else Path("reports") / res.name
    out.mkdir(parents=True, exist_ok=True)
    return _Report(res, out).build()


def add_cli_args(parser) -> None:
    parser.add_argument("dir", help="results directory written by `python -m harness run`")
    parser.add_argument("--out", help="report directory (default reports/<run>)")


def main(args) -> int:
    path = build_report(args.dir, args.out)
    print(f"report: {path}")
    return 0
