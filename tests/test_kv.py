"""KV cache formats and the LayerKV interface, against independent references.

Oracles: ``gguf.quants`` (Q8_0 and BF16 bytes, Q8_0 dequantization), torch's RNE bfloat16
cast, a float64 softmax(QK^T)V written here, DESIGN.md's Coder-30B KV byte counts, and
HF-independent greedy answers / fp32 top-1 on SmolLM2 for the end-to-end dtype checks.
"""
from __future__ import annotations

import os

if not __import__("torch").cuda.is_available():          # before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gg_dequantize, quantize as gg_quantize
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

import engine
from engine.errors import ConfigError, ContextOverflowError, KVGeometryError
from engine.kv import (KV_DTYPES, LayerKV, dequantize_q8_0, kv_bytes_per_token, make_layer_kv,
                       quantize_q8_0)
from engine.spec import ModelSpec


def gguf_q8(x: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gg_quantize(x.astype(np.float32), QT.Q8_0)


def assert_q8_matches_gguf(x: np.ndarray) -> None:
    ours = quantize_q8_0(torch.from_numpy(x.astype(np.float32))).numpy()
    ref = gguf_q8(x)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    bad = np.nonzero((ours != ref).any(axis=-1).reshape(-1))[0]
    assert bad.size == 0, f"{bad.size} rows differ, first at {bad[0]}: {ours.reshape(-1, ours.shape[-1])[bad[0]][:8]}" \
                          f" vs {ref.reshape(-1, ref.shape[-1])[bad[0]][:8]}"
    with np.errstate(all="ignore"):
        want = gg_dequantize(ref, QT.Q8_0)
    got = dequantize_q8_0(torch.from_numpy(ref), x.shape).numpy()
    assert np.array_equal(got, want.reshape(x.shape), equal_nan=True)


def _ties(rng) -> np.ndarray:
    # amax 127 -> d = 1 exactly, so x = k + 0.5 sits on a rounding tie (ggml rounds away from 0)
    x = rng.integers(-126, 126, size=(16, 32)).astype(np.float32) + 0.5
    x[:, 0] = 127.0
    x[::2, 0] = -127.0
    return x


SEEDED = {
    "random": lambda r: r.standard_normal((64, 256)),
    "constant": lambda r: np.full((8, 64), 3.25),
    "negative-constant": lambda r: np.full((4, 96), -0.7),
    "zeros": lambda r: np.zeros((4, 128)),
    "tiny-1e-30": lambda r: r.standard_normal((8, 64)) * 1e-30,
    "subnormal": lambda r: r.standard_normal((8, 64)) * 1e-40,
    "d-overflows-1/d": lambda r: r.standard_normal((8, 64)) * 2e-37,
    "outliers": lambda r: r.standard_normal((32, 128)) * np.where(r.random((32, 128)) < 0.03, 1e4, 1.0),
    "huge": lambda r: r.standard_normal((4, 64)) * 1e6,
    "fp16-overflow": lambda r: r.standard_normal((4, 64)) * 1e7,
    "ties": _ties,
    "mixed-scales": lambda r: r.standard_normal((16, 32 * 8)) * np.repeat(np.logspace(-20, 20, 8), 32),
    "3d": lambda r: r.standard_normal((3, 5, 64)),
}


@pytest.mark.parametrize("case", list(SEEDED))
def test_q8_0_bytes_identical_to_gguf(case):
    assert_q8_matches_gguf(SEEDED[case](np.random.default_rng(len(case))).astype(np.float32))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 4).map(lambda n: 32 * n)),
              elements=st.floats(-3e4, 3e4, width=32, allow_subnormal=True)),
       st.sampled_from([1.0, 1e-3, 1e-30, 1e-38, 7.0]))
def test_q8_0_property_matches_gguf(x, scale):
    assert_q8_matches_gguf(x * np.float32(scale))


def test_q8_0_rejects_ragged_rows():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q8_0(torch.zeros(2, 48))


def test_bf16_storage_is_rne_and_matches_gguf():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(4096) * 10.0 ** rng.integers(-30, 30, 4096),
                        # exact halfway cases between two bf16 values: low 16 bits 0x8000
                        (rng.integers(0, 2 ** 31, 512, dtype=np.uint32) & 0xFFFF0000 | 0x8000).view(np.float32),
                        np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, 1e-45], np.float32)]).astype(np.float32)
    x = x[np.isfinite(x) | np.isinf(x)]
    ref = gg_quantize(x, QT.BF16).view(np.uint16)
    torch_bits = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(torch_bits, ref)
    cache = LayerKV(0, 1, 32, len(x) // 32, "bf16")
    n = len(x) // 32 * 32
    t = torch.from_numpy(x[:n]).view(-1, 1, 32)
    cache.write(0, t, t)
    assert np.array_equal(cache.k.view(torch.int16).numpy().view(np.uint16).reshape(-1), ref[:n])


def test_layer_kv_q8_0_buffer_is_gguf_bytes():
    """The split layout (quants, then scales) holds ggml's block_q8_0 values: its block view
    is gguf's bytes, and the two arrays are exactly gguf's quants and scales, in place."""
    x = torch.randn(10, 3, 64)
    cache = LayerKV(0, 3, 64, 16, "q8_0")
    cache.write(2, x, -x)
    kb, vb = cache.to_ggml_blocks()
    assert kb.dtype == torch.uint8 and tuple(kb.shape) == (16, 3 * 64 // 32 * 34)
    assert np.array_equal(kb[2:12].numpy(), gguf_q8(x.reshape(10, -1).numpy()))
    assert np.array_equal(vb[2:12].numpy(), gguf_q8(-x.reshape(10, -1).numpy()))
    assert np.array_equal(cache.to_ggml_blocks(12)[0][2:].numpy(), kb[2:12].numpy())
    # the buffer itself: one flat uint8 allocation of 34 bytes per 32 values, int8 quants
    # [rows, Hkv, D] first, then the fp16 scales [rows, Hkv*D/32], read here by hand
    assert cache.k.dtype == torch.uint8 and tuple(cache.k.shape) == (16 * 3 * 64 * 34 // 32,)
    g = gguf_q8(x.reshape(10, -1).numpy()).reshape(10, 6, 34)
    raw = cache.k.numpy()
    quants = raw[:16 * 192].view(np.int8).reshape(16, 3, 64)
    scales = raw[16 * 192:].view(np.float16).reshape(16, 6)
    assert np.array_equal(quants[2:12].reshape(10, 6, 32), g[:, :, 2:].view(np.int8))
    assert np.array_equal(scales[2:12], g[:, :, :2].copy().view(np.float16)[..., 0])
    assert not quants[:2].any() and not quants[12:].any()        # rows never written stay zero


def test_q8_0_split_arrays_are_aligned_views():
    """Each head's quants are one contiguous run at a 16-byte multiple (vector loads), the scales
    array starts at a 32-byte multiple; views share the buffer; ggml blocks round-trip."""
    from engine.kernels import q8_layout
    for rows, hkv, d in ((37, 4, 128), (5, 3, 64), (9, 1, 256)):
        buf = q8_layout.alloc(rows, hkv, d)
        assert buf.nbytes == rows * hkv * d * 34 // 32
        r = q8_layout.split(buf, hkv, d)
        assert r.quants.data_ptr() == buf.data_ptr() and r.quants.stride() == (hkv * d, d, 1)
        assert (r.scales.data_ptr() - buf.data_ptr()) % 32 == 0 and r.scales.is_contiguous()
        assert tuple(r.scales.shape) == (rows, hkv * d // 32) and r.shape == (rows, hkv, d)
        assert all((r.quants[j, h].data_ptr() - buf.data_ptr()) % 16 == 0 for j in range(rows) for h in range(hkv))
        x = torch.randn(rows, hkv * d) * torch.logspace(-3, 3, rows)[:, None]
        blocks = quantize_q8_0(x)
        back = q8_layout.from_ggml_blocks(blocks, hkv, d)
        assert torch.equal(q8_layout.to_ggml_blocks(back), blocks)
        assert torch.equal(q8_layout.dequantize(back), dequantize_q8_0(blocks, (rows, hkv, d)))
        sub = back[3:5]
        assert sub.shape == (2, hkv, d) and torch.equal(q8_layout.to_ggml_blocks(sub), blocks[3:5])
        idx = torch.tensor([4, 0, 2])
        assert torch.equal(q8_layout.to_ggml_blocks(back.index_select(0, idx)), blocks[idx])


def test_kv_bytes_match_design_numbers():
    # DESIGN.md: Coder-30B (48 layers, 4 KV heads x 128) at 32768 tokens: 6144 MB fp32, 1632 MB q8_0
    mb = lambda dt: 48 * 32768 * kv_bytes_per_token(4, 128, dt) / 2 ** 20
    assert (mb("fp32"), mb("bf16"), mb("q8_0")) == (6144, 3072, 1632)
    for dt in KV_DTYPES:
        assert LayerKV(0, 4, 128, 100, dt).nbytes == 100 * kv_bytes_per_token(4, 128, dt)
    with pytest.raises(KVGeometryError):
        kv_bytes_per_token(3, 16, "q8_0")


def oracle(q, k, v, start, scale):
    T, Hq, D = q.shape
    n = start + T
    g = Hq // k.shape[1]
    k = k[:n].double().repeat_interleave(g, 1)
    v = v[:n].double().repeat_interleave(g, 1)
    s = torch.einsum("thd,nhd->htn", q.double(), k) * scale
    s = s.masked_fill(torch.arange(n)[None, :] > torch.arange(start, n)[:, None], float("-inf"))
    return torch.einsum("htn,nhd->thd", s.softmax(-1), v).float()


def stored(cache):
    """What the cache holds, decoded with gguf (q8_0) / plain casts: the oracle's K and V."""
    if cache.dtype == "q8_0":
        shape = (cache.max_tokens, cache.n_kv_heads, cache.head_dim)
        return tuple(torch.from_numpy(gg_dequantize(b.numpy(), QT.Q8_0)).reshape(shape) for b in cache.to_ggml_blocks())
    return cache.k.float(), cache.v.float()


@pytest.mark.parametrize("fmt", KV_DTYPES)
def test_attend_matches_float64_oracle_prefill_then_decode(fmt):
    torch.manual_seed(0)
    Hq, Hkv, D, T = 9, 3, 64, 150
    cache = LayerKV(0, Hkv, D, 200, fmt)
    k, v, q = torch.randn(T + 3, Hkv, D), torch.randn(T + 3, Hkv, D), torch.randn(T + 3, Hq, D)
    cache.write(0, k[:T], v[:T])
    out = cache.attend(q[:T], 0, D ** -0.5)
    ks, vs = stored(cache)
    torch.testing.assert_close(out, oracle(q[:T], ks, vs, 0, D ** -0.5), atol=1e-5, rtol=1e-5)
    for t in range(T, T + 3):                              # decode steps read the same cache
        cache.write(t, k[t:t + 1], v[t:t + 1])
        ks, vs = stored(cache)
        step = cache.attend(q[t:t + 1], t, D ** -0.5)
        torch.testing.assert_close(step, oracle(q[t:t + 1], ks, vs, t, D ** -0.5), atol=1e-5, rtol=1e-5)
    if fmt != "fp32":   # the narrowed cache really changed the values it returns
        assert not torch.equal(stored(cache)[0][:T], k[:T])


@pytest.mark.parametrize("fmt", KV_DTYPES)
def test_wave_prefill_bit_identical_to_one_pass(fmt):
    torch.manual_seed(1)
    T, Hq, Hkv, D, start = 700, 6, 2, 64, 37
    k, v, q = torch.randn(start + T, Hkv, D), torch.randn(start + T, Hkv, D), torch.randn(T, Hq, D)
    budget = 3 << 20
    waves = LayerKV(0, Hkv, D, start + T, fmt, wave_budget_bytes=budget)
    one = LayerKV(0, Hkv, D, start + T, fmt, wave_max_rows=1 << 30)
    for c in (waves, one):
        c.write(0, k, v)
    a = waves.attend(q, start, D ** -0.5)
    b = one.attend(q, start, D ** -0.5)
    assert one.last_waves == 1 and waves.last_waves >= 3
    assert 0 < waves.peak_scratch_bytes <= budget
    assert torch.equal(a, b)


def test_long_prefill_takes_waves_and_scratch_does_not_grow_with_n():
    torch.manual_seed(2)
    Hq, Hkv, D = 1, 1, 32
    peaks = {}
    for n in (1500, 4600):
        c = LayerKV(0, Hkv, D, n, "q8_0", wave_budget_bytes=2 << 20)
        c.write(0, torch.randn(n, Hkv, D), torch.randn(n, Hkv, D))
        c.attend(torch.randn(n, Hq, D), 0, D ** -0.5)
        peaks[n] = (c.peak_scratch_bytes, c.last_waves)
    assert peaks[4600][1] > peaks[1500][1] >= 2
    assert peaks[4600][0] <= peaks[1500][0] <= 2 << 20            # flat in N, under the budget
    big = LayerKV(0, Hkv, D, 4200, "fp32")                          # default 256 MiB budget
    big.write(0, torch.randn(4200, Hkv, D), torch.randn(4200, Hkv, D))
    big.attend(torch.randn(4200, Hq, D), 0, D ** -0.5)
    assert big.last_waves == 2                                      # > 4096 rows: several waves


def test_budget_too_small_is_a_clear_error():
    c = LayerKV(3, 2, 64, 600, "fp32", wave_budget_bytes=64 << 10)
    c.write(0, torch.randn(600, 2, 64), torch.randn(600, 2, 64))
    with pytest.raises(ConfigError, match="wave_budget_bytes=65536 is too small.*at least"):
        c.attend(torch.randn(600, 4, 64), 0, 0.125)


def test_write_past_the_cache_is_an_error():
    c = LayerKV(2, 2, 32, 8, "bf16")
    with pytest.raises(ContextOverflowError, match="layer 2: 10 tokens exceed the KV cache of 8"):
        c.write(4, torch.zeros(6, 2, 32), torch.zeros(6, 2, 32))


def spec_of(n_kv_heads, head_dim, n_layers=2):
    return ModelSpec(arch="llama", name="t", n_layers=n_layers, d_model=n_kv_heads * head_dim * 2,
                     n_heads=n_kv_heads * 2, n_kv_heads=n_kv_heads, head_dim=head_dim, d_ff=64,
                     vocab_size=32, ctx_train=64, rope_base=1e4, rope_type="norm", rms_eps=1e-6, qk_norm="none")


def test_geometry_guard_on_synthetic_48_wide_model():
    from engine.gguf_io import open_gguf
    from engine.synth import ensure
    spec = ModelSpec.from_gguf(open_gguf(ensure("tiny-llama-kv48")))
    assert spec.n_kv_heads * spec.head_dim == 48
    with pytest.raises(KVGeometryError) as e:
        make_layer_kv(spec, 1, 64, "q8_0", "cpu")
    msg = str(e.value)
    assert "layer 1" in msg and "3 x 16 = 48" in msg and "fp32" in msg and "bf16" in msg
    assert "\n" not in msg
    for dt in ("fp32", "bf16"):                       # not narrowed to q8_0: nothing to check
        assert make_layer_kv(spec, 1, 64, dt, "cpu").dtype == dt
    with pytest.raises(KVGeometryError):
        engine.load("tiny-llama-kv48", kv_dtype="q8_0", ctx=64)
    assert make_layer_kv(spec_of(4, 128), 0, 64, "q8_0", "cpu").dtype == "q8_0"


def test_dtype_is_read_from_buffers_and_faults_are_visible(monkeypatch):
    spec = spec_of(4, 128, n_layers=4)
    for dt in KV_DTYPES:
        c = make_layer_kv(spec, 0, 32, dt, "cpu")
        assert c.dtype == dt
    c = make_layer_kv(spec, 0, 32, "q8_0", "cpu")
    c.k = torch.zeros(32, 4, 128)                     # swap the buffer: the report follows it
    assert c.dtype == "k-fp32.v-q8_0" and c.kv_dtypes == ("fp32", "q8_0")   # K and V each read
    c.v = torch.zeros(32, 4, 128)
    assert c.dtype == "fp32"
    monkeypatch.setenv("KVBENCH_FAULT", "ignore_kv_dtype")
    assert [make_layer_kv(spec, i, 32, "q8_0", "cpu").dtype for i in range(4)] == ["fp32"] * 4
    monkeypatch.setenv("KVBENCH_FAULT", "skip_narrow_layer:2")
    assert [make_layer_kv(spec, i, 32, "q8_0", "cpu").dtype for i in range(4)] == ["q8_0", "q8_0", "fp32", "q8_0"]
    monkeypatch.setenv("KVBENCH_FAULT", "flip_bits")
    with pytest.raises(ConfigError, match="KVBENCH_FAULT"):
        make_layer_kv(spec, 0, 32, "q8_0", "cpu")


def test_triton_interpreter_works_when_triton_was_imported_first(tmp_path):
    """engine.kernels repairs triton's library functions if triton was imported before it."""
    import subprocess
    import sys
    code = ("import torch._dynamo, triton\n"              # triton imported without the interpreter
            "from engine import kernels\nfrom engine.kv import LayerKV\nimport torch\n"
            "kernels.set_backend('triton')\nc = LayerKV(0, 2, 64, 40, 'q8_0')\n"
            "c.write(0, torch.randn(40, 2, 64), torch.randn(40, 2, 64))\nq = torch.randn(40, 4, 64)\n"
            "a = c.attend(q, 0, 0.125)\nkernels.set_backend('torch')\nb = c.attend(q, 0, 0.125)\n"
            "print(float((a - b).abs().max()))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.strip().splitlines()[-1]) < 1e-5


# --- end to end on SmolLM2 ------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_engines(smollm2_path):
    return {dt: engine.load(smollm2_path, kv_dtype=dt, ctx=512) for dt in KV_DTYPES}


@pytest.mark.slow(seconds=50)
def test_smollm2_kv_dtypes_applied_and_teacher_forced_top1_stable(smol_engines):
    base = smol_engines["fp32"]
    text = ("The history of the printing press begins in the fifteenth century, when Johannes "
            "Gutenberg combined movable metal type, oil-based ink and a wooden press adapted from "
            "those used to make wine. Within fifty years, presses were running in more than two "
            "hundred cities across Europe, and the price of books fell so far that students, "
            "merchants and craftsmen could own them. Scholars argue about how quickly literacy rose, "
            "but nobody doubts that the spread of cheap printed pamphlets changed religion, science "
            "and politics. ") * 3
    ids = base.tokenizer.encode(text)[:260]
    assert len(ids) >= 256
    ref = base.logits(ids)
    for dt in ("bf16", "q8_0"):
        eng = smol_engines[dt]
        assert eng.kv_dtypes == [dt] * eng.spec.n_layers
        out = eng.logits(ids)
        top5 = out.topk(5, dim=-1).indices
        inside = (top5 == ref.argmax(-1, keepdim=True)).any(-1)
        max_abs = (out - ref).abs().max().item()
        print(f"{dt}: fp32 top-1 inside top-5 at {int(inside.sum())}/{len(ids)} positions, max-abs {max_abs:.3f}")
        assert bool(inside.all())
        assert 0 < max_abs < 5.0


def test_smollm2_greedy_chat_answer_with_each_dtype(smol_engines):
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    answers = {}
    for dt, eng in smol_engines.items():
        ids = eng.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        answers[dt] = eng.generate(ids, 12)
        print(dt, repr(eng.tokenizer.decode(answers[dt])))
    assert "Paris" in smol_engines["fp32"].tokenizer.decode(answers["fp32"])
    assert "Paris" in smol_engines["bf16"].tokenizer.decode(answers["bf16"])
    q8 = smol_engines["q8_0"].tokenizer.decode(answers["q8_0"])
    if "Paris" not in q8:
        # SmolLM2-135M's first answer token is a near-tie in fp32 ('The' 25.325 vs 'L' 25.243);
        # q8_0's KV error flips it. Hold the flip to that explanation: it must happen where
        # fp32's own margin is tiny, and pick fp32's runner-up.
        ref, got = answers["fp32"], answers["q8_0"]
        p = next(i for i, (a, b) in enumerate(zip(ref, got)) if a != b)
        lg = smol_engines["fp32"].logits(ids + ref[:p])[-1]
        top2 = lg.topk(2)
        margin = float(top2.values[0] - top2.values[1])
        print(f"q8_0 diverges at answer token {p}: fp32 margin {margin:.3f}")
        assert margin < 0.2 and int(top2.indices[1]) == got[p]
