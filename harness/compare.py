"""Compare two results directories: a markdown diff with regressions flagged (PR comments).

Contract: ``compare(base, head) -> Comparison`` matches cases on (model, kv dtype, check) and
metric records on (case, metric). A *regression* is:

- a case of base that is missing in head, or that passed (or was ``n/a``) in base and has
  any other status in head (``fail``, ``error``, ``incomplete``, ...);
- a gate (a metric with a threshold) that held in base and in head no longer holds, or is
  *not measured in head*: the metric is missing, skipped or not judged, or its case ran
  nothing (error, ``n/a``); a gate that head's suite dropped counts too, unless the suites
  differ and ``allow_suite_change`` is given (then it is listed as a note);
- a metric with a direction (lower/higher is better, as ``harness.metric_registry`` declares it;
  the record's ``better`` only for metrics nobody declares) that got worse by more than the
  tolerance (relative ``tol``, plus ``abs_tol`` so exact zeros do not flag float dust);
- a speed metric (unit tok/s) only when its repetitions say so (issue 15.7): the
  ``<metric>_samples`` series of both runs go through ``harness.speedstats.compare_speed``, a
  Mann-Whitney U rank test at ``speed_alpha`` plus a minimum change of the median of
  ``speed_tol``; a row whose samples spread more than ``max_cv`` (coefficient of variation) in
  either run is *unstable*: listed as such, never a regression or an improvement; too few
  repetitions (a record without samples counts as one) are *untested*. A prefill speed
  (``pp<N>``) timed on different prefill paths (the throughput check's ``info.prefill_path``:
  ``exact`` vs ``fast``) is *not comparable*, never a change. Every speed row and its verdict
  is in ``Comparison.speed``.

Statuses are strings, read generically: every case whose status is not ``pass`` in either
run, or differs between them, is listed per case with its reason. When the two runs' suites
differ (the manifests' suite sha256, or their check lists, suite settings or matrix), the
differences are stated at the top of the markdown and ``Comparison.exit_code`` is 1 unless
``allow_suite_change``; a different suite *path* with identical bytes is only noted.
Runs whose numerics-changing settings differ (the manifests' ``settings`` snapshots,
``engine.settings.numerics_changes``: attention backend, precision, a planted fault, ...) are
refused: ``SettingsChangeError``, one line naming each setting, exit 2, unless
``allow_settings_change`` (then listed at the top); a manifest without a snapshot is a note.
``Comparison.markdown()`` is the PR-comment body; the CLI exits with ``exit_code`` (0 or 1).

    cmp = compare("results/base", "results/head")
    print(cmp.markdown()); sys.exit(cmp.exit_code)
"""
from __future__ import annotations

import argparse
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from engine import settings as engine_settings

from . import checks as _checks  # noqa: F401  (importing the checks declares their metrics)
from . import metric_registry
from .errors import HarnessError
from .report import md_table
from .results import Results, atomic_write, case_key, load_results
from .speedstats import DEFAULT_ALPHA, DEFAULT_MAX_CV, DEFAULT_MIN_EFFECT, compare_speed

OK_STATUSES = ("pass", "n/a")     # a case in base with one of these must not get worse in head


@dataclass
class Comparison:
    base: str
    head: str
    regressions: list[dict] = field(default_factory=list)
    improvements: list[dict] = field(default_factory=list)
    unchanged: int = 0
    new_cases: list[tuple] = field(default_factory=list)
    statuses: list[dict] = field(default_factory=list)      # cases not passing in either run, or changed
    status_counts: dict = field(default_factory=dict)       # {"base": {"pass": 12, ...}, "head": {...}}
    suite_changes: list[str] = field(default_factory=list)  # non-empty: the suites differ
    suite_notes: list[str] = field(default_factory=list)    # informational (same bytes, other path; dropped gates)
    allow_suite_change: bool = False
    settings_changes: list[str] = field(default_factory=list)  # numerics-changing settings that differ
    engines: str = ""                                        # side-by-side markdown when the engines differ
    speed: list[dict] = field(default_factory=list)         # every tok/s row: rank-test verdict

    @property
    def exit_code(self) -> int:
        return 1 if self.regressions or (self.suite_changes and not self.allow_suite_change) else 0

    def markdown(self) -> str:
        n_r, n_i = len(self.regressions), len(self.improvements)
        md = [f"## kvbench compare {'❌' if self.exit_code else '✅'}\n"]
        if self.suite_changes:
            verdict = ("allowed by --allow-suite-change" if self.allow_suite_change
                       else "exit 1; pass --allow-suite-change if the change is intended")
            md += [f"**⚠️ The two runs used different suites** ({verdict}):\n",
                   *[f"- {c}" for c in self.suite_changes], ""]
        if self.settings_changes:
            md += ["**⚠️ The two runs used different numerics-changing settings** (allowed by "
                   "--allow-settings-change; their numbers need not agree):\n",
                   *[f"- {c}" for c in self.settings_changes], ""]
        if self.suite_notes:
            md += [*[f"- note: {c}" for c in self.suite_notes], ""]
        if self.engines:
            md.append(self.engines)
        md.append(f"base `{self.base}` → head `{self.head}`: **{n_r} regression{'s' * (n_r != 1)}**, "
                  f"{n_i} improvement{'s' * (n_i != 1)}, {self.unchanged} metrics within tolerance.\n")
        counts = {k: ", ".join(f"{n} {s}" for s, n in v.items()) or "no cases"
                  for k, v in self.status_counts.items()}
        if counts:
            md.append(f"Cases: base {counts.get('base')}; head {counts.get('head')}.\n")
        if self.regressions:
            md += ["### Regressions\n", md_table(pd.DataFrame(self.regressions)), ""]
        if self.statuses:
            md += ["### Cases not passing\n", md_table(pd.DataFrame(self.statuses)), ""]
        if self.improvements:
            md += ["<details><summary>Improvements</summary>\n", md_table(pd.DataFrame(self.improvements)),
                   "\n</details>\n"]
        if self.speed:
            n_u = sum(r["verdict"] == "unstable" for r in self.speed)
            md += [f"<details><summary>Speed: rank test over the repetitions ({n_u} unstable, not compared)"
                   "</summary>\n", md_table(pd.DataFrame(self.speed)), "\n</details>\n"]
        if self.new_cases:
            md.append(f"New in head (not in base): {', '.join(' '.join(k) for k in self.new_cases)}\n")
        return "\n".join(md)


def _num(v):
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _why(case: dict) -> str:
    """Why a case is not ``pass``, from whatever its record says (any status)."""
    parts = [case.get("error"), case.get("reason"), *(case.get("failures") or []), *(case.get("unmeasured") or [])]
    return "; ".join(str(p) for p in parts if p)


def _short(v, n: int = 60) -> str:
    s = repr(v) if not isinstance(v, str) else v
    return s if len(s) <= n else s[:n - 1] + "…"


def suite_differences(base: dict, head: dict) -> tuple[list[str], list[str]]:
    """(differences, notes) between the suites recorded in two manifests: file sha256, suite
    settings, check lists and matrix are differences; the path alone (same sha256) is a note."""
    bs, hs = base.get("suite") or {}, head.get("suite") or {}
    diffs, notes = [], []
    if bs.get("sha256") != hs.get("sha256"):
        diffs.append(f"suite file sha256 `{str(bs.get('sha256'))[:12]}` ({bs.get('path')}) → "
                     f"`{str(hs.get('sha256'))[:12]}` ({hs.get('path')})")
    elif bs.get("path") != hs.get("path"):
        notes.append(f"suite path {bs.get('path')} → {hs.get('path')} (identical bytes)")
    bsec, hsec = bs.get("suite") or {}, hs.get("suite") or {}
    for k in dict.fromkeys([*bsec, *hsec]):
        if bsec.get(k) != hsec.get(k):
            diffs.append(f"suite.{k}: {_short(bsec.get(k))} → {_short(hsec.get(k))}")
    bchk = {c.get("name"): c for c in bs.get("checks") or [] if isinstance(c, dict)}
    hchk = {c.get("name"): c for c in hs.get("checks") or [] if isinstance(c, dict)}
    if only := [n for n in bchk if n not in hchk]:
        diffs.append(f"checks only in base: {', '.join(map(str, only))}")
    if only := [n for n in hchk if n not in bchk]:
        diffs.append(f"checks only in head: {', '.join(map(str, only))}")
    for n in (n for n in bchk if n in hchk and bchk[n] != hchk[n]):
        keys = [k for k in dict.fromkeys([*bchk[n], *hchk[n]]) if bchk[n].get(k) != hchk[n].get(k)]
        diffs.append(f"check {n}: " + "; ".join(f"{k} {_short(bchk[n].get(k), 40)} → {_short(hchk[n].get(k), 40)}"
                                               for k in keys))
    bm, hm = base.get("matrix") or {}, head.get("matrix") or {}
    for k in ("models", "dtypes", "checks"):
        if bm.get(k) != hm.get(k):
            diffs.append(f"matrix {k}: {_short(bm.get(k))} → {_short(hm.get(k))}")
    return diffs, notes


class SettingsChangeError(HarnessError):
    """Two runs whose numerics-changing settings differ (bad input: exit 2)."""


def settings_differences(base: dict, head: dict) -> tuple[list[str], list[str]]:
    """(differences, notes) between the ``settings`` snapshots of two manifests
    (``engine.settings.snapshot``): a difference is a setting that can change logits
    (``numerics``) with another value; a run whose manifest predates the snapshot is a note
    (nothing to hold it against)."""
    bs, hs = base.get("settings"), head.get("settings")
    missing = [w for w, snap in (("base", bs), ("head", hs)) if not isinstance(snap, dict)]
    if missing:
        return [], [f"settings not recorded in {' and '.join(missing)}'s manifest: numerics-changing "
                    "settings could not be compared"]
    return engine_settings.numerics_changes(bs, hs), []


def _counts(res: Results) -> dict:
    return dict(Counter(c["status"] for c in res.cases()).most_common())


def compare(base_dir: str | Path, head_dir: str | Path, tol: float = 0.10, speed_tol: float = DEFAULT_MIN_EFFECT,
            abs_tol: float = 1e-6, allow_suite_change: bool = False, speed_alpha: float = DEFAULT_ALPHA,
            max_cv: float = DEFAULT_MAX_CV, allow_settings_change: bool = False) -> Comparison:
    base, head = load_results(base_dir), load_results(head_dir)
    changed, notes = settings_differences(base.manifest, head.manifest)
    if changed and not allow_settings_change:
        raise SettingsChangeError(
            f"{base_dir} and {head_dir} ran with different numerics-changing settings ({'; '.join(changed)}), "
            "so their numbers are not comparable",
            "rerun one with the other's settings, or pass --allow-settings-change")
    out = Comparison(str(base_dir), str(head_dir), allow_suite_change=allow_suite_change, settings_changes=changed)
    out.suite_changes, out.suite_notes = suite_differences(base.manifest, head.manifest)
    out.suite_notes += notes
    out.status_counts = {"base": _counts(base), "head": _counts(head)}
    out.engines = engines_side_by_side(base, head)
    bcases = {case_key(c): c for c in base.cases()}
    hcases = {case_key(c): c for c in head.cases()}
    bm = {(*case_key(r), r["metric"]): r for r in base.of_type("metric")}
    hm = {(*case_key(r), r["metric"]): r for r in head.of_type("metric")}
    measured_in_head = {case_key(r) for r in head.of_type("metric")}
    tables = [metric_registry.from_json(res.manifest.get("metrics")) for res in (head, base)]
    bser = {(*case_key(r), r["name"]): r["values"] for r in base.of_type("series")}
    hser = {(*case_key(r), r["name"]): r["values"] for r in head.of_type("series")}

    for key, bc in bcases.items():
        hc = hcases.get(key)
        row = {"model": key[0], "dtype": key[1], "check": key[2]}
        held = [m for (*k, m), r in bm.items() if tuple(k) == key and r.get("passed") is True]
        gates = f"; gates that held in base, not measured in head: {', '.join(held)}" if held else ""
        bs, hs = bc["status"], (hc or {}).get("status", "missing")
        if bs != "pass" or hs != "pass":
            out.statuses.append({**row, "base": bs, "head": hs,
                                 "why (head)": _why(hc) if hc else "case not run in head"})
        if hc is None:
            out.regressions.append({**row, "metric": "(case)", "base": bs, "head": "missing",
                                    "change": "", "why": "case not run in head" + gates})
            continue
        ran = key in measured_in_head          # head measured something for this case
        if hs != bs and (bs == "pass" or (bs in OK_STATUSES and hs not in OK_STATUSES)):
            out.regressions.append({**row, "metric": "(verdict)", "base": bs, "head": hs, "change": "",
                                    "why": (_why(hc) or f"status {hs}") + ("" if ran else gates)})
        elif held and not ran:
            out.regressions.append({**row, "metric": "(case)", "base": bs, "head": hs, "change": "",
                                    "why": (_why(hc) or f"status {hs}") + gates})
        elif bs not in OK_STATUSES and hs == "pass":
            out.improvements.append({**row, "metric": "(verdict)", "base": bs, "head": "pass",
                                     "change": "", "why": "now passes"})
    out.new_cases = [k for k in hcases if k not in bcases]

    for key, r in bm.items():
        ck = key[:3]
        if ck not in hcases or ck not in measured_in_head:
            continue                           # reported per case above
        h = hm.get(key)
        row = {"model": key[0], "dtype": key[1], "check": key[2], "metric": key[3]}
        bv, hv = _num(r.get("value")), _num((h or {}).get("value"))
        gate = f"{r.get('op')} {r.get('threshold')}"
        if r.get("passed") is True and (h is None or h.get("passed") is None):
            if h is None:
                why = "not measured in head (metric missing)"
            elif h.get("threshold") is None:
                why = "not measured in head (head's suite has no threshold for it)"
                if out.suite_changes and allow_suite_change:
                    out.suite_notes.append(f"gate {gate} on {' '.join(key)} dropped by the suite change")
                    continue
            else:
                why = f"not measured in head ({h.get('skipped') or 'not judged'})"
            out.regressions.append({**row, "base": bv, "head": hv if hv is not None else "not measured",
                                    "change": "", "why": f"gate {gate} held in base; {why}"})
            continue
        if h is None:
            continue
        if r.get("passed") is True and h.get("passed") is False:
            out.regressions.append({**row, "base": bv, "head": hv, "change": _change(bv, hv),
                                    "why": f"threshold {h.get('op')} {h.get('threshold')} no longer holds"})
            continue
        decl = _declaration(r.get("kind") or key[2], key[3], tables)
        better = decl.better if decl else (r.get("better") or h.get("better"))
        if better not in ("lower", "higher") or bv is None or hv is None:
            continue
        if (decl.unit if decl else r.get("unit")) == "tok/s":
            paths = [res.info(*key[:3]).get("prefill_path", "exact") for res in (base, head)]
            if key[3].startswith("pp") and paths[0] != paths[1]:
                out.speed.append({**row, "base": bv, "head": hv, "change": _change(bv, hv),
                                  "verdict": "not comparable", "p": None, "CV base": "", "CV head": "",
                                  "why": f"prefill path {paths[0]} in base, {paths[1]} in head"})
                continue
            samples = [(ser.get((*key[:3], f"{key[3]}_samples")) or [v]) for ser, v in ((bser, bv), (hser, hv))]
            v = compare_speed(*samples, better, alpha=speed_alpha, min_effect=speed_tol, max_cv=max_cv)
            out.speed.append({**row, "base": bv, "head": hv, "change": _change(bv, hv), "verdict": v.verdict,
                              "p": v.p, "CV base": _pct(v.base.cv), "CV head": _pct(v.head.cv), "why": v.why})
            if v.verdict == "regression":
                out.regressions.append({**row, "base": bv, "head": hv, "change": _change(bv, hv), "why": v.why})
            elif v.verdict == "improvement":
                out.improvements.append({**row, "base": bv, "head": hv, "change": _change(bv, hv), "why": v.why})
            else:
                out.unchanged += 1
            continue
        t = tol
        margin = abs(bv) * t + abs_tol
        worse = hv > bv + margin if better == "lower" else hv < bv - margin
        better_ = hv < bv - margin if better == "lower" else hv > bv + margin
        if worse:
            out.regressions.append({**row, "base": bv, "head": hv, "change": _change(bv, hv),
                                    "why": f"{better} is better; tolerance {t:.0%}"})
        elif better_:
            out.improvements.append({**row, "base": bv, "head": hv, "change": _change(bv, hv), "why": ""})
        else:
            out.unchanged += 1
    return out


def _declaration(kind: str, metric: str, tables: list[dict]):
    """A metric's declaration (``harness.metric_registry``): the checks' live declarations,
    else the ones head's or base's manifest recorded (a check since removed), else None (the
    record's own ``better``/``unit`` are used: results written before the registry)."""
    decl = metric_registry.lookup(kind, metric)
    for table in tables:
        if decl is None and table.get(kind):
            decl = metric_registry.lookup(kind, metric, table)
    return decl


def _engine_of(res: Results) -> str:
    return str((res.manifest.get("engine") or {}).get("spec") or "kvbench")


def _side(rec: dict, tables: list[dict]) -> bool:
    """Whether a metric record goes in the engines side-by-side table: its declaration lists
    the ``"side"`` view or is in tok/s (``harness.metric_registry``), or it is one of the
    engine pool's KV-only records (``harness.engines``: narrowed vs the same engine's widest KV)."""
    if str(rec.get("metric", "")).startswith("KV-only "):
        return True
    decl = _declaration(rec.get("kind") or "", rec["metric"], tables)
    return decl is not None and ("side" in decl.show or decl.unit == "tok/s")


def engines_side_by_side(base: Results, head: Results) -> str:
    """When base and head ran their narrowed rows on different engines (``--engine``): a
    statement that the verdicts below compare engines, not versions, and a table of the
    accuracy, KV and speed metrics of every narrowed case in both runs, engine beside engine
    (e.g. llama.cpp q8_0 KV next to kvbench q8_0 KV on the same model and tokens). Top-k+tail
    KLDs (lower bounds) and tok/s come from the metric registry's ``"side"`` view. Empty when
    the engines are the same."""
    be, he = _engine_of(base), _engine_of(head)
    if be == he:
        return ""
    tables = [metric_registry.from_json(res.manifest.get("metrics")) for res in (head, base)]
    bm = {(*case_key(r), r["metric"]): r.get("value") for r in base.of_type("metric") if _side(r, tables)}
    hm = {(*case_key(r), r["metric"]): r.get("value") for r in head.of_type("metric") if _side(r, tables)}
    baseline = ((head.manifest.get("suite") or {}).get("suite") or {}).get("baseline", "fp32")
    rows = []
    for key in dict.fromkeys([*bm, *hm]):
        if key[1] == baseline:
            continue                     # the baseline row is kvbench's engine in both runs
        b, h = _num(bm.get(key)), _num(hm.get(key))
        if b is None and h is None:
            continue
        rows.append({"model": key[0], "KV": key[1], "check": key[2], "metric": key[3],
                     f"base: {be}": b, f"head: {he}": h})
    md = [f"### Engines side by side: base `{be}`, head `{he}`\n",
          f"The narrowed rows ran on different engines (baseline `{baseline}` on kvbench's engine in both), so "
          "the regressions below compare engines, not versions. 'KV-only' metrics hold an engine's narrowed "
          "KV against its own widest KV on the same tokens; '(top-k+tail)' KLDs are lower bounds.\n"]
    if rows:
        md.append(md_table(pd.DataFrame(rows).sort_values(["model", "KV", "check", "metric"], kind="stable")))
    return "\n".join(md) + "\n"


def _change(b, h) -> str:
    if b is None or h is None:
        return ""
    if b == 0:
        return "from 0" if h != 0 else "0%"
    return f"{100.0 * (h - b) / abs(b):+.1f}%"


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _tolerance(text: str) -> float:
    """argparse ``type=``: a finite number >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def add_cli_args(parser) -> None:
    parser.add_argument("base", help="results directory of the base (e.g. main branch)")
    parser.add_argument("head", help="results directory of the head (e.g. the PR)")
    parser.add_argument("--out", help="write the markdown here (default: stdout only)")
    parser.add_argument("--tolerance", type=_tolerance, default=0.10,
                        help="relative worsening allowed for accuracy/memory metrics (default 0.10)")
    parser.add_argument("--speed-tolerance", type=_tolerance, default=DEFAULT_MIN_EFFECT,
                        help="smallest relative change of a tok/s median that counts, when the rank test "
                        f"says the repetitions differ (default {DEFAULT_MIN_EFFECT:g})")
    parser.add_argument("--speed-alpha", type=_tolerance, default=DEFAULT_ALPHA,
                        help=f"significance level of the rank test over tok/s repetitions (default {DEFAULT_ALPHA:g})")
    parser.add_argument("--max-cv", type=_tolerance, default=DEFAULT_MAX_CV,
                        help="a tok/s row whose repetitions' coefficient of variation exceeds this in either "
                        f"run is unstable and not compared (default {DEFAULT_MAX_CV:g})")
    parser.add_argument("--abs-tolerance", type=_tolerance, default=1e-6,
                        help="absolute slack added to every comparison (default 1e-6)")
    parser.add_argument("--allow-suite-change", action="store_true",
                        help="compare runs of different suites without failing (the differences "
                        "are still listed)")
    parser.add_argument("--allow-settings-change", action="store_true",
                        help="compare runs whose numerics-changing KVBENCH_* settings differ (refused "
                        "otherwise, exit 2; the differences are listed at the top)")


def main(args) -> int:
    cmp = compare(args.base, args.head, args.tolerance, args.speed_tolerance, args.abs_tolerance,
                  allow_suite_change=args.allow_suite_change, speed_alpha=args.speed_alpha, max_cv=args.max_cv,
                  allow_settings_change=args.allow_settings_change)
    text = cmp.markdown()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, text)
    print(text)
    return cmp.exit_code
