"""engine.kernels.rows (the fast prefill's fused norm and RoPE launches) against the torch ops they
replace: ``engine.model.rms_norm`` on bfloat16 rows and ``engine.model.rotate``. Interpreted
(TRITON_INTERPRET=1, CPU) or compiled (CUDA); then the fast prefill through them against the
same prefill through torch's ops."""
from __future__ import annotations

import os

if not __import__("torch").cuda.is_available():          # before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from engine import kernels
import torch.nn.functional as F

from engine.kernels.rows import rms_norm_rows, rope_rows, silu_mul_rows
from engine.model import Rope, rms_norm, rotate

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", [(37, 576), (19, 4, 128), (1, 2048)])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_rms_norm_rows_matches_the_torch_norm(shape, wdtype):
    """The same bfloat16 result as rms_norm's narrow branch, but where the float32 statistic's
    summation order moves a product across a rounding boundary: one bfloat16 step, rarely."""
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * torch.logspace(-2, 2, shape[-1])).to(torch.bfloat16).to(DEV)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(wdtype).to(DEV)
    ref = rms_norm(x, w, 1e-6)
    out = rms_norm_rows(x, w, 1e-6)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    diff = (out.float() - ref.float()).abs()
    step = ref.float().abs() * 2.0 ** -7 + 1e-30          # one bfloat16 step (8 significant bits)
    assert bool((diff <= step).all()), f"beyond one bfloat16 step: {(diff / step).max().item():.2f} steps"
    same = (diff == 0).float().mean().item()
    print(f"rms_norm_rows {shape} w {wdtype}: {same:.2%} of values equal to torch's")
    assert same >= 0.99


def test_rms_norm_rows_refuses_what_it_does_not_compute():
    x = torch.randn(4, 64, device=DEV)
    with pytest.raises(ValueError, match="bfloat16"):
        rms_norm_rows(x, torch.ones(64, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="does not match"):
        rms_norm_rows(x.to(torch.bfloat16), torch.ones(32, device=DEV), 1e-6)


@pytest.mark.parametrize("kind", ["neox", "norm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_rows_matches_rotate(kind, dtype):
    """float32 RoPE at positions start.. over bf16 or f32 rows against ``rotate`` (torch ops):
    interpreted, the same float32 ops (equal); compiled, within what a fused multiply-add moves
    (a float32 ulp of the larger product, not of the result, which may cancel)."""
    g = torch.Generator().manual_seed(3)
    T, H, D, start = 23, 3, 64, 41
    rope = Rope(D, 10000.0, kind, 128, device=DEV)
    x = (torch.randn(T, H, D, generator=g) * 10).to(dtype).to(DEV)
    ref = rotate(x, rope.cos[start:start + T, None, :], rope.sin[start:start + T, None, :], kind)
    assert ref.dtype == torch.float32
    slack = x.float().abs().amax(-1, keepdim=True) * 2.0 ** -21      # per row: 2 ulps of the largest term
    out = rope_rows(x, rope.cos, rope.sin, start, kind)
    assert out.dtype == torch.float32
    if DEV == "cpu":
        assert torch.equal(out, ref)
    else:
        assert bool(((out - ref).abs() <= slack).all()), f"max {(out - ref).abs().max().item():.3g}"
    # a column view of a fused projection [T, (H + 2) * D]: strided rows, read in place
    fused = torch.cat([x.reshape(T, H * D), torch.randn(T, 2 * D, generator=g).to(dtype).to(DEV)], dim=1)
    view = fused[:, :H * D].reshape(T, H, D)
    assert not view.is_contiguous()
    assert torch.equal(rope_rows(view, rope.cos, rope.sin, start, kind), out)
    # rounded to bfloat16 in the launch (the fast prefill's q): torch's .to(bfloat16) of those values
    qb = rope_rows(x, rope.cos, rope.sin, start, kind, torch.bfloat16)
    assert qb.dtype == torch.bfloat16
    if DEV == "cpu":
        assert torch.equal(qb, ref.to(torch.bfloat16))
    else:     # each side one bf16 rounding (2^-8 relative) of values at most `slack` apart
        assert bool(((qb.float() - ref.to(torch.bfloat16).float()).abs() <= ref.abs() * 2.0 ** -7 + 2 * slack).all())
    # Rope.apply: bf16 rows go to the row kernel where Triton runs, others to rotate
    assert torch.equal(rope.apply(x.float(), start, torch.bfloat16), ref.to(torch.bfloat16))
    via = rope.apply(x, start)
    assert torch.equal(via, out if dtype == torch.bfloat16 and kernels.use_triton(x.device) else ref)


@pytest.mark.parametrize("T,ff", [(33, 1536), (5, 96), (1, 2050)])
def test_silu_mul_rows_matches_the_torch_ffn(T, ff):
    """bf16(bf16(silu(gate)) * up) from a fused [T, 2 ff] projection, as the dense FFN computes it
    on bf16 activations: equal, but where exp's last bit moves silu across a bfloat16 rounding
    boundary (one step, rarely)."""
    g = torch.Generator().manual_seed(T + ff)
    gu = (torch.randn(T, 2 * ff, generator=g) * 4).to(torch.bfloat16).to(DEV)
    ref = F.silu(gu[:, :ff]) * gu[:, ff:]
    out = silu_mul_rows(gu)
    assert out.dtype == torch.bfloat16 and out.shape == (T, ff)
    diff = (out.float() - ref.float()).abs()
    step = ref.float().abs() * 2.0 ** -7 + 1e-30
    assert bool((diff <= step).all()), f"beyond one bfloat16 step: {(diff / step).max().item():.2f} steps"
    same = (diff == 0).float().mean().item()
    print(f"silu_mul_rows [{T}, {ff}]: {same:.2%} equal to torch's")
    assert same >= 0.99
    with pytest.raises(ValueError, match="bfloat16"):
        silu_mul_rows(gu.float())


def test_rope_rows_refuses_tables_short_of_the_positions():
    rope = Rope(64, 10000.0, "neox", 16, device=DEV)
    with pytest.raises(ValueError, match="do not cover positions"):
        rope_rows(torch.randn(8, 2, 64, device=DEV), rope.cos, rope.sin, 12, "neox")
    with pytest.raises(ValueError, match="kind"):
        rope_rows(torch.randn(8, 2, 64, device=DEV), rope.cos, rope.sin, 0, "yarn")
    with pytest.raises(ValueError, match="out_dtype"):
        rope_rows(torch.randn(8, 2, 64, device=DEV), rope.cos, rope.sin, 0, "neox", torch.float16)


def test_fast_prefill_goes_through_the_row_kernels_and_keeps_its_logits(monkeypatch):
    """The fast prefill (bfloat16 activations) with the Triton backend launches the row kernels
    for its norms and RoPE, and its logits stay within bfloat16 noise of the same prefill through
    torch's ops (the exact path never calls them)."""
    import engine
    from engine.kernels import rows
    calls = {"norm": 0, "rope": 0, "ffn": 0}
    real_norm, real_rope, real_ffn = rows.rms_norm_rows, rows.rope_rows, rows.silu_mul_rows

    def count_norm(*a, **k):
        calls["norm"] += 1
        return real_norm(*a, **k)

    def count_rope(*a, **k):
        calls["rope"] += 1
        return real_rope(*a, **k)
    def count_ffn(*a, **k):
        calls["ffn"] += 1
        return real_ffn(*a, **k)
    monkeypatch.setattr(rows, "rms_norm_rows", count_norm)
    monkeypatch.setattr(rows, "rope_rows", count_rope)
    monkeypatch.setattr(rows, "silu_mul_rows", count_ffn)
    toks = list(range(5, 69))
    prev = kernels.set_backend("torch")
    try:
        eng = engine.load("tiny-llama", device=DEV, kv_dtype="bf16", ctx=128, weight_format="bf16")
        eng.set_prefill_path("fast")
        ref = eng.logits(toks)
        assert calls == {"norm": 0, "rope": 0, "ffn": 0}
        kernels.set_backend("triton")
        out = eng.logits(toks)
        n = eng.spec.n_layers
        assert calls["rope"] == 2 * n and calls["norm"] >= 2 * n + 1 and calls["ffn"] == n, calls
        calls.update(norm=0, rope=0, ffn=0)
        eng.set_prefill_path("exact")
        eng.logits(toks)
        assert calls == {"norm": 0, "rope": 0, "ffn": 0}
    finally:
        kernels.set_backend(prev)
    err = (out.float() - ref.float()).abs().max().item()
    print(f"fast prefill, row kernels vs torch ops: max abs logit {err:.3e} (logits up to {ref.abs().max().item():.2f})")
    assert err < 0.05 * max(1.0, ref.abs().max().item())
