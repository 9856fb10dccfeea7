"""benchmarks/bench_coder30b.py on a tiny MoE on CPU, and the ``weights_from`` reuse it relies on.

References: a fresh ``engine.load`` of the same configuration (plan, ledger and logits of a
reused engine must equal it bit for bit), the planner's prices (ledger compare), and the
expert geometry (bytes moved = misses x gate+up+down of one expert at bf16).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import weakref
from pathlib import Path

import pytest
import torch

import engine
from engine.errors import ConfigError
from engine.expert_cache import ExpertCache
from engine.planner import plan, spec_for_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-qwen3moe"


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_coder30b", ROOT / "benchmarks" / "bench_coder30b.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def streaming_budget(slots: int, ctx: int) -> int:
    """A budget that holds every layer (bf16) but only about ``slots`` experts (fp32 KV at ``ctx``)."""
    p = plan(spec_for_model(MODEL), kv_dtype="fp32", ctx=ctx, weight_format="bf16", device="cpu")
    return p.trunk.total - p.trunk.expert_cache + slots * p.expert_slot_bytes


def run_bench(capsys, tmp_path, *argv) -> tuple[dict, str]:
    mod = bench_module()
    ap = argparse.ArgumentParser()
    mod.add_cli_args(ap)
    out = tmp_path / "bench.json"
    assert mod.main(ap.parse_args([*argv, "--out", str(out)])) == 0
    text = capsys.readouterr().out
    return json.loads(out.read_text()), text


def test_bench_runs_the_matrix_on_cpu(capsys, tmp_path):
    budget = streaming_budget(10, 64)
    doc, text = run_bench(capsys, tmp_path, "--model", MODEL, "--device", "cpu", "--budgets", f"full,{budget}",
                          "--kv", "fp32,bf16,q8_0", "--contexts", "16,40", "--decode", "3", "--warmup", "1",
                          "--bw-bytes", "16MiB")
    last = json.loads(text.strip().splitlines()[-1])
    assert len(doc["cases"]) == len(last["cases"]) == 2 * 3 * 2 and not doc["skipped"] and not doc["failed"]
    spec = spec_for_model(MODEL)
    slot_bytes = 3 * spec.d_ff_expert * spec.d_model * 2      # gate, up, down of one expert at bf16
    for i, c in enumerate(doc["cases"]):
        assert c["fresh_load"] == (i == 0)                     # one file read, then reuse
        assert c["kv_dtypes_applied"] == [c["kv"]] and c["kv_applied_ok"]
        assert c["plan_vs_runtime_max_abs_diff"] == 0 and c["unaccounted"] == 0
        assert c["n_gpu_layers"] == spec.n_layers and c["prefill_tokens"] == c["context"]
        assert len(c["decode_samples_s"]) == 3 and c["decode_tok_s"] > 0 and c["prefill_tok_s"] > 0
        assert c["h2d_bytes_per_token"] * 3 == c["misses"] * slot_bytes
        assert c["hit_rate"] == c["hits"] / (c["hits"] + c["misses"])
        assert 0 < c["roofline_frac"] and c["bytes_per_token_device"] > 0
        if c["budget"] == "full":
            assert c["expert_slots"] == c["trunk_experts"] == spec.n_experts * spec.n_layers
            assert c["evictions"] == 0
        else:
            assert c["expert_slots"] < c["trunk_experts"] and c["evictions"] > 0
    assert "tg tok/s" in text and "H2D GB/s" in text


def test_max_seconds_skips_and_names_every_case(capsys, tmp_path):
    doc, text = run_bench(capsys, tmp_path, "--model", MODEL, "--device", "cpu", "--budgets", "full",
                          "--kv", "fp32,q8_0", "--contexts", "16", "--max-seconds", "0", "--bw-bytes", "1MiB")
    assert doc["cases"] == []
    assert [(s["budget"], s["kv"], s["context"]) for s in doc["skipped"]] == [("full", "fp32", 16), ("full", "q8_0", 16)]
    assert "skipped: full q8_0 ctx 16" in text


def test_weights_from_equals_a_fresh_load(monkeypatch):
    first = engine.load(MODEL, ctx=64, weight_format="bf16")
    budget = streaming_budget(9, 64)
    kw = dict(kv_dtype="q8_0", ctx=48, vram_budget=budget, weight_format="bf16")
    # the old KV and expert-cache buffers must be gone before the new ones are allocated (on a
    # GPU holding every expert, old + new slots would not fit)
    old = [weakref.ref(t) for t in first.expert_cache.slots + [b for c in first.caches for b in (c.k, c.v)]]
    alive_at_alloc = []
    init = ExpertCache.__init__

    def spy(self, *a, **k):
        alive_at_alloc.append(sum(r() is not None for r in old))
        init(self, *a, **k)
    monkeypatch.setattr(ExpertCache, "__init__", spy)
    reused = engine.load(MODEL, weights_from=first, **kw)
    monkeypatch.setattr(ExpertCache, "__init__", init)
    assert alive_at_alloc == [0]
    fresh = engine.load(MODEL, **kw)
    assert first.model is None                                  # taken over
    # equal plans, except what the host-RAM check read: a takeover counts the held weights
    strip = lambda d: {k: v for k, v in d.items() if k != "host_ram"}   # noqa: E731
    assert strip(reused.plan.to_dict()) == strip(fresh.plan.to_dict())
    assert reused.plan.host_ram.held > 0 == fresh.plan.host_ram.held
    assert (reused.plan.host_ram.need, reused.plan.host_ram.experts) == \
        (fresh.plan.host_ram.need, fresh.plan.host_ram.experts)
    assert 0 < reused.plan.expert_slots < reused.plan.trunk_experts
    assert all(r.diff == 0 for r in reused.ledger.compare(reused.plan))
    assert [tuple(r) for r in reused.ledger.compare(reused.plan)] == [tuple(r) for r in fresh.ledger.compare(fresh.plan)]
    assert reused.kv_dtypes == fresh.kv_dtypes == ["q8_0"] * fresh.spec.n_layers
    ids = list(range(300, 340))
    assert torch.equal(reused.logits(ids), fresh.logits(ids))
    assert reused.expert_cache.stats()["misses"] > 0
    with pytest.raises(ConfigError, match="already taken over"):
        engine.load(MODEL, weights_from=first, **kw)
    with pytest.raises(ConfigError, match="weights_from holds"):
        engine.load(MODEL, weights_from=reused, kv_dtype="fp32", ctx=48, weight_format="f32")
    with pytest.raises(ConfigError, match="weights_from: this plan puts 2 layers"):
        engine.load(MODEL, weights_from=reused, kv_dtype="fp32", ctx=48, weight_format="bf16", n_gpu_layers=2)
    assert reused.model is not None                              # a refused take-over leaves it intact
    again = engine.load(MODEL, weights_from=reused, kv_dtype="bf16", ctx=32, weight_format="bf16")
    assert again.kv_dtypes == ["bf16"] * again.spec.n_layers and again.plan.expert_slots == again.plan.trunk_experts
    assert all(r.diff == 0 for r in again.ledger.compare(again.plan))
