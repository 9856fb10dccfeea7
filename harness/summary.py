"""Report sections of issue 15 items 4 and 7, registered with ``harness.report.register_section``:
the run summary (speed and quality in one table) and the multiturn check's section.

Contract: built from the results directory alone (as every report section), never from the
suite file.

*Summary* (``top``: right after the verdict table), one row per model x KV dtype:

- ``KV MiB`` and ``at ctx``: the vram check's ``KV bytes (runtime)`` at that check's context
  (the suite's memory context, e.g. 32768); without a vram row, computed from the case's
  recorded spec and applied per-layer dtypes at ``[suite].ctx`` (``engine.formats`` bytes per
  value; models with sliding-window layers are left blank rather than guessed);
- ``pp<N>`` / ``tg<N>`` tok/s of each throughput check: ``median ± stddev`` over the
  repetitions (from the ``<name> stddev`` metric, or the ``<name>_samples`` series of older
  results), followed by ``unstable (CV x%)`` when the CV is above the check's ``max_cv_pct``
  (10% by default, or the record's own ``<name> unstable`` flag);
- ``Mean KLD``: of the first argmax-kind check, ``± <Mean KLD SE>`` when the check recorded it;
  in a suite with no argmax check (``long.toml``), the first corpus_kld check's whole-text
  Mean KLD, marked ``(corpus)``;
- ``coherent %``: 100 - the coherence check's ``Collapse rate`` (± its SE), blank when the
  check did not run, was n/a, or recorded no rate;
- ``needle score``: a needle-kind check's score metric (``Needle score`` or the first metric
  whose name holds "score"), blank when none ran.

*Multiturn*: per model x dtype the divergence and collapse metrics, then per turn the first
divergence step and repeat run of every dtype (fp32's own for reference).

    from harness import summary   # importing registers the sections (harness.checks does)
"""
from __future__ import annotations

import math

import pandas as pd

from engine import formats
from engine.errors import EngineError
from engine.kv_spec import cell_formats

from .report import SPEED_RE, _num, md_table, register_section
from .speedstats import DEFAULT_MAX_CV, spread



def _f(v) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _pm(v, se) -> str | float | None:
    v, se = _f(v), _f(se)
    if v is None:
        return None
    return f"{_num(v)} ± {_num(se)}" if se is not None else v


def _ran(r, m: str, d: str, chk: str) -> bool:
    c = r.case.get((m, d, chk))
    return c is not None and c.get("status") not in ("n/a", "error")


def kv_cell(r, m: str, d: str) -> tuple[float | None, int | None, str]:
    """(MiB, ctx, source) of the KV cache of model ``m`` at ``d``."""
    for chk in r.checks_of("vram"):
        v = _f(r.value(m, d, chk, "KV bytes (runtime)"))
        if v is not None:
            ctx = ((r.case.get((m, d, chk)) or {}).get("engine") or {}).get("load_options", {}).get("ctx")
            return v, ctx, "vram runtime"
    ctx = ((r.res.manifest.get("suite") or {}).get("suite") or {}).get("ctx")
    for chk in r.checks:
        eng = (r.case.get((m, d, chk)) or {}).get("engine") or {}
        spec, applied = eng.get("spec") or {}, eng.get("kv_dtypes") or []
        if not (spec and applied and ctx):
            continue
        if spec.get("sliding_window") or spec.get("swa_layers"):
            return None, None, ""
        try:
            row = spec["n_kv_heads"] * spec["head_dim"]
            total = sum(row * ctx * sum(formats.kv_format(f).bytes_per_value for f in cell_formats(a))
                        for a in applied)     # a cell: q8_0, or k-q8_0.v-bf16 (engine.kv_spec)
        except (KeyError, TypeError, ValueError, EngineError):
            return None, None, ""
        return total / 2**20, ctx, "computed"
    return None, None, ""


def speed_cells(r, m: str, d: str, chk: str) -> dict:
    out = {}
    if not _ran(r, m, d, chk):
        return out
    sel = r.df[(r.df.model == m) & (r.df.kv_dtype == d) & (r.df.check == chk)]
    series = r.res.series(m, d, chk)
    max_cv = _f(r.res.info(m, d, chk).get("max_cv_pct"))
    max_cv = max_cv / 100.0 if max_cv else DEFAULT_MAX_CV
    for name in (x for x in sel.metric if SPEED_RE.fullmatch(str(x))):
        med = _f(r.value(m, d, chk, name))
        s = spread(series.get(f"{name}_samples") or [])
        sd = _f(r.value(m, d, chk, f"{name} stddev"))
        sd = sd if sd is not None else s.stdev
        cv = _f(r.value(m, d, chk, f"{name} CV"))
        cv = cv / 100.0 if cv is not None else s.cv
        flag = r.value(m, d, chk, f"{name} unstable")
        unstable = bool(flag) if flag is not None else (cv is not None and cv > max_cv)
        if med is None:
            continue
        cell = f"{_num(med)} ± {_num(sd)}" if sd is not None else _num(med)
        if unstable:
            cell += f" **unstable** (CV {100 * cv:.0f}%)" if cv is not None else " **unstable**"
        out[f"{name} tok/s"] = cell
    return out


def needle_score(r, m: str, d: str):
    for chk in r.checks_of("needle"):
        if not _ran(r, m, d, chk):
            continue
        names = list(r.df[(r.df.model == m) & (r.df.kv_dtype == d) & (r.df.check == chk)].metric)
        pick = next((x for x in names if x == "Needle score"), None) or next(
            (x for x in names if "score" in str(x).lower() and not str(x).endswith(" SE")), None)
        if pick is not None:
            return _pm(r.value(m, d, chk, pick), r.value(m, d, chk, f"{pick} SE"))
    return None


@register_section("summary", top=True)
def summary(r, names) -> None:
    rows, speed_rows = [], {}
    argmax = r.checks_of("argmax")
    coherence = r.checks_of("coherence")
    for m in r.models:
        for d in r.dtypes:
            if not any((m, d, c) in r.case for c in r.checks):
                continue
            mib, ctx, src = kv_cell(r, m, d)
            row = {"model": m, "dtype": d, "KV MiB": mib,
                   "at ctx": f"{ctx} ({src})" if ctx and src == "computed" else ctx}
            # One throughput check per row: several (a suite's eager, CPU-expert and PCIe rows) measure
            # different engines, and their cells under one heading would mix them. The first that
            # measured the row speaks; where the suite has several, the row names it.
            speed_checks = r.checks_of("throughput")
            for chk in speed_checks:
                cells = speed_cells(r, m, d, chk)
                if cells:
                    if len(speed_checks) > 1:
                        row["speed from"] = f"`{chk}`"
                    row.update(cells)
                    speed_rows.setdefault(chk, []).append((m, d))
                    break
            kld = None
            for chk in argmax + r.checks_of("corpus_kld"):     # a suite without argmax: the corpus text's
                if _ran(r, m, d, chk) and _f(r.value(m, d, chk, "Mean KLD")) is not None:
                    kld = _pm(r.value(m, d, chk, "Mean KLD"), r.value(m, d, chk, "Mean KLD SE"))
                    if chk not in argmax:
                        kld = f"{kld} (corpus)"
                    break
            row["Mean KLD"] = kld
            coh = None
            for chk in coherence:
                rate = _f(r.value(m, d, chk, "Collapse rate")) if _ran(r, m, d, chk) else None
                if rate is not None:
                    coh = _pm(100.0 - rate, r.value(m, d, chk, "Collapse rate SE"))
                    break
            row["coherent %"] = coh
            row["needle score"] = needle_score(r, m, d)
            rows.append(row)
    if not rows:
        return
    r.md.append("## Summary: speed and quality per model x KV dtype\n")
    r.md.append(md_table(pd.DataFrame(rows)) + "\n")
    notes = ["KV MiB: runtime KV cache at the vram check's context (or computed from the applied dtypes "
             "at the suite's context)."]
    if any(k.endswith("tok/s") for row in rows for k in row):
        if any("speed from" in row for row in rows):
            notes.append("speed from: the throughput check whose numbers the row shows (the first that measured "
                         "it); the suite's other throughput checks are in their own tables below.")
        notes.append("tok/s: median ± standard deviation over the repetitions; a row whose coefficient of "
                     "variation exceeds the check's limit (10% by default) is **unstable**: the machine was "
                     "too busy to compare it, and `harness compare` does not.")
    notes.append("Mean KLD ± its standard error over positions. coherent %: 100 - the coherence check's "
                 "collapse rate. Blank: that check did not run (or is not applicable) for the row.")
    r.md.append(" ".join(notes) + "\n")
    # the speed columns side by side are only a comparison where one process measured them
    note = r.origins_note([(m, d, chk) for chk in speed_rows for m, d in speed_rows[chk]])
    if note:
        r.md.append("Speed columns: " + note + "\n")


@register_section("multiturn")
def multiturn(r, names) -> None:
    r.md.append("## Multi-turn chat and long generation\n")
    for chk in names:
        rows, turn_rows = [], []
        for m in r.models:
            na = {(r.case.get((m, d, chk)) or {}).get("reason") for d in r.dtypes
                  if (r.case.get((m, d, chk)) or {}).get("status") == "n/a"}
            for why in na:
                r.md.append(f"`{m}`: not applicable: {why}\n")
            for d in r.dtypes:
                if not _ran(r, m, d, chk):
                    continue
                rows.append({"model": m, "dtype": r.label(d, "reference"), **{x: r.value(m, d, chk, x) for x in (
                    "Turns before divergence", "Identical tokens before divergence", "Long first divergence",
                    "Collapsed turns", "Long repeat run", "Collapse beyond fp32")}})
                info = r.res.info(m, d, chk)
                for t in info.get("turns") or []:
                    turn_rows.append({"model": m, "turn": t.get("turn"), "dtype": d,
                                      "tokens": t.get("tokens"), "first divergence": t.get("first_divergence"),
                                      "repeat run": t.get("repeat_run"), "collapsed": t.get("collapsed"),
                                      "history identical": t.get("history_identical")})
                long = info.get("long")
                if long:
                    turn_rows.append({"model": m, "turn": "long", "dtype": d, "tokens": long.get("tokens"),
                                      "first divergence": long.get("first_divergence"),
                                      "repeat run": long.get("repeat_run"), "collapsed": long.get("collapsed")})
        if rows:
            r.md.append(f"### `{chk}`\n")
            r.md.append(md_table(pd.DataFrame(rows).dropna(axis=1, how="all")) + "\n")
            r.md.append("Each dtype holds its own conversation (its answers fed back through the chat template). "
                        "First divergence: answer tokens equal to the reference's in that turn (blank: identical). "
                        "*Collapse beyond fp32* counts turns (and the long generation) that fell into a repeat "
                        "loop where the reference did not: the gate.\n")
        if turn_rows:
            r.md.append("<details><summary>Per turn</summary>\n")
            r.md.append(md_table(pd.DataFrame(turn_rows)) + "\n\n</details>\n")
