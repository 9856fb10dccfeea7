"""Speed verdicts from repetitions (issue 15.7): the Mann-Whitney U test of
harness/speedstats.py against an independent computation (every split of the pooled samples
enumerated, U counted pair by pair; scipy.stats.mannwhitneyu too when installed), the spread
statistics against numpy, the throughput check's ``unstable`` marking on timings the test
controls, and ``harness compare`` on synthetic results directories: a noisy speed difference
is not a regression, a clear one is, an unstable row is reported as unstable.

    .venv/bin/python -m pytest -q tests/test_speedstats.py
"""
from __future__ import annotations

import itertools
import math
import random
import time

import numpy as np
import pytest
import torch

from harness import speedstats as ss


# -- independent reference: brute-force permutation distribution of U ----------------------

def _u_pairs(x, y) -> float:
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in x for b in y)


def _brute(x, y, alternative="two-sided") -> tuple[float, float]:
    """(U of x, p) over every split of the pooled values into len(x) and len(y)."""
    pooled = np.array(list(x) + list(y), dtype=float)
    m, N = len(x), len(pooled)
    g = (pooled[:, None] > pooled[None, :]) + 0.5 * (pooled[:, None] == pooled[None, :])
    combos = np.array(list(itertools.combinations(range(N), m)))
    mask = np.zeros((len(combos), N), dtype=bool)
    np.put_along_axis(mask, combos, True, axis=1)
    us = ((mask.astype(float) @ g) * ~mask).sum(axis=1)          # pairs (i in x-side, j in y-side)
    u = _u_pairs(x, y)
    ge, le = np.mean(us >= u - 1e-9), np.mean(us <= u + 1e-9)
    p = {"greater": ge, "less": le, "two-sided": min(1.0, 2 * min(ge, le))}[alternative]
    return u, float(p)


CASES = [  # (x, y): no ties / ties / one side all larger / equal samples
    ([20.1, 20.3, 19.8, 20.0, 20.2], [15.0, 15.2, 14.9, 15.1, 15.3]),
    ([5.1, 4.9, 5.3, 5.0, 4.8, 5.2], [5.05, 5.25, 4.7, 4.95, 5.15]),
    ([1.0, 2.0, 2.0, 3.0, 4.0], [2.0, 3.0, 3.0, 5.0, 1.0, 6.0]),
    ([7, 7, 8, 9, 9, 9, 10], [7, 8, 8, 8, 9, 10, 11, 11]),
    ([3.0, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0]),
]


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
@pytest.mark.parametrize("x,y", CASES)
def test_small_samples_match_the_brute_force_permutation_test(x, y, alternative):
    r = ss.mann_whitney_u(x, y, alternative)
    u, p = _brute(x, y, alternative)
    assert r.u == pytest.approx(u, abs=1e-9)
    assert r.method == ("exact" if len(set(x + y)) == len(x + y) else "permutation")
    assert r.p == pytest.approx(p, abs=1e-12)


def test_exact_distribution_without_ties_at_larger_sizes():
    rng = random.Random(1)
    for m, n in ((8, 9), (4, 12), (1, 7)):
        x = [rng.random() for _ in range(m)]
        y = [rng.random() + 0.2 for _ in range(n)]
        r = ss.mann_whitney_u(x, y)
        assert r.method == "exact"
        assert r.p == pytest.approx(_brute(x, y)[1], abs=1e-12)


def test_normal_approximation_is_close_to_the_permutation_distribution():
    rng = random.Random(7)
    # ties and 10 + 10 values (184,756 splits): past the enumeration limit, so asymptotic
    for shift in (0.0, 0.6, 1.2):
        x = [round(rng.gauss(0, 1), 1) for _ in range(10)]
        y = [round(rng.gauss(shift, 1), 1) for _ in range(10)]
        r = ss.mann_whitney_u(x, y)
        assert r.method == "asymptotic"
        assert r.p == pytest.approx(_brute(x, y)[1], abs=0.015)


def test_against_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(3)
    for m, n in ((5, 5), (7, 6), (30, 40)):
        x = [round(rng.gauss(0, 1), 2) for _ in range(m)]
        y = [round(rng.gauss(0.5, 1), 2) for _ in range(n)]
        mine = ss.mann_whitney_u(x, y)
        ref = stats.mannwhitneyu(x, y, alternative="two-sided",
                                 method="exact" if mine.method == "exact" else "asymptotic")
        assert mine.u == pytest.approx(ref.statistic)
        if mine.method != "permutation":
            assert mine.p == pytest.approx(ref.pvalue, rel=1e-6)


def test_min_p_and_bad_input():
    assert ss.min_p(5, 5) == pytest.approx(2 / math.comb(10, 5))
    assert ss.min_p(3, 3) == pytest.approx(0.1)
    # the extreme split of 5 vs 5 reaches exactly min_p
    assert ss.mann_whitney_u([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]).p == pytest.approx(ss.min_p(5, 5))
    for bad in (([], [1.0]), ([float("nan")], [1.0])):
        with pytest.raises(ValueError):
            ss.mann_whitney_u(*bad)
    with pytest.raises(ValueError):
        ss.mann_whitney_u([1], [2], "both")


def test_spread_matches_numpy():
    xs = [21.0, 19.5, 20.25, 23.0, 18.0, 20.0]
    s = ss.spread(xs)
    assert s.n == 6 and s.median == pytest.approx(float(np.median(xs)))
    assert s.stdev == pytest.approx(float(np.std(xs, ddof=1)))
    assert s.cv == pytest.approx(float(np.std(xs, ddof=1) / np.mean(xs)))
    assert ss.spread([5.0]).cv is None and ss.spread([]).n == 0


# -- verdicts --------------------------------------------------------------------------------

BASE = [20.1, 20.3, 19.8, 20.0, 20.2]


def test_clear_slowdown_is_a_regression_and_speedup_an_improvement():
    v = ss.compare_speed(BASE, [15.0, 15.2, 14.9, 15.1, 15.3])
    assert v.verdict == "regression" and v.p == pytest.approx(ss.min_p(5, 5)) and v.change < -0.2
    assert ss.compare_speed(BASE, [25.0, 25.2, 24.9, 25.1, 25.3]).verdict == "improvement"
    # for a time-like metric (lower is better) the same samples read the other way round
    assert ss.compare_speed(BASE, [25.0, 25.2, 24.9, 25.1, 25.3], better="lower").verdict == "regression"


def test_overlapping_samples_are_unchanged_and_a_tiny_shift_is_below_the_effect_size():
    v = ss.compare_speed(BASE, [20.0, 20.4, 19.7, 20.1, 19.9])
    assert v.verdict == "unchanged" and v.p >= 0.05
    v = ss.compare_speed(BASE, [x * 0.98 for x in BASE])             # significant but 2%
    assert v.verdict == "unchanged" and v.p < 0.05 and "less than 5%" in v.why


def test_wide_spread_is_unstable_never_a_verdict():
    noisy = [5.4, 21.0, 12.0, 20.5, 8.0]                             # the busy 2-core box
    v = ss.compare_speed(BASE, noisy)
    assert v.verdict == "unstable" and "head CV" in v.why and v.head.cv > 0.10
    assert ss.compare_speed(noisy, BASE).verdict == "unstable"


def test_too_few_repetitions_are_untested():
    assert ss.compare_speed([20.0], [10.0]).verdict == "untested"
    v = ss.compare_speed([20.0, 20.1, 20.2], [10.0, 10.1, 10.2])      # min p 0.1 >= 0.05
    assert v.verdict == "untested" and "cannot reach" in v.why


# -- the throughput check marks an unstable row ----------------------------------------------

class _Tok:
    def apply_chat_template(self, messages, add_generation_prompt=True):
        return list(range(len(messages[0]["content"].split())))

    def encode(self, text):
        return list(range(len(text.split())))


class _TimedEngine:
    """prefill/generate that take the wall time the test dictates, one call after another: asleep,
    or (``clock``) by advancing the clock the check reads, so the samples are exactly those times
    (a 0.06 s sleep overshot enough on a loaded 2-core box to read a CV above 10% once)."""

    def __init__(self, pp_s, tg_s, clock=None):
        self.pp_s, self.tg_s = list(pp_s), list(tg_s)
        self.tokenizer = _Tok()
        self.clock = clock

    def _take(self, dt: float) -> None:
        if self.clock is None:
            time.sleep(dt)
        else:
            self.clock.t += dt

    def prefill(self, tokens):
        self._take(self.pp_s.pop(0) if self.pp_s else 0.0)

    def generate(self, prompt, n, stop_at_eos=True):
        self._take(self.tg_s.pop(0) if self.tg_s else 0.0)
        return [0] * n


class _Clock:
    """time.perf_counter for the check under test: the time the fake engine took, nothing else."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _run_throughput(pp_s, tg_s, monkeypatch):
    from harness import checks
    from harness.checks.base import CaseContext
    from harness.checks.throughput import ThroughputConfig
    from harness.schema import SuiteSection
    clock = _Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    cfg = ThroughputConfig(kind="throughput", pp=8, tg=4, repeats=5, warmup=0)
    out = checks.get("throughput").measure(_TimedEngine(pp_s, tg_s, clock), cfg, None,
                                           CaseContext("m", "fp32", "fp32", SuiteSection(name="t"), "cpu", 0))
    monkeypatch.undo()
    return {m.name: m for m in out.metrics}, out


def test_throughput_marks_a_wide_spread_unstable_and_keeps_every_sample(monkeypatch):
    m, out = _run_throughput([0.06] * 5, [0.02, 0.08, 0.02, 0.08, 0.04], monkeypatch)
    samples = out.series["tg4_samples"]
    assert len(samples) == 5 and len(out.series["tg4_load1"]) == 5 and len(out.series["tg4_others_cpu"]) == 5
    # independent: CV of the samples the check kept, by numpy
    cv = 100 * np.std(samples, ddof=1) / np.mean(samples)
    assert m["tg4 CV"].value == pytest.approx(cv)
    assert m["tg4"].value == pytest.approx(float(np.median(samples)))
    assert cv > 10 and m["tg4 unstable"].value is True and "unstable" in m["tg4"].detail
    assert m["pp8 unstable"].value is False and m["pp8 CV"].value < 10 and m["pp8"].detail is None
    assert sorted(samples) == pytest.approx(sorted(4 / t for t in (0.02, 0.08, 0.02, 0.08, 0.04)))
    assert out.info["repeats"] == 5 and out.info["cpu_count"] >= 1


def test_repeats_below_five_are_refused_by_the_suite(tmp_path):
    from harness.errors import SuiteError
    from harness.suite import load_suite
    p = tmp_path / "s.toml"
    body = '[suite]\nname = "t"\nmodels = ["tiny-llama"]\n\n[[check]]\nkind = "throughput"\n'
    p.write_text(body + "repeats = 4\n")
    with pytest.raises(SuiteError, match="repeats"):
        load_suite(p)
    p.write_text(body)
    assert load_suite(p).check("throughput").repeats == 5


# -- synthetic results directories: the report's summary and `harness compare` ---------------

def _write_run(d, speed: dict, extra=None):
    """A results directory by hand: ``speed`` maps kv dtype -> {"tg128": samples, ...} (a
    throughput case each, written as the check writes it: median, stddev, CV, unstable flag,
    samples series); ``extra`` maps (dtype, check, kind) -> [(metric, value), ...]."""
    import json
    from harness.results import RECORDS, write_manifest
    d.mkdir(parents=True)
    recs, checks = [], ["throughput"]

    def case(dtype, check, kind, metrics, series=None, status="pass", reason=None):
        common = {"run": d.name, "suite": "hand", "model": "m1", "kv_dtype": dtype,
                  "baseline": dtype == "fp32", "check": check, "kind": kind}
        for name, value, unit, better in metrics:
            recs.append({**common, "type": "metric", "metric": name, "value": value, "unit": unit,
                         "better": better, "threshold": None, "op": None, "passed": None,
                         "skipped": None, "detail": None})
        for k, v in (series or {}).items():
            recs.append({**common, "type": "series", "name": k, "values": v})
        recs.append({**common, "type": "case", "status": status, "failures": [], "error": None,
                     "reason": reason, "seconds": 1.0, "finished": "x", "engine": {}})

    for dtype, per in speed.items():
        metrics, series = [], {}
        for name, xs in per.items():
            s = ss.spread(xs)
            metrics += [(name, s.median, "tok/s", "higher"), (f"{name} stddev", s.stdev, "tok/s", None),
                        (f"{name} CV", None if s.cv is None else 100 * s.cv, "%", None),
                        (f"{name} unstable", s.unstable(), "", None)]
            series[f"{name}_samples"] = list(xs)
        case(dtype, "throughput", "throughput", metrics, series)
    for (dtype, check, kind), metrics in (extra or {}).items():
        if check not in checks:
            checks.append(check)
        if metrics == "n/a":
            case(dtype, check, kind, [], status="n/a", reason="random weights")
        else:
            case(dtype, check, kind, [(n, v, "", None) for n, v in metrics])
    (d / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in recs))
    write_manifest(d, {"schema": 1, "run": d.name, "suite": {"path": "suites/hand.toml", "sha256": "abc",
                                                              "suite": {"name": "hand", "baseline": "fp32"}},
                       "matrix": {"models": ["m1"], "dtypes": list(speed), "checks": checks},
                       "git": {"sha": "0" * 40, "dirty": False}, "device": {"requested": "cpu"},
                       "versions": {"python": "3.11"}, "command": "hand", "started": "x", "finished": "y"})
    return d


QUIET = [20.1, 20.3, 19.8, 20.0, 20.2]
NOISY = [5.4, 21.0, 12.0, 20.5, 8.0]


def _summary_rows(md: str) -> dict:
    lines = md.split("## Summary")[1].split("\n## ")[0].splitlines()
    table = [x for x in lines if x.startswith("|")]
    head = [c.strip() for c in table[0].strip("|").split("|")]
    return {row[1]: dict(zip(head, row)) for row in
            ([c.strip() for c in x.strip("|").split("|")] for x in table[2:])}


def _pm_parse(cell: str) -> tuple[float, float]:
    a, b = cell.split("±")
    return float(a.replace(",", "")), float(b.split()[0].replace(",", ""))


def test_summary_section_puts_speed_and_quality_in_one_table(tmp_path):
    import harness.summary  # noqa: F401  (registers the section)
    from harness.report import build_report
    run = _write_run(tmp_path / "r", {"fp32": {"tg128": QUIET}, "bf16": {"tg128": NOISY}, "q8_0": {"tg128": QUIET}},
                     extra={("fp32", "argmax", "argmax"): [("Mean KLD", 1e-7), ("Mean KLD SE", 2e-8)],
                            ("bf16", "argmax", "argmax"): [("Mean KLD", 0.0021), ("Mean KLD SE", 0.0004)],
                            ("q8_0", "argmax", "argmax"): [("Mean KLD", 0.0042)],
                            ("fp32", "coherence", "coherence"): [("Collapse rate", 4.0), ("Collapse rate SE", 2.0)],
                            ("bf16", "coherence", "coherence"): [("Collapse rate", 12.5)],
                            ("q8_0", "coherence", "coherence"): "n/a",
                            ("fp32", "vram", "vram"): [("KV bytes (runtime)", 120.0)],
                            ("bf16", "vram", "vram"): [("KV bytes (runtime)", 60.0)],
                            ("q8_0", "vram", "vram"): [("KV bytes (runtime)", 31.875)]})
    md = build_report(run, tmp_path / "rep").read_text()
    rows = _summary_rows(md)
    assert md.index("## Summary") < md.index("## Throughput")          # right after the verdict
    med, sd = _pm_parse(rows["fp32"]["tg128 tok/s"])
    assert med == pytest.approx(float(np.median(QUIET)), rel=1e-3)
    assert sd == pytest.approx(float(np.std(QUIET, ddof=1)), rel=1e-2)
    assert "unstable" not in rows["fp32"]["tg128 tok/s"]
    cv = 100 * np.std(NOISY, ddof=1) / np.mean(NOISY)
    assert "**unstable**" in rows["bf16"]["tg128 tok/s"] and f"CV {cv:.0f}%" in rows["bf16"]["tg128 tok/s"]
    assert _pm_parse(rows["bf16"]["Mean KLD"]) == pytest.approx((0.0021, 0.0004))
    assert float(rows["q8_0"]["Mean KLD"]) == pytest.approx(0.0042)          # no SE recorded: bare value
    assert _pm_parse(rows["fp32"]["coherent %"]) == pytest.approx((96.0, 2.0))
    assert float(rows["bf16"]["coherent %"]) == pytest.approx(87.5)
    assert rows["q8_0"]["coherent %"] == "" and rows["q8_0"]["needle score"] == ""   # n/a, not run
    assert float(rows["q8_0"]["KV MiB"]) == pytest.approx(31.9, abs=0.05)


def test_summary_row_takes_its_speed_from_one_throughput_check(tmp_path):
    """A suite with several throughput checks (eager, CPU experts, PCIe experts) measures different
    engines: a summary row shows one check's numbers and names it, never one column from each."""
    import harness.summary  # noqa: F401
    from harness.report import build_report
    deep = [15.0, 15.2, 14.9, 15.1, 15.0]
    run = _write_run(tmp_path / "multi", {"fp32": {"tg128": QUIET, "tg128@d4096": deep}, "q8_0": {"tg128": QUIET}},
                     extra={("fp32", "throughput_pcie_moe", "throughput"): [("tg128", 900.0), ("pp512", 2000.0)],
                            ("q8_0", "throughput_pcie_moe", "throughput"): [("tg128", 880.0)]})
    md = build_report(run, tmp_path / "rep").read_text()
    rows = _summary_rows(md)
    assert rows["fp32"]["speed from"] == "`throughput`"
    assert _pm_parse(rows["fp32"]["tg128 tok/s"])[0] == pytest.approx(float(np.median(QUIET)), rel=1e-3)
    assert _pm_parse(rows["fp32"]["tg128@d4096 tok/s"])[0] == pytest.approx(15.0, rel=1e-3)
    assert rows["fp32"].get("pp512 tok/s", "") == ""              # the PCIe check's column is not mixed in
    assert "speed from: the throughput check" in md


def test_summary_of_old_results_reads_the_samples(tmp_path):
    """Results written before the spread metrics existed (samples series only, 3 repetitions)."""
    import json
    import harness.summary  # noqa: F401
    from harness.report import build_report
    from harness.results import RECORDS
    run = _write_run(tmp_path / "old", {"fp32": {"pp512": [900.0, 905.0, 880.0]}, "q8_0": {"pp512": [700.0, 400.0, 650.0]}})
    recs = [json.loads(x) for x in (run / RECORDS).read_text().splitlines()]
    recs = [r for r in recs if not (r["type"] == "metric" and r["metric"] != "pp512")]
    (run / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in recs))
    rows = _summary_rows(build_report(run, tmp_path / "rep").read_text())
    assert _pm_parse(rows["fp32"]["pp512 tok/s"])[1] == pytest.approx(np.std([900, 905, 880], ddof=1), rel=1e-2)
    assert "**unstable**" in rows["q8_0"]["pp512 tok/s"]


def test_compare_calls_a_noisy_difference_no_regression_and_a_clear_one_a_regression(tmp_path):
    from harness.compare import compare
    overlapping = [18.4, 21.0, 19.0, 20.6, 18.9]            # median -5.5%, CV < 10%, ranks interleave
    assert ss.spread(overlapping).cv < 0.10
    base = _write_run(tmp_path / "base", {"fp32": {"tg128": QUIET}, "q8_0": {"tg128": QUIET}})
    head = _write_run(tmp_path / "head", {"fp32": {"tg128": overlapping}, "q8_0": {"tg128": [15.0, 15.2, 14.9, 15.1, 15.3]}})
    cmp = compare(base, head)
    speed = {(r["dtype"], r["metric"]): r for r in cmp.speed}
    # independent: the two-sided exact p by brute force
    assert speed[("fp32", "tg128")]["verdict"] == "unchanged"
    assert speed[("fp32", "tg128")]["p"] == pytest.approx(_brute(overlapping, QUIET)[1])
    assert _brute(overlapping, QUIET)[1] >= 0.05
    assert speed[("q8_0", "tg128")]["verdict"] == "regression"
    assert speed[("q8_0", "tg128")]["p"] == pytest.approx(_brute([15.0, 15.2, 14.9, 15.1, 15.3], QUIET)[1])
    regs = {(r["dtype"], r["metric"]) for r in cmp.regressions}
    assert regs == {("q8_0", "tg128")} and cmp.exit_code == 1
    md = cmp.markdown()
    assert "1 regression" in md and "rank test p=" in md


def test_compare_reports_an_unstable_row_as_unstable_never_a_regression(tmp_path):
    from harness.compare import compare
    base = _write_run(tmp_path / "base", {"fp32": {"tg128": QUIET}})
    head = _write_run(tmp_path / "head", {"fp32": {"tg128": NOISY}})      # median 12 vs 20: -40%
    for a, b in ((base, head), (head, base)):
        cmp = compare(a, b)
        assert not cmp.regressions and not cmp.improvements and cmp.exit_code == 0
        assert [r["verdict"] for r in cmp.speed] == ["unstable"]
        assert "1 unstable, not compared" in cmp.markdown()


def test_compare_of_single_timings_is_untested_not_a_regression(tmp_path):
    """Records of one repetition (older results): a 40% slowdown cannot be told from noise."""
    from harness.compare import compare
    base = _write_run(tmp_path / "base", {"fp32": {"tg128": [50.0]}})
    head = _write_run(tmp_path / "head", {"fp32": {"tg128": [30.0]}})
    cmp = compare(base, head)
    assert not cmp.regressions and cmp.speed[0]["verdict"] == "untested"


class _DepthEngine(_TimedEngine):
    """A slow prefill (0.3 s) and a decode at depth that takes 0.05 s: tg<N>@d<D> must time the
    decode alone, from one prefill, rewinding to the depth before each sample."""
    name = "timed"
    capabilities = frozenset({"prefill", "generate", "chat", "decode_at"})

    def __init__(self):
        super().__init__([], [])
        self.prefills, self.rewinds = 0, []

    def prefill(self, tokens):
        self.prefills += 1
        time.sleep(0.3)
        return torch.zeros(8)

    def rewind(self, pos):
        self.rewinds.append(pos)

    def decode_greedy(self, token, n):
        time.sleep(0.05)
        return [0] * n


def test_decode_at_a_depth_times_the_decode_alone():
    from harness import checks
    from harness.checks.base import CaseContext
    from harness.checks.throughput import ThroughputConfig
    from harness.schema import SuiteSection
    eng = _DepthEngine()
    cfg = ThroughputConfig(kind="throughput", pp=8, tg=4, repeats=5, warmup=1, tg_depths=[64])
    out = checks.get("throughput").measure(eng, cfg, None, CaseContext("m", "fp32", "fp32", SuiteSection(name="t"), "cpu", 0))
    m = {x.name: x for x in out.metrics}
    # 4 tokens in ~0.05 s: ~80 tok/s; with the 0.3 s prefill inside it would be ~11
    assert 50 < m["tg4@d64"].value < 81 and len(out.series["tg4@d64_samples"]) == 5
    assert eng.rewinds == [64] * 6 and eng.prefills == 1 + 6      # pp8's: warm-up + 5; the depth's: once
