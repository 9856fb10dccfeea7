"""harness.stats and the '+/-' of logit_stats, each against an independent computation.

scipy is not in the venv: the references are numpy written the way llama.cpp's perplexity
tool writes them (sums of x and x^2, covariance of the two NLLs), brute-force binomial sums
with exact integers, and mpmath's regularized incomplete beta function (Clopper-Pearson's
bounds are beta quantiles) where mpmath is installed."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from harness import stats
from harness.metrics import logit_stats


def _llama_mean_unc(x: np.ndarray) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty: from the sums of x and x^2."""
    n = x.size
    s, s2 = float(x.sum()), float((x * x).sum())
    mean = s / n
    return mean, math.sqrt(max(s2 / n - mean * mean, 0.0) / (n - 1))


def _logits(T=300, V=97, seed=0, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(T, V, generator=g) * 3
    test = base + noise * torch.randn(T, V, generator=g)
    targets = torch.randint(0, V, (T,), generator=g)
    return base, test, targets


def _np_logsoftmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def test_logit_stats_uncertainties_match_an_independent_numpy_computation():
    base, test, targets = _logits()
    st = logit_stats(base, test, top_k=5, targets=targets).scalars
    b, t = base.double().numpy(), test.double().numpy()
    lb, lt = _np_logsoftmax(b), _np_logsoftmax(t)
    kld = (np.exp(lb) * (lb - lt)).sum(axis=1)
    m, unc = _llama_mean_unc(kld)
    assert st["Mean KLD"] == pytest.approx(m, rel=1e-9)
    assert st["Mean KLD SE"] == pytest.approx(unc, rel=1e-6)
    # Same top p: binomial, llama.cpp's sqrt(p (1 - p) / (n - 1)), in %
    same = (b.argmax(1) == t.argmax(1))
    p = same.mean()
    assert 0 < p < 1                      # the data exercises a real rate
    assert st["Same top p"] == pytest.approx(100 * p)
    assert st["Same top p SE"] == pytest.approx(100 * math.sqrt(p * (1 - p) / (len(same) - 1)), rel=1e-9)
    # RMS dp with the delta method on <dp^2> (as llama.cpp: 0.5 / rms * unc(<dp^2>)), in %
    idx = targets.numpy()
    pb, pt = np.exp(lb[np.arange(len(idx)), idx]), np.exp(lt[np.arange(len(idx)), idx])
    dp = pt - pb
    ms, ms_unc = _llama_mean_unc(dp * dp)
    assert st["RMS Δp"] == pytest.approx(100 * math.sqrt(ms), rel=1e-9)
    assert st["RMS Δp SE"] == pytest.approx(100 * 0.5 / math.sqrt(ms) * ms_unc, rel=1e-6)
    # PPL ratio: llama.cpp's log-PPL uncertainties and their covariance
    nb, nt = -lb[np.arange(len(idx)), idx], -lt[np.arange(len(idx)), idx]
    n = len(nb)
    mb, ub = _llama_mean_unc(nb)
    mt, ut = _llama_mean_unc(nt)
    cov = (float((nb * nt).mean()) - mb * mt) / (n - 1)
    log_unc = math.sqrt(ub * ub + ut * ut - 2 * cov)
    assert st["Mean ln(PPL(Q)/PPL(base))"] == pytest.approx(mt - mb, rel=1e-9, abs=1e-12)
    assert st["Mean ln(PPL(Q)/PPL(base)) SE"] == pytest.approx(log_unc, rel=1e-6)
    assert st["Mean PPL(Q)/PPL(base)"] == pytest.approx(math.exp(mt - mb), rel=1e-9)
    assert st["Mean PPL(Q)/PPL(base) SE"] == pytest.approx(math.exp(mt - mb) * log_unc, rel=1e-6)


def test_standard_errors_shrink_like_one_over_sqrt_n_and_match_the_spread_of_repeated_means():
    """What an SE promises: the spread of the mean over independent repetitions."""
    rng = np.random.default_rng(1)
    reps = rng.exponential(0.01, size=(4000, 200))        # KLD-like: positive, skewed
    ses = [stats.mean_se(r)[1] for r in reps[:50]]
    spread = reps.mean(axis=1).std(ddof=1)
    assert np.mean(ses) == pytest.approx(spread, rel=0.08)
    dp = rng.normal(0, 0.02, size=(4000, 200))
    rms_spread = np.sqrt((dp * dp).mean(axis=1)).std(ddof=1)
    assert np.mean([stats.rms_se(r)[1] for r in dp[:50]]) == pytest.approx(rms_spread, rel=0.1)


def test_identical_logits_give_zero_deltas_and_zero_uncertainty():
    base, _, targets = _logits(T=64)
    st = logit_stats(base, base.clone(), targets=targets).scalars
    assert st["Mean KLD"] == 0 and st["Mean KLD SE"] == 0
    assert st["Same top p"] == 100 and st["Same top p SE"] == 0
    assert st["RMS Δp"] == 0 and st["RMS Δp SE"] == 0
    assert st["Mean PPL(Q)/PPL(base)"] == 1 and st["Mean PPL(Q)/PPL(base) SE"] == 0
    assert stats.mean_se([1.0])[1] != stats.mean_se([1.0])[1]        # NaN: one sample has no SE


def _binom_cdf_exact(k: int, n: int, p: float) -> float:
    q = Fraction(p)
    return float(sum(math.comb(n, i) * q ** i * (1 - q) ** (n - i) for i in range(k + 1)))


@pytest.mark.parametrize("k,n", [(0, 1), (0, 24), (1, 24), (2, 24), (3, 24), (12, 24), (23, 24), (5, 300)])
def test_clopper_pearson_bounds_solve_the_binomial_tail_equations(k, n):
    up, lo = stats.binom_upper(k, n), stats.binom_lower(k, n)
    assert 0 <= lo <= k / n <= up <= 1
    if k < n:      # P(X <= k | upper) = 5%, and any smaller p leaves more than 5% there
        assert _binom_cdf_exact(k, n, up) == pytest.approx(0.05, abs=1e-9)
        assert _binom_cdf_exact(k, n, up * (1 - 1e-6)) > 0.05
    if k > 0:      # P(X >= k | lower) = 5%
        assert 1 - _binom_cdf_exact(k - 1, n, lo) == pytest.approx(0.05, abs=1e-9)
    assert stats.binom_cdf(k, n, 0.3) == pytest.approx(_binom_cdf_exact(k, n, 0.3), rel=1e-9, abs=1e-300)


def test_closed_forms_and_beta_quantiles():
    for n in (1, 5, 24, 100):
        assert stats.binom_upper(0, n) == pytest.approx(1 - 0.05 ** (1 / n), abs=1e-10)
        assert stats.binom_lower(n, n) == pytest.approx(0.05 ** (1 / n), abs=1e-10)
        assert stats.binom_upper(n, n) == 1.0 and stats.binom_lower(0, n) == 0.0
    mpmath = pytest.importorskip("mpmath")
    def ppf(a, b, q):      # quantile of Beta(a, b): bisection on mpmath's regularized incomplete beta
        lo, hi = mpmath.mpf(0), mpmath.mpf(1)
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mpmath.betainc(a, b, 0, mid, regularized=True) < q else (lo, mid)
        return float((lo + hi) / 2)

    for k, n in ((1, 24), (4, 24), (7, 50)):
        # Clopper-Pearson: upper = Beta(k + 1, n - k).ppf(0.95), lower = Beta(k, n - k + 1).ppf(0.05)
        assert stats.binom_upper(k, n) == pytest.approx(ppf(k + 1, n - k, 0.95), abs=1e-9)
        assert stats.binom_lower(k, n) == pytest.approx(ppf(k, n - k + 1, 0.05), abs=1e-9)


@pytest.mark.parametrize("n", [10, 24])
def test_one_sided_upper_bound_covers_at_least_95_percent_for_every_rate(n):
    """Coverage by brute force: sum P(X = x) over the x whose bound reaches p."""
    bounds = [stats.binom_upper(x, n) for x in range(n + 1)]
    for p in np.linspace(0.001, 0.999, 97):
        cover = sum(math.comb(n, x) * p ** x * (1 - p) ** (n - x) for x in range(n + 1) if bounds[x] >= p)
        assert cover >= 0.95 - 1e-9, (p, cover)


def test_rate_gate_rule():
    # zero reference events in 24: the bound is 1 - 0.05^(1/24) = 11.7%: 2/24 = 8.3% passes, 3/24 fails
    assert not stats.rate_gate(2, 24, 0, 24).exceeds
    g = stats.rate_gate(3, 24, 0, 24)
    assert g.exceeds and g.excess == pytest.approx(3 / 24 - (1 - 0.05 ** (1 / 24)))
    # a reference with events of its own allows more: find the smallest failing k by brute force
    up = next(p for p in np.linspace(0, 1, 200001) if _binom_cdf_exact(2, 24, float(p)) <= 0.05)
    first_fail = next(k for k in range(25) if k / 24 > up)
    assert [stats.rate_gate(k, 24, 2, 24).exceeds for k in range(25)] == [k >= first_fail for k in range(25)]
    assert not stats.rate_gate(24, 24, 24, 24).exceeds       # both always: nothing to exceed
    with pytest.raises(ValueError):
        stats.rate_gate(5, 4, 0, 4)


def test_significance_rule():
    # a delta must clear the floor by more than 2 combined SEs
    assert stats.significant(1.0, 0.1, floor=0.0)
    assert not stats.significant(0.19, 0.1, floor=0.0)
    assert stats.significant(0.21, 0.1, floor=0.0)
    assert not stats.significant(1.0, 0.1, floor=0.9)                  # within noise above the floor
    assert not stats.significant(0.5, 0.1, floor=0.0, floor_se=0.3)   # sqrt(0.01 + 0.09) * 2 = 0.63
    assert not stats.significant(None, 0.1) and not stats.significant(1.0, float("nan"))
    row = {"Mean KLD": 1e-3, "Mean KLD SE": 1e-4, "Same top p": 99.0, "Same top p SE": 0.6,
           "Mean ln(PPL(Q)/PPL(base))": -0.02, "Mean ln(PPL(Q)/PPL(base)) SE": 0.005}
    floor = {"Mean KLD": 0.0, "Mean KLD SE": 0.0, "Same top p": 100.0, "Same top p SE": 0.0}
    sig = stats.significance(row, floor)
    # KLD 10 SE above 0; 1% flipped top-1 is < 2 x 0.6; |ln ratio| 0.02 > 2 x 0.005
    assert sig == {"Mean KLD": True, "Same top p": False, "Mean ln(PPL(Q)/PPL(base))": True,
                   "Mean PPL(Q)/PPL(base)": True}


def test_report_shows_plus_minus_and_marks_only_significant_deltas(tmp_path):
    """A hand-made results directory: bf16's Mean KLD is 10 SE above a zero floor
    (significant), q8_0's is 1 SE (noise); Same top p 99 +/- 0.2 is 5 SE below the floor."""
    import json
    from test_harness_results import _case
    from harness.report import build_report
    from harness.results import RECORDS, write_manifest
    run = tmp_path / "r"
    run.mkdir()
    rows = {"fp32": (0.0, 0.0, 100.0, 0.0), "bf16": (1e-3, 1e-4, 99.0, 0.2), "q8_0": (1e-4, 1e-4, 100.0, 0.0)}
    recs = []
    for d, (kld, kse, same, sse) in rows.items():
        recs += _case("m", d, "argmax", "argmax", [
            ("Mean KLD", kld, "nats", "lower", None, None), ("Mean KLD SE", kse, "nats", None, None, None),
            ("Same top p", same, "%", "higher", None, None), ("Same top p SE", sse, "%", None, None, None)])
        recs += _case("m", d, "coherence", "coherence", [
            ("Collapse rate", 0.0, "%", "lower", None, None)] + ([] if d == "fp32" else [
            ("Collapse excess", -11.7, "pp", "lower", 0.0, "<="), ("Near-tie flips", 1, "sets", None, None, None)]),
            info={"samples": [{"prompt": "Capital of France?", "text": "Paris.", "tokens": 3, "stop": "eos",
                               "identical_prefix": 0, "baseline_tokens": 3, "diverged_at": 0,
                               "fp32_margin": 0.082, "flip": None if d == "fp32" else "near-tie",
                               "collapsed": False}]})
    (run / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in recs))
    write_manifest(run, {"schema": 1, "run": "r", "suite": {"path": "s.toml", "sha256": "abc",
                                                            "suite": {"name": "s", "baseline": "fp32"}},
                         "matrix": {"models": ["m"], "dtypes": list(rows), "checks": ["argmax", "coherence"]},
                         "git": {"sha": "0" * 40, "dirty": False}, "device": {"requested": "cpu"},
                         "versions": {"python": "3.11"}, "command": "hand", "started": "x", "finished": "y"})
    md = build_report(run, tmp_path / "rep").read_text()
    acc = md[md.index("### `argmax`"):md.index("Values are mean")]
    line = {d: next(x for x in acc.splitlines() if x.startswith(f"| m | {d}")) for d in ("bf16", "q8_0")}
    assert "0.001 ± 0.0001" in line["bf16"] and line["bf16"].rstrip(" |").endswith("Mean KLD, Same top p")
    assert "0.0001 ± 0.0001" in line["q8_0"] and line["q8_0"].rstrip(" |").endswith("none")
    assert "by more than 2 combined standard errors" in md
    assert "**near-tie** flip at step 0 (fp32 margin 0.082)" in md
    assert "Clopper-Pearson" in md
