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
    if native.simd() < 2:
        pytest.skip("this CPU has no AVX2: its default build is the portable path already")
    monkeypatch.setenv("KVBENCH_NATIVE_MARCH", "x86-64")
    plain = native.moe_q4_decode(x, ids, w, gate, up, down)
    assert native.simd() == 0
    ref = native.moe_q4_decode_ref(x, ids, w, gate, up, down)
    assert ((plain.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
    assert ((plain - vec).abs().max() / vec.abs().max()).item() < 1e-5


@pytest.mark.parametrize("d,ff", [(128, 96), (2048, 768)])
def test_the_avx512_path_computes_what_the_avx2_path_does(monkeypatch, d, ff):
    """Where this CPU has AVX-512 VNNI (simd 3: two blocks a step, vpdpbusd), the AVX2 build
    (-march=haswell) gives the same layer to float32 summation order, both within the reference's
    bound; 96 / 32 = 3 blocks leaves an odd last block to the AVX2 loop of the AVX-512 build."""
    if native.simd() != 3:
        pytest.skip("this CPU's build has no AVX-512 VNNI path")
    gen = torch.Generator().manual_seed(d + ff)
    gate, up, down = stack((8, ff, d), gen), stack((8, ff, d), gen), stack((8, d, ff), gen)
    x, ids, w = torch.randn(d, generator=gen), [1, 6, 3, 0], [0.4, 0.3, 0.2, 0.1]
    wide = native.moe_q4_decode(x, ids, w, gate, up, down, threads=2)
    monkeypatch.setenv("KVBENCH_NATIVE_MARCH", "haswell")
    assert native.simd() == 2
    avx2 = native.moe_q4_decode(x, ids, w, gate, up, down, threads=2)
    ref = native.moe_q4_decode_ref(x, ids, w, gate, up, down)
    for y in (wide, avx2):
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
    assert ((wide - avx2).abs().max() / avx2.abs().max()).item() < 1e-5 and not torch.equal(wide, torch.zeros_like(wide))


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


@pytest.mark.parametrize("n,threads", [(1, 1), (1001, 2), (1 << 16, 2)])
def test_read_xor_is_the_xor_of_every_word(n, threads):
    """read_rate's kernel reads every word once whatever the thread split: its XOR equals numpy's
    over the same words (odd lengths leave a remainder to one thread's range)."""
    buf = torch.randint(-2 ** 62, 2 ** 62, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.int64)
    want = int(np.bitwise_xor.reduce(buf.numpy()))
    assert native.read_xor(buf, threads) == want % 2 ** 64
    with pytest.raises(ConfigError, match="int64"):
        native.read_xor(buf.to(torch.int32))


def test_read_rate_times_the_bytes_asked():
    r = native.read_rate(1 << 24, threads=1, reps=3)
    assert r["bytes"] == 1 << 24 and r["threads"] == 1 and len(r["gb_s_all"]) == 3
    assert 0 < min(r["gb_s_all"]) <= r["gb_s"] <= max(r["gb_s_all"])
    with pytest.raises(ConfigError, match="repetitions"):
        native.read_rate(1 << 10, reps=0)


def test_a_doorbell_runs_the_rung_job_answers_and_gives_up_on_silence():
    """Doorbell.serve, the host side of KVBENCH_HOST_NODES_RUN=doorbell (the device side, the
    captured ring and wait, runs on a GPU only: tests/test_expert_placement.py): a rung flag makes
    it run that node's job here and set the answer flag; a ring that never comes releases every
    wait (no stream left blocked) and raises a one-line ConfigError naming the setting."""
    gen = torch.Generator().manual_seed(11)
    gate, up, down = stack((8, 64, 128), gen), stack((8, 64, 128), gen), stack((8, 128, 64), gen)
    job = native.HostJob(gate, up, down, k=2, threads=1)
    x, ids, w = torch.randn(128, generator=gen), [5, 2], [0.7, 0.3]
    job.fill(x, ids, w)
    bell = native.Doorbell(2)
    assert bell.view.tolist() == [0, 0, 0, 0]
    bell.view[0] = 1                        # what the graph's cuStreamWriteValue32 does at node 0
    bell.serve(0, job)
    assert bell.view.tolist() == [1, 0, 1, 0] and job.runs == 1
    assert torch.equal(job.out, native.moe_q4_decode(x, ids, w, gate, up, down, threads=1))
    with pytest.raises(ConfigError, match="never rang") as err:
        bell.serve(1, job, timeout_s=0.05)
    assert "set KVBENCH_HOST_NODES_RUN=callback" in str(err.value) and "\n" not in str(err.value)
    assert bell.view.tolist()[2:] == [1, 1] and job.runs == 1
    bell.reset()
    assert bell.view.tolist() == [0, 0, 0, 0]
