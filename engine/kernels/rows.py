"""Row-wise kernels of the fast prefill path: one launch where torch's eager ops take six or seven.

Contract (both callable on any device through the interpreter; ``engine.model`` uses them on
CUDA tensors when the Triton backend is in use, on the fast prefill path's bfloat16 activations):
- ``rms_norm_rows(x, w, eps)``: x bfloat16 [..., d] (contiguous), w [d] any float dtype ->
  bfloat16 [..., d], ``engine.model.rms_norm``'s narrow-activation maths: the statistic in
  float32 (``rstd = 1 / sqrt(mean(x^2) + eps)``), ``bf16(x * rstd)`` times ``bf16(w)``, rounded to
  bfloat16 (nearest even, on the bits: the interpreter's casts truncate). Against torch's ops it
  differs only where the float32 sum's order or the reciprocal square root moves a product
  across a bfloat16 rounding boundary: one bfloat16 step, on a few values.
- ``rope_rows(x, cos, sin, start, kind)``: x [T, H, D] (bfloat16 or float32; rows may be strided,
  as a column view of a fused projection is, each row's H x D values contiguous), cos,
  sin float32 [n, D/2] tables -> float32 [T, H, D] (or those values rounded to bfloat16,
  ``out_dtype``), ``engine.model.rotate`` at positions
  ``start .. start+T-1``: ``x1 cos - x2 sin``, ``x2 cos + x1 sin`` in float32 over "neox" halves
  or "norm" adjacent pairs (compiled, a fused multiply-add may move a value by one float32 ulp).

- ``silu_mul_rows(gu)``: gu bfloat16 [T, 2 ff] (a fused gate/up projection: gate columns, then
  up) -> bfloat16 [T, ff], ``bf16(bf16(silu(gate)) * up)``: ``engine.model``'s dense FFN on bf16
  activations (``F.silu`` rounded to bf16, then the product rounded), in one launch instead of
  the two projections' split, the activation and the product.

What it buys (the H100 profile of reports/h100-2026-12-05d call 1): SmolLM2's fast prefill
launched 1635 kernels for 8192 tokens (54 a layer) and was bound by the launches (37 ms of wall
for 21.7 ms of device time), where HF launched 1311. RoPE over q and k was ~14 launches a layer
(float32 promotion, four products, two sums, a stack), each norm ~7.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import bf16_bits, round_bf16


@triton.jit
def _rms_rows_kernel(X, W, OUT, d, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < d
    x = tl.load(X + row * d + c, mask=mask, other=0).to(tl.float32)
    ms = tl.sum(x * x, axis=0) / d
    rstd = 1.0 / tl.sqrt(ms + eps)
    w = round_bf16(tl.load(W + c, mask=mask, other=0).to(tl.float32))
    y = round_bf16(x * rstd) * w
    tl.store(OUT + row * d + c, bf16_bits(y), mask=mask)


def rms_norm_rows(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """See the module docstring. bfloat16 [..., d]."""
    if x.dtype != torch.bfloat16:
        raise ValueError(f"rms_norm_rows: x must be bfloat16 (the fast prefill's activations), not {x.dtype}")
    d = x.shape[-1]
    if w.shape != (d,):
        raise ValueError(f"rms_norm_rows: weight {tuple(w.shape)} does not match rows of {d}")
    x2 = x.contiguous().view(-1, d)
    out = torch.empty(x2.shape, dtype=torch.int16, device=x.device)
    if x2.shape[0]:
        _rms_rows_kernel[(x2.shape[0],)](x2, w.contiguous(), out, d, float(eps),
                                         BLOCK=triton.next_power_of_2(d), num_warps=4)
    return out.view(torch.bfloat16).view(x.shape)


@triton.jit
def _rope_rows_kernel(X, COS, SIN, OUT, start, stride_t, H: tl.constexpr, D: tl.constexpr, NEOX: tl.constexpr,
                      BLOCK: tl.constexpr, OUT_BF16: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = D // 2
    i = tl.arange(0, BLOCK)                      # one (head, pair) per lane: H * D/2 of them
    mask = i < H * HALF
    h = i // HALF
    j = i % HALF
    if NEOX:
        c1 = h * D + j
        c2 = c1 + HALF
    else:
        c1 = h * D + 2 * j
        c2 = c1 + 1
    base = t * (H * D)
    x1 = tl.load(X + t * stride_t + c1, mask=mask, other=0).to(tl.float32)
    x2 = tl.load(X + t * stride_t + c2, mask=mask, other=0).to(tl.float32)
    cs = tl.load(COS + (start + t) * HALF + j, mask=mask, other=0)
    sn = tl.load(SIN + (start + t) * HALF + j, mask=mask, other=0)
    y1 = x1 * cs - x2 * sn
    y2 = x2 * cs + x1 * sn
    if OUT_BF16:                                 # float32 maths, then torch's .to(bfloat16) rounding
        tl.store(OUT + base + c1, bf16_bits(y1), mask=mask)
        tl.store(OUT + base + c2, bf16_bits(y2), mask=mask)
    else:
        tl.store(OUT + base + c1, y1, mask=mask)
        tl.store(OUT + base + c2, y2, mask=mask)


def rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int, kind: str,
              out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """See the module docstring. [T, H, D] float32, or bfloat16 (``out_dtype``: the float32
    result rounded as ``.to(torch.bfloat16)`` rounds it, in the same launch)."""
    if kind not in ("neox", "norm"):
        raise ValueError(f"rope_rows: kind {kind!r} is not 'neox' or 'norm'")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"rope_rows: out_dtype {out_dtype} is not float32 or bfloat16")
    T, H, D = x.shape
    if cos.dtype != torch.float32 or cos.shape[1] != D // 2 or start + T > cos.shape[0]:
        raise ValueError(f"rope_rows: tables {tuple(cos.shape)} {cos.dtype} do not cover positions "
                         f"{start}..{start + T - 1} of head_dim {D} in float32")
    if x.stride(2) != 1 or x.stride(1) != D:      # rows may be strided (q, k: column views of one
        x = x.contiguous()                          # projection), each row's heads contiguous
    bf16 = out_dtype == torch.bfloat16
    out = torch.empty(T, H, D, dtype=torch.int16 if bf16 else torch.float32, device=x.device)
    if T:
        _rope_rows_kernel[(T,)](x, cos.contiguous(), sin.contiguous(), out, start, x.stride(0), H=H, D=D,
                                NEOX=kind == "neox", BLOCK=triton.next_power_of_2(H * D // 2),
                                OUT_BF16=bf16, num_warps=4)
    return out.view(torch.bfloat16) if bf16 else out


@triton.jit
def _silu_mul_kernel(GU, OUT, ff, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < ff
    g = tl.load(GU + row * 2 * ff + c, mask=mask, other=0).to(tl.float32)
    u = tl.load(GU + row * 2 * ff + ff + c, mask=mask, other=0).to(tl.float32)
    a = round_bf16(g / (1.0 + tl.exp(-g)))
    tl.store(OUT + row * ff + c, bf16_bits(a * u), mask=mask)


def silu_mul_rows(gu: torch.Tensor) -> torch.Tensor:
    """See the module docstring. bfloat16 [T, ff]."""
    if gu.dtype != torch.bfloat16 or gu.dim() != 2 or gu.shape[1] % 2:
        raise ValueError(f"silu_mul_rows: gu must be bfloat16 [T, 2 ff], not {gu.dtype} {tuple(gu.shape)}")
    gu = gu.contiguous()
    T, ff = gu.shape[0], gu.shape[1] // 2
    out = torch.empty(T, ff, dtype=torch.int16, device=gu.device)
    if T:
        block = min(1024, triton.next_power_of_2(ff))
        _silu_mul_kernel[(T, triton.cdiv(ff, block))](gu, out, ff, BLOCK=block, num_warps=4)
    return out.view(torch.bfloat16)
