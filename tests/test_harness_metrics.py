"""Metric maths against independent references (torch.nn.functional, numpy) on hand-made
tensors, and the text metrics on sequences whose answers follow from the definitions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.metrics import common_prefix, distinct_n, logit_stats, longest_repeat_run


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(300, 97, generator=g) * 3
    test = base + torch.randn(300, 97, generator=g) * 0.4
    targets = torch.randint(0, 97, (299,), generator=g)
    return base, test, targets


def test_kld_statistics_match_torch_and_numpy(pair):
    base, test, targets = pair
    st = logit_stats(base, test, top_k=5, targets=targets, rows=64).scalars
    # KL(base || test) per position via torch's own kl_div (input = log q, target = log p)
    kld = F.kl_div(F.log_softmax(test.double(), 1), F.log_softmax(base.double(), 1),
                   reduction="none", log_target=True).sum(1).numpy()
    assert st["Mean KLD"] == pytest.approx(kld.mean(), rel=1e-9)
    assert st["Maximum KLD"] == pytest.approx(kld.max(), rel=1e-9)
    assert st["Minimum KLD"] == pytest.approx(kld.min(), rel=1e-9)
    assert st["Median KLD"] == pytest.approx(np.percentile(kld, 50), rel=1e-9)
    assert st["99.0% KLD"] == pytest.approx(np.percentile(kld, 99), rel=1e-9)
    assert st["99.9% KLD"] == pytest.approx(np.percentile(kld, 99.9), rel=1e-9)


def test_top1_agreement_containment_and_abs(pair):
    base, test, targets = pair
    st = logit_stats(base, test, top_k=3, targets=targets)
    top_b = base.argmax(1)
    same = (top_b == test.argmax(1)).double().mean().item() * 100
    inside = np.mean([int(top_b[i]) in test[i].topk(3).indices.tolist() for i in range(len(base))]) * 100
    assert st.scalars["Same top p"] == pytest.approx(same)
    assert st.scalars["Top-1 in top-3"] == pytest.approx(inside)
    assert 0 < same < inside <= 100          # the noise is large enough to move some top-1s
    diff = (base - test).abs()
    assert st.scalars["Max abs logit diff"] == pytest.approx(diff.max().item(), rel=1e-6)
    assert st.scalars["Mean abs logit diff"] == pytest.approx(diff.mean().item(), rel=1e-6)
    assert st.series["max_abs"] == pytest.approx(diff.amax(1).tolist(), rel=1e-5)
    assert len(st.series["kld"]) == len(st.series["top1_rank"]) == 300


def test_ppl_ratio_matches_cross_entropy(pair):
    base, test, targets = pair
    st = logit_stats(base, test, top_k=5, targets=targets).scalars
    ce_b = F.cross_entropy(base[:-1].double(), targets)
    ce_t = F.cross_entropy(test[:-1].double(), targets)
    assert st["Mean PPL(base)"] == pytest.approx(math.exp(ce_b), rel=1e-9)
    assert st["Mean PPL(Q)/PPL(base)"] == pytest.approx(math.exp(ce_t - ce_b), rel=1e-9)
    pb = F.softmax(base[:-1].double(), 1).gather(1, targets[:, None])
    pt = F.softmax(test[:-1].double(), 1).gather(1, targets[:, None])
    assert st["RMS Δp"] == pytest.approx(100 * ((pt - pb) ** 2).mean().sqrt().item(), rel=1e-9)


def test_targets_with_gaps_are_skipped(pair):
    base, test, targets = pair
    t = targets.clone()
    t[10:20] = -1          # no known next token at these positions (e.g. ends of sequences)
    keep = t >= 0
    st = logit_stats(base[:-1], test[:-1], targets=t).scalars
    ce_b = F.cross_entropy(base[:-1][keep].double(), t[keep])
    assert st["Mean PPL(base)"] == pytest.approx(math.exp(ce_b), rel=1e-9)


def test_identical_logits_are_all_zero(pair):
    base, _, targets = pair
    st = logit_stats(base, base.clone(), targets=targets).scalars
    assert st["Max abs logit diff"] == 0 and st["Mean KLD"] == 0 and st["Maximum KLD"] == 0
    assert st["Same top p"] == 100 and st["Top-1 in top-5"] == 100
    assert st["Mean PPL(Q)/PPL(base)"] == 1.0


def test_text_metrics():
    assert distinct_n([1, 2, 3, 4]) == 1.0
    assert distinct_n([1, 1, 1, 1]) == pytest.approx(1 / 3)     # (1,1) x3 -> 1 distinct of 3
    assert distinct_n([7]) is None
    assert longest_repeat_run([1, 1, 1, 1]) == 4
    assert longest_repeat_run([9, 1, 2, 1, 2, 1, 2, 8]) == 6
    assert longest_repeat_run([5, 1, 2, 3, 1, 2, 3, 6]) == 6
    assert longest_repeat_run([1, 2, 3, 4, 5, 6]) == 0
    assert longest_repeat_run([1, 2, 3, 1, 2, 4]) == 0            # a repeat that is not back-to-back
    assert longest_repeat_run(list(range(9)) * 2) == 18           # a repeated 9-token line
    assert longest_repeat_run(list(range(9)) * 2, max_period=8) == 0
    assert longest_repeat_run(list(range(33)) * 2) == 0           # period 33 > max_period 32
    assert longest_repeat_run([7] + list(range(9)) * 5 + [0, 1, 5]) == 47   # 5 copies + 2 tokens of a 6th
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0
