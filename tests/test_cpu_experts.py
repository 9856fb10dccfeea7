"""Routed experts on the host CPU from Q4_0 blocks (engine.cpu_experts).

References: torch's own packing op (``_convert_weight_to_int4pack_for_cpu``) for the layout
``pack_int4`` writes; for the maths, a float64 SiLU-gated expert sum over ``gguf.quants``'
values of the same blocks: once exact (bounding the speed path's distance) and once with the
path's bf16 roundings applied (activations, scales, each matmul's output), which it must
follow to within bf16 rounding-boundary flips.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants

from engine import cpu_experts
from engine.cpu_experts import HostQ4Experts, pack_int4
from engine.kernels.moe_blocks import BlockStack


@pytest.mark.parametrize("N,K", [(16, 64), (48, 32), (64, 64), (80, 128), (192, 96), (1536, 64)])
def test_pack_int4_is_torchs_layout(N, K):
    g = torch.Generator().manual_seed(N + K)
    v = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
    assert torch.equal(pack_int4(v), torch.ops.aten._convert_weight_to_int4pack_for_cpu(v, 1))
    assert cpu_experts.packing() == "direct"


def test_packing_tile_follows_torchs_cpu_kernels():
    """torch packs in tiles of 64 rows where it dispatches to AVX-512 kernels and 32 under AVX2;
    the tile found on the probe is the one this machine's torch uses."""
    cap = torch.backends.cpu.get_cpu_capability()
    want = {"AVX512": 64, "AVX2": 32}.get(cap)
    if want is None:
        pytest.skip(f"torch's CPU capability here is {cap}: no documented tile to hold it to")
    assert cpu_experts.packing_tile() == want
    other = 96 - want
    g = torch.Generator().manual_seed(1)
    v = torch.randint(0, 16, (128, 64), generator=g, dtype=torch.int32)
    assert not torch.equal(pack_int4(v, other), torch.ops.aten._convert_weight_to_int4pack_for_cpu(v, 1))


def test_pack_int4_refuses_rows_it_cannot_tile():
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_int4(torch.zeros(24, 64, dtype=torch.int32))


def q4_stack(S, N, K, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((S * N, K)) / K ** 0.5).astype(np.float32)
    raw = quants.quantize(w, QT.Q4_0)
    vals = quants.dequantize(raw, QT.Q4_0).reshape(S, N, K)
    return BlockStack.from_ggml(torch.from_numpy(raw.copy()), "q4_0", (S, N, K)), torch.from_numpy(vals.copy()).double()


def reference(x, stacks, ids, p, bf16: bool):
    """float64 sum over the experts; ``bf16``: round as the CPU path does."""
    r = (lambda t: t.to(torch.bfloat16).double()) if bf16 else (lambda t: t)
    (gate, gv), (up, uv), (down, dv) = stacks

    def w(st, vals, e):   # the values with the scale rounded: (q - 8) * bf16(d)
        if not bf16:
            return vals[e]
        d = st.d[e].double()
        return vals[e] / d.repeat_interleave(32, dim=1) * r(d).repeat_interleave(32, dim=1)
    xb = r(x.double())
    y = torch.zeros(1, x.shape[1], dtype=torch.float64)
    for e, pj in zip(ids, p):
        a, b = r(xb @ w(gate, gv, e).T), r(xb @ w(up, uv, e).T)
        h = r(torch.nn.functional.silu(a) * b)
        y += pj * r(h @ w(down, dv, e).T)
    return y


@pytest.mark.parametrize("E,ff,d,k", [(6, 64, 128, 3), (4, 96, 64, 4)])
def test_experts_follow_the_gguf_values(E, ff, d, k):
    stacks = [q4_stack(E, ff, d, 1), q4_stack(E, ff, d, 2), q4_stack(E, d, ff, 3)]
    ex = HostQ4Experts.from_blocks(*(s for s, _ in stacks))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, d, generator=g)
    ids = torch.randperm(E, generator=g)[:k].tolist()
    p = torch.rand(k, generator=g).tolist()
    out = ex(x, ids, p).double()
    assert out.shape == (1, d) and torch.isfinite(out).all()
    exact, emulated = reference(x, stacks, ids, p, bf16=False), reference(x, stacks, ids, p, bf16=True)
    scale = exact.abs().max().item()
    e_exact = (out - exact).abs().max().item() / scale
    e_emul = (out - emulated).abs().max().item() / scale
    print(f"E{E} ff{ff} d{d}: max-abs / max |y|: vs exact {e_exact:.2e}, vs bf16-emulated {e_emul:.2e}")
    assert e_emul <= 2 ** -7, "the CPU path does not compute the bf16 maths it records"
    assert e_exact <= 3e-2, "the bf16 speed path is further from the exact maths than its roundings allow"
    # a wrong expert, nibble order or scale would be far outside both bounds
    wrong = reference(x, stacks, [(e + 1) % E for e in ids], p, bf16=True)
    assert (out - wrong).abs().max().item() / scale > 0.1


def test_refuses_q8_0_experts():
    raw = torch.from_numpy(quants.quantize(np.ones((4 * 64, 64), np.float32), QT.Q8_0).copy())
    st = BlockStack.from_ggml(raw, "q8_0", (4, 64, 64))
    with pytest.raises(ValueError, match="Q4_0 only"):
        HostQ4Experts.from_blocks(st, st, st)


def test_rows_equal_one_token_at_a_time_and_bytes_are_priced():
    E, ff, d = 5, 64, 64
    stacks = [q4_stack(E, ff, d, 4)[0], q4_stack(E, ff, d, 5)[0], q4_stack(E, d, ff, 6)[0]]
    ex = HostQ4Experts.from_blocks(*stacks)
    assert ex.nbytes == cpu_experts.packed_bytes(E, ff, d)
    g = torch.Generator().manual_seed(8)
    h = torch.randn(4, d, generator=g)
    ids = [torch.randperm(E, generator=g)[:2].tolist() for _ in range(4)]
    p = [torch.rand(2, generator=g).tolist() for _ in range(4)]
    together = ex.rows(h, ids, p)
    for t in range(4):
        assert torch.allclose(together[t:t + 1], ex(h[t:t + 1], ids[t], p[t]), rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_packing_on_the_gpu_gives_the_same_bytes():
    """A load repacks host experts on the GPU when there is one: the same bytes as on the CPU."""
    stacks = [q4_stack(4, 64, 128, 9)[0], q4_stack(4, 64, 128, 10)[0], q4_stack(4, 128, 64, 11)[0]]
    host = HostQ4Experts.from_blocks(*stacks)
    gpu = HostQ4Experts.from_blocks(*(s.to("cuda") for s in stacks))
    assert all(t.device.type == "cpu" for t in gpu.tensors())
    assert all(torch.equal(a, b) for a, b in zip(host.tensors(), gpu.tensors()))


def _pinned_copy(st: BlockStack) -> BlockStack:
    dst = BlockStack.empty(st.fmt, st.shape, pinned=torch.cuda.is_available())
    dst.qs.copy_(st.qs)
    dst.d.copy_(st.d)
    return dst


def test_gpu_share_applies_only_on_cuda_with_blocks_and_is_named_in_the_math(monkeypatch):
    """KVBENCH_CPU_MOE_GPU_SHARE: the GPU's share of a cpu-tier layer's experts, only where a GPU
    can read the layer's blocks (CUDA, blocks kept); the layer's recorded maths says so; a value
    out of range is refused, not clamped."""
    from engine.errors import ConfigError
    from engine.model import CpuExperts
    stacks = [q4_stack(4, 64, 64, 12)[0], q4_stack(4, 64, 64, 13)[0], q4_stack(4, 64, 64, 14)[0]]
    packed = HostQ4Experts.from_blocks(*stacks)
    layer, bare = CpuExperts(packed, tuple(stacks)), CpuExperts(packed)
    assert layer.gpu_share("cuda") == 0 and "GPU_SHARE" not in layer.math
    monkeypatch.setenv("KVBENCH_CPU_MOE_GPU_SHARE", "3")
    assert layer.gpu_share("cuda") == 3 and layer.gpu_share("cpu") == 0 and bare.gpu_share("cuda") == 0
    assert "3 of each token's experts computed by the GPU" in layer.math and "GPU_SHARE" not in bare.math
    monkeypatch.setenv("KVBENCH_CPU_MOE_GPU_SHARE", "65")
    with pytest.raises(ConfigError):
        layer.gpu_share("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("share", [3, 8])
def test_split_step_is_the_gpu_share_plus_the_cpu_rest(share, monkeypatch):
    """One token through a cpu-tier layer with its experts split: the GPU's share (blocks kernel
    over the pinned host blocks, on a side stream) plus the CPU's rest (engine.native's 8-bit
    activation blocks where it is in force, else the int4 path), against each part's own
    reference; all 8 on the GPU is the blocks kernel alone."""
    from engine import native
    from engine.kernels.moe_blocks import moe_decode_blocks_ref
    from engine.model import CpuExperts
    E, ff, d, k = 16, 256, 512, 8
    stacks = [q4_stack(E, ff, d, 20)[0], q4_stack(E, ff, d, 21)[0], q4_stack(E, d, ff, 22)[0]]
    packed = HostQ4Experts.from_blocks(*stacks)
    layer = CpuExperts(packed, tuple(_pinned_copy(s) for s in stacks))
    g = torch.Generator().manual_seed(23)
    h = torch.randn(1, d, generator=g)
    ids = torch.randperm(E, generator=g)[:k]
    p = torch.rand(k, generator=g)
    monkeypatch.setenv("KVBENCH_CPU_MOE_GPU_SHARE", str(share))
    out = layer.run(h.cuda(), ids[None].cuda(), p[None].cuda()).cpu()
    assert layer.last_gpu_share == share
    want = moe_decode_blocks_ref(h, *stacks, ids[:share], p[:share])
    if share < k:   # the CPU's rest in the maths the layer runs (native: activations in 8-bit blocks)
        rest = (native.moe_q4_decode_ref(h[0], ids[share:].tolist(), p[share:].tolist(), *stacks).float()[None]
                if layer.uses_native else packed(h, ids[share:].tolist(), p[share:].tolist()))
        want = want + rest
    err = ((out - want).abs().max() / want.abs().max()).item()
    print(f"split {share}/{k}: rel err {err:.2e}")
    assert err < 1e-5


@pytest.mark.gpu
def test_clock_stamps_each_host_round_trip_in_order(monkeypatch):
    """``CpuExperts.clock``: a list there gets one tuple of six ordered stamps per one-token run on
    CUDA (start, side launched, sync reached, synced, CPU done, end), with a GPU share or without;
    None (the default) keeps nothing."""
    from engine.model import CpuExperts
    E, ff, d, k = 16, 256, 512, 8
    stacks = [q4_stack(E, ff, d, 30)[0], q4_stack(E, ff, d, 31)[0], q4_stack(E, d, ff, 32)[0]]
    layer = CpuExperts(HostQ4Experts.from_blocks(*stacks), tuple(_pinned_copy(s) for s in stacks))
    h, ids, p = torch.randn(1, d).cuda(), torch.randperm(E)[:k][None].cuda(), torch.rand(1, k).cuda()
    assert CpuExperts.clock is None
    layer.run(h, ids, p)
    try:
        CpuExperts.clock = []
        for share in ("0", "3"):
            monkeypatch.setenv("KVBENCH_CPU_MOE_GPU_SHARE", share)
            layer.run(h, ids, p)
        clock = CpuExperts.clock
    finally:
        CpuExperts.clock = None
    assert len(clock) == 2 and all(len(c) == 6 and list(c) == sorted(c) for c in clock)
    assert clock[0][1] == clock[0][0] and clock[1][1] > clock[1][0]     # the side launch only with a share
