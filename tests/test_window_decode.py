"""Sliding-window decode through the Triton kernel (issue 14.5: gemma3 on the GPU path).

The decode kernel's ``window`` (keys at positions > pos - window only) and ``ring_rows``
(position p in row p % rows, ``engine.kv_ring.RingKV``), run by Triton's interpreter on the
CPU, equal an independent float64 attention over the stored values (gguf.quants for q8_0)
for a full-length cache and for a ring whose positions have wrapped several times; the
windowed prefill on the Triton backend is the torch reference (bit-identical); a bad window
or a ring smaller than its window is a one-line error.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from engine import kernels
from engine.kernels.decode_attention import decode_attention
from engine.kv import LayerKV
from engine.kv_ring import RingKV

HQ, HKV, D, W = 4, 2, 32, 24


def stored(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """What a cache of ``fmt`` holds for float32 rows x [n, Hkv, D], independently of kvbench."""
    if fmt == "fp32":
        return x.double()
    if fmt == "bf16":
        return x.to(torch.bfloat16).double()
    n = x.shape[0]
    flat = x.reshape(n, -1).numpy().astype(np.float32)
    deq = quants.dequantize(quants.quantize(flat, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    return torch.from_numpy(np.asarray(deq, dtype=np.float64)).reshape(x.shape)


def window_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, window: int) -> torch.Tensor:
    """float64 attention of one query row at ``pos`` over keys (pos - window, pos]."""
    lo = max(0, pos - window + 1)
    kk = k[lo:pos + 1].repeat_interleave(HQ // HKV, dim=1)          # [L, Hq, D]
    vv = v[lo:pos + 1].repeat_interleave(HQ // HKV, dim=1)
    s = torch.einsum("hd,lhd->hl", q.double(), kk) * D ** -0.5
    return torch.einsum("hl,lhd->hd", s.softmax(-1), vv)


@pytest.fixture
def triton_backend():
    prev = kernels.set_backend("triton")
    yield
    kernels.set_backend(prev)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g) * 2,
            torch.randn(n, HQ, D, generator=g))


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "q8_0"])
def test_windowed_decode_kernel_on_a_full_length_cache(fmt, triton_backend):
    n = 70
    k, v, q = _data(n, 1)
    cache = LayerKV(0, HKV, D, 96, fmt)
    cache.write(0, k, v)
    ks, vs = stored(k, fmt), stored(v, fmt)
    for pos in (0, W - 2, W - 1, W, n - 1):
        out = cache.attend(q[pos:pos + 1], pos, D ** -0.5, window=W)[0]
        want = window_ref(q[pos], ks, vs, pos, W)
        err = (out.double() - want).abs().max().item()
        print(f"{fmt} pos {pos}: {err:.2e}")
        assert err < 2e-5, (fmt, pos, err)
    full = cache.attend(q[n - 1:n], n - 1, D ** -0.5)[0]              # the window is load-bearing
    assert (full.double() - window_ref(q[n - 1], ks, vs, n - 1, W)).abs().max().item() > 1e-2
    pos_t = torch.tensor([n - 1], dtype=torch.int32)                  # a CUDA graph's device position
    at = decode_attention(q[n - 1], cache.k, cache.v, fmt, None, D ** -0.5, HKV, pos=pos_t, window=W,
                          cfg={"block_n": 16})
    assert (at.double() - window_ref(q[n - 1], ks, vs, n - 1, W)).abs().max().item() < 2e-5


@pytest.mark.parametrize("fmt", ["fp32", "q8_0"])
def test_ring_decode_kernel_after_the_ring_wrapped(fmt):
    """A ring of W + 128 = 152 rows, prefilled to position 450 in calls of <= 128 tokens (the
    ring wrapped twice), then decode steps 450..461, whose windows straddle the ring's end at
    456: every step on the Triton path equals the torch path and the float64 reference over
    the stored values."""
    n, prompt = 462, 450
    k, v, q = _data(n, 2)
    ks, vs = stored(k, fmt), stored(v, fmt)
    outs = {}
    for backend in ("torch", "triton"):
        ring = RingKV(0, HKV, D, 512, W, fmt, chunk=128)
        prev = kernels.set_backend(backend)
        try:
            for s0 in range(0, prompt, 128):
                s1 = min(prompt, s0 + 128)
                ring.write(s0, k[s0:s1], v[s0:s1])
                ring.attend(q[s0:s1], s0, D ** -0.5, window=W)
            for pos in range(prompt, n):
                ring.write(pos, k[pos:pos + 1], v[pos:pos + 1])
                outs[backend, pos] = ring.attend(q[pos:pos + 1], pos, D ** -0.5, window=W)[0]
        finally:
            kernels.set_backend(prev)
        worst = max((outs[backend, p].double() - window_ref(q[p], ks, vs, p, W)).abs().max().item()
                    for p in range(prompt, n))
        print(f"{fmt} ring ({ring.rows} rows) {backend}: worst vs float64 {worst:.2e}")
        assert worst < 2e-5
    assert all((outs["triton", p] - outs["torch", p]).abs().max().item() < 2e-5 for p in range(prompt, n))


def test_windowed_prefill_on_the_triton_backend_is_the_torch_reference(triton_backend):
    k, v, q = _data(60, 3)
    tri = LayerKV(0, HKV, D, 64, "q8_0")
    tri.write(0, k, v)
    a = tri.attend(q, 0, D ** -0.5, window=W)
    prev = kernels.set_backend("torch")
    try:
        ref = LayerKV(0, HKV, D, 64, "q8_0")
        ref.write(0, k, v)
        b = ref.attend(q, 0, D ** -0.5, window=W)
    finally:
        kernels.set_backend(prev)
    assert torch.equal(a, b)


def test_bad_window_arguments_are_one_line_errors():
    cache = LayerKV(0, HKV, D, 64, "fp32")
    q = torch.randn(HQ, D)
    with pytest.raises(ValueError, match="sliding window 0 must be positive"):
        decode_attention(q, cache.k, cache.v, "fp32", 10, D ** -0.5, HKV, window=0)
    with pytest.raises(ValueError, match="a ring of 16 rows needs a window of at most that many keys"):
        decode_attention(q, cache.k, cache.v, "fp32", 10, D ** -0.5, HKV, window=24, ring_rows=16)
