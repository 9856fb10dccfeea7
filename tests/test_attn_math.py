"""The kernel-precision axis (engine/attn_math.py) against independent references.

q8_0 query conversion equals ``gguf.quants`` Q8_0 quantize + dequantize bit for bit; bf16
equals numpy's round-to-nearest-even on the float32 bits; ``exact`` and fp32 K leave the query
untouched; an unknown mode or a K format without a conversion is a ConfigError.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from engine import attn_math
from engine.errors import ConfigError


def _q(seed=0, shape=(5, 4, 64)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x[0, 0, :32] = 0.0                     # an all-zero block: scale 0, values 0
    x[1, 1, 5] = 1e4                       # one outlier dominating its block
    return x


def test_q8_0_conversion_equals_gguf_quants_round_trip():
    x = _q()
    want = dequantize(quantize(x.numpy(), QT.Q8_0), QT.Q8_0).reshape(x.shape)
    got = attn_math.q_for_k(x, "q8_0", "ggml-cpu")
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want)
    assert not torch.equal(got, x)


def test_bf16_conversion_is_round_to_nearest_even_of_the_float32_bits():
    x = _q(1)
    u = x.numpy().view(np.uint32).astype(np.uint64)
    rne = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16).astype(np.uint32).view(np.float32)
    got = attn_math.q_for_k(x, "bf16", "ggml-cpu")
    assert np.array_equal(got.numpy(), rne)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "q8_0"])
def test_exact_mode_and_fp32_k_leave_the_query_alone(fmt):
    x = _q(2)
    assert attn_math.q_for_k(x, fmt, "exact") is x
    assert attn_math.q_for_k(x, "fp32", "ggml-cpu") is x


def test_unknown_mode_and_unconvertible_format_are_config_errors():
    with pytest.raises(ConfigError, match="attention maths 'fast' is unknown"):
        attn_math.check_mode("fast")
    with pytest.raises(ConfigError, match="no query conversion"):
        attn_math.q_for_k(_q(), "q4_0", "ggml-cpu")
    with pytest.raises(ConfigError, match="divisible by 32"):
        attn_math.q_for_k(torch.ones(2, 2, 48), "q8_0", "ggml-cpu")


def test_the_engine_applies_the_mode_to_every_attention_call():
    """fp32 K: ggml-cpu maths is the identity (bit-equal logits); q8_0 K: the query is converted
    (logits move), and the moved logits equal those of an exact-maths run whose attention is fed
    the converted query by hand (the mode changes nothing else)."""
    import engine
    from engine import synth
    path = synth.ensure("tiny-qwen3")                  # head_dim 32: one q8_0 block per head row
    ids = list(range(3, 40))
    e32 = engine.load(path, kv_dtype="fp32", ctx=64)
    exact = e32.logits(ids)
    e32.model.attn_math = "ggml-cpu"
    assert torch.equal(e32.logits(ids), exact)
    e32.close()
    e8 = engine.load(path, kv_dtype="q8_0", ctx=64)
    ex8 = e8.logits(ids)
    e8.model.attn_math = "ggml-cpu"
    gg8 = e8.logits(ids)
    assert not torch.equal(gg8, ex8) and (gg8 - ex8).abs().max() < 0.5
    # by hand: exact maths, every cache's attend fed the q8_0-rounded query
    e8.model.attn_math = "exact"
    calls = []
    for c in e8.caches:
        orig = c.attend

        def attend(q, start, scale, window=None, _orig=orig):
            calls.append(1)
            q2 = torch.from_numpy(dequantize(quantize(q.numpy(), QT.Q8_0), QT.Q8_0).reshape(q.shape))
            return _orig(q2, start, scale) if window is None else _orig(q2, start, scale, window=window)
        c.attend = attend
    assert torch.equal(e8.logits(ids), gg8) and len(calls) == len(e8.caches)
    e8.close()


def test_set_attn_math_is_observable_and_refuses_what_a_layer_cannot_take():
    import engine
    from engine import synth
    eng = engine.load(synth.ensure("tiny-llama"), kv_dtype="q8_0", ctx=32)      # head_dim 16
    assert eng.attn_math == "exact"
    with pytest.raises(ConfigError, match="cannot be applied to layer 0 .*divisible by 32"):
        eng.set_attn_math("ggml-cpu")
    assert eng.attn_math == "exact"
    with pytest.raises(ConfigError, match="unknown"):
        eng.set_attn_math("fast")
    eng.close()
    eng = engine.load(synth.ensure("tiny-qwen3"), kv_dtype="bf16", ctx=32)
    assert eng.set_attn_math("ggml-cpu") == "ggml-cpu" == eng.attn_math
    eng.close()


def test_corpus_kld_maths_axis_equals_numpy_on_the_engines_own_logits(tmp_path):
    """corpus_kld with attn_math = [exact, ggml-cpu] on a q8_0 row: the extra metrics equal KL
    computed by numpy from the engine's logits under each mode, and the share is their ratio."""
    import engine
    from engine import synth
    from harness.checks import CaseContext, get
    from harness.checks.corpus_kld import CorpusKldConfig
    from harness.schema import SuiteSection
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 37} value{i % 11}" for i in range(400)))
    path = synth.ensure("tiny-qwen3")
    cfg = CorpusKldConfig(kind="corpus_kld", corpus=str(text), depths=[64, 96], trained_cap=96,
                          attn_math=["exact", "ggml-cpu"])
    check, suite = get("corpus_kld"), SuiteSection(name="t", ctx=128)
    base_eng = engine.load(path, kv_dtype="fp32", ctx=128)
    ctx0 = CaseContext(model="tiny-qwen3", kv_dtype="fp32", baseline="fp32", suite=suite, device="cpu", seed=0)
    state = check.prepare(base_eng, cfg, ctx0)
    base = base_eng.logits(state["ids"][:96]).numpy().astype(np.float64)
    base_eng.close()
    eng = engine.load(path, kv_dtype="q8_0", ctx=128)
    ctx1 = CaseContext(model="tiny-qwen3", kv_dtype="q8_0", baseline="fp32", suite=suite, device="cpu", seed=0)
    out = check.measure(eng, cfg, state, ctx1)
    got = {m.name: m.value for m in out.metrics}
    assert eng.attn_math == "exact"                         # restored after the extra pass

    def kl(t):
        lb = base - np.log(np.exp(base - base.max(1, keepdims=True)).sum(1, keepdims=True)) - base.max(1, keepdims=True)
        lt = t - np.log(np.exp(t - t.max(1, keepdims=True)).sum(1, keepdims=True)) - t.max(1, keepdims=True)
        return float((np.exp(lb) * (lb - lt)).sum(1).mean())
    exact = kl(eng.logits(state["ids"][:96]).numpy().astype(np.float64))
    eng.set_attn_math("ggml-cpu")
    maths = kl(eng.logits(state["ids"][:96]).numpy().astype(np.float64))
    eng.close()
    assert got["Mean KLD"] == pytest.approx(exact, rel=1e-5)
    assert got["Mean KLD (ggml-cpu maths)"] == pytest.approx(maths, rel=1e-5) and maths != exact
    assert got["Kernel maths share of Mean KLD (ggml-cpu)"] == pytest.approx(100 * (maths - exact) / maths, rel=1e-4)


def test_report_puts_storage_and_kernel_error_side_by_side():
    """The corpus_kld report section's storage-vs-maths table: per narrowed dtype the exact
    (storage) Mean KLD, each extra mode's, and the share the maths add, from the recorded
    values; no table when no extra mode ran."""
    from types import SimpleNamespace
    from harness.checks.corpus_kld import _maths_table
    vals = {("q8_0", "Mean KLD"): 1.0e-3, ("q8_0", "Mean KLD SE"): 8.0e-5}
    infos = {"q8_0": {"attn_math": {"ggml-cpu": {"Mean KLD": 1.6e-3, "Mean KLD SE": 1.4e-4}}}, "fp32": {}}
    rep = SimpleNamespace(dtypes=["fp32", "q8_0"], md=[],
                          res=SimpleNamespace(info=lambda m, d, c: infos.get(d, {})),
                          value=lambda m, d, c, k: vals.get((d, k)))
    _maths_table(rep, "tiny", "corpus_kld")
    text = "\n".join(rep.md)
    row = next(line for line in text.splitlines() if line.startswith("| tiny | q8_0"))
    assert "ggml-cpu" in row and "0.001 ± 8e-05" in row and "0.0016 ± 0.00014" in row
    assert row.rstrip(" |").endswith(f"{100 * (1.6e-3 - 1.0e-3) / 1.6e-3:.0f}")       # 38 %
    assert "fp32" not in text
    infos["q8_0"] = {}
    rep.md.clear()
    _maths_table(rep, "tiny", "corpus_kld")
    assert rep.md == []
