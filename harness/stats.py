"""Uncertainty of accuracy statistics, binomial bounds and the significance rule.

Pure maths on numbers, numpy arrays or torch tensors (converted to float64 numpy); no
engine, no I/O. Every standard error (SE) here is of a *mean over positions* (or prompts)
treated as independent samples, which is how llama.cpp's ``llama-perplexity
--kl-divergence`` prints its ``+/-`` (positions of one text are correlated, so these SEs are
a lower bound on the true uncertainty: read them as "at least this uncertain").

Contract:

- ``mean_se(x) -> (mean, se)``: sample mean and its standard error
  ``std(x, ddof=1) / sqrt(n)`` (llama.cpp: ``sqrt((<x^2> - <x>^2) / (n - 1))``, the same
  number); ``se`` is NaN for fewer than 2 samples.
- ``proportion_se(k, n) -> (p, se)``: a rate and its binomial SE ``sqrt(p (1 - p) / (n - 1))``
  (llama.cpp's ``Same top p`` uses n - 1; NaN for n < 2).
- ``rms_se(x) -> (rms, se)``: root mean square and its SE by the delta method:
  ``se(<x^2>) / (2 rms)`` (llama.cpp's ``RMS Δp``); se is 0 when rms is 0 and every x is 0.
- ``ratio_of_means_log(a, b) -> (ratio, ratio_se, log_ratio, log_se)``: paired samples of
  two negative log-likelihoods (test ``a``, base ``b``); ``log_ratio`` is the mean of
  ``a - b`` (= ln PPL(a)/PPL(b)), ``log_se`` its SE over positions; ``ratio = exp(log_ratio)``
  and ``ratio_se = ratio * log_se`` (delta method, as llama.cpp prints ``Mean PPL(Q)/PPL(base)``).
- ``binom_cdf(k, n, p)``: P(X <= k) for X ~ Binomial(n, p), an exact sum in log space.
- ``binom_upper(k, n, alpha=0.05)`` / ``binom_lower(k, n, alpha=0.05)``: the one-sided
  ``1 - alpha`` **Clopper-Pearson** (exact) bounds on a rate from k events in n trials:
  upper = the p with P(X <= k | p) = alpha (1 when k = n), lower = the p with
  P(X >= k | p) = alpha (0 when k = 0). Found by bisection to 1e-12; conservative (coverage
  >= 1 - alpha for every p), unlike Wilson's, which is why it is used for gates.
- ``rate_gate(k, n, k_ref, n_ref, alpha=0.05) -> RateGate``: **the rate gate rule**. A rate of
  k events in n trials *exceeds* a reference of k_ref in n_ref only when k / n is above the
  one-sided 95% Clopper-Pearson upper bound of the reference rate:
  ``excess = k / n - binom_upper(k_ref, n_ref, alpha) > 0``. With a reference of 0 of 24
  the bound is ``1 - 0.05 ** (1 / 24) = 11.7%``: 2 events of 24 are within chance, 3 fail.
  (The power of a 24-prompt set is that coarse; more prompts tighten it.)
- ``significant(delta, se, floor, floor_se=0.0, z=2.0) -> bool``: **the significance rule**.
  A delta (a dtype's cost: Mean KLD, 100 - Same top p, RMS Δp, |ln PPL ratio|) is
  significant only when it exceeds the noise floor (the same statistic for the baseline
  against itself, e.g. fp32 one pass vs fp32 chunked) by more than ``z`` combined standard
  errors: ``delta - floor > z * sqrt(se^2 + floor_se^2)``. NaN/None in delta or se: not
  significant (no evidence). z = 2 is about one-sided 97.7% under normality.
- ``significance(values, floor) -> {metric: bool}``: the rule applied to a dtype row against
  the baseline row (the noise floor) for each metric of ``DELTAS``: ``Mean KLD``, ``Same top
  p`` (as 100 - it: % of positions whose top-1 changed), ``RMS Δp``, ``Mean
  ln(PPL(Q)/PPL(base))`` (as its absolute value; ``Mean PPL(Q)/PPL(base)`` takes its verdict).

    from harness.stats import mean_se, binom_upper, rate_gate, significant
    m, se = mean_se(kld)                     # Mean KLD +/- se
    binom_upper(0, 24)                        # 0.1171...
    rate_gate(3, 24, 0, 24).exceeds           # True
    significant(1e-3, 1e-4, floor=0.0)        # True
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05          # one-sided 95% bounds
Z_SIGNIFICANT = 2.0   # standard errors a delta must clear above the floor


def _arr(x) -> np.ndarray:
    if hasattr(x, "detach"):                      # torch tensor
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def mean_se(x) -> tuple[float, float]:
    """Mean and its standard error (std with ddof=1 over sqrt(n)); se NaN when n < 2."""
    a = _arr(x)
    n = a.size
    if n == 0:
        return math.nan, math.nan
    m = float(a.mean())
    if n < 2:
        return m, math.nan
    return m, float(a.std(ddof=1) / math.sqrt(n))


def proportion_se(k: int, n: int) -> tuple[float, float]:
    """k of n as a rate in [0, 1] and its binomial SE sqrt(p (1 - p) / (n - 1))."""
    if n <= 0:
        return math.nan, math.nan
    p = k / n
    if n < 2:
        return p, math.nan
    return p, math.sqrt(max(p * (1.0 - p), 0.0) / (n - 1))


def rms_se(x) -> tuple[float, float]:
    """Root mean square of x and its SE by the delta method, se(<x^2>) / (2 rms)."""
    a = _arr(x)
    if a.size == 0:
        return math.nan, math.nan
    ms, ms_se = mean_se(a * a)
    rms = math.sqrt(max(ms, 0.0))
    if rms == 0.0:
        return 0.0, (0.0 if a.size >= 2 else math.nan)
    return rms, ms_se / (2.0 * rms)


def ratio_of_means_log(a, b) -> tuple[float, float, float, float]:
    """Paired NLLs: (exp(mean(a-b)), exp(mean(a-b)) * se, mean(a-b), se of mean(a-b))."""
    a, b = _arr(a), _arr(b)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.size} vs {b.size}")
    lr, lse = mean_se(a - b)
    ratio = math.exp(lr) if math.isfinite(lr) else math.nan
    return ratio, ratio * lse, lr, lse


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k), X ~ Binomial(n, p), summed exactly in log space."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _check_kn(k: int, n: int) -> None:
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")


def _bisect(f, lo: float, hi: float) -> float:
    """Root of a decreasing f on [lo, hi] (f(lo) >= 0 >= f(hi)) to 1e-12."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def binom_upper(k: int, n: int, alpha: float = ALPHA) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on the rate of k events in n."""
    _check_kn(k, n)
    if k == n:
        return 1.0
    return _bisect(lambda p: binom_cdf(k, n, p) - alpha, 0.0, 1.0)


def binom_lower(k: int, n: int, alpha: float = ALPHA) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on the rate of k events in n."""
    _check_kn(k, n)
    if k == 0:
        return 0.0
    # P(X >= k | p) = 1 - cdf(k - 1) rises with p: find where it equals alpha
    return _bisect(lambda p: alpha - (1.0 - binom_cdf(k - 1, n, p)), 0.0, 1.0)


@dataclass(frozen=True)
class RateGate:
    k: int
    n: int
    k_ref: int
    n_ref: int
    rate: float          # k / n
    ref_rate: float      # k_ref / n_ref
    allowed: float       # binom_upper(k_ref, n_ref, alpha): the most the reference allows
    excess: float        # rate - allowed (> 0: exceeds)

    @property
    def exceeds(self) -> bool:
        return self.excess > 0

    def describe(self, what: str) -> str:
        return (f"{what} {self.k}/{self.n} = {100 * self.rate:.1f}% vs reference {self.k_ref}/{self.n_ref}"
                f" (one-sided 95% Clopper-Pearson upper bound {100 * self.allowed:.1f}%)")


def rate_gate(k: int, n: int, k_ref: int, n_ref: int, alpha: float = ALPHA) -> RateGate:
    """The rate gate rule (module docstring): exceeds when k/n > binom_upper(k_ref, n_ref)."""
    _check_kn(k, n)
    _check_kn(k_ref, n_ref)
    allowed = binom_upper(k_ref, n_ref, alpha)
    return RateGate(k, n, k_ref, n_ref, k / n, k_ref / n_ref, allowed, k / n - allowed)


def _bad(x) -> bool:
    return x is None or not math.isfinite(float(x))


def significant(delta, se, floor=0.0, floor_se=0.0, z: float = Z_SIGNIFICANT) -> bool:
    """The significance rule: delta - floor > z * sqrt(se^2 + floor_se^2); missing or
    non-finite delta/se: False (a missing floor counts as 0, a missing floor SE as 0)."""
    if _bad(delta) or _bad(se):
        return False
    floor = 0.0 if _bad(floor) else float(floor)
    floor_se = 0.0 if _bad(floor_se) else float(floor_se)
    return float(delta) - floor > z * math.sqrt(float(se) ** 2 + floor_se ** 2)


# How the report turns an accuracy metric into a *delta* (a cost that is 0 when nothing
# changed) for ``significant``: metric -> (delta(value), the metric holding its SE).
# ``Same top p`` becomes the % of positions whose top-1 changed; the PPL ratio is judged on
# |mean ln ratio| (its SE is the SE of the mean log-ratio).
DELTAS = {
    "Mean KLD": (lambda v: v, "Mean KLD SE"),
    "Same top p": (lambda v: 100.0 - v, "Same top p SE"),
    "RMS Δp": (lambda v: v, "RMS Δp SE"),
    "Mean PPL(Q)/PPL(base)": (None, "Mean PPL(Q)/PPL(base) SE"),   # judged through its log
    "Mean ln(PPL(Q)/PPL(base))": (lambda v: abs(v), "Mean ln(PPL(Q)/PPL(base)) SE"),
}


def significance(values: dict, floor: dict, z: float = Z_SIGNIFICANT) -> dict[str, bool]:
    """Per metric of ``DELTAS`` present in ``values`` (a dtype row: metric -> value, with the
    ``"<metric> SE"`` entries): whether its delta is significant against ``floor`` (the
    baseline row, same keys) by ``significant``. ``Mean PPL(Q)/PPL(base)`` takes the verdict
    of ``Mean ln(PPL(Q)/PPL(base))``. Metrics without an SE are left out (no evidence)."""
    out: dict[str, bool] = {}
    for name, (to_delta, se_name) in DELTAS.items():
        if to_delta is None or _bad_or_missing(values.get(name)) or _bad_or_missing(values.get(se_name)):
            continue
        f = floor.get(name)
        out[name] = significant(to_delta(float(values[name])), values[se_name],
                                None if _bad_or_missing(f) else to_delta(float(f)), floor.get(se_name), z)
    if "Mean ln(PPL(Q)/PPL(base))" in out:
        out["Mean PPL(Q)/PPL(base)"] = out["Mean ln(PPL(Q)/PPL(base))"]
    return out


def _bad_or_missing(x) -> bool:
    try:
        return x is None or not math.isfinite(float(x))
    except (TypeError, ValueError):
        return True
