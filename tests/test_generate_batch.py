"""Several sequences decoded together (``Engine.generate_batch``, ``Transformer.forward_rows``)
and the CPU decode step's one-row attention (``decode_rows_ref``), against independent
references.

Oracles: a float64 softmax(QK^T)V over what the cache holds (gguf's Q8_0 dequantization), the
blocked prefill reference (``prefill_attention_ref``, the path the decode step took before),
and each sequence decoded alone through ``Engine.generate`` / ``Transformer.forward`` (held to
HF transformers in test_engine.py / test_hf_parity.py).
"""
from __future__ import annotations

import os

if not __import__("torch").cuda.is_available():          # before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gg_dequantize

import engine
from engine import kv as kvmod, synth
from engine.errors import ConfigError
from engine.kernels.prefill_attention import decode_rows_ref

FORMATS = [("fp32", "fp32"), ("bf16", "bf16"), ("q8_0", "q8_0"), ("q8_0", "bf16")]


def _held(cache, buf, fmt):
    """What a buffer holds as float32 [rows, Hkv, D], decoded independently (gguf for q8_0)."""
    if fmt == "q8_0":
        k, v = cache.to_ggml_blocks()
        raw = k if buf is cache.k else v
        x = gg_dequantize(raw.numpy(), QT.Q8_0)
        return torch.from_numpy(x).reshape(cache.max_tokens, cache.n_kv_heads, cache.head_dim)
    return buf.float()


def _oracle(q, k, v, pos, scale, window=None):
    """float64 attention of one row q [Hq, D] at ``pos`` over k, v [rows, Hkv, D]."""
    g = q.shape[0] // k.shape[1]
    lo = 0 if window is None else max(0, pos - window + 1)
    kk = k[lo:pos + 1].double().repeat_interleave(g, 1)        # [L, Hq, D]
    vv = v[lo:pos + 1].double().repeat_interleave(g, 1)
    s = torch.einsum("hd,nhd->hn", q.double(), kk) * scale
    return torch.einsum("hn,nhd->hd", s.softmax(-1), vv).float()


@pytest.mark.parametrize("fmt,vfmt", FORMATS)
@pytest.mark.parametrize("window", [None, 40])
def test_decode_rows_ref_matches_float64_oracle_and_the_blocked_reference(fmt, vfmt, window):
    torch.manual_seed(1)
    hkv, hq, d, n = 3, 9, 64, 300          # 300 rows: past the blocked reference's first key block
    cache = kvmod.LayerKV(0, hkv, d, n, fmt, v_dtype=vfmt)
    cache.write(0, torch.randn(n, hkv, d), torch.randn(n, hkv, d))
    ks, vs = _held(cache, cache.k, fmt), _held(cache, cache.v, vfmt)
    for pos in (0, 5, 39, 150, 299):
        q = torch.randn(1, hq, d)
        got, scratch = decode_rows_ref(q, cache.k, cache.v, fmt, pos, d ** -0.5, hkv, window=window, v_fmt=vfmt)
        torch.testing.assert_close(got[0], _oracle(q[0], ks, vs, pos, d ** -0.5, window), atol=2e-6, rtol=1e-5)
        cache.decode_fast = False                       # the blocked reference's 128-row chunk
        blocked = cache.attend(q, pos, d ** -0.5, window=window)
        cache.decode_fast = True
        fast = cache.attend(q, pos, d ** -0.5, window=window)
        assert torch.equal(fast, got) and scratch > 0
        torch.testing.assert_close(fast, blocked, atol=1e-6, rtol=1e-6)


def _prompts(vocab: int, lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("model,kv", [("tiny-llama", "q8_0"), ("tiny-qwen3moe", "fp32"),
                                      ("tiny-gemma3", "k-q8_0.v-bf16"), ("tiny-olmoe", "bf16")])
def test_forward_rows_equals_each_sequence_alone(model, kv):
    """B sequences at different positions, fed the same tokens: each row of ``forward_rows``
    equals that sequence's own ``forward`` (up to the B-row matmuls' summation order), rows
    outside ``live`` change no other row, and the sequence caches end up with the same bytes.
    tiny-gemma3's sliding-window layers (window 8) run in rings (8 + 512 rows) past 520 rows."""
    ring = model == "tiny-gemma3"
    eng = engine.load(synth.ensure(model), kv_dtype=kv, ctx=1024 if ring else 256)
    m, spec = eng.model, eng.spec
    prompts = _prompts(spec.vocab_size, (560, 20, 300) if ring else (150, 20, 90))
    n = 600 if ring else 200

    def caches():
        return [[kvmod.make_layer_kv(spec, i, n, k, "cpu", v_dtype=v) for i, (k, v) in enumerate(eng._wanted_formats)]
                for _ in prompts]
    rows, alone = caches(), caches()
    assert [tuple(c.kv_dtypes) for c in rows[0]] == eng.kv_formats
    if model == "tiny-gemma3":
        assert any(type(c).__name__ == "RingKV" for c in rows[0])
    with torch.inference_mode():
        for b, p in enumerate(prompts):
            m.forward(torch.tensor(p), 0, rows[b])
            m.forward(torch.tensor(p), 0, alone[b])
        pos = [len(p) for p in prompts]
        g = torch.Generator().manual_seed(7)
        for step in range(4):
            toks = torch.randint(3, spec.vocab_size, (len(prompts),), generator=g)
            live = [0, 1, 2] if step < 2 else [0, 2]          # sequence 1 "stopped" after two steps
            got = m.head(m.forward_rows(toks, pos, rows, live))
            for b in live:
                want = m.head(m.forward(toks[b:b + 1], pos[b], alone[b]))[0]
                torch.testing.assert_close(got[b], want, atol=1e-4, rtol=1e-4)
            if step == 3:       # a dead row is carried, not attended: the others do not move
                again = m.head(m.forward_rows(toks, pos, [[c for c in cs] for cs in rows], [0, 2]))
                torch.testing.assert_close(again[[0, 2]], got[[0, 2]], atol=1e-5, rtol=1e-5)
            for b in live:
                pos[b] += 1
    for b in (0, 2):         # the decoded rows were stored at the right positions, in the right format
        for x, y, (kf, vf) in zip(rows[b], alone[b], eng._wanted_formats):
            if type(x).__name__ == "LayerKV":
                for bx, by, f in ((x.k, y.k, kf), (x.v, y.v, vf)):
                    torch.testing.assert_close(_held(x, bx, f)[:pos[b]], _held(y, by, f)[:pos[b]],
                                               atol=0.05, rtol=0.02)


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return {kv: engine.load(smollm2_path, kv_dtype=kv, ctx=512) for kv in ("fp32", "q8_0")}


CHAT = ["What is the capital of France?", "What is 7 times 8?",
        "Write a Python function that reverses a string.", "List three colours of the rainbow.",
        "Translate 'good morning' into Spanish."]


@pytest.mark.slow(seconds=40)
@pytest.mark.parametrize("kv", ["fp32", "q8_0"])
def test_generate_batch_gives_generates_answers_on_smollm2(smol, kv):
    eng = smol[kv]
    prompts = [eng.tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)
               for c in CHAT]
    want, reasons = [], []
    for p in prompts:
        want.append(eng.generate(p, 16))
        reasons.append(eng.last_stop_reason)
    got = eng.generate_batch(prompts, 16)
    run = eng.last_generate_batch
    print(kv, run, reasons)
    assert got == want and eng.last_stop_reasons == reasons
    assert run["path"] == "batched" and run["batches"] == [len(prompts)] and run["decode_steps"] == 15
    assert "eos" in reasons or kv == "q8_0"     # at least one answer stops early (rows carried)
    assert "Paris" in eng.tokenizer.decode(got[0]) or kv == "q8_0"


def test_generate_batch_packs_its_caches_into_the_wave_budget(smollm2_path):
    """The batches' caches fit the prefill scratch the plan prices (wave_budget_bytes)."""
    per_row = 30 * 2 * 3 * 64 * 2                       # smollm2: 30 layers, K+V, 3 x 64 bf16
    tok = engine.load(smollm2_path, kv_dtype="bf16", ctx=256).tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)
               for c in CHAT[:3]]
    rows = max(len(p) for p in prompts) + 6
    # room for the caches of two sequences, not three
    eng = engine.load(smollm2_path, kv_dtype="bf16", ctx=256, wave_budget_bytes=2 * rows * per_row)
    got = eng.generate_batch(prompts, 6, stop_at_eos=False)
    run = eng.last_generate_batch
    assert run["batches"] == [2, 1] and 0 < run["cache_bytes"] <= eng.wave_budget_bytes
    assert got == [eng.generate(p, 6, stop_at_eos=False) for p in prompts]
    assert eng.last_stop_reasons == ["length"] * 3
    with pytest.raises(ConfigError, match="at least one token"):
        eng.generate_batch([prompts[0], []], 4)
    with pytest.raises(engine.errors.ContextOverflowError):
        eng.generate_batch([prompts[0] * 10], 4)


def test_generate_batch_runs_one_by_one_on_the_static_path():
    """The static / CUDA-graph step holds one sequence: there the prompts go through generate."""
    from engine import kernels
    prev = kernels.set_backend("triton")           # static decode needs the Triton kernels
    try:
        eng = engine.load(synth.ensure("tiny-llama"), kv_dtype="q8_0", ctx=64)
        prompts = _prompts(eng.spec.vocab_size, (9, 4))
        eng.set_decode_mode("static")
        got = eng.generate_batch(prompts, 3, stop_at_eos=False)
        assert eng.last_generate_batch["path"] == "sequential"
        assert eng.last_generate_batch["decode_path"] == "static"
        assert got == [eng.generate(p, 3, stop_at_eos=False) for p in prompts]
    finally:
        kernels.set_backend(prev)


def test_generate_batch_refuses_caches_unlike_the_engines(smollm2_path):
    eng = engine.load(smollm2_path, kv_dtype="q8_0", ctx=128)
    eng._wanted_formats = [("bf16", "bf16")] * eng.spec.n_layers     # a stale plan: never silently run
    p = eng.tokenizer.encode("Hello there")
    with pytest.raises(RuntimeError, match="generate_batch: its caches hold"):
        eng.generate_batch([p, p], 3)
