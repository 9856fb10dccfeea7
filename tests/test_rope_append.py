"""engine.kernels.kv_append.rope_append_at (RoPE + the K/V append in one launch, the captured
decode step's ``KVBENCH_DECODE_ROPE_APPEND``) against the torch path it replaces: q and k rotated
by ``engine.model.rotate`` at the position, then ``kv_append_ref`` into a buffer of the format.
Interpreted (TRITON_INTERPRET=1, CPU) the float32 ops are the reference's own, so the cache bytes
must be equal; compiled (CUDA) a fused multiply-add may move a value by an ulp, so the stored
values are held to one step of the format instead."""
from __future__ import annotations

import os

if not __import__("torch").cuda.is_available():          # before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from engine import kernels
from engine.kernels.kv_append import kv_append_ref, rope_append_at
from engine.kv_layout import alloc_kv, to_ggml_bytes
from engine.model import Rope, rotate

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEV == "cpu"


@pytest.fixture
def triton_backend():
    prev = kernels.set_backend("triton")
    yield
    kernels.set_backend(prev)


def _dequant(buf, fmt, hkv, d):
    from engine.kv import dequantize_q8_0
    if fmt == "q8_0":
        return dequantize_q8_0(to_ggml_bytes(buf, fmt, hkv, d).cpu(), (buf.shape[0] if buf.dim() > 1 else -1, hkv * d))
    return buf.float().reshape(buf.shape[0], hkv * d).cpu()


@pytest.mark.parametrize("kind", ["neox", "norm"])
@pytest.mark.parametrize("k_fmt,v_fmt", [("fp32", "fp32"), ("bf16", "bf16"), ("q8_0", "q8_0"), ("q8_0", "bf16")])
@pytest.mark.parametrize("qkv_dtype,ring", [(torch.float32, None), (torch.bfloat16, 16)])
def test_rope_append_matches_rotate_then_append(kind, k_fmt, v_fmt, qkv_dtype, ring, triton_backend):
    hq, hkv, d, pos, rows = 6, 2, 64, 37, 48
    gen = torch.Generator().manual_seed(hash((kind, k_fmt, v_fmt, ring)) % 1000)
    qkv = (torch.randn(1, (hq + 2 * hkv) * d, generator=gen) * torch.logspace(-2, 2, (hq + 2 * hkv) * d)[
        torch.randperm((hq + 2 * hkv) * d, generator=gen)]).to(qkv_dtype)
    rope = Rope(d, 10000.0, kind, 64, device="cpu")
    n = ring or rows
    kb, vb = alloc_kv(n, hkv, d, k_fmt, DEV), alloc_kv(n, hkv, d, v_fmt, DEV)
    q = rope_append_at(qkv.to(DEV), rope.cos.to(DEV), rope.sin.to(DEV), torch.tensor([pos], device=DEV), kb, vb,
                       k_fmt, v_fmt, hq, hkv, d, kind, ring_rows=ring)
    # the torch path: rotate (float32 maths on the projection's values), then append
    x = qkv.float()
    c, s = rope.cos[pos:pos + 1, None, :], rope.sin[pos:pos + 1, None, :]
    q_ref = rotate(x[:, :hq * d].view(1, hq, d), c, s, kind)
    k_ref = rotate(x[:, hq * d:(hq + hkv) * d].view(1, hkv, d), c, s, kind)
    v_ref = x[:, (hq + hkv) * d:].view(1, hkv, d)
    row = pos % n
    kr, vr = alloc_kv(n, hkv, d, k_fmt), alloc_kv(n, hkv, d, v_fmt)
    kv_append_ref(kr, row, k_ref, k_fmt)
    kv_append_ref(vr, row, v_ref, v_fmt)
    # q: the same products and sums (an ulp where a compiled FMA contracts them)
    bound = (x[:, :hq * d].abs().view(1, hq, d) * 2 ** -22).amax(-1, keepdim=True)
    assert (q.cpu() - q_ref).abs().le(2 * bound + 1e-30).all()
    if INTERPRETED:
        assert torch.equal(q.cpu(), q_ref)
        assert torch.equal(to_ggml_bytes(kb, k_fmt, hkv, d).cpu(), to_ggml_bytes(kr, k_fmt, hkv, d))
        assert torch.equal(to_ggml_bytes(vb, v_fmt, hkv, d).cpu(), to_ggml_bytes(vr, v_fmt, hkv, d))
    else:
        for got, want, fmt in ((kb, kr, k_fmt), (vb, vr, v_fmt)):
            g, w = _dequant(got, fmt, hkv, d), _dequant(want, fmt, hkv, d)
            step = {"fp32": 2 ** -22, "bf16": 2 ** -7, "q8_0": 1 / 64}[fmt]
            assert ((g - w).abs() <= step * w.abs().amax() + 1e-30).all(), fmt
    # no other row written
    others = [r for r in range(n) if r != row]
    for b, fmt in ((kb, k_fmt), (vb, v_fmt)):
        assert not to_ggml_bytes(b, fmt, hkv, d).cpu()[others].any()


def test_rope_append_honours_the_planted_scale_fault(triton_backend, monkeypatch):
    """A planted q8_0 fault reaches this launch as it reaches kv_append (harness self-tests)."""
    monkeypatch.setenv("KVBENCH_FAULT", "q8_scale_shift")
    hq, hkv, d, pos = 2, 2, 64, 3
    qkv = torch.randn(1, (hq + 2 * hkv) * d, generator=torch.Generator().manual_seed(1))
    rope = Rope(d, 10000.0, "neox", 8, device="cpu")
    kb, vb = alloc_kv(8, hkv, d, "q8_0", DEV), alloc_kv(8, hkv, d, "q8_0", DEV)
    rope_append_at(qkv.to(DEV), rope.cos.to(DEV), rope.sin.to(DEV), torch.tensor([pos], device=DEV), kb, vb,
                   "q8_0", "q8_0", hq, hkv, d, "neox")
    vr = alloc_kv(8, hkv, d, "q8_0")
    kv_append_ref(vr, pos, qkv[:, (hq + hkv) * d:].view(1, hkv, d), "q8_0")       # the fault applies here too
    assert torch.equal(to_ggml_bytes(vb, "q8_0", hkv, d).cpu(), to_ggml_bytes(vr, "q8_0", hkv, d))
    monkeypatch.delenv("KVBENCH_FAULT")
    clean = alloc_kv(8, hkv, d, "q8_0")
    kv_append_ref(clean, pos, qkv[:, (hq + hkv) * d:].view(1, hkv, d), "q8_0")
    assert not torch.equal(to_ggml_bytes(clean, "q8_0", hkv, d), to_ggml_bytes(vr, "q8_0", hkv, d))


def test_rope_append_rejects_what_it_cannot_apply(triton_backend):
    rope = Rope(64, 10000.0, "neox", 8, device="cpu")
    kb, vb = alloc_kv(8, 2, 64, "bf16", DEV), alloc_kv(8, 2, 64, "bf16", DEV)
    args = (rope.cos.to(DEV), rope.sin.to(DEV), torch.tensor([0], device=DEV), kb, vb, "bf16", "bf16")
    good = torch.zeros(1, 6 * 64, device=DEV)
    with pytest.raises(ValueError, match="kind"):
        rope_append_at(good, *args, 2, 2, 64, "gptj")
    with pytest.raises(ValueError, match="contiguous"):
        rope_append_at(torch.zeros(1, 5 * 64, device=DEV), *args, 2, 2, 64, "neox")
    with pytest.raises(ValueError, match="power-of-two"):
        rope_append_at(torch.zeros(1, 6 * 48, device=DEV), *args, 2, 2, 48, "neox")


@pytest.mark.parametrize("kind", ["neox", "norm"])
@pytest.mark.parametrize("k_fmt,v_fmt", [("fp32", "fp32"), ("bf16", "bf16"), ("q8_0", "q8_0")])
def test_rope_append_with_head_norms_matches_norm_rotate_append(kind, k_fmt, v_fmt, triton_backend):
    """qk_norm "head" (Qwen3): each q and k head RMS-normed with its weights, then rotated and
    appended, in the one launch; against engine.model.rms_norm, rotate and kv_append_ref. The
    norm's sum runs in another order than torch's mean, so values are held to a few ulps and
    the stored K to one step of its format (v is untouched by the norm: bytes equal)."""
    from engine.model import rms_norm
    hq, hkv, d, pos, n, eps = 4, 2, 64, 11, 16, 1e-6
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(1, (hq + 2 * hkv) * d, generator=gen) * 3
    qn, kn = torch.rand(d, generator=gen) + 0.5, torch.rand(d, generator=gen) + 0.5
    rope = Rope(d, 10000.0, kind, 32, device="cpu")
    kb, vb = alloc_kv(n, hkv, d, k_fmt, DEV), alloc_kv(n, hkv, d, v_fmt, DEV)
    q = rope_append_at(qkv.to(DEV), rope.cos.to(DEV), rope.sin.to(DEV), torch.tensor([pos], device=DEV), kb, vb,
                       k_fmt, v_fmt, hq, hkv, d, kind, head_norm=(qn.to(DEV), kn.to(DEV), eps))
    c, s = rope.cos[pos:pos + 1, None, :], rope.sin[pos:pos + 1, None, :]
    q_ref = rotate(rms_norm(qkv[:, :hq * d].view(1, hq, d), qn, eps), c, s, kind)
    k_ref = rotate(rms_norm(qkv[:, hq * d:(hq + hkv) * d].view(1, hkv, d), kn, eps), c, s, kind)
    v_ref = qkv[:, (hq + hkv) * d:].view(1, hkv, d)
    assert (q.cpu() - q_ref).abs().max().item() <= 8 * 2 ** -23 * q_ref.abs().max().item()
    kr, vr = alloc_kv(n, hkv, d, k_fmt), alloc_kv(n, hkv, d, v_fmt)
    kv_append_ref(kr, pos, k_ref, k_fmt)
    kv_append_ref(vr, pos, v_ref, v_fmt)
    g, w = _dequant(kb, k_fmt, hkv, d), _dequant(kr, k_fmt, hkv, d)
    step = {"fp32": 2 ** -20, "bf16": 2 ** -7, "q8_0": 1 / 64}[k_fmt]
    assert ((g - w).abs() <= step * w.abs().amax() + 1e-30).all()
    assert torch.equal(to_ggml_bytes(vb, v_fmt, hkv, d).cpu(), to_ggml_bytes(vr, v_fmt, hkv, d))
    # without the norms the same launch gives a different q: the norms were applied
    kb2, vb2 = alloc_kv(n, hkv, d, k_fmt, DEV), alloc_kv(n, hkv, d, v_fmt, DEV)
    q_plain = rope_append_at(qkv.to(DEV), rope.cos.to(DEV), rope.sin.to(DEV), torch.tensor([pos], device=DEV),
                             kb2, vb2, k_fmt, v_fmt, hq, hkv, d, kind)
    assert (q_plain.cpu() - q_ref).abs().max().item() > 0.1


@pytest.mark.parametrize("kind", ["neox", "norm"])
def test_rope_tables_grow_past_their_first_4096_rows(kind):
    """``Rope`` starts with 4096 rows of tables and rebuilds them longer when a prefill reaches
    past them: rows straddling 4096 and far beyond are rotated by the angle of their own
    position, against a float64 rotation written out from the RoPE formula."""
    D, base = 64, 1e6
    rope = Rope(D, base, kind, 4096)
    assert rope.cos.shape[0] == 4096
    g = torch.Generator().manual_seed(0)
    for start, T in ((4090, 12), (9000, 5)):
        x = torch.randn(T, 3, D, generator=g)
        got = rope.apply(x, start)
        inv = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
        ang = torch.arange(start, start + T, dtype=torch.float64)[:, None, None] * inv      # [T, 1, D/2]
        xd = x.double()
        a, b = (xd[..., : D // 2], xd[..., D // 2:]) if kind == "neox" else (xd[..., 0::2], xd[..., 1::2])
        ra, rb = a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()
        want = torch.cat([ra, rb], -1) if kind == "neox" else torch.stack([ra, rb], -1).flatten(-2)
        assert rope.cos.shape[0] >= start + T
        assert (got.double() - want).abs().max().item() < 1e-5
