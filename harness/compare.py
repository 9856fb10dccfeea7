"""Compare two results directories: a markdown diff with regressions flagged (PR comments).

Contract: ``compare(base, head) -> Comparison`` matches metric records on (model, kv dtype,
check, metric). A *regression* is a case that passed in base and fails, errors or is missing
in head; a threshold that held and no longer does; or a metric with a direction
(``better``: lower/higher) that got worse by more than the tolerance (relative ``tol``,
``speed_tol`` for tok/s, plus ``abs_tol`` so exact zeros do not flag float dust).
``Comparison.markdown()`` is the PR-comment body; the CLI exits 1 when there is any regression.

    cmp = compare("results/base", "results/head")
    print(cmp.markdown()); sys.exit(1 if cmp.regressions else 0)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .report import md_table
from .results import atomic_write, case_key, load_results


@dataclass
class Comparison:
    base: str
    head: str
    regressions: list[dict] = field(default_factory=list)
    improvements: list[dict] = field(default_factory=list)
    unchanged: int = 0
    new_cases: list[tuple] = field(default_factory=list)

    def markdown(self) -> str:
        n_r, n_i = len(self.regressions), len(self.improvements)
        head = "❌" if n_r else "✅"
        md = [f"## kvbench compare {head}\n",
              f"base `{self.base}` → head `{self.head}`: **{n_r} regression{'s' * (n_r != 1)}**, "
              f"{n_i} improvement{'s' * (n_i != 1)}, {self.unchanged} metrics within tolerance.\n"]
        if self.regressions:
            md += ["### Regressions\n", md_table(pd.DataFrame(self.regressions)), ""]
        if self.improvements:
            md += ["<details><summary>Improvements</summary>\n", md_table(pd.DataFrame(self.improvements)),
                   "\n</details>\n"]
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


def compare(base_dir: str | Path, head_dir: str | Path, tol: float = 0.10, speed_tol: float = 0.10,
            abs_tol: float = 1e-6) -> Comparison:
    base, head = load_results(base_dir), load_results(head_dir)
    out = Comparison(str(base_dir), str(head_dir))
    bcases = {case_key(c): c for c in base.cases()}
    hcases = {case_key(c): c for c in head.cases()}
    for key, bc in bcases.items():
        hc = hcases.get(key)
        row = {"model": key[0], "dtype": key[1], "check": key[2]}
        if hc is None:
            out.regressions.append({**row, "metric": "(case)", "base": bc["status"], "head": "missing",
                                    "change": "", "why": "case not run in head"})
        elif bc["status"] == "pass" and hc["status"] != "pass":
            why = hc.get("error") or "; ".join(hc.get("failures") or [])
            out.regressions.append({**row, "metric": "(verdict)", "base": "pass", "head": hc["status"],
                                    "change": "", "why": why})
        elif bc["status"] != "pass" and hc["status"] == "pass":
            out.improvements.append({**row, "metric": "(verdict)", "base": bc["status"], "head": "pass",
                                     "change": "", "why": "now passes"})
    out.new_cases = [k for k in hcases if k not in bcases]

    hm = {(*case_key(r), r["metric"]): r for r in head.of_type("metric")}
    for r in base.of_type("metric"):
        key = (*case_key(r), r["metric"])
        h = hm.get(key)
        if h is None or case_key(r) not in hcases:
            continue
        row = {"model": key[0], "dtype": key[1], "check": key[2], "metric": key[3]}
        bv, hv = _num(r.get("value")), _num(h.get("value"))
        if r.get("passed") is True and h.get("passed") is False:
            out.regressions.append({**row, "base": bv, "head": hv, "change": _change(bv, hv),
                                    "why": f"threshold {h.get('op')} {h.get('threshold')} no longer holds"})
            continue
        better = r.get("better") or h.get("better")
        if better not in ("lower", "higher") or bv is None or hv is None:
            continue
        t = speed_tol if (r.get("unit") == "tok/s") else tol
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


def _change(b, h) -> str:
    if b is None or h is None:
        return ""
    if b == 0:
        return "from 0" if h != 0 else "0%"
    return f"{100.0 * (h - b) / abs(b):+.1f}%"


def add_cli_args(parser) -> None:
    parser.add_argument("base", help="results directory of the base (e.g. main branch)")
    parser.add_argument("head", help="results directory of the head (e.g. the PR)")
    parser.add_argument("--out", help="write the markdown here (default: stdout only)")
    parser.add_argument("--tolerance", type=float, default=0.10,
                        help="relative worsening allowed for accuracy/memory metrics (default 0.10)")
    parser.add_argument("--speed-tolerance", type=float, default=0.10,
                        help="relative slowdown allowed for tok/s metrics (default 0.10)")
    parser.add_argument("--abs-tolerance", type=float, default=1e-6,
                        help="absolute slack added to every comparison (default 1e-6)")


def main(args) -> int:
    cmp = compare(args.base, args.head, args.tolerance, args.speed_tolerance, args.abs_tolerance)
    text = cmp.markdown()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, text)
    print(text)
    return 1 if cmp.regressions else 0
