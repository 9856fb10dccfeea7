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
