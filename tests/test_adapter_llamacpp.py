"""The llama.cpp adapter against llama.cpp itself (llama-cpp-python built from its sdist), on the
real SmolLM2-135M GGUF: ``make test-engines``.

- Each KV type the issue names (f16, bf16, q8_0, q4_0; f32 too) is applied: llama.cpp's own KV
  log line names it on all 30 layers, and the bytes per cached token it serialises equal
  n_layers x 2 x kv_dim values at ggml's size for that type (gguf's GGML_QUANT_SIZES, not ours).
- The narrowed types move the logits (KLD against llama.cpp's f32 KV on the same tokens
  is > 0 and q4_0 > q8_0), the same call twice is bit for bit the same, and the noise floor
  of prefilling in chunks is measured per type (printed).
- Greedy generation agrees with the teacher-forced argmax of its own continuation where
  prefill batching changes nothing (bf16 / q8_0 / q4_0; f16 is printed).
- Chat prompts through llama-cpp-python's rendering of the GGUF template tokenize exactly as
  kvbench's tokenizer does (two implementations of one template).
- A quantized V cache without flash attention, and a type llama.cpp has no KV for, are refused;
  the planted fault (``KVBENCH_FAULT=llamacpp_keep_f16``) is visible in the applied type.
"""
from __future__ import annotations

import gguf
import pytest
import torch

from test_engines_support import engines_only  # noqa: F401  (autouse: make test-engines only)

pytestmark = pytest.mark.engines

GGML = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
MSGS = [{"role": "user", "content": "Explain how a bicycle stays upright, step by step."}]


@pytest.fixture(scope="module")
def kv_ref():
    """kvbench's fp32 engine: the chat prompt and a greedy continuation (the token corpus)."""
    import engine
    eng = engine.load("smollm2-135m")
    prompt = eng.tokenizer.apply_chat_template(MSGS)
    seq = prompt + eng.generate(prompt, 40, stop_at_eos=False)
    return {"eng": eng, "prompt": prompt, "seq": seq}


def lc(native, ctx=512, **kw):
    from harness.adapters.llamacpp import LlamaCpp
    return LlamaCpp("smollm2-135m", "q8_0", native, {"ctx": ctx}, **kw)


def kld(ref, test):
    lr, lt = torch.log_softmax(ref.double(), -1), torch.log_softmax(test.double(), -1)
    return float((lr.exp() * (lr - lt)).sum(-1).mean())


def test_each_kv_type_is_applied_and_takes_ggml_bytes(kv_ref):
    spec = kv_ref["eng"].spec
    seq = kv_ref["seq"]
    wide = lc("f32")
    ref = wide.logits(seq)
    wide.close()
    res = {}
    for native in ("f32", "f16", "bf16", "q8_0", "q4_0"):
        e = lc(native)
        try:
            assert e.kv_applied_native == [native] * spec.n_layers
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[GGML[native]]]
            per_token = spec.n_layers * 2 * spec.kv_dim // block * size
            assert e.n_cells == 512
            assert abs(e.kv_bytes - per_token * 512) <= 0.01 * 2**20 + 1   # K and V logged in MiB to 2 decimals
            # its serialised state grows by the K and V rows + the cell's position and sequence (3 int32)
            assert e.state_bytes_per_token == per_token + 12
            out = e.logits(seq)
            assert out.shape == (len(seq), spec.vocab_size) and out.dtype == torch.float32
            assert torch.equal(out, e.logits(seq))                    # deterministic
            floor = float((e.logits(seq, chunk=16) - out).abs().max())
            res[native] = {"KLD vs f32 KV": kld(ref, out), "max abs vs f32 KV": float((out - ref).abs().max()),
                           "chunk-16 floor": floor, "bytes/token": per_token}
        finally:
            e.close()
    for k, v in res.items():
        print(f"llama.cpp {k:5} KV: " + ", ".join(f"{a} {b:.4g}" for a, b in v.items()))
    assert res["bf16"]["KLD vs f32 KV"] > 0 and res["q8_0"]["KLD vs f32 KV"] > 0
    assert res["q4_0"]["KLD vs f32 KV"] > res["q8_0"]["KLD vs f32 KV"]
    for native in ("bf16", "q8_0", "q4_0"):      # prefill batching does not move these types
        assert res[native]["chunk-16 floor"] == 0.0, res


@pytest.mark.parametrize("native", ["bf16", "q8_0", "q4_0"])
def test_greedy_generation_matches_its_teacher_forced_argmax(kv_ref, native):
    e = lc(native)
    try:
        prompt = kv_ref["prompt"]
        new = e.generate(prompt, 24, stop_at_eos=False)
        assert len(new) == 24 and e.last_stop_reason == "length"
        tf = e.logits(prompt + new)[len(prompt) - 1:-1].argmax(-1).tolist()
        assert tf == new
        print(native, repr(e.tokenizer.decode(new)))
        assert e.prefill(prompt).argmax().item() == new[0]
    finally:
        e.close()


def test_chat_tokens_equal_kvbench_through_the_gguf_template(kv_ref):
    e = lc("q8_0")
    try:
        for msgs in (MSGS, [{"role": "system", "content": "You are a concise assistant."},
                            {"role": "user", "content": "Give three tips for staying focused."}]):
            assert e.tokenizer.apply_chat_template(msgs) == kv_ref["eng"].tokenizer.apply_chat_template(msgs)
        text = "Lighthouses guided ships, 1890–1920: « phares »."
        assert e.tokenizer.encode(text) == kv_ref["eng"].tokenizer.encode(text)
        assert e.tokenizer.decode(e.tokenizer.encode(text)) == text
        assert 2 in e.tokenizer.eos_ids            # <|im_end|>: what a chat answer stops at
    finally:
        e.close()


def test_refusals_name_the_setting():
    from harness.adapters.base import KVNotSupported
    with pytest.raises(KVNotSupported, match="llama.cpp needs flash attention for a q8_0 V cache"):
        lc("q8_0", flash_attn=False)
    with pytest.raises(KVNotSupported, match="llama.cpp has no KV setting 'q2_k'"):
        lc("q2_k")
    e = lc("f16", flash_attn=False)               # f16 without flash attention is fine
    assert e.kv_applied_native[0] == "f16"
    e.close()


def test_the_planted_fault_keeps_f16_and_the_applied_type_shows_it(kv_ref, monkeypatch):
    monkeypatch.setenv("KVBENCH_FAULT", "llamacpp_keep_f16")
    e = lc("q8_0")
    try:
        assert set(e.kv_applied_native) == {"f16"} and set(e.kv_dtypes) == {"f16"}
        twin = e.twin("f16")                       # the detector's instrument is not planted
        assert torch.equal(e.logits(kv_ref["seq"]), twin.logits(kv_ref["seq"]))
        twin.close()
    finally:
        e.close()


def test_separate_k_and_v_types_are_applied_like_ctk_ctv(kv_ref):
    """The row ``k-q8_0.v-bf16`` maps to llama.cpp's ``-ctk q8_0 -ctv bf16`` (``q8_0/bf16``): its
    KV log names q8_0 for K and bf16 for V on every layer, the bytes per cached token are K at
    q8_0's ggml size plus V at bf16's (gguf's sizes), the row's name is what ``kv_dtypes``
    reports, and the logits differ from both uniform types. Per-layer rows have no llama.cpp
    setting; K and V of one type are the plain setting, not ``k/v``."""
    from harness.adapters import EngineSpec, native_for
    from harness.adapters.llamacpp import LlamaCpp
    from harness.errors import UsageError
    spec, seq = kv_ref["eng"].spec, kv_ref["seq"]
    assert LlamaCpp.native_of("k-q8_0.v-bf16") == "q8_0/bf16" and LlamaCpp.native_of("v-q8_0") == "f32/q8_0"
    assert LlamaCpp.native_of("q8_0.fp32@0,23") is None and not LlamaCpp.valid_native("q8_0/q8_0")
    with pytest.raises(UsageError, match="no KV cache in q8_0.fp32@0"):
        native_for(EngineSpec("llama.cpp"), "q8_0.fp32@0", {})
    e = LlamaCpp("smollm2-135m", "k-q8_0.v-bf16", "q8_0/bf16", {"ctx": 512})
    try:
        assert e.kv_applied_native == ["q8_0/bf16"] * spec.n_layers
        assert e.kv_dtypes == ["k-q8_0.v-bf16"] * spec.n_layers
        kb, ks = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
        vb, vs = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.BF16]
        per_token = spec.n_layers * (spec.kv_dim // kb * ks + spec.kv_dim // vb * vs)
        assert abs(e.kv_bytes - per_token * 512) <= 0.01 * 2**20 + 1
        assert e.state_bytes_per_token == per_token + 12
        assert e.references() == ["f32", "f16", "bf16", "q8_0"]     # K or V dropped: one of the uniform runs
        mixed = e.logits(seq)
    finally:
        e.close()
    for native in ("q8_0", "bf16"):
        u = lc(native)
        try:
            assert not torch.equal(u.logits(seq), mixed)
        finally:
            u.close()

