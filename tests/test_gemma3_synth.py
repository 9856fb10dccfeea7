"""gemma3 stand-ins (engine.synth ``tiny-gemma3``, ``gemma3-synth``): the gemma3 path on a machine
that cannot fetch Gemma 3 (the GPU machine), checked against HF transformers.

``tiny-gemma3`` (5 sliding-window layers of window 8, one global; post-norms, GELU, scaled
embedding, query_pre_attn_scalar) loaded by our engine gives HF transformers' Gemma3 logits
(``tests/hf_oracle.py``: explicit Gemma3TextConfig, llama.cpp's 1 + w norms turned back into
HF's w) teacher-forced over 600 tokens, in one pass and in 100-token calls through ring KV
caches that wrap (ctx 1024 > window + 512-row chunk); ``gemma3-synth`` has Gemma-3-270M's
geometry (header only here: 18 layers, 15 of them sliding, 262144-token vocabulary).
"""
from __future__ import annotations

import torch

import engine
from engine import synth
from engine.kv_ring import RingKV
from hf_oracle import hf_logits, hf_model_for


def test_tiny_gemma3_matches_hf_with_wrapping_rings():
    path = synth.ensure("tiny-gemma3")
    toks = torch.randint(100, 40000, (600,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = hf_logits(hf_model_for(path), toks)
    eng = engine.load(path, kv_dtype="fp32", device="cpu", ctx=1024)
    assert [isinstance(c, RingKV) for c in eng.caches] == [True] * 5 + [False]
    one = eng.logits(toks)
    calls = eng.logits(toks, chunk=100)
    scale = ref.abs().max().item()
    print(f"tiny-gemma3 vs HF: one pass {(one - ref).abs().max().item():.2e}, "
          f"100-token calls {(calls - ref).abs().max().item():.2e} (|logit| {scale:.1f})")
    assert (one - ref).abs().max().item() < 1e-4 * scale
    assert (calls - ref).abs().max().item() < 1e-4 * scale


def test_gemma3_synth_has_gemma3_270m_geometry(tmp_path):
    path = synth.write_metadata_only("gemma3-synth", tmp_path / "g.gguf")
    from engine.gguf_io import open_gguf
    from engine.spec import ModelSpec
    s = ModelSpec.from_gguf(open_gguf(path))
    assert (s.arch, s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.vocab_size) == \
        ("gemma3", 18, 640, 4, 1, 256, 262144)
    assert s.sliding_window == 512 and len(s.swa_layers) == 15 and s.post_norms and s.embed_scale
    assert s == synth.spec_for("gemma3-synth")


def test_wave_prefill_check_compares_gemma3_global_layers(tmp_path):
    """gemma3-synth on the H200 (2026-12-04): the fp32 wave_prefill check said "the reference
    ran the same 13 waves" and measured nothing, because its sliding-window rings prefill in
    512-row chunks whatever the wave budget and the maximum over layers hid that the global
    layers' splits differed. Per-layer splits: here the global layer runs in 2 waves against
    1 (the rings in 3 chunks both times), so the check compares them (exact on the CPU), and
    says how many layers were split differently."""
    from harness.checks.wave_prefill import wave_budget_for
    from harness.results import load_results
    from harness.runner import Runner
    from harness.suite import parse_suite
    n = 1100
    mib = wave_budget_for(synth.spec_for("tiny-gemma3"), n, 2) / 2**20
    suite = parse_suite({"suite": {"name": "g3-waves", "models": ["tiny-gemma3"], "kv_dtypes": ["q8_0"],
                                   "device": "cpu", "ctx": 1152},
                         "check": [{"kind": "wave_prefill", "tokens": n, "compare_from": 1000,
                                    "wave_budget_mib": mib, "max_abs": {"fp32": 0.0, "q8_0": 3.5}}]})
    summary = Runner(suite, tmp_path / "r", progress=False).run()
    cases = {c["kv_dtype"]: c for c in summary.cases}
    assert cases["fp32"]["status"] == "pass", cases["fp32"]
    res = load_results(tmp_path / "r")
    info = res.info("tiny-gemma3", "fp32", "wave_prefill")
    assert info["layers_split_differently"] == "1 of 6"
    m = {r["metric"]: r for r in res.of_type("metric") if r["kv_dtype"] == "fp32"}
    assert m["Max abs logit diff"]["value"] == 0.0 and m["Waves"]["value"] == 3
