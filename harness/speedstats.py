"""Speed statistics: the spread of repeated timings, and a rank test that says whether two
sets of repetitions differ (asv / pyperf style), so a speed verdict rests on evidence.

Contract (pure Python, no engine, no I/O):

- ``spread(samples) -> Spread``: n, median, mean, sample standard deviation (ddof=1),
  coefficient of variation ``cv = stdev / mean`` (a fraction; None below 2 samples or for a
  mean of 0), min and max.
- ``mann_whitney_u(x, y, alternative="two-sided") -> RankTest``: the Mann-Whitney U test.
  ``u`` is U of ``x`` (pairs with x > y, ties counting 1/2), as ``scipy.stats.mannwhitneyu``
  returns it. ``alternative``: ``"greater"`` (x tends to be larger), ``"less"``, or
  ``"two-sided"``. ``method`` is how the p-value was obtained:
  ``"exact"`` (no ties, ``len(x) * len(y) <= EXACT_MAX_CELLS``: the exact null distribution
  of U by the recursion f(m, n, u) = f(m-1, n, u-n) + f(m, n-1, u)); ``"permutation"``
  (ties, ``comb(m+n, m) <= PERMUTATION_MAX``: every split of the pooled samples enumerated,
  an exact conditional test); ``"asymptotic"`` (otherwise: normal approximation with the tie
  correction of the variance and a 0.5 continuity correction, scipy's formula). Two-sided
  p-values are ``min(1, 2 * min(P(U >= u), P(U <= u)))`` (the null distribution is symmetric).
- ``min_p(m, n)``: the smallest two-sided p any pair of samples of these sizes can reach
  (``2 / comb(m+n, m)``): with 3 repetitions on each side it is 0.1, so no test at alpha 0.05
  can call a difference; 5 a side reach 0.0079.
- ``compare_speed(base, head, better="higher", alpha=, min_effect=, max_cv=) -> SpeedVerdict``:
  the verdict on one speed metric from its repetitions. ``verdict`` is one of

  - ``"untested"``: fewer than 2 samples on a side, or sizes whose ``min_p`` is not below
    ``alpha`` (the repetitions cannot say anything);
  - ``"unstable"``: either side's CV is above ``max_cv`` (the machine was not quiet enough to
    compare; never a regression or an improvement);
  - ``"regression"`` / ``"improvement"``: the two-sided rank test's p is below ``alpha`` *and*
    the medians differ by at least ``min_effect`` (relative to base's median) in the worse /
    better direction;
  - ``"unchanged"``: otherwise (``why`` says whether the test or the effect size decided).

  ``change`` is (head median - base median) / base median (signed).

    v = compare_speed([20.1, 20.3, 19.8, 20.0, 20.2], [15.0, 15.2, 14.9, 15.1, 15.3])
    v.verdict == "regression"; v.p   # 0.0079 (exact, 5 vs 5)
"""
from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass
from functools import lru_cache

EXACT_MAX_CELLS = 2500          # m * n up to which the exact (no-ties) distribution is computed
PERMUTATION_MAX = 20000         # splits enumerated for an exact test with ties
DEFAULT_ALPHA = 0.05
DEFAULT_MIN_EFFECT = 0.05       # 5% of base's median
DEFAULT_MAX_CV = 0.10           # issue 15.7: a spread above 10% is unstable


@dataclass(frozen=True)
class Spread:
    n: int
    median: float | None
    mean: float | None
    stdev: float | None
    cv: float | None             # stdev / mean, a fraction
    min: float | None
    max: float | None

    def unstable(self, max_cv: float = DEFAULT_MAX_CV) -> bool:
        return self.cv is not None and self.cv > max_cv


def spread(samples) -> Spread:
    xs = [float(x) for x in samples]
    if not xs:
        return Spread(0, None, None, None, None, None, None)
    mean = statistics.fmean(xs)
    sd = statistics.stdev(xs) if len(xs) >= 2 else None
    cv = sd / abs(mean) if sd is not None and mean != 0 else None
    return Spread(len(xs), statistics.median(xs), mean, sd, cv, min(xs), max(xs))


@dataclass(frozen=True)
class RankTest:
    u: float
    p: float
    method: str                  # "exact" | "permutation" | "asymptotic"
    alternative: str


def _ranks(values: list[float]) -> list[float]:
    """Ranks 1..N of ``values``, tied values sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


@lru_cache(maxsize=None)
def _u_counts(m: int, n: int) -> tuple[int, ...]:
    """Number of orderings of m x's and n y's (no ties) with each U = 0..m*n."""
    if m == 0 or n == 0:
        return (1,)
    a, b = _u_counts(m - 1, n), _u_counts(m, n - 1)   # the largest value is an x / a y
    out = [0] * (m * n + 1)
    for u, c in enumerate(a):
        out[u + n] += c
    for u, c in enumerate(b):
        out[u] += c
    return tuple(out)


def _tails(p_ge: float, p_le: float, alternative: str) -> float:
    if alternative == "greater":
        return p_ge
    if alternative == "less":
        return p_le
    return min(1.0, 2.0 * min(p_ge, p_le))


def min_p(m: int, n: int) -> float:
    """Smallest two-sided p-value reachable with samples of sizes m and n."""
    if m < 1 or n < 1:
        return 1.0
    return min(1.0, 2.0 / math.comb(m + n, m))


def mann_whitney_u(x, y, alternative: str = "two-sided") -> RankTest:
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be two-sided, greater or less, got {alternative!r}")
    x, y = [float(v) for v in x], [float(v) for v in y]
    m, n = len(x), len(y)
    if m == 0 or n == 0:
        raise ValueError("both samples need at least one value")
    if any(math.isnan(v) for v in x + y):
        raise ValueError("samples must not contain NaN")
    pooled = x + y
    ranks = _ranks(pooled)
    u = sum(ranks[:m]) - m * (m + 1) / 2
    ties = len(set(pooled)) < len(pooled)
    if not ties and m * n <= EXACT_MAX_CELLS:
        counts = _u_counts(m, n)
        total = math.comb(m + n, m)
        k = int(round(u))
        p_ge = sum(counts[k:]) / total
        p_le = sum(counts[:k + 1]) / total
        return RankTest(u, _tails(p_ge, p_le, alternative), "exact", alternative)
    if math.comb(m + n, m) <= PERMUTATION_MAX:
        eps = 1e-9 * max(1.0, m * n)
        ge = le = total = 0
        base = m * (m + 1) / 2
        for idx in itertools.combinations(range(m + n), m):
            v = sum(ranks[i] for i in idx) - base
            ge += v >= u - eps
            le += v <= u + eps
            total += 1
        return RankTest(u, _tails(ge / total, le / total, alternative), "permutation", alternative)
    N = m + n
    counts: dict[float, int] = {}
    for v in pooled:
        counts[v] = counts.get(v, 0) + 1
    tie_term = sum(t ** 3 - t for t in counts.values()) / (N * (N - 1))
    sigma = math.sqrt(m * n / 12.0 * ((N + 1) - tie_term))
    mu = m * n / 2.0
    if sigma == 0:
        return RankTest(u, 1.0, "asymptotic", alternative)

    def sf(z: float) -> float:
        return 0.5 * math.erfc(z / math.sqrt(2.0))

    p_ge = sf((u - mu - 0.5) / sigma)          # P(U >= u), continuity-corrected
    p_le = sf((mu - u - 0.5) / sigma)          # P(U <= u)
    return RankTest(u, _tails(p_ge, p_le, alternative), "asymptotic", alternative)


@dataclass(frozen=True)
class SpeedVerdict:
    verdict: str                 # regression | improvement | unchanged | unstable | untested
    why: str
    base: Spread
    head: Spread
    change: float | None = None  # relative change of the median, head vs base
    p: float | None = None
    method: str | None = None


def compare_speed(base, head, better: str = "higher", *, alpha: float = DEFAULT_ALPHA,
                  min_effect: float = DEFAULT_MIN_EFFECT, max_cv: float = DEFAULT_MAX_CV) -> SpeedVerdict:
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be higher or lower, got {better!r}")
    b, h = spread(base), spread(head)
    change = ((h.median - b.median) / abs(b.median)
              if b.median not in (None, 0) and h.median is not None else None)
    if b.n < 2 or h.n < 2:
        return SpeedVerdict("untested", f"too few repetitions to test ({b.n} vs {h.n})", b, h, change)
    if min_p(b.n, h.n) >= alpha:
        return SpeedVerdict("untested", f"{b.n} vs {h.n} repetitions cannot reach p < {alpha:g} "
                            f"(smallest p {min_p(b.n, h.n):.3g})", b, h, change)
    noisy = [f"{side} CV {s.cv:.0%}" for side, s in (("base", b), ("head", h)) if s.unstable(max_cv)]
    if noisy:
        return SpeedVerdict("unstable", f"{', '.join(noisy)} > {max_cv:.0%}: not compared", b, h, change)
    test = mann_whitney_u(head, base, "two-sided")
    if test.p >= alpha:
        return SpeedVerdict("unchanged", f"rank test p={test.p:.3g} >= {alpha:g}", b, h, change,
                            test.p, test.method)
    if change is None or abs(change) < min_effect:
        return SpeedVerdict("unchanged", f"p={test.p:.3g} but the median moved less than "
                            f"{min_effect:.0%}", b, h, change, test.p, test.method)
    worse = change < 0 if better == "higher" else change > 0
    return SpeedVerdict("regression" if worse else "improvement",
                        f"rank test p={test.p:.3g} < {alpha:g} ({test.method}, {b.n} vs {h.n}), "
                        f"median {change:+.1%}", b, h, change, test.p, test.method)
