"""The fast prefill path (issue 14.3): bfloat16 SDPA over the stored KV rows, for throughput.

- ``prefill_attention_fast`` equals an independent float64 attention over the same rows
  rounded to bfloat16 (K/V dequantized by gguf.quants for q8_0), for every KV format, a K/V
  split, GQA, a chunk after cached rows and a sliding window; it is not the exact path.
- ``Engine.set_prefill_path``: ``fast`` moves logits a little, ``exact`` gives back the
  bit-identical exact logits, a bad path is a one-line ConfigError and changes nothing.
- Over bf16 weights the fast path's activations are bf16 (``prefill_activations``), as HF's
  bf16 model runs; its logits are no further from HF's float32 model than HF's own bf16 model
  is, and the exact path over the same weights is untouched.
- The throughput check with ``prefill_path = "fast"`` records the path, names it on ``pp<N>``,
  measures ``Fast-vs-exact max abs logit`` (recounted here from the engine's logits) and
  leaves the engine on ``exact``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

import engine
from engine import kernels, synth
from engine.errors import ConfigError
from engine.kernels.prefill_attention import prefill_attention_fast
from engine.kv import LayerKV


def _rows_f64(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """What the cache stores for float32 rows x [n, Hkv, D], independently of kvbench: fp32 as
    is, bf16 rounded by torch, q8_0 through gguf.quants' quantize/dequantize."""
    if fmt == "fp32":
        return x.double()
    if fmt == "bf16":
        return x.to(torch.bfloat16).double()
    n, h, d = x.shape
    flat = x.reshape(n, h * d).numpy().astype(np.float32)
    deq = quants.dequantize(quants.quantize(flat, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    return torch.from_numpy(np.asarray(deq, dtype=np.float64)).reshape(n, h, d)


def _ref(q, k, v, start, scale, window=None):
    """float64 causal attention of bfloat16-rounded q, K, V (the fast path's inputs)."""
    T, Hq, D = q.shape
    n, Hkv, _ = k.shape
    bf = lambda t: t.to(torch.bfloat16).double()                     # noqa: E731
    qd, kd, vd = bf(q.float()), bf(k.float()), bf(v.float())
    kd, vd = kd.repeat_interleave(Hq // Hkv, dim=1), vd.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.einsum("thd,nhd->htn", qd, kd) * scale
    qpos = torch.arange(start, start + T)[:, None]
    kpos = torch.arange(n)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    s = s.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("htn,nhd->thd", s.softmax(-1), vd)


@pytest.mark.parametrize("kf,vf", [("fp32", "fp32"), ("bf16", "bf16"), ("q8_0", "q8_0"), ("q8_0", "bf16")])
@pytest.mark.parametrize("window", [None, 16])
def test_fast_attention_equals_a_float64_reference_of_bf16_inputs(kf, vf, window):
    gen = torch.Generator().manual_seed(7)
    Hq, Hkv, D, start, T = 9, 3, 64, 37, 20
    n = start + T
    k = torch.randn(n, Hkv, D, generator=gen)
    v = torch.randn(n, Hkv, D, generator=gen) * 3
    q = torch.randn(T, Hq, D, generator=gen)
    cache = LayerKV(0, Hkv, D, 80, kf, v_dtype=vf)
    prev = kernels.set_backend("torch")
    try:
        cache.write(0, k, v)
        exact = cache.attend(q, start, D ** -0.5, window=window)
    finally:
        kernels.set_backend(prev)
    out = prefill_attention_fast(q, cache.k, cache.v, kf, start, D ** -0.5, Hkv, v_fmt=vf, window=window)
    want = _ref(q, _rows_f64(k, kf), _rows_f64(v, vf), start, D ** -0.5, window)
    size = want.abs().max().item()
    err = (out.double() - want).abs().max().item()
    print(f"{kf}/{vf} window={window}: fast vs float64-of-bf16 {err:.3e} (|o| {size:.2f}), "
          f"fast vs exact {(out - exact).abs().max().item():.3e}")
    assert out.shape == (T, Hq, D) and out.dtype == torch.float32
    assert err <= 5e-3 * size                                          # bf16 rounding of the output (2^-9)
    assert (out - exact).abs().max().item() > 0                        # it is not the exact path


def test_engine_prefill_path_switches_and_comes_back_bit_identical():
    eng = engine.load(synth.ensure("tiny-llama"), kv_dtype="q8_0", device="cpu", ctx=256)
    toks = list(range(5, 105))
    assert eng.prefill_path == "exact"
    exact = eng.logits(toks)
    assert eng.set_prefill_path("fast") == "fast" and eng.prefill_path == "fast"
    fast = eng.logits(toks)
    delta = (fast - exact).abs().max().item()
    print(f"tiny-llama q8_0: fast vs exact max abs logit {delta:.3e}")
    assert 0 < delta < 0.5 * exact.abs().max().item()
    eng.set_prefill_path("exact")
    assert torch.equal(eng.logits(toks), exact)
    with pytest.raises(ConfigError, match="prefill path 'flash' is not one of exact, fast"):
        eng.set_prefill_path("flash")
    assert eng.prefill_path == "exact"


def test_throughput_check_times_the_fast_path_and_records_it():
    from harness import checks
    from harness.checks.base import CaseContext
    from harness.checks.throughput import ThroughputConfig
    from harness.schema import SuiteSection
    from harness.text import prompt_tokens
    eng = engine.load(synth.ensure("tiny-llama"), kv_dtype="bf16", device="cpu", ctx=256)
    cfg = ThroughputConfig(kind="throughput", pp=64, tg=4, repeats=5, warmup=0, prefill_path="fast",
                           fast_delta_tokens=48)
    out = checks.get("throughput").measure(eng, cfg, None, CaseContext("m", "bf16", "fp32", SuiteSection(name="t"),
                                                                       "cpu", 0))
    m = {x.name: x for x in out.metrics}
    assert out.info["prefill_path"] == "fast"
    assert out.info["prefill_activations"] == eng.prefill_activations == "fp32"    # f32 weights here
    assert "fast prefill path (bf16 SDPA, fp32 activations)" in (m["pp64"].detail or "") and m["pp64"].value > 0
    assert "fast" not in (m["tg4"].detail or "")
    assert eng.prefill_path == "exact"                                 # put back
    # recount the delta from the engine itself
    toks = prompt_tokens(eng.tokenizer, 64, 0)[:48]
    exact = eng.logits(toks)
    eng.set_prefill_path("fast")
    fast = eng.logits(toks)
    eng.set_prefill_path("exact")
    assert m["Fast-vs-exact max abs logit"].value == pytest.approx((fast - exact).abs().max().item())
    assert m["Fast-vs-exact max abs logit"].value > 0


def test_suite_rejects_an_unknown_prefill_path(tmp_path):
    from harness.checks.throughput import ThroughputConfig
    from harness.errors import SuiteError
    with pytest.raises(SuiteError, match="prefill_path"):
        ThroughputConfig(kind="throughput", prefill_path="flash").validate(tmp_path / "s.toml", "check[0]")


@pytest.mark.parametrize("name,wf,kw", [("tiny-llama", "bf16", {}), ("tiny-qwen3moe", "bf16", {}),
                                        ("tiny-llama-q8_0", "q8_0", {}),
                                        ("tiny-qwen3moe-q8_0", "q8_0", {"expert_format": "blocks"})])
def test_fast_path_runs_bf16_activations_over_bf16_weights_like_hf(name, wf, kw):
    """Over bf16 weights, and over Q8_0 ones (the file's blocks, rounded to bf16 on this path,
    as HF's bf16 model rounds the dequantised file). An independent yardstick for the bf16
    activations: HF transformers on the same GGUF
    (tests/hf_oracle.py) in float32 and cast to bfloat16. On these random-weight models bf16
    moves logits by ~0.2 (HF's own bf16 model from its float32 one); the fast path, bf16
    activations and all, stays within 1.25x of that, its activations are observably bf16, and
    the exact path over the same bf16 weights gives back its float32-activation logits."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from hf_oracle import hf_logits, hf_model_for
    path = synth.ensure(name)
    hf = hf_model_for(path)
    toks = [1] + torch.randint(3, hf.config.vocab_size, (63,), generator=torch.Generator().manual_seed(2)).tolist()
    ref32 = hf_logits(hf, toks)
    refbf = hf_logits(hf.to(torch.bfloat16), toks).float()
    eng = engine.load(path, weight_format=wf, ctx=128, **kw)       # q8_0: the file's blocks, bf16 on the fast path
    exact = eng.logits(toks)
    assert eng.prefill_activations == "fp32"
    eng.set_prefill_path("fast")
    assert eng.prefill_activations == "bf16"
    fast = eng.logits(toks)
    model = eng._live()                   # the same fast path with float32 activations differs
    model.prefill_act_dtype = lambda T: torch.float32                   # (the bf16 ones reach the logits)
    fast32 = eng.logits(toks)
    del model.prefill_act_dtype
    eng.set_prefill_path("exact")
    d = lambda a, b: (a.float() - b.float()).abs().max().item()          # noqa: E731
    assert d(fast, fast32) > 0
    print(f"{name}: |fast - hf32| {d(fast, ref32):.3f}, |hf bf16 - hf32| {d(refbf, ref32):.3f}, "
          f"|fast - exact| {d(fast, exact):.3f}")
    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    assert d(fast, ref32) <= 1.25 * d(refbf, ref32)
    assert d(fast, exact) > 0
    assert torch.equal(eng.logits(toks), exact)                        # the exact path is untouched


def test_mm_keeps_narrow_activations_only_over_their_own_weights():
    """engine.model.mm: bf16 activations over bf16 weights stay bf16 (the fast prefill); over
    float32 weights (a hybrid's host tail) they are widened and the product is float32, as is
    every float32-activation product (the exact path, unchanged)."""
    from engine.model import mm
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(3, 8, generator=gen), torch.randn(5, 8, generator=gen)
    assert torch.equal(mm(x, w), x @ w.T)
    assert torch.equal(mm(x, w.bfloat16()), (x.bfloat16() @ w.bfloat16().T).float())
    y = mm(x.bfloat16(), w.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.equal(y, x.bfloat16() @ w.bfloat16().T)
    z = mm(x.bfloat16(), w)
    assert z.dtype == torch.float32 and torch.equal(z, x.bfloat16().float() @ w.T)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, 8, 300])
def test_narrow_mm_rounds_the_exact_product_once_at_any_row_count(monkeypatch, dtype, rows):
    """engine.model.mm over bf16/f16 weights, whichever product this CPU takes (the narrow one,
    or from ``WIDE_MM_MIN_ROWS`` rows on a CPU without native narrow arithmetic the one widened
    to float32, also with its weight rows widened a chunk at a time): each output is the exact
    product of the narrowed values (float64 here) rounded once to ``dtype``, up to summation
    order, so within one unit in the last place (plus float32 summation's error where sums
    cancel), and equal to that rounding almost everywhere."""
    from engine import model, qweights
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 192, generator=gen)
    w = (torch.randn(70, 192, generator=gen) * 0.1).to(dtype)
    exact = x.to(dtype).double() @ w.double().T
    want = exact.to(dtype)
    fi = torch.finfo(dtype)        # one unit in the last place of dtype at each exact value
    ulp = torch.ldexp(torch.full_like(exact, fi.eps), torch.frexp(exact)[1] - 1).clamp_min(fi.eps * fi.smallest_normal)
    # + what float32 sums of 192 products may lose where they cancel to near zero
    ulp += 192 * torch.finfo(torch.float32).eps * (x.to(dtype).double().abs() @ w.double().abs().T)
    ys = {"whole": model.mm(x, w), "narrow-out": model.mm(x.to(dtype), w).float()}
    monkeypatch.setattr(qweights, "MM_CHUNK_BYTES", 4 * 192 * 16)      # 16 weight rows a chunk
    ys["chunked"] = model.mm(x, w)
    for name, y in ys.items():
        assert y.dtype == torch.float32 and y.shape == (rows, 70), name
        assert ((y.double() - exact).abs() <= ulp).all(), name
        assert (y == want.float()).float().mean() >= 0.99, name
    if not model.cpu_has_native(dtype) and rows >= model.WIDE_MM_MIN_ROWS:
        # the widened path is the one taken here: rounded from float32 sums, not the narrow GEMM's
        assert torch.equal(ys["chunked"], model._mm_widened(x.to(dtype), w).float())
