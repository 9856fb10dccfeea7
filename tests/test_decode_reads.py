"""``planner.decode_read_bytes``: what one decode token reads, held against the loaded engine's
own tensors (their ``nbytes``, not the planner's formulas): every layer matrix and norm, the k
routed experts' share of each stack (blocks on the trunk, the int4 packing on the host), the
K/V rows attended (a sliding window's at most), the head, one embedding row."""
from __future__ import annotations

import pytest

import engine
from engine import synth
from engine.errors import ConfigError
from engine.planner import decode_read_bytes


def _layer_bytes(eng, i):
    lw = eng.model.layers[i]
    return sum(t.nbytes for n, t in lw.owned())


def _kv_row_bytes(eng, i):
    c = eng.caches[i]
    return (c.k.nbytes + c.v.nbytes) // eng.ctx


@pytest.mark.parametrize("wf,kv", [("f32", "fp32"), ("q8_0", "q8_0")])
def test_dense_reads_are_the_tensors_bytes(wf, kv):
    eng = engine.load(synth.ensure("tiny-llama-q8_0"), weight_format=wf, kv_dtype=kv, ctx=64)
    r = decode_read_bytes(eng.plan, eng.spec, 10)
    t = r["trunk"]
    assert t["weights"] == sum(_layer_bytes(eng, i) for i in range(eng.spec.n_layers))
    assert t["kv"] == 10 * sum(_kv_row_bytes(eng, i) for i in range(eng.spec.n_layers))
    m = eng.model
    assert t["head"] == m.output.nbytes + m.out_norm.nbytes
    # token_embd is a host-tier buffer (the ledger's tiers; here the host is the device too)
    assert r["host"]["embed"] == r["host"]["total"] == m.embed.nbytes // eng.spec.vocab_size
    assert t["experts"] == t["embed"] == 0
    assert t["total"] == sum(v for k, v in t.items() if k != "total")
    with pytest.raises(ConfigError, match="depth -1"):
        decode_read_bytes(eng.plan, eng.spec, -1)


def test_moe_reads_k_experts_where_they_live():
    """coder30b-mini-synth, Q8_0 attention, Q4_0 experts in blocks, the first 2 MoE layers' on the
    host CPU: k/E of each trunk layer's block stacks, k/E of each host layer's int4 packing."""
    eng = engine.load(synth.ensure("coder30b-mini-synth"), weight_format="q8_0", expert_format="blocks",
                      cpu_moe=2, ctx=64)
    s = eng.spec
    r = decode_read_bytes(eng.plan, s, 0)
    frac = lambda n: n * s.n_experts_used // s.n_experts        # noqa: E731
    trunk = host = 0
    for i in s.moe_layers:
        ex = eng.model.layers[i].experts
        if eng.plan.layer_expert_tiers[i] == "cpu":
            host += frac(sum(t.nbytes for t in ex.tensors()[:4]))      # the packed form; blocks serve batches
        else:
            trunk += frac(sum(t.nbytes for t in ex.tensors()))
    assert host > 0 and trunk > 0
    assert r["trunk"]["experts"] == trunk and r["host"]["experts"] == host
    assert r["trunk"]["weights"] == sum(_layer_bytes(eng, i) for i in range(s.n_layers))   # router f32 included
    assert r["trunk"]["kv"] == 0 and r["host"]["weights"] == 0


def test_sliding_window_layers_read_at_most_their_window():
    eng = engine.load(synth.ensure("tiny-gemma3"), ctx=300)
    s = eng.spec
    deep = decode_read_bytes(eng.plan, s, 200)["trunk"]["kv"]
    want = sum(_kv_row_bytes(eng, i) * (min(200, s.window(i)) if s.window(i) else 200) for i in range(s.n_layers))
    assert deep == want and s.swa_layers
    assert deep < 200 * sum(_kv_row_bytes(eng, i) for i in range(s.n_layers))
