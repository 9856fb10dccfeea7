"""Metric maths on plain tensors and token lists; no engine, no I/O.

Contract: ``logit_stats(base, test, top_k, targets)`` compares two teacher-forced logit
matrices [T, V] (baseline first) and returns scalars named as llama.cpp's perplexity
KL-divergence report names them (``Mean KLD``, ``Median KLD``, ``99.0% KLD``, ``Maximum KLD``,
``Same top p``, ``Mean PPL(Q)/PPL(base)``, ...) plus per-position series for plots. KLD is
KL(base || test) in nats, computed in float64. Each of ``Mean KLD``, ``Same top p``,
``RMS Δp``, ``Mean PPL(Q)/PPL(base)`` and ``Mean ln(PPL(Q)/PPL(base))`` comes with its
standard error as the scalar ``"<name> SE"`` (the ``+/-`` llama-perplexity prints; the maths
and its caveats are ``harness.stats``): SE over positions, binomial for ``Same top p``,
delta method for ``RMS Δp``, SE of the mean log-ratio exponentiated for the PPL ratio. NaN
where fewer than 2 positions make it undefined. Text metrics: ``distinct_n``,
``longest_repeat_run`` (collapse detector) and ``common_prefix``.

    stats = logit_stats(fp32_logits, q8_logits, top_k=5, targets=tokens[1:])
    stats.scalars["Mean KLD"], stats.series["kld"]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

if TYPE_CHECKING:      # torch loads in the functions that use it: a bad input fails fast, in one line
    import torch

from .stats import mean_se, proportion_se, ratio_of_means_log, rms_se

KLD_QUANTILES = {"99.9% KLD": 0.999, "99.0% KLD": 0.99, "Median KLD": 0.5,
                 "10.0% KLD": 0.10, "5.0% KLD": 0.05}


@dataclass
class LogitStats:
    scalars: dict[str, float]
    series: dict[str, list] = field(default_factory=dict)


def logit_stats(base: torch.Tensor, test: torch.Tensor, top_k: int = 5,
                targets: torch.Tensor | list[int] | None = None, rows: int = 256) -> LogitStats:
    """base, test: [T, V] logits at the same positions; ``targets[i]`` is the token that
    follows position i (for perplexity; shorter than T or -1 where none is known). Rows are
    processed ``rows`` at a time so the float64 copies stay small."""
    import torch
    if base.shape != test.shape or base.dim() != 2:
        raise ValueError(f"logit shapes differ or are not 2-D: {tuple(base.shape)} vs {tuple(test.shape)}")
    T, V = base.shape
    if targets is not None:
        tg = torch.full((T,), -1, dtype=torch.long)
        given = torch.as_tensor(targets, dtype=torch.long)[:T]
        tg[:len(given)] = given
        targets = tg
    max_abs, mean_abs, kld, rank, same, nll_b, nll_t, dp = [], [], [], [], [], [], [], []
    for s in range(0, T, rows):
        b = base[s:s + rows].double()
        t = test[s:s + rows].double()
        diff = (b - t).abs()
        max_abs.append(diff.amax(dim=1))
        mean_abs.append(diff.mean(dim=1))
        lb, lt = torch.log_softmax(b, dim=1), torch.log_softmax(t, dim=1)
        kld.append((lb.exp() * (lb - lt)).sum(dim=1).clamp_min(0.0))
        top_b = b.argmax(dim=1)
        # rank of the baseline's top-1 in the test logits (0 = test's own top-1; ties count for it)
        tb = t.gather(1, top_b[:, None])
        rank.append((t > tb).sum(dim=1))
        same.append(top_b == t.argmax(dim=1))
        if targets is not None:
            keep = targets[s:s + rows] >= 0
            if keep.any():
                idx = targets[s:s + rows][keep][:, None]
                pb, pt = lb[keep].gather(1, idx)[:, 0], lt[keep].gather(1, idx)[:, 0]
                nll_b.append(-pb)
                nll_t.append(-pt)
                dp.append(pt.exp() - pb.exp())
    max_abs_t, mean_abs_t = torch.cat(max_abs), torch.cat(mean_abs)
    kld_t, rank_t, same_t = torch.cat(kld), torch.cat(rank), torch.cat(same)
    n_same = int(same_t.sum())
    same_p, same_se = proportion_se(n_same, T)
    kld_mean, kld_se = mean_se(kld_t)
    sc: dict[str, float] = {
        "Max abs logit diff": float(max_abs_t.max()),
        "Mean abs logit diff": float(mean_abs_t.mean()),
        f"Top-1 in top-{top_k}": 100.0 * float((rank_t < top_k).double().mean()),
        "Same top p": 100.0 * same_p,
        "Same top p SE": 100.0 * same_se,
        "Mean KLD": kld_mean,
        "Mean KLD SE": kld_se,
        "Maximum KLD": float(kld_t.max()),
        "Minimum KLD": float(kld_t.min()),
    }
    q = torch.quantile(kld_t, torch.tensor(list(KLD_QUANTILES.values()), dtype=torch.float64))
    sc.update({name: float(v) for name, v in zip(KLD_QUANTILES, q)})
    if nll_b:
        nb, nt, d = torch.cat(nll_b), torch.cat(nll_t), torch.cat(dp)
        ratio, ratio_se, log_ratio, log_se = ratio_of_means_log(nt, nb)
        rms, rms_err = rms_se(d)
        sc["Mean PPL(base)"] = math.exp(float(nb.mean()))
        sc["Mean PPL(Q)"] = math.exp(float(nt.mean()))
        sc["Mean PPL(Q)/PPL(base)"] = ratio
        sc["Mean PPL(Q)/PPL(base) SE"] = ratio_se
        sc["Mean ln(PPL(Q)/PPL(base))"] = log_ratio
        sc["Mean ln(PPL(Q)/PPL(base)) SE"] = log_se
        sc["RMS Δp"] = 100.0 * rms
        sc["RMS Δp SE"] = 100.0 * rms_err
    series = {"max_abs": _round(max_abs_t), "kld": _round(kld_t),
              "top1_rank": [int(r) for r in rank_t], "same_top": [bool(x) for x in same_t]}
    return LogitStats(sc, series)


def _round(t: torch.Tensor, digits: int = 6) -> list[float]:
    """Per-position values for plots: 6 significant digits keep records small."""
    return [float(f"{float(x):.{digits}g}") for x in t]


def distinct_n(tokens: list[int], n: int = 2) -> float | None:
    """Distinct n-grams / all n-grams (1.0: no repeats); None with fewer than n tokens."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def longest_repeat_run(tokens: list[int], max_period: int = 32) -> int:
    """Length in tokens of the longest span made of >= 2 back-to-back copies of one n-gram
    (n <= max_period): ``a a a a`` -> 4, ``x a b a b a b`` -> 6, healthy prose -> 0 or 2.
    The default period reaches whole repeated sentences (a base model echoing a 9-token
    question line by line is a period-9 loop; 8 missed it)."""
    best = 0
    for p in range(1, max_period + 1):
        run = 0
        for i in range(p, len(tokens)):
            run = run + 1 if tokens[i] == tokens[i - p] else 0
            if run >= p:
                best = max(best, run + p)
    return best


def common_prefix(a: list[int], b: list[int]) -> int:
    """Number of leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
