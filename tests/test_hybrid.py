"""The hybrid: planner-driven trunk/tail split, plan vs runtime ledger, SLRU expert streaming.

References: the unsplit engine (a split must not change fp32 logits), the planner's own
arithmetic (runtime bytes per category must equal it), and the all-resident MoE run (a
streaming expert cache must not change logits)."""
from __future__ import annotations

import functools

import pytest
import torch

import engine
from engine.planner import plan as make_plan
from engine.planner import spec_for_model

IDS = list(range(300, 364))


spec_of = functools.lru_cache(maxsize=None)(spec_for_model)   # metadata only, once per model


@functools.lru_cache(maxsize=None)
def weights_of(model: str) -> str:
    """The weight format ``auto`` picks for ``model`` here, resolved once: auto follows the host
    RAM free at that moment (smollm2-moe is f32 only while 2 x 6.6 GiB are free), which other
    models loaded beside it move, so a budget priced in one format and a load in the other would
    disagree. Budgets and loads below use this one."""
    return make_plan(spec_of(model), device="cpu").weight_format


def budget_for(model: str, k: int, kv_dtype: str, ctx: int, slots_extra: int = 0) -> int:
    """A vram budget that fits exactly ``k`` trunk layers (priced by the planner itself)."""
    eng_spec = spec_of(model)
    p = make_plan(eng_spec, kv_dtype=kv_dtype, ctx=ctx, n_gpu_layers=k, device="cpu",
                  weight_format=weights_of(model))
    min_slots = min(eng_spec.n_experts_used, p.trunk_experts)
    return p.trunk.total - p.trunk.expert_cache + (min_slots + slots_extra) * p.expert_slot_bytes


@pytest.fixture(scope="module")
def smol_ref(smollm2_path):
    return engine.load(smollm2_path, ctx=128).logits(IDS)


@pytest.mark.parametrize("n_gpu", [0, 1, 15, 30])
def test_split_is_bit_identical_to_unsplit(smollm2_path, smol_ref, n_gpu):
    eng = engine.load(smollm2_path, ctx=128, n_gpu_layers=n_gpu)
    assert eng.plan.n_gpu_layers == n_gpu
    assert [str(d) for d in eng.model.layer_devices].count("cpu") == 30  # CPU machine: same path
    assert torch.equal(eng.logits(IDS), smol_ref)


@pytest.mark.parametrize("kv", ["bf16", "q8_0"])
def test_narrowing_applies_to_trunk_layers_only(smollm2_path, kv):
    eng = engine.load(smollm2_path, ctx=128, kv_dtype=kv, n_gpu_layers=12)
    assert eng.kv_dtypes == [kv] * 12 + ["fp32"] * 18
    assert eng.kv_dtypes == eng.plan.layer_kv_dtypes


def assert_plan_matches_runtime(eng):
    rows = eng.ledger.compare(eng.plan)
    bad = [r for r in rows if r.diff != 0]
    assert not bad, bad
    assert eng.ledger.unaccounted == 0
    assert eng.kv_dtypes == eng.plan.layer_kv_dtypes


@pytest.mark.parametrize("kv", ["fp32", "bf16", "q8_0"])
@pytest.mark.parametrize("model,k", [("smollm2-135m", 10), ("smollm2-135m", 20),
                                     ("smollm2-moe", 10), ("smollm2-moe", 20),
                                     ("tiny-qwen3moe", 1), ("tiny-qwen3moe", 2)])
@pytest.mark.slow(seconds=3)
def test_plan_equals_runtime_after_prefill_and_decode(model, k, kv):
    ctx = 96
    budget = budget_for(model, k, kv, ctx)
    eng = engine.load(model, ctx=ctx, kv_dtype=kv, vram_budget=budget, weight_format=weights_of(model))
    assert eng.plan.n_gpu_layers == k
    eng.prefill(IDS[:40])
    eng.decode(5)
    assert_plan_matches_runtime(eng)


def test_planted_fault_fp32_kv_under_q8_plan_is_caught(monkeypatch, smollm2_path):
    monkeypatch.setenv("KVBENCH_FAULT", "ignore_kv_dtype")
    eng = engine.load(smollm2_path, ctx=96, kv_dtype="q8_0", n_gpu_layers=10)
    assert eng.kv_dtypes[:10] == ["fp32"] * 10            # applied != requested: visible
    assert eng.kv_dtypes != eng.plan.layer_kv_dtypes
    kv = [r for r in eng.ledger.compare(eng.plan) if r.category == "kv" and r.tier == "trunk"][0]
    assert kv.runtime > kv.planned                          # the seed's bug, in bytes


def test_expert_cache_smaller_than_experts_gives_identical_logits():
    model = "tiny-qwen3moe"
    resident = engine.load(model, ctx=96)
    ref = resident.logits(IDS)
    spec = resident.spec
    all_experts = spec.n_experts * len(spec.moe_layers)
    assert resident.plan.expert_slots == all_experts        # fits-all: never evicts
    resident.logits(IDS)
    assert resident.expert_cache.stats()["evictions"] == 0
    k = spec.n_layers
    slots = all_experts * 3 // 4
    small = engine.load(model, ctx=96, vram_budget=budget_for(model, k, "fp32", 96,
                                                               slots - spec.n_experts_used))
    assert small.plan.n_gpu_layers == k and small.plan.expert_slots == slots < all_experts
    assert torch.equal(small.logits(IDS), ref)
    # decode streams experts step by step: logits still equal, and the cache now hits
    resident.prefill(IDS[:8])
    small.prefill(IDS[:8])
    for t in IDS[8:40]:
        assert torch.equal(small.decode(t), resident.decode(t))
    st = small.expert_cache.stats()
    print("expert cache:", {k: st[k] for k in ("capacity", "hits", "misses", "evictions", "hit_rate")})
    assert st["evictions"] > 0 and st["hits"] > 0 and st["bytes_moved"] > 0


@pytest.mark.parametrize("wf", ["bf16", "f16"])
def test_narrow_weight_storage_is_priced_and_applied(wf):
    eng = engine.load("tiny-qwen3moe", ctx=96, weight_format=wf, n_gpu_layers=2)
    assert eng.model.layers[0].wq.dtype == {"bf16": torch.bfloat16, "f16": torch.float16}[wf]
    assert eng.model.layers[0].attn_norm.dtype == torch.float32
    eng.logits(IDS[:20])
    assert_plan_matches_runtime(eng)


def test_unknown_weight_format_is_refused():
    with pytest.raises(engine.errors.ConfigError, match="weight_format"):
        engine.load("tiny-llama", weight_format="q4_k")


@pytest.fixture(scope="module")
def smollm2_moe():
    return engine.load("smollm2-moe", ctx=160, weight_format=weights_of("smollm2-moe"))


def test_smollm2_moe_answers_paris(smollm2_moe):
    tok = smollm2_moe.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    text = tok.decode(smollm2_moe.generate(ids, 16))
    print("smollm2-moe:", text)
    assert "Paris" in text


@pytest.mark.slow(seconds=30)
def test_smollm2_moe_streaming_cache_equals_resident(smollm2_moe):
    spec = smollm2_moe.spec
    ids = IDS[:24]
    ref = smollm2_moe.logits(ids)
    all_experts = spec.n_experts * spec.n_layers
    slots = all_experts // 2
    small = engine.load("smollm2-moe", ctx=160, n_gpu_layers=spec.n_layers, weight_format=weights_of("smollm2-moe"),
                        vram_budget=budget_for("smollm2-moe", spec.n_layers, "fp32", 160,
                                               slots - spec.n_experts_used))
    assert small.plan.expert_slots == slots
    assert torch.equal(small.logits(ids), ref)
    small.prefill(ids[:4])
    smollm2_moe.prefill(ids[:4])
    for t in ids[4:]:
        assert torch.equal(small.decode(t), smollm2_moe.decode(t))
    st = small.expert_cache.stats()
    print(f"smollm2-moe SLRU {slots}/{all_experts} slots: hit rate {st['hit_rate']:.2%}, "
          f"{st['evictions']} evictions, {st['bytes_moved'] / 2**20:.1f} MiB moved")
    assert st["evictions"] > 0 and st["hits"] > 0
