"""MoE routing without a sort (engine/kernels/route.py) against plain torch.

References: ``route_topk_ref`` (softmax, k first-occurrence argmax passes: the documented tie
rule) and the engine's ``moe_route`` (``torch.softmax`` + ``torch.topk`` + renormalisation),
which promises no order among equal values: where values tie, the test holds the kernel to
the lowest-id rule and torch's choice to "the same values, and any expert it picks
differently ties with the k-th". Renormalisation per architecture comes from the spec table
(``engine.spec.MOE_NORM_TOPK``: qwen3moe and Mixtral-style llama renormalise, olmoe not).
On CPU the kernel runs in Triton's interpreter.
"""
from __future__ import annotations

import pytest
import torch

from engine.kernels.route import route_topk, route_topk_ref
from engine.model import moe_route
from engine.spec import MOE_NORM_TOPK


def torch_topk(logits, k, renorm):
    p, e = torch.softmax(logits.float(), -1).topk(k, dim=-1)
    if renorm:
        p = p / p.sum(-1, keepdim=True)
    return p, e


SHAPES = [(128, 8), (8, 3), (8, 2), (60, 4), (64, 1), (5, 5), (33, 7)]


@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("E,k", SHAPES)
def test_kernel_matches_references_on_random_logits(E, k, renorm):
    g = torch.Generator().manual_seed(E * 10 + k)
    logits = torch.randn(6, E, generator=g) * 3          # distinct values: no ties
    p, e = route_topk(logits, k, renorm)
    assert p.shape == e.shape == (6, k) and p.dtype == torch.float32 and e.dtype == torch.int64
    rp, re = route_topk_ref(logits, k, renorm)
    tp, te = torch_topk(logits, k, renorm)
    assert torch.equal(e, re) and torch.equal(e, te)      # same experts, same (descending) order
    assert (p - rp).abs().max().item() < 1e-6 and (p - tp).abs().max().item() < 1e-6
    if renorm:
        assert torch.allclose(p.sum(-1), torch.ones(6), atol=1e-6)
    # one row as [E] (the decode step's call)
    p1, e1 = route_topk(logits[2], k, renorm)
    assert p1.shape == (k,) and torch.equal(e1, e[2]) and torch.equal(p1, p[2])


@pytest.mark.parametrize("arch", sorted(MOE_NORM_TOPK))
def test_kernel_is_moe_route_after_the_router_matmul(arch):
    """``moe_route`` (what the eager and the unfused static step use) vs router matmul + kernel."""
    from engine.spec import ModelSpec
    spec = ModelSpec(arch=arch, name="t", n_layers=1, d_model=48, n_heads=2, n_kv_heads=1, head_dim=16,
                     d_ff=0, vocab_size=10, ctx_train=64, rope_base=1e4, rope_type="neox", rms_eps=1e-6,
                     qk_norm="none", n_experts=16, n_experts_used=4, d_ff_expert=8, moe_layers=(0,),
                     moe_norm_topk=MOE_NORM_TOPK[arch])
    g = torch.Generator().manual_seed(5)
    h, router = torch.randn(3, 48, generator=g), torch.randn(16, 48, generator=g)
    want_p, want_e = moe_route(spec, h, router)
    p, e = route_topk(h @ router.T, 4, spec.moe_norm_topk)
    assert torch.equal(e, want_e)
    assert (p - want_p).abs().max().item() < 1e-6
    if spec.moe_norm_topk:
        assert torch.allclose(p.sum(-1), torch.ones(3), atol=1e-6)
    else:                                                 # olmoe: the softmax's own mass of the k
        assert (p.sum(-1) < 1 - 1e-3).all()


def tied_logits():
    """Rows with ties: inside the top k, across the k-th boundary, and everywhere."""
    g = torch.Generator().manual_seed(11)
    rows = []
    x = torch.randn(32, generator=g)
    x[[3, 9]] = 5.0                       # a tie at the top (inside the top 4)
    rows.append(x)
    x = torch.randn(32, generator=g)
    x[[1, 7, 20, 30]] = 4.0               # four equal, top 2 taken from them: the boundary
    x[12] = 6.0
    rows.append(x)
    x = torch.zeros(32)                   # all equal
    rows.append(x)
    x = torch.randn(32, generator=g).round()   # many small-integer ties
    rows.append(x)
    return torch.stack(rows)


@pytest.mark.parametrize("renorm", [True, False])
def test_ties_go_to_the_lowest_id_and_torch_picks_equal_values(renorm):
    logits, k = tied_logits(), 4
    p, e = route_topk(logits, k, renorm)
    rp, re = route_topk_ref(logits, k, renorm)
    assert torch.equal(e, re) and (p - rp).abs().max().item() < 1e-6
    assert e[0].tolist()[:2] == [3, 9]                    # the tie at the top, lowest id first
    assert e[1].tolist()[:3] == [12, 1, 7]                # boundary tie: 1 and 7 of {1, 7, 20, 30}
    assert e[2].tolist() == [0, 1, 2, 3]                  # all equal: the first k
    assert torch.allclose(p[2], torch.full((k,), 1 / k if renorm else 1 / 32))
    tp, te = torch_topk(logits, k, renorm)
    for r in range(logits.shape[0]):
        # same values in the same order, whichever equal experts torch chose
        assert (p[r] - tp[r]).abs().max().item() < 1e-6
        kth = logits[r, e[r, -1]]
        for mine, theirs in zip(e[r].tolist(), te[r].tolist()):
            assert mine == theirs or logits[r, mine] == logits[r, theirs]
        assert set(te[r].tolist()) - set(e[r].tolist()) <= set((logits[r] == kth).nonzero().flatten().tolist())
    # without a tie at the boundary the set is identical (row 0: the tie is inside the top k)
    assert set(e[0].tolist()) == set(te[0].tolist())


def test_kernel_refuses_bad_shapes():
    with pytest.raises(ValueError, match=r"must be \[E\] or \[T, E\]"):
        route_topk(torch.zeros(2, 3, 4), 2, True)
    with pytest.raises(ValueError, match=r"k=9 must be in \[1, 8\]"):
        route_topk(torch.zeros(8), 9, True)


def test_kernel_reads_a_strided_row():
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(3, 40, generator=g)
    logits = wide[:, ::2]                                  # stride 2 along the experts
    p, e = route_topk(logits, 3, True)
    tp, te = torch_topk(logits, 3, True)
    assert torch.equal(e, te) and (p - tp).abs().max().item() < 1e-6
