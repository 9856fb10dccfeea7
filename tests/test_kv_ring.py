"""RingKV (engine/kv_ring.py) against the full-length windowed LayerKV it replaces.

The reference is a ``LayerKV`` of ``max_tokens`` rows attending with the same window: the
ring must give torch.equal outputs (fp32, bf16, q8_0: the stored values are the same) over a
sequence that crosses the window several times, in one prefill, in chunked prefills of sizes
that straddle the ring's chunk, and in a prefill followed by many decode steps; plus a
float64 dense check that the window is honoured at all, the byte sizes, and the errors.
"""
from __future__ import annotations

import pytest
import torch

from engine.errors import ConfigError, ContextOverflowError
from engine.kv import LayerKV, make_layer_kv
from engine.kv_ring import RING_CHUNK, RingKV, layer_kv_rows, ring_rows
from engine.kernels.kv_append import dequantize_q8_0_ref

FMTS = ["fp32", "bf16", "q8_0"]


def qkv(n: int, hq: int, hkv: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, h, d, generator=g) for h in (hq, hkv, hkv))


def run(cache, q, k, v, steps: list[int], window: int) -> torch.Tensor:
    """Write + attend the sequence in calls of the given sizes (as the model does per layer)."""
    out, pos = [], 0
    for n in steps:
        cache.write(pos, k[pos:pos + n], v[pos:pos + n])
        out.append(cache.attend(q[pos:pos + n], pos, q.shape[-1] ** -0.5, window=window))
        pos += n
    return torch.cat(out)


def pair(fmt, n_max, hkv, d, window, chunk=RING_CHUNK, **kw):
    full = LayerKV(0, hkv, d, n_max, fmt, **kw)
    ring = RingKV(0, hkv, d, n_max, window, fmt, chunk=chunk, **kw)
    return full, ring


# window 150 with chunk 128 (ring of 278 rows) and Gemma's 512 with 512 (1024 rows)
GEOMS = [pytest.param(150, 128, 1100, id="W150-C128"), pytest.param(512, 512, 2600, id="W512-C512")]


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("window,chunk,n", GEOMS)
def test_one_prefill_equals_full_length(fmt, window, chunk, n):
    q, k, v = qkv(n, 4, 2, 32, seed=1)
    full, ring = pair(fmt, n + 7, 2, 32, window, chunk)
    a, b = run(full, q, k, v, [n], window), run(ring, q, k, v, [n], window)
    assert ring.rows == window + chunk < n / 2          # the sequence crosses the ring twice+
    assert ring.last_waves >= n // chunk                 # processed in pieces of <= chunk rows
    assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", FMTS)
def test_chunked_prefills_and_decode_equal_full_length(fmt):
    window, chunk, hq, hkv, d = 150, 128, 4, 2, 32
    steps = [1, 127, 128, 129, 300, 5, 64, 700] + [1] * 180   # straddle the chunk, then decode
    n = sum(steps)
    q, k, v = qkv(n, hq, hkv, d, seed=2)
    full, ring = pair(fmt, n, hkv, d, window, chunk)
    a, b = run(full, q, k, v, steps, window), run(ring, q, k, v, steps, window)
    assert n > 5 * ring.rows
    assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", FMTS)
def test_small_wave_budget_and_reset(fmt):
    """A wave budget that forces one-chunk waves on both, then a second sequence after reset."""
    window, chunk, n = 150, 256, 1000
    q, k, v = qkv(n, 4, 2, 32, seed=3)
    budget = 2 << 20          # 128-row waves on both
    full, ring = pair(fmt, n, 2, 32, window, chunk, wave_budget_bytes=budget)
    a, b = run(full, q, k, v, [n], window), run(ring, q, k, v, [n], window)
    assert full.last_waves > 2 and torch.equal(a, b)
    full.reset()
    ring.reset()
    q2, k2, v2 = qkv(n, 4, 2, 32, seed=4)
    a, b = run(full, q2, k2, v2, [600, 400], window), run(ring, q2, k2, v2, [600, 400], window)
    assert torch.equal(a, b)


def dense_ref(q, k, v, window):
    """float64 softmax over keys j with qpos - window < j <= qpos (GQA by repetition)."""
    T, Hq, D = q.shape
    G = Hq // k.shape[1]
    kk, vv = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = torch.einsum("thd,nhd->thn", q.double(), kk) * D ** -0.5
    pos = torch.arange(T)
    s = s.masked_fill((pos[None, :] > pos[:, None])[:, None] | (pos[None, :] <= pos[:, None] - window)[:, None],
                      float("-inf"))
    return torch.einsum("thn,nhd->thd", s.softmax(-1), vv).float()


@pytest.mark.parametrize("fmt", FMTS)
def test_ring_honours_the_window_against_dense(fmt):
    window, n = 150, 900
    q, k, v = qkv(n, 4, 2, 32, seed=5)
    ring = RingKV(0, 2, 32, n, window, fmt, chunk=128)
    out = run(ring, q, k, v, [400, 1, 1, 498], window)
    full = LayerKV(0, 2, 32, n, fmt)          # only for the stored values the ring quantized
    full.write(0, k, v)
    if fmt == "q8_0":
        ks, vs = (dequantize_q8_0_ref(b, (n, 2, 32)) for b in full.to_ggml_blocks())
    else:
        ks, vs = full.k.float(), full.v.float()
    want = dense_ref(q, ks, vs, window)
    assert (out - want).abs().max().item() < 1e-5
    assert (dense_ref(q, ks, vs, n)[window:] - want[window:]).abs().max().item() > 1e-2


@pytest.mark.parametrize("fmt,per_row", [("fp32", 2 * 256 * 4), ("bf16", 2 * 256 * 2), ("q8_0", 2 * 8 * 34)])
def test_bytes_are_ring_rows(fmt, per_row):
    ring = RingKV(3, 1, 256, 32768, 512, fmt)
    assert ring.rows == ring_rows(512) == 512 + RING_CHUNK == 1024
    assert ring.dtype == fmt and ring.nbytes == 1024 * per_row
    assert ring.to_ggml_blocks()[0].shape[0] == ring.to_ggml_blocks()[1].shape[0] == 1024


class _Spec:
    n_kv_heads, head_dim, sliding_window, swa_layers = 1, 256, 512, (0, 1)

    def window(self, layer):
        return self.sliding_window if layer in self.swa_layers else None


def test_make_layer_kv_builds_rings_only_where_smaller():
    s = _Spec()
    assert isinstance(make_layer_kv(s, 0, 32768, "q8_0"), RingKV)
    assert type(make_layer_kv(s, 2, 32768, "q8_0")) is LayerKV          # global layer
    assert type(make_layer_kv(s, 0, 1024, "fp32")) is LayerKV           # ring would not be smaller
    assert layer_kv_rows(s, 0, 32768) == 1024 and layer_kv_rows(s, 2, 32768) == 32768
    assert layer_kv_rows(s, 0, 1024) == 1024 and layer_kv_rows(s, 0, 1025) == 1024


def test_errors():
    ring = RingKV(0, 1, 32, 600, 100, "fp32", chunk=128)
    with pytest.raises(ContextOverflowError, match="exceed the KV cache of 600"):
        ring.write(590, torch.zeros(20, 1, 32), torch.zeros(20, 1, 32))
    with pytest.raises(ConfigError, match="cannot serve window=None"):
        ring.attend(torch.zeros(1, 2, 32), 0, 1.0)
    with pytest.raises(ConfigError, match="cannot serve window=200"):
        ring.attend(torch.zeros(1, 2, 32), 0, 1.0, window=200)
    with pytest.raises(ConfigError, match="multiple of 128"):
        RingKV(0, 1, 32, 600, 100, "fp32", chunk=100)


@pytest.mark.parametrize("fmt", FMTS)
def test_held_prefill_without_attend_is_flushed_by_the_next_write(fmt):
    """A long write that no attend() consumed (e.g. keys only) still leaves the last window."""
    window, n = 150, 700
    q, k, v = qkv(n + 3, 4, 2, 32, seed=6)
    full, ring = pair(fmt, n + 3, 2, 32, window, chunk=128)
    for c in (full, ring):
        c.write(0, k[:n], v[:n])                 # 700 > chunk: held by the ring
        c.write(n, k[n:], v[n:])
    a = full.attend(q[n:], n, 32 ** -0.5, window=window)
    b = ring.attend(q[n:], n, 32 ** -0.5, window=window)
    assert torch.equal(a, b)
