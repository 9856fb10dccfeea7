"""Planner: the seed's KV table, expert-cache budget, greedy packing, pinning, errors, CLI.

Expected byte counts are computed here by hand from the geometry (values x bytes per value),
not read back from the planner; per-layer tensor inventories are held against a real GGUF.
"""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from engine.errors import ConfigError, KVGeometryError, OutOfMemoryError
from engine.plan_cli import add_cli_args, main
from engine.planner import (DEFAULT_RESERVE, DEFAULT_WAVE_BUDGET, MiB, Plan, layer_tensors, parse_size, plan,
                            round_alloc)
from engine.spec import ModelSpec

GiB = 1 << 30


def coder30b_spec() -> ModelSpec:
    try:
        from engine.synth import spec_for
        return spec_for("coder30b-synth")
    except (ImportError, AttributeError):
        return ModelSpec(arch="qwen3moe", name="coder30b-geometry", n_layers=48, d_model=2048, n_heads=32,
                         n_kv_heads=4, head_dim=128, d_ff=0, vocab_size=151936, ctx_train=262144,
                         rope_base=1e7, rope_type="neox", rms_eps=1e-6, qk_norm="head", n_experts=128,
                         n_experts_used=8, d_ff_expert=768, moe_layers=tuple(range(48)))


def dense_spec(n_layers=30) -> ModelSpec:
    """SmolLM2-135M geometry (llama, 9 q heads, 3 kv heads x 64, ff 1536, tied output)."""
    return ModelSpec(arch="llama", name="smollm2-geometry", n_layers=n_layers, d_model=576, n_heads=9,
                     n_kv_heads=3, head_dim=64, d_ff=1536, vocab_size=49152, ctx_train=8192,
                     rope_base=1e5, rope_type="norm", rms_eps=1e-5, qk_norm="none", tied_output=True)


# Hand arithmetic (4 bytes per f32 value).
def coder_layer_resident_f32() -> int:
    d, q, kv, E, D = 2048, 32 * 128, 4 * 128, 128, 128
    matrices = q * d + kv * d + kv * d + d * q + E * d      # q, k, v, o, router
    norms = d + d + D + D                                  # attn_norm, ffn_norm, q_norm, k_norm
    return 4 * (matrices + norms)


def dense_layer_f32() -> int:
    d, q, kv, ff = 576, 576, 192, 1536
    return 4 * (q * d + 2 * kv * d + d * q + 3 * ff * d + 2 * d)


def dense_act(ubatch=512, head=False) -> int:
    d, q, kv, ff = 576, 576, 192, 1536
    return 4 * ubatch * (2 * d + 2 * q + 2 * kv + 2 * ff + (49152 if head else 0))


@pytest.mark.parametrize("kv,mib", [("fp32", 6144), ("bf16", 3072), ("q8_0", 1632)])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_seed_kv_table_coder30b(kv, mib, device):
    p = plan(coder30b_spec(), kv_dtype=kv, ctx=32768, vram_budget=80 * GiB, n_gpu_layers=48, device=device)
    assert p.n_gpu_layers == 48
    assert p.trunk.kv == mib * MiB          # exact: 48 x 2 x 32768 x 512 values x {4, 2, 34/32}
    assert p.host.kv == 0
    assert p.layer_kv_dtypes == [kv] * 48
    assert p.layer_kv_bytes == [mib * MiB // 48] * 48


@pytest.mark.parametrize("weight_format", ["f32", "bf16"])
def test_q8_0_more_than_doubles_the_expert_cache_at_12gib(weight_format):
    spec = coder30b_spec()
    fp32 = plan(spec, kv_dtype="fp32", ctx=32768, vram_budget=12 * GiB, device="cpu", weight_format=weight_format)
    q8 = plan(spec, kv_dtype="q8_0", ctx=32768, vram_budget=12 * GiB, device="cpu", weight_format=weight_format)
    assert fp32.n_gpu_layers == q8.n_gpu_layers == 48
    assert q8.trunk.kv == 1632 * MiB and fp32.trunk.kv == 6144 * MiB
    assert fp32.expert_slots > 0
    assert q8.trunk.expert_cache > 2 * fp32.trunk.expert_cache


def test_coder30b_bytes_by_hand():
    spec = coder30b_spec()
    budget = 12 * GiB
    p = plan(spec, kv_dtype="q8_0", ctx=32768, vram_budget=budget, device="cpu")
    slot = 3 * 768 * 2048 * 4
    head = 4 * (2048 + 151936 * 2048)
    assert p.expert_slot_bytes == slot
    assert p.layer_weight_bytes == [coder_layer_resident_f32()] * 48
    assert p.layer_expert_bytes == [128 * slot] * 48
    assert p.head_tier == "trunk"
    assert p.trunk.weights == 48 * coder_layer_resident_f32() + head
    act = 4 * 512 * (2 * 2048 + 2 * 4096 + 2 * 512 + 2 * 8 * 768 + 151936)
    assert p.scratch_items == {"wave": DEFAULT_WAVE_BUDGET, "activations": act}
    assert p.trunk.reserve == DEFAULT_RESERVE
    assert p.trunk.expert_cache == p.expert_slots * slot
    # whole slots, rounded down: one more slot would not fit
    assert 0 <= budget - p.trunk.total < slot
    # host: embedding + every routed expert; no tail layers
    assert p.host.weights == 4 * 151936 * 2048 + 48 * 128 * slot
    assert p.trunk_experts == 48 * 128


def test_budget_that_holds_every_expert_gives_exactly_all_slots():
    spec = coder30b_spec()
    p = plan(spec, kv_dtype="q8_0", ctx=4096, vram_budget=200 * GiB, device="cpu")
    assert p.expert_slots == 48 * 128
    cpu_default = plan(spec, kv_dtype="q8_0", ctx=4096, device="cpu")
    assert cpu_default.expert_slots == 48 * 128 and cpu_default.free_bytes == 0


def test_layer_inventory_matches_real_gguf(smollm2_path):
    from engine.gguf_io import open_gguf
    g = open_gguf(smollm2_path)
    spec = ModelSpec.from_gguf(g)
    for i in (0, spec.n_layers - 1):
        ours = {t.name: t.shape for t in layer_tensors(spec, i)}
        theirs = {n: g.shape(n) for n in g.tensors if n.startswith(f"blk.{i}.")}
        assert ours == theirs
    p = plan(spec, ctx=256, device="cpu")
    file_bytes = [4 * sum(int(_prod(g.shape(n))) for n in g.tensors if n.startswith(f"blk.{i}."))
                  for i in range(spec.n_layers)]
    assert p.layer_weight_bytes == file_bytes == [dense_layer_f32()] * spec.n_layers


def _prod(shape):
    out = 1
    for s in shape:
        out *= s
    return out


def test_greedy_packing_fits_exactly_k_layers():
    spec = dense_spec()
    ctx, k = 1024, 11
    kv32, kvq8 = 2 * ctx * 192 * 4, 2 * ctx * 192 * 34 // 32
    essentials = DEFAULT_RESERVE + DEFAULT_WAVE_BUDGET + dense_act()
    budget = essentials + k * (dense_layer_f32() + kvq8)
    p = plan(spec, kv_dtype="q8_0", ctx=ctx, vram_budget=budget, device="cpu")
    assert p.n_gpu_layers == k and p.free_bytes == 0
    assert p.layer_tiers == ["trunk"] * k + ["host"] * (30 - k)
    assert p.layer_kv_dtypes == ["q8_0"] * k + ["fp32"] * (30 - k)
    assert p.trunk.kv == k * kvq8 and p.host.kv == (30 - k) * kv32
    assert p.head_tier == "host"
    assert plan(spec, kv_dtype="q8_0", ctx=ctx, vram_budget=budget - 1, device="cpu").n_gpu_layers == k - 1
    # fp32 KV costs more per layer: the same budget holds fewer layers
    fewer = plan(spec, kv_dtype="fp32", ctx=ctx, vram_budget=budget, device="cpu").n_gpu_layers
    assert fewer == (budget - essentials) // (dense_layer_f32() + kv32) < k


def test_head_joins_the_trunk_only_when_all_layers_and_it_fit():
    spec = dense_spec(n_layers=4)
    ctx = 512
    kvq8 = 2 * ctx * 192 * 34 // 32
    layers = DEFAULT_RESERVE + DEFAULT_WAVE_BUDGET + dense_act() + 4 * (dense_layer_f32() + kvq8)
    p = plan(spec, kv_dtype="q8_0", ctx=ctx, vram_budget=layers, device="cpu")
    assert p.n_gpu_layers == 4 and p.head_tier == "host"
    # tied head on the trunk = output_norm + its own copy of token_embd, logits in the arena
    with_head = layers + 4 * (576 + 49152 * 576) + (dense_act(head=True) - dense_act())
    p = plan(spec, kv_dtype="q8_0", ctx=ctx, vram_budget=with_head, device="cpu")
    assert p.head_tier == "trunk" and p.free_bytes == 0
    assert p.host.weights == 4 * 49152 * 576         # token_embd only


def test_pinning_reprices_and_overcommit_is_an_error():
    spec = dense_spec()
    ctx = 1024
    kv32, kvq8 = 2 * ctx * 192 * 4, 2 * ctx * 192 * 34 // 32
    p = plan(spec, kv_dtype="q8_0", ctx=ctx, vram_budget=40 * GiB, n_gpu_layers=7, device="cpu")
    assert p.n_gpu_layers == 7
    assert p.trunk.weights == 7 * dense_layer_f32()
    assert p.trunk.kv == 7 * kvq8 and p.host.kv == 23 * kv32
    assert p.host.weights == 23 * dense_layer_f32() + 4 * (49152 * 576 + 576)   # tail + embd + out norm
    zero = plan(spec, kv_dtype="q8_0", ctx=ctx, vram_budget=1, n_gpu_layers=0, device="cpu")
    assert zero.n_gpu_layers == 0 and zero.trunk.total == zero.trunk.reserve and zero.host.kv == 30 * kv32
    budget = DEFAULT_RESERVE + DEFAULT_WAVE_BUDGET + dense_act() + 5 * (dense_layer_f32() + kvq8)
    with pytest.raises(OutOfMemoryError) as e:
        plan(spec, kv_dtype="q8_0", ctx=ctx, vram_budget=budget, n_gpu_layers=9, device="cpu")
    msg = str(e.value)
    assert "n_gpu_layers=9" in msg and "--n-gpu-layers 5" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"n_gpu_layers 31 must be an integer in \[0, 30\]"):
        plan(spec, n_gpu_layers=31, device="cpu")


def test_moe_packing_keeps_room_for_the_active_experts():
    spec = coder30b_spec()
    ctx, k = 4096, 10
    slot = 3 * 768 * 2048 * 4
    kvq8 = 2 * ctx * 512 * 34 // 32
    act = 4 * 512 * (2 * 2048 + 2 * 4096 + 2 * 512 + 2 * 8 * 768)
    budget = DEFAULT_RESERVE + DEFAULT_WAVE_BUDGET + act + k * (coder_layer_resident_f32() + kvq8) + 8 * slot
    p = plan(spec, kv_dtype="q8_0", ctx=ctx, vram_budget=budget, device="cpu")
    assert (p.n_gpu_layers, p.expert_slots, p.free_bytes) == (k, 8, 0)
    assert p.layer_weight_bytes[k] == coder_layer_resident_f32() + 0      # tail: resident part
    assert p.host.weights == (4 * 151936 * 2048 + 4 * (2048 + 151936 * 2048)
                              + (48 - k) * coder_layer_resident_f32() + 48 * 128 * slot)
    assert plan(spec, kv_dtype="q8_0", ctx=ctx, vram_budget=budget - 1, device="cpu").n_gpu_layers == k - 1


def test_tiny_budget_names_the_numbers_and_the_fix():
    with pytest.raises(OutOfMemoryError) as e:
        plan(coder30b_spec(), kv_dtype="q8_0", ctx=32768, vram_budget=100 * MiB, device="cpu")
    msg = str(e.value)
    assert "100.00 MiB" in msg and "reserve 256.00 MiB" in msg and "--vram-budget" in msg
    assert "\n" not in msg


def test_bad_settings():
    spec = coder30b_spec()
    with pytest.raises(ConfigError, match="kv_dtype 'q4_0'"):
        plan(spec, kv_dtype="q4_0", device="cpu")
    with pytest.raises(ConfigError, match="ctx 0"):
        plan(spec, ctx=0, device="cpu")
    with pytest.raises(ConfigError, match="weight_format"):
        plan(spec, weight_format="int3", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="pass vram_budget"):
            plan(spec, device="cuda")
    odd = ModelSpec(arch="llama", name="odd", n_layers=2, d_model=48, n_heads=2, n_kv_heads=1, head_dim=24,
                    d_ff=64, vocab_size=100, ctx_train=64, rope_base=1e4, rope_type="norm", rms_eps=1e-5,
                    qk_norm="none")
    with pytest.raises(KVGeometryError, match="head_dim % 32"):
        plan(odd, kv_dtype="q8_0", device="cpu")


def test_round_alloc_rule():
    assert [round_alloc(n, "cpu") for n in (0, 1, 513, 10**9 + 7)] == [0, 1, 513, 10**9 + 7]
    assert [round_alloc(n, "cuda") for n in (0, 1, 511, 512, 513, 1025)] == [0, 512, 512, 512, 1024, 1536]
    # on CUDA an odd KV buffer is priced rounded, per buffer (K and V)
    spec = dense_spec(n_layers=1)
    p = plan(spec, kv_dtype="bf16", ctx=3, vram_budget=40 * GiB, n_gpu_layers=1, device="cuda")
    assert p.trunk.kv == 2 * 1536                     # 3 x 192 x 2 = 1152 B -> 1536 per buffer


def test_round_alloc_odd_buffer_on_cuda_plan():
    spec = dense_spec(n_layers=1)
    p = plan(spec, kv_dtype="fp32", ctx=5, vram_budget=40 * GiB, n_gpu_layers=1, device="cuda")
    assert p.trunk.kv == 2 * 4096                     # 5 x 192 x 4 = 3840 B -> 4096 per buffer
    # matrices are 512-aligned; each 576-float norm (2304 B) takes 2560 B
    assert p.layer_weight_bytes == [dense_layer_f32() + 2 * (2560 - 2304)]


def test_plan_json_roundtrip():
    p = plan(coder30b_spec(), kv_dtype="bf16", ctx=8192, vram_budget=12 * GiB, device="cpu")
    d = json.loads(json.dumps(p.to_dict()))
    assert Plan.from_dict(d) == p
    assert d["free_bytes"] == p.free_bytes


def test_parse_size():
    assert parse_size("12GiB") == 12 * GiB
    assert parse_size("12GB") == 12 * 10**9
    assert parse_size("500MiB") == 500 * MiB
    assert parse_size("1.5G") == 3 * GiB // 2
    assert parse_size("4096") == 4096
    for bad in ("12 parsecs", "GiB", "-1GiB", ""):
        with pytest.raises(ConfigError, match="cannot read"):
            parse_size(bad, "--vram-budget")


def _run_cli(capsys, *argv):
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    rc = main(parser.parse_args(list(argv)))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_banner_and_json_coder30b_synth(capsys):
    pytest.importorskip("engine.synth")
    # a what-if plan for a machine with enough host RAM (--host-ram vouches for one)
    rc, out, _ = _run_cli(capsys, "coder30b-synth", "--kv-dtype", "q8_0", "--ctx", "32768",
                          "--vram-budget", "12GiB", "--device", "cpu", "--host-ram", "256GiB")
    assert rc == 0
    assert "offloaded 48/48 layers" in out and "KV q8_0: 1632.00 MiB" in out
    assert "expert cache:" in out and "/6144 slots" in out
    assert "weights bf16 (auto: f32 would need" in out and ": fits;" in out
    # a decode token's reads at depth 0 and at ctx: the KV (q8_0, 34 bytes a 32 values) is the difference
    assert "decode reads at depth 0 (trunk)" in out and "decode reads at depth 32768 (trunk)" in out
    assert "KV 1632.00 MiB, head" in out
    rc, out, _ = _run_cli(capsys, "coder30b-synth", "--kv-dtype", "fp32", "--ctx", "32768",
                          "--vram-budget", "12GiB", "--device", "cpu", "--json", "--host-ram", "256GiB")
    d = json.loads(out)
    assert rc == 0 and d["trunk"]["kv"] == 6144 * MiB and d["n_gpu_layers"] == 48
    assert d["weight_format"] == "bf16" and d["host_ram"]["fits"] is True
    reads = d["decode_reads"]
    assert [r["depth"] for r in reads] == [0, 32768] and reads[1]["trunk"]["kv"] == 6144 * MiB
    # the same plan on a 24 GiB box: printed, then refused in one line with the numbers (exit 2)
    rc, out, err = _run_cli(capsys, "coder30b-synth", "--ctx", "32768", "--vram-budget", "12GiB",
                            "--device", "cpu", "--host-ram", "24GiB")
    assert rc == 2 and "DOES NOT FIT" in out and err.count("\n") == 1
    assert err.startswith("error: host RAM: coder30b-synth with bf16 weights on cpu needs ")
    assert "routed experts 54.00 GiB" in err and "but 24.00 GiB available (host_ram argument)" in err
    rc, _, err = _run_cli(capsys, "coder30b-synth", "--vram-budget", "10MiB", "--device", "cpu")
    assert rc == 2 and err.startswith("error: vram budget 10.00 MiB is below") and "essentials" in err


def test_cli_prices_experts_in_blocks(capsys):
    """--expert-blocks / --cpu-moe: llama.cpp's placement priced from metadata; the banner says
    how many MoE layers' experts sit where; a count that does not fit names the fewest that do."""
    rc, out, _ = _run_cli(capsys, "coder30b-synth", "--kv-dtype", "q8_0", "--vram-budget", "12GiB", "--device",
                          "cpu", "--weight-format", "bf16", "--host-ram", "100GiB", "--expert-blocks", "q4_0",
                          "--cpu-moe", "auto", "--json")
    d = json.loads(out)
    n = d["cpu_moe"]
    assert rc == 0 and 0 < n < 48 and d["n_gpu_layers"] == 48 and d["trunk"]["expert_cache"] == 0
    assert d["layer_expert_tiers"] == ["cpu"] * n + ["trunk"] * (48 - n)
    rc, out, _ = _run_cli(capsys, "coder30b-synth", "--kv-dtype", "q8_0", "--vram-budget", "12GiB", "--device",
                          "cpu", "--weight-format", "bf16", "--host-ram", "100GiB", "--expert-blocks", "q4_0")
    assert rc == 0 and f"experts in q4_0 blocks (cpu_moe auto -> {n}): {48 - n} MoE layers on the trunk" in out
    rc, _, err = _run_cli(capsys, "coder30b-synth", "--kv-dtype", "q8_0", "--vram-budget", "12GiB", "--device",
                          "cpu", "--weight-format", "bf16", "--expert-blocks", "q4_0", "--cpu-moe", str(n - 1))
    assert rc == 2 and f"use cpu_moe={n} (--cpu-moe {n}), the fewest that fit" in err and err.count("\n") == 1
    rc, _, err = _run_cli(capsys, "coder30b-synth", "--expert-blocks", "q4_0", "--cpu-moe", "some")
    assert rc == 2 and "--cpu-moe 'some' is not auto or a count" in err


def test_cli_on_a_real_gguf_and_bad_size(capsys, smollm2_path):
    rc, out, _ = _run_cli(capsys, str(smollm2_path), "--kv-dtype", "q8_0", "--ctx", "4096",
                          "--vram-budget", "1GiB", "--device", "cpu", "--json")
    d = json.loads(out)
    assert rc == 0 and d["n_gpu_layers"] == 30
    assert d["trunk"]["kv"] == 30 * 2 * 4096 * 192 * 34 // 32
    rc, out, err = _run_cli(capsys, str(smollm2_path), "--vram-budget", "12 parsecs")
    assert rc == 2 and out == ""
    assert err.startswith("error: --vram-budget: cannot read '12 parsecs'") and err.count("\n") == 1


@pytest.mark.parametrize("host,needle", [("cpu", "on the host CPU"), ("pcie", "read in place by the GPU over PCIe"),
                                         ("dma", "copied to the GPU by DMA")])
def test_cli_prices_each_host_experts_mode(capsys, host, needle):
    """engine plan --host-experts: the blocks alone on the host for pcie/dma (no int4 packing),
    a staging stack on the trunk for dma only, and the same cpu_moe count at the same budget."""
    rc, out, _ = _run_cli(capsys, "coder30b-synth", "--kv-dtype", "bf16", "--vram-budget", "12GiB", "--device", "cpu",
                          "--host-ram", "256GiB", "--expert-blocks", "q4_0", "--cpu-moe", "auto",
                          "--weight-format", "q8_0", "--host-experts", host, "--json")
    d = json.loads(out)
    assert rc == 0 and d["host_experts"] == host
    tiers = [t for t in d["layer_expert_tiers"] if t]
    assert tiers.count(host) == d["cpu_moe"] > 0 and set(tiers) == {host, "trunk"}
    assert ("expert_staging" in d["scratch_items"]) == (host == "dma")
    per_layer = {t: b for t, b in zip(d["layer_expert_tiers"], d["layer_expert_bytes"]) if t == host}[host]
    from engine import planner
    spec = planner.spec_for_model("coder30b-synth")
    blocks = sum(planner.expert_block_buffers(spec, "q4_0"))
    assert per_layer == (planner.cpu_expert_bytes(spec) if host == "cpu" else blocks)
    rc, out, _ = _run_cli(capsys, "coder30b-synth", "--kv-dtype", "bf16", "--vram-budget", "12GiB", "--device", "cpu",
                          "--host-ram", "256GiB", "--expert-blocks", "q4_0", "--cpu-moe", "auto",
                          "--weight-format", "q8_0", "--host-experts", host)
    assert needle in out
