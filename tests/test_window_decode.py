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


@pytest.mark.parametrize("fmt,pair", [("fp32", True), ("q8_0", True), ("bf16", False)])
def test_ring_device_position_steps_after_the_ring_wrapped(fmt, pair, triton_backend, monkeypatch):
    """The captured step's ring path: ``RingKV.write_at`` / ``attend_at`` with the position on
    the device (K+V in one launch or two), after a prefill that wrapped the ring twice and
    across its end, store the rows ``write`` stores and equal the float64 reference.

    The prefill is set-up, taken by both rings through the torch backend: the interpreted
    Triton append of 450 rows cost 4-11 s a case, and its bytes are the torch reference's
    (every format: tests/test_kernels.py; a wrapping ring prefill on Triton: the test above).
    The decode steps, which this test is about, run on the Triton backend."""
    monkeypatch.setenv("KVBENCH_DECODE_KV_PAIR", "1" if pair else "0")
    n, prompt = 462, 450
    k, v, q = _data(n, 3)
    ks, vs = stored(k, fmt), stored(v, fmt)
    ring, ref = (RingKV(0, HKV, D, 512, W, fmt, chunk=128) for _ in range(2))
    prev = kernels.set_backend("torch")
    try:
        for s0 in range(0, prompt, 128):
            s1 = min(prompt, s0 + 128)
            for c in (ring, ref):
                c.write(s0, k[s0:s1], v[s0:s1])
                c.attend(q[s0:s1], s0, D ** -0.5, window=W)
    finally:
        kernels.set_backend(prev)
    ring.flush()
    for pos in range(prompt, n):
        p = torch.tensor([pos], dtype=torch.int32)
        ring.write_at(p, k[pos:pos + 1], v[pos:pos + 1])
        ref.write(pos, k[pos:pos + 1], v[pos:pos + 1])
        out = ring.attend_at(q[pos:pos + 1], p, D ** -0.5)[0]
        ref.attend(q[pos:pos + 1], pos, D ** -0.5, window=W)
        err = (out.double() - window_ref(q[pos], ks, vs, pos, W)).abs().max().item()
        assert err < 2e-5, (pos, err)
    assert torch.equal(ring.k.view(torch.uint8), ref.k.view(torch.uint8))
    assert torch.equal(ring.v.view(torch.uint8), ref.v.view(torch.uint8))


def test_gemma3_static_decode_matches_eager_through_wrapping_rings(monkeypatch):
    """tiny-gemma3 (5 sliding-window layers of window 8 in rings of 520 rows, one global) in
    the static decode step (device position, the step a CUDA graph captures; Triton by the
    interpreter here) against the eager step, from position 515 across the rings' end: the
    same logits to float32 summation order and the same greedy tokens."""
    from engine import synth
    import engine
    from engine.kv_ring import RingKV as Ring
    eng = engine.load(synth.ensure("tiny-gemma3"), kv_dtype="q8_0", ctx=600)
    assert sum(isinstance(c, Ring) for c in eng.caches) == 5 and eng.caches[0].rows == 520
    prompt = torch.randint(100, 40000, (515,), generator=torch.Generator().manual_seed(4)).tolist()
    prev = kernels.set_backend("torch")
    try:
        eng.set_decode_mode("eager")
        eng.prefill(prompt)
        eager = torch.stack([eng.decode(prompt[-1] + i) for i in range(8)])
    finally:
        kernels.set_backend(prev)
    prev = kernels.set_backend("triton")
    try:
        eng.set_decode_mode("static")
        assert eng.decode_path == "static", eng.decode_path_reason
        kernels.set_backend("torch")
        eng.prefill(prompt)
        kernels.set_backend("triton")
        static = torch.stack([eng.decode(prompt[-1] + i) for i in range(8)])
    finally:
        kernels.set_backend(prev)
    err = (static - eager).abs().max().item()
    print(f"tiny-gemma3 static vs eager, positions 515-522 (rings of 520 rows): max abs {err:.2e}")
    assert err < 1e-4 * eager.abs().max().item()
    assert torch.equal(static.argmax(-1), eager.argmax(-1))


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
