"""engine.synth: deterministic files, llama.cpp names/keys, metadata round trip, storage formats.

References: gguf-py's tensor-name tables (MODEL_TENSORS per arch) and block codecs
(gguf.quants), the published geometries of Qwen3-Coder-30B-A3B / OLMoE-1B-7B, and the
DESIGN's KV arithmetic (Coder-30B: 6144 MiB of fp32 KV at 32768 tokens).
"""
from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES
from gguf.quants import dequantize, quantize

import engine.synth as synth
from engine.errors import ModelNotFoundError
from engine.gguf_io import open_gguf
from engine.spec import ModelSpec

TINY = ["tiny-llama", "tiny-llama-moe", "tiny-llama-kv48", "tiny-qwen3", "tiny-qwen3moe", "tiny-olmoe"]


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def allowed_names(arch: str, n_layers: int) -> set[str]:
    """Every tensor name llama.cpp knows for ``arch`` (from gguf-py's own tables)."""
    arch_id = next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch)
    out = set()
    for t in MODEL_TENSORS[arch_id]:
        fmt = TENSOR_NAMES[t]
        out |= {fmt.format(bid=i) + ".weight" for i in range(n_layers)} if "{bid}" in fmt else {fmt + ".weight"}
    return out


def test_generation_is_byte_identical(tmp_path):
    for name in ["tiny-qwen3moe", "tiny-llama-q8_0"]:
        a = synth.write(name, tmp_path / f"a-{name}.gguf")
        b = synth.write(name, tmp_path / f"b-{name}.gguf")
        assert sha256(a) == sha256(b), name
    # a different name is a different model (seeds come from the name)
    c = synth.write("tiny-llama", tmp_path / "c.gguf")
    assert sha256(c) != sha256(tmp_path / "a-tiny-llama-q8_0.gguf")


# per-model facts the brief asks for: {name: {tensor: PyTorch shape}, plus spec predicates}
SHAPES = {
    "tiny-llama": {"blk.0.attn_q.weight": (64, 64), "blk.0.attn_k.weight": (32, 64)},       # GQA 4/2
    "tiny-llama-moe": {"blk.0.ffn_gate_inp.weight": (4, 64), "blk.0.ffn_down_exps.weight": (4, 64, 96)},
    "tiny-llama-kv48": {"blk.0.attn_k.weight": (48, 96)},                                   # 3 kv x 16
    "tiny-qwen3": {"blk.0.attn_q_norm.weight": (32,), "blk.0.attn_q.weight": (128, 64)},    # per head
    "tiny-qwen3moe": {"blk.0.attn_q_norm.weight": (16,), "blk.0.attn_k_norm.weight": (16,),
                      "blk.0.ffn_gate_exps.weight": (8, 32, 64)},
    "tiny-olmoe": {"blk.0.attn_q_norm.weight": (64,), "blk.0.attn_k_norm.weight": (32,)},   # full proj
}
TIED = {"tiny-llama": True, "tiny-llama-moe": False, "tiny-llama-kv48": True, "tiny-qwen3": True,
        "tiny-qwen3moe": False, "tiny-olmoe": False}


@pytest.mark.parametrize("name", TINY)
def test_tiny_metadata_round_trip(name):
    path = synth.ensure(name)
    g = open_gguf(path)
    spec = ModelSpec.from_gguf(g)
    assert spec == synth.spec_for(name)
    cfg = synth.config(name)
    # names are llama.cpp's for this arch (gguf-py's table)
    assert set(g.tensors) <= allowed_names(cfg.arch, cfg.n_layers)
    for tname, shape in SHAPES[name].items():
        assert g.shape(tname) == shape, tname
    assert spec.tied_output == TIED[name] and g.has("output.weight") != TIED[name]
    assert g.meta[f"{cfg.arch}.feed_forward_length"] == cfg.d_ff
    assert g.meta["general.name"] == name and g.meta["kvbench.synth.version"] == synth.SYNTH_VERSION
    if name == "tiny-qwen3moe":
        assert g.meta["qwen3moe.expert_feed_forward_length"] == 32 != g.meta["qwen3moe.feed_forward_length"]
        assert spec.moe_norm_topk
    if name == "tiny-olmoe":
        assert not spec.moe_norm_topk
    if name == "tiny-llama-moe":
        assert "llama.expert_feed_forward_length" not in g.meta and spec.moe_norm_topk  # as Mixtral GGUFs
    if name == "tiny-llama-kv48":
        assert spec.kv_dim == 48
    tok_src = synth._base_tokenizer().source
    assert ("SmolLM2" in g.meta["general.description"]) == (tok_src == "smollm2")
    assert len(g.meta["tokenizer.ggml.tokens"]) == spec.vocab_size
    for k in ("tokenizer.ggml.model", "tokenizer.ggml.merges", "tokenizer.chat_template"):
        assert g.meta.get(k), k
    # every weight is finite, norms near 1, projections non-degenerate
    for tname in g.tensors:
        w = g.tensor(tname)
        assert torch.isfinite(w).all(), tname
        if "norm" in tname:
            assert 0.5 < w.mean() < 1.5, tname
        else:
            assert w.std() > 1e-3, tname


def test_coder30b_spec_from_metadata_only_file(tmp_path):
    path = synth.write_metadata_only("coder30b-synth", tmp_path / "c.gguf")
    spec = ModelSpec.from_gguf(open_gguf(path))
    assert spec == synth.spec_for("coder30b-synth")
    # Qwen3-Coder-30B-A3B-Instruct's published geometry
    assert (spec.arch, spec.n_layers, spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim) == \
        ("qwen3moe", 48, 2048, 32, 4, 128)
    assert (spec.n_experts, spec.n_experts_used, spec.d_ff_expert) == (128, 8, 768)
    assert (spec.vocab_size, spec.ctx_train, spec.rope_base, spec.qk_norm) == (151936, 262144, 1e7, "head")
    # DESIGN: fp32 KV for 32768 tokens on all 48 layers is 6144 MiB
    assert 2 * spec.n_layers * spec.kv_dim * 4 * 32768 == 6144 << 20
    # realistic size for a ~4.5 bit/weight 30B file, without writing the weights
    assert 16e9 < path.stat().st_size < 20e9
    header = path.stat().st_size - synth.data_bytes("coder30b-synth")
    assert 0 < header < 8 << 20                          # tokenizer + tensor infos


def test_olmoe_synth_spec(tmp_path):
    spec = ModelSpec.from_gguf(open_gguf(synth.write_metadata_only("olmoe-synth", tmp_path / "o.gguf")))
    assert spec == synth.spec_for("olmoe-synth")
    assert (spec.arch, spec.n_layers, spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim,
            spec.n_experts, spec.n_experts_used, spec.d_ff_expert, spec.vocab_size, spec.qk_norm,
            spec.moe_norm_topk) == ("olmoe", 16, 2048, 16, 16, 128, 64, 8, 1024, 50304, "full", False)


def test_smollm2_moe_spec_follows_smollm2(tmp_path, smollm2_path):
    path = synth.write_metadata_only("smollm2-moe", tmp_path / "s.gguf")
    spec = ModelSpec.from_gguf(open_gguf(path))
    base = ModelSpec.from_gguf(open_gguf(smollm2_path))
    assert spec == synth.spec_for("smollm2-moe")
    assert (spec.n_experts, spec.n_experts_used, spec.d_ff_expert, spec.arch) == (8, 2, base.d_ff, "llama")
    for f in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "rope_base",
              "rms_eps", "tied_output", "bos_id", "eos_id"):
        assert getattr(spec, f) == getattr(base, f), f


def test_upcycled_experts_stay_close_to_smollm2_ffn(smollm2_path):
    cfg = synth.config("smollm2-moe")
    smol = synth._smollm2_tensors()
    t = next(t for t in synth._upcycle_plan(cfg, smol) if t.name == "blk.3.ffn_up_exps.weight")
    assert t.qtype == QT.Q8_0
    src = open_gguf(smollm2_path).tensor("blk.3.ffn_up.weight")
    experts = [torch.from_numpy(dequantize(b, QT.Q8_0)) for b in synth._upcycled_experts(cfg, t, smol)]
    assert len(experts) == 8
    rms = src.pow(2).mean().sqrt()
    for e in experts:
        rel = (e - src).pow(2).mean().sqrt() / rms
        assert 0.005 < rel < 0.03          # 1% seeded noise + Q8_0 rounding, nothing more
    assert not torch.equal(experts[0], experts[1])


@pytest.mark.parametrize("suffix,qtype", [("q8_0", QT.Q8_0), ("q4_0", QT.Q4_0), ("f16", QT.F16),
                                          ("bf16", QT.BF16)])
def test_quantized_storage_matches_gguf_codec(tmp_path, suffix, qtype):
    name = f"tiny-llama-{suffix}"
    path = synth.write(name, tmp_path / f"{name}.gguf")
    g = open_gguf(path)
    reader = g.tensors                                  # gguf.ReaderTensor by name
    cfg = synth.config(name)
    for t in synth.tensor_plan(cfg):
        src = synth.float_source(cfg, t)
        stored = reader[t.name]
        if t.role in ("norm", "qknorm"):
            assert stored.tensor_type == QT.F32
            np.testing.assert_array_equal(g.tensor(t.name).numpy(), src)
            continue
        assert stored.tensor_type == qtype, t.name
        # the bytes are exactly gguf-py's encoding of the float source
        np.testing.assert_array_equal(np.asarray(stored.data).view(np.uint8).reshape(-1),
                                      quantize(src, qtype).view(np.uint8).reshape(-1))
        got = g.tensor(t.name).numpy()
        np.testing.assert_array_equal(got, dequantize(quantize(src, qtype), qtype).reshape(src.shape))
        # and within the block format's error of the float source
        err = np.abs(got - src)
        if qtype in (QT.F16, QT.BF16):
            rel = 2.0 ** (-11 if qtype == QT.F16 else -8)
            assert (err <= np.abs(src) * rel + 1e-7).all(), t.name
        else:
            blocks = np.abs(src).reshape(-1, 32).max(axis=1, keepdims=True)
            step = blocks / (127.0 if qtype == QT.Q8_0 else 8.0)   # the block scale |d|
            # half a step of rounding, plus the fp16 rounding of d times |q| <= 127 (Q8_0);
            # Q4_0 clips the side opposite the block max at +7: up to one full step
            bound = step * (0.5 + 127 * 2.0 ** -11 if qtype == QT.Q8_0 else 1.0 + 8 * 2.0 ** -11) + 1e-7
            assert (err.reshape(-1, 32) <= bound).all(), t.name
            assert err.max() > 0                                      # really quantized


def test_random_blocks_are_valid_and_scaled():
    rng = np.random.default_rng(0)
    for qtype in (QT.Q4_0, QT.Q8_0):
        raw = synth._random_blocks(rng, 4096, qtype, std=0.02)
        w = dequantize(raw.reshape(64, -1), qtype)
        assert np.isfinite(w).all()
        assert 0.015 < w.std() < 0.025, qtype.name


def test_blocks_kind_writes_a_loadable_model(tmp_path):
    """The real-scale generator (random valid Q8_0/Q4_0 blocks, streamed) on a tiny geometry."""
    cfg = replace(synth.config("coder30b-synth"), name="mini-coder", n_layers=2, d_model=64,
                  n_heads=4, n_kv_heads=2, head_dim=32, d_ff=96, n_experts=8, n_used=2,
                  d_ff_expert=32, vocab=50304, ctx=4096)
    a = synth.write(cfg, tmp_path / "a.gguf")
    b = synth.write(cfg, tmp_path / "b.gguf")
    assert sha256(a) == sha256(b)
    import engine
    eng = engine.load(a)
    g = eng.gguf
    assert eng.spec == synth.spec_for(cfg)
    assert g.qtype("blk.0.ffn_down_exps.weight") == QT.Q4_0 and g.qtype("blk.0.attn_q.weight") == QT.Q8_0
    assert len(g.meta["tokenizer.ggml.tokens"]) == 50304                   # padded with UNUSED tokens
    text = "Hello, synthetic world!"
    assert eng.tokenizer.decode(eng.tokenizer.encode(text)) == text
    logits = eng.logits([1, 200, 300, 400, 2])
    assert logits.shape == (5, 50304) and torch.isfinite(logits).all() and logits.std() > 0.1


def test_ensure_caches_atomically_and_registers(tmp_path, monkeypatch, smollm2_path):
    (tmp_path / smollm2_path.name).symlink_to(smollm2_path)   # no PyPI fetch into the new cache
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path))
    from engine import models
    p = models.resolve("tiny-llama-moe")              # registry kind "synth" -> synth.ensure
    assert p == tmp_path / "synth" / "tiny-llama-moe.gguf" and p.is_file()
    first = (sha256(p), p.stat().st_mtime_ns)
    assert synth.ensure("tiny-llama-moe") == p and p.stat().st_mtime_ns == first[1]   # cached
    p.with_suffix(".gguf.stamp").write_text("stale\n")
    synth.ensure("tiny-llama-moe")                     # stale stamp -> regenerated, same bytes
    assert sha256(p) == first[0] and p.stat().st_mtime_ns != first[1]
    assert not list(p.parent.glob("*.part"))
    with pytest.raises(ModelNotFoundError, match="unknown synthetic model 'tiny-gpt'"):
        synth.ensure("tiny-gpt")


def test_byte_level_fallback_without_smollm2(tmp_path, monkeypatch):
    """No SmolLM2 (offline, fresh cache): a small byte-level tokenizer, said in the file."""
    from engine import registry

    real = registry.resolve

    def offline(name):
        if str(name) == "smollm2-135m":
            raise ModelNotFoundError("smollm2-135m unavailable (simulated offline machine)")
        return real(name)

    monkeypatch.setattr(registry, "resolve", offline)   # synth fetches SmolLM2 through the registry
    synth._smollm2.cache_clear()
    synth._base_tokenizer.cache_clear()
    try:
        path = synth.write("tiny-qwen3", tmp_path / "t.gguf")
        import engine
        eng = engine.load(path)
        assert "byte-level fallback" in eng.gguf.meta["general.description"]
        assert eng.spec == synth.spec_for("tiny-qwen3") and eng.spec.vocab_size == 3 + 256 + 5
        text = "The ocean, in 12 words: wide, deep, blue."
        assert eng.tokenizer.decode(eng.tokenizer.encode(text)) == text
        chat = eng.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        assert chat[0] == synth.BOS_ID and eng.tokenizer.decode(chat).endswith("<|im_start|>assistant\n")
        assert torch.isfinite(eng.logits(chat)).all()
    finally:
        synth._smollm2.cache_clear()
        synth._base_tokenizer.cache_clear()
