"""SLRU policy against a plainly written reference, hand-traced scenarios, and the slot store."""
from __future__ import annotations

import random
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import ConfigError
from engine.expert_cache import ExpertCache, SLRUPolicy
from engine.ledger import Ledger


class RefSLRU:
    """Reference: two OrderedDicts of keys (LRU first), nothing else."""

    def __init__(self, capacity, protected_fraction):
        self.cap, self.pcap = capacity, int(capacity * protected_fraction)
        self.prob, self.prot = OrderedDict(), OrderedDict()

    def access(self, key):
        if key in self.prot:
            self.prot.move_to_end(key)
            return True, None
        if key in self.prob:
            del self.prob[key]
            self.prot[key] = True
            if len(self.prot) > self.pcap:
                first = next(iter(self.prot))
                del self.prot[first]
                self.prob[first] = True
            return True, None
        victim = None
        if len(self.prob) + len(self.prot) == self.cap:
            seg = self.prob if self.prob else self.prot
            victim = next(iter(seg))
            del seg[victim]
        self.prob[key] = True
        return False, victim


@settings(max_examples=150, deadline=None)
@given(capacity=st.integers(1, 7), fraction=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
       seq=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 5)), max_size=120))
def test_policy_matches_reference(capacity, fraction, seq):
    pol, ref = SLRUPolicy(capacity, fraction), RefSLRU(capacity, fraction)
    where = {}                                   # key -> slot while resident
    for key in seq:
        hit, slot, evicted = pol.access(key)
        assert (hit, evicted) == ref.access(key)
        if hit:
            assert where[key] == slot            # a resident key keeps its slot
        else:
            if evicted is not None:
                assert where.pop(evicted) == slot   # the new key takes the victim's slot
            where[key] = slot
        assert list(pol.probation) == list(ref.prob) and list(pol.protected) == list(ref.prot)
        assert sorted(where.values()) == list(range(len(where)))   # slots 0..n-1, no sharing
        assert len(pol.protected) <= pol.protected_capacity
    assert pol.hits + pol.misses == len(seq)


def test_promotion_eviction_order_and_demotion_by_hand():
    pol = SLRUPolicy(4, 0.75)                    # protected holds 3
    assert [pol.access(k) for k in "ABCD"] == [(False, 0, None), (False, 1, None), (False, 2, None),
                                               (False, 3, None)]
    assert pol.access("A") == (True, 0, None)    # probationary hit -> protected
    assert list(pol.protected) == ["A"] and list(pol.probation) == ["B", "C", "D"]
    assert pol.access("E") == (False, 1, "B")    # probationary LRU goes first, its slot reused
    assert pol.access("C")[0] and pol.access("D")[0]
    assert list(pol.protected) == ["A", "C", "D"] and list(pol.probation) == ["E"]
    assert pol.access("E") == (True, 1, None)    # protected overflow: A demoted to probationary MRU
    assert list(pol.protected) == ["C", "D", "E"] and list(pol.probation) == ["A"]
    assert pol.access("C") == (True, 2, None)    # protected hit: moves to MRU, no demotion
    assert list(pol.protected) == ["D", "E", "C"]
    assert pol.access("F") == (False, 0, "A")
    assert pol.evictions == 2


def test_protected_tail_evicted_when_probationary_is_empty():
    pol = SLRUPolicy(2, 1.0)
    for k in "ABAB":
        pol.access(k)
    assert list(pol.probation) == [] and list(pol.protected) == ["A", "B"]
    assert pol.access("C") == (False, 0, "A")


def test_capacity_one():
    pol = SLRUPolicy(1)
    assert pol.protected_capacity == 0
    assert pol.access("A") == (False, 0, None)
    assert pol.access("A") == (True, 0, None)
    assert pol.access("B") == (False, 0, "A")
    assert pol.access("A") == (False, 0, "B")
    assert (pol.hits, pol.misses, pol.evictions) == (1, 3, 2)


def test_never_evicts_when_capacity_holds_every_key():
    keys = [(layer, e) for layer in range(3) for e in range(8)]
    pol = SLRUPolicy(len(keys))
    rng = random.Random(0)
    for _ in range(2000):
        assert pol.access(rng.choice(keys))[2] is None
    assert pol.evictions == 0 and pol.misses == len(keys) and pol.hits == 2000 - len(keys)


def test_stats_per_layer():
    pol = SLRUPolicy(8)
    for key in [(0, 1), (0, 1), (0, 2), (1, 5), (1, 5), (1, 5), (0, 1)]:
        pol.access(key)
    s = pol.stats()
    assert (s["hits"], s["misses"], s["evictions"]) == (4, 3, 0)
    assert s["per_layer"][0] == {"hits": 2, "misses": 2, "hit_rate": 0.5}
    assert s["per_layer"][1]["hit_rate"] == pytest.approx(2 / 3)
    assert pol.hit_rate() == pytest.approx(4 / 7) and pol.hit_rate(7) == 0.0


def test_bad_capacity():
    with pytest.raises(ConfigError, match="capacity 0"):
        SLRUPolicy(0)
    with pytest.raises(ConfigError, match="protected_fraction"):
        SLRUPolicy(4, 1.5)


def _host_experts(n_layers=3, E=6, ff=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(E, ff, d, generator=g), torch.randn(E, ff, d, generator=g),
             torch.randn(E, d, ff, generator=g)) for _ in range(n_layers)]


@pytest.mark.parametrize("capacity", [1, 3, 18])
def test_slot_store_serves_the_right_weights(capacity, device="cpu"):
    host = _host_experts()
    led = Ledger(device)
    cache = ExpertCache(SLRUPolicy(capacity), led, ((8, 16), (8, 16), (16, 8)))
    assert led.current("expert_cache") == capacity * 3 * 8 * 16 * 4
    layers = [cache.layer(i, *host[i]) for i in range(3)]
    rng = random.Random(1)
    for _ in range(200):
        i, e = rng.randrange(3), rng.randrange(6)
        got = layers[i].get(i, e)
        for j in range(3):
            assert got[j].device.type == torch.device(device).type
            assert torch.equal(got[j].cpu(), host[i][j][e])
    s = cache.stats()
    assert s["bytes_moved"] == s["misses"] * 3 * 8 * 16 * 4
    if capacity == 18:                               # every (layer, expert) fits
        assert s["evictions"] == 0 and s["misses"] <= 18
    else:
        assert s["evictions"] == s["misses"] - capacity


def test_slot_store_rejects_mismatched_host_tensors():
    cache = ExpertCache(SLRUPolicy(2), Ledger("cpu"), ((8, 16), (8, 16), (16, 8)))
    with pytest.raises(ConfigError, match="does not fit a slot"):
        cache.fetch(0, 0, (torch.zeros(8, 16), torch.zeros(8, 16), torch.zeros(8, 16)))
    with pytest.raises(ConfigError, match="does not fit a slot"):
        cache.fetch(0, 1, (torch.zeros(8, 16, dtype=torch.bfloat16),) * 2 + (torch.zeros(16, 8),))


@pytest.mark.gpu
def test_slot_store_on_cuda_with_pinned_host():
    host = [tuple(t.pin_memory() for t in layer) for layer in _host_experts()]
    led = Ledger("cuda")
    cache = ExpertCache(SLRUPolicy(4), led, ((8, 16), (8, 16), (16, 8)))
    for i, e in [(0, 1), (1, 2), (0, 1), (2, 5), (2, 4), (0, 3), (1, 2)]:
        got = cache.fetch(i, e, (host[i][0][e], host[i][1][e], host[i][2][e]))
        assert all(torch.equal(got[j].cpu(), host[i][j][e]) for j in range(3))
    assert cache.pinned_copies > 0 and cache.pageable_copies == 0
    assert led.unaccounted == 0


def test_one_token_moe_batched_equals_expert_loop():
    """The decode MoE (k experts stacked from their slots, batched matmuls) against the per-expert
    loop that prefill uses, on the same routed token; both fetch in ascending expert id, so the
    cache sees the same accesses."""
    import engine
    from engine import synth
    eng = engine.load(synth.ensure("tiny-qwen3moe"), ctx=32, vram_budget=None)
    m = eng.model
    i = sorted(eng.spec.moe_layers)[0]
    h = torch.randn(1, eng.spec.d_model, generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(h @ m.layers[i].router.T.float(), dim=-1)
    top_p, top_e = probs.topk(eng.spec.n_experts_used, dim=-1)
    if eng.spec.moe_norm_topk:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    batched = m._moe_one(i, h, top_p[0], top_e[0])
    loop = m.moe(i, torch.cat([h, h]))[:1]                 # T = 2 takes the loop
    assert (batched - loop).abs().max().item() < 1e-5
    assert batched.abs().max().item() > 1e-3                 # not trivially zero
