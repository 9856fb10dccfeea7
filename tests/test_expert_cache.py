"""SLRU policy against a plainly written reference, hand-traced scenarios, the slot store and
its resident mode (slot table, preloading, statistics of the device-routed path)."""
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
    """The decode MoE (the k experts read in place from their slots) against the per-expert
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


def test_victim_and_admit():
    pol = SLRUPolicy(3, 0.75)                    # protected holds 2
    assert pol.victim() is None                  # free slots: nothing would be evicted
    assert pol.admit("A") == 0 and (pol.hits, pol.misses) == (0, 0)   # not an access
    with pytest.raises(ValueError, match="already cached"):
        pol.admit("A")
    for k in "BC":
        pol.access(k)
    assert pol.victim() == "A"                   # probationary LRU
    pol.access("A")
    pol.access("B")                              # A, B protected; C probationary
    assert pol.victim() == "C"
    ref = RefSLRU(3, 0.75)
    for k in "ABCAB":
        ref.access(k)
    assert ref.access("D") == (False, "C")       # what the reference evicts next
    with pytest.raises(ConfigError, match="no free slot"):
        pol.admit("D")


def _cache_with_layers(capacity, n_layers=3, E=6):
    host = _host_experts(n_layers, E)
    cache = ExpertCache(SLRUPolicy(capacity), Ledger("cpu"), ((8, 16), (8, 16), (16, 8)))
    layers = [cache.layer(i, *host[i]) for i in range(n_layers)]
    return host, cache, layers


def test_make_resident_builds_a_table_of_every_expert():
    host, cache, layers = _cache_with_layers(18)
    assert cache.n_keys == 18 and cache.can_hold_all
    assert layers[0].resident_view() is None                 # not yet resident
    layers[1].get(1, 4)                                      # one miss before: keeps its slot
    slot_before = cache.policy.slot_of((1, 4))
    table = cache.make_resident()
    assert table.shape == (3, 6) and table.dtype == torch.int32
    assert sorted(table.flatten().tolist()) == list(range(18))          # a slot each, no sharing
    assert table[1, 4].item() == slot_before
    for i in range(3):
        gate, up, down, row = layers[i].resident_view()
        for e in range(6):
            s = row[e].item()
            assert torch.equal(gate[s], host[i][0][e]) and torch.equal(up[s], host[i][1][e])
            assert torch.equal(down[s], host[i][2][e])
    st = cache.stats()
    assert (st["misses"], st["hits"], st["preloaded"], st["evictions"]) == (1, 0, 17, 0)
    assert st["bytes_moved"] == 18 * 3 * 8 * 16 * 4
    assert cache.make_resident() is table                    # idempotent, nothing copied again
    assert cache.stats()["bytes_moved"] == st["bytes_moved"]
    with pytest.raises(ConfigError, match="after make_resident"):
        cache.layer(3, *host[0])


def test_resident_statistics():
    _, cache, layers = _cache_with_layers(18)
    layers[0].get(0, 1)
    layers[0].get(0, 1)                                       # host-routed: 1 miss, 1 hit
    cache.make_resident()
    cache.note_resident(5, 2)                                 # 5 device-routed tokens, k = 2
    st = cache.stats()
    assert st["resident_hits"] == 5 * 2 * 3 and st["resident_tokens"] == 5
    assert st["hits"] == 1 + 30 and st["misses"] == 1
    assert st["hit_rate"] == pytest.approx(31 / 32)
    assert st["per_layer"][0] == {"hits": 11, "misses": 1, "hit_rate": 11 / 12, "resident_hits": 10}
    assert st["per_layer"][2] == {"hits": 10, "misses": 0, "hit_rate": 1.0, "resident_hits": 10}


def test_make_resident_refuses_a_partial_cache():
    _, cache, layers = _cache_with_layers(17)
    assert not cache.can_hold_all
    assert "holds 17 of 18 trunk experts" in layers[0].resident_blocker("cpu")
    with pytest.raises(ConfigError, match="17 slots cannot hold the 18 experts"):
        cache.make_resident()


def test_slot_groups_end_before_a_token_evicts_its_own_expert():
    host, cache, layers = _cache_with_layers(3, n_layers=1, E=8)   # protected 2, probationary 1
    for e in (0, 1, 0, 1):
        layers[0].get(0, e)                                   # 0 and 1 protected
    groups = list(layers[0].slot_groups(0, [4, 5, 6]))       # three misses through one slot
    assert [pos for pos, _ in groups] == [[0], [1], [2]]
    groups = list(layers[0].slot_groups(0, [0, 1, 7]))       # hits, then one miss: one group
    assert [pos for pos, _ in groups] == [[0, 1, 2]]
    assert len(set(groups[0][1])) == 3
