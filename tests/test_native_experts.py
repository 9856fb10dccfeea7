"""engine.native: one MoE layer's Q4_0 experts for one token, integer dots against 8-bit blocks.

References: the same maths in torch (``moe_q4_decode_ref``: the kernel's 8-bit roundings, the
block sums as exact integers, float64 after them), and the exact float64 maths over the GGUF
block values (``gguf.quants`` dequantisation), whose distance is the 8-bit activations' rounding.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from engine import native
from engine.errors import ConfigError
from engine.kernels.moe_blocks import BlockStack

ok, why = native.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"native kernels unavailable: {why}")


def stack(shape, gen) -> BlockStack:
    st = BlockStack.empty("q4_0", shape)
    st.qs.copy_(torch.randint(0, 256, st.qs.shape, generator=gen, dtype=torch.int32).to(torch.uint8))
    st.d.copy_(((torch.rand(st.d.shape, generator=gen) + 0.5) / (8 * shape[2] ** 0.5)).half())
    return st


def ggml_values(st: BlockStack, e: int) -> torch.Tensor:
    """Expert e's matrix through gguf.quants: the GGUF bytes (fp16 d then 16 nibble bytes a block)."""
    N, kb = st.d.shape[1], st.d.shape[2]
    raw = torch.cat([st.d[e].reshape(N, kb, 1).view(torch.uint8).reshape(N, kb, 2), st.qs[e].reshape(N, kb, 16)], -1)
    return torch.from_numpy(dequantize(raw.reshape(N, -1).numpy(), GGMLQuantizationType.Q4_0).astype(np.float64))


@pytest.mark.parametrize("E,ff,d,k,threads", [(16, 256, 512, 8, 2), (8, 96, 64, 3, 1), (4, 32, 128, 1, 2)])
def test_native_experts_follow_their_reference_and_the_exact_maths(E, ff, d, k, threads):
    gen = torch.Generator().manual_seed(E + ff + d + k)
    gate, up, down = stack((E, ff, d), gen), stack((E, ff, d), gen), stack((E, d, ff), gen)
    x = torch.randn(d, generator=gen) * 3
    ids = torch.randperm(E, generator=gen)[:k].tolist()
    w = (torch.rand(k, generator=gen) + 0.1).tolist()
    y = native.moe_q4_decode(x, ids, w, gate, up, down, threads=threads)
    ref = native.moe_q4_decode_ref(x, ids, w, gate, up, down)
    rel = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    exact = torch.zeros(d, dtype=torch.float64)
    for e, p in zip(ids, w):
        g, u = ggml_values(gate, e) @ x.double(), ggml_values(up, e) @ x.double()
        exact += p * (ggml_values(down, e) @ (g / (1 + torch.exp(-g)) * u))
    rel_exact = ((y.double() - exact).abs().max() / exact.abs().max()).item()
    print(f"E{E} ff{ff} d{d} k{k}: vs reference {rel:.2e}, vs exact {rel_exact:.2e} (simd {native.simd()})")
    assert rel < 1e-5                    # float32 block-scale sums against float64 ones (a rare 8-bit flip)
    assert 1e-4 < rel_exact < 3e-2       # the 8-bit activations' rounding: present, and bounded


def test_the_portable_path_computes_what_the_vector_path_does(monkeypatch):
    """Built for plain x86-64 (no AVX2) the kernel runs its portable C loops: the same results to
    float32 summation order."""
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the portable build is checked on x86-64 hosts")
    gen = torch.Generator().manual_seed(5)
    gate, up, down = stack((8, 96, 128), gen), stack((8, 96, 128), gen), stack((8, 128, 96), gen)
    x, ids, w = torch.randn(128, generator=gen), [1, 6, 3], [0.5, 0.3, 0.2]
    vec = native.moe_q4_decode(x, ids, w, gate, up, down)
    if native.simd() != 2:
        pytest.skip("this CPU has no AVX2: its default build is the portable path already")
    monkeypatch.setenv("KVBENCH_NATIVE_MARCH", "x86-64")
    plain = native.moe_q4_decode(x, ids, w, gate, up, down)
    assert native.simd() == 0
    ref = native.moe_q4_decode_ref(x, ids, w, gate, up, down)
    assert ((plain.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
    assert ((plain - vec).abs().max() / vec.abs().max()).item() < 1e-5


def test_native_experts_refuse_what_they_cannot_read():
    gen = torch.Generator().manual_seed(1)
    gate, up, down = stack((4, 64, 64), gen), stack((4, 64, 64), gen), stack((4, 64, 64), gen)
    x = torch.randn(64)
    with pytest.raises(ConfigError, match="outside 0..3"):
        native.moe_q4_decode(x, [0, 4], [0.5, 0.5], gate, up, down)
    with pytest.raises(ConfigError, match="x of 32 values"):
        native.moe_q4_decode(x[:32], [0], [1.0], gate, up, down)
    q8 = BlockStack.empty("q8_0", (4, 64, 64))
    with pytest.raises(ConfigError, match="reads Q4_0"):
        native.moe_q4_decode(x, [0], [1.0], q8, up, down)
    with pytest.raises(ConfigError, match="do not agree"):
        native.moe_q4_decode(x, [0], [1.0], gate, up, stack((4, 32, 64), gen))


def test_a_host_job_computes_what_the_call_does():
    """HostJob: the body of a captured step's host node (kvb_run_job over the page-locked stage),
    run here on this thread: equal to moe_q4_decode on the same inputs, bit for bit (the same
    C function under it); an id outside the layer cannot raise from a host node, so the output
    turns NaN and rc says so; runs counts each run."""
    gen = torch.Generator().manual_seed(9)
    gate, up, down = stack((16, 128, 256), gen), stack((16, 128, 256), gen), stack((16, 256, 128), gen)
    job = native.HostJob(gate, up, down, k=4, threads=2)
    for step in range(3):
        x = torch.randn(256, generator=gen)
        ids = torch.randperm(16, generator=gen)[:4].tolist()
        w = (torch.rand(4, generator=gen) + 0.1).tolist()
        job.fill(x, ids, w)
        got = job.run().clone()
        assert torch.equal(got, native.moe_q4_decode(x, ids, w, gate, up, down, threads=2))
    assert job.runs == 3 and job.rc == 0
    job.fill(x, [0, 1, 16, 2], w)
    assert torch.isnan(job.run()).all() and job.rc != 0
    with pytest.raises(ConfigError, match="k = 65"):
        native.HostJob(gate, up, down, k=65)
