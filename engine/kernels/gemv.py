"""One token's matrix-vector products with their neighbours fused in (the decode step, issue 14.2).

Contract: ``gemv(x, w, prologue=, g=, eps=, residual=)`` returns ``y [1, N]`` float32 with

    y = round_w(pro(x) @ w.T) (+ residual)

for one token: ``w [N, K]`` (rows contiguous along K; a row view of a fused buffer is fine)
float32 or bfloat16, or a Q8_0 matrix (``engine.qweights``: int8 [N, K + K/16], quants then
fp16 block scales per row; its values dequantised in registers); ``x`` float32 on the same
device. The prologue is the op that
feeds the product, recomputed by every program from ``x`` (a few KB) so it needs no launch of
its own:

- ``"none"``: ``x [1, K]`` as it is;
- ``"rms"``: ``x * rsqrt(mean(x^2) + eps) * g`` (``engine.model.rms_norm``), ``g [K]``;
- ``"silu"`` / ``"gelu_tanh"``: ``x = [gate | up]`` of ``[1, 2K]`` (``w_gu``'s output),
  ``act(gate) * up`` (a dense FFN's SwiGLU / GeGLU before its down projection).

The rounding is ``engine.model.mm``'s: with bfloat16 ``w`` the input is rounded to
bfloat16 (nearest, ties to even), products accumulate in float32 and the result is rounded to bfloat16 (what
``(x.to(w.dtype) @ w.T).float()`` returns); float32 ``w`` rounds nothing, nor does Q8_0 (float32
products of the exact block values: ``engine.qweights.mm``). Over Q8_0 the sum takes one of two
forms (``KVBENCH_GEMV_Q8_FORM``): "blocks" sums each block's 32 products and multiplies the sum by
the block's scale (one scale load a block), "gather" multiplies every value by its block's
scale before summing; the GPU's profile decides which is the default. ``residual [1, N]``
float32 is added after that rounding (``x + mm(...)``). Summation order differs from
cuBLAS's, so results agree with ``gemv_ref`` to float32 summation error before the rounding
(a value at a bf16 rounding boundary can land one bf16 ulp apart). One program per
``BLOCK_N`` output rows; launches read nothing on the host, so a CUDA graph captures them.
``gemv_ref`` is the same maths from ``engine.model``'s own torch ops.

    qkv = gemv(x, w.wqkv, prologue="rms", g=w.attn_norm, eps=spec.rms_eps)
    x = gemv(o, w.wo, residual=x)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import qweights
from ..formats import Q8_BLOCK
from . import interpreted
from .common import pdl_enter, pdl_launch, round_bf16

PROLOGUES = {"none": 0, "rms": 1, "silu": 2, "gelu_tanh": 3}
_GELU_C = 0.7978845608028654          # sqrt(2 / pi)


@triton.jit
def _gemv_kernel(X, W, Y, G, R, H, WD, N, stride_w, stride_d, eps, K: tl.constexpr,
                 PRO: tl.constexpr, RES: tl.constexpr, NARROW: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HOUT: tl.constexpr = False,
                 Q8: tl.constexpr = False, QB: tl.constexpr = 32, BLOCK_SUMS: tl.constexpr = False, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    # K is a compile-time constant and the K loops unroll (tl.static_range): every weight
    # load of a program can be in flight at once (a decode GEMV is bound by memory latency)
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    offs = tl.arange(0, BLOCK_K)
    inv = 1.0
    if PRO == 1:                                   # the row's inverse RMS, from all K inputs
        ss = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in tl.static_range(0, K, BLOCK_K):
            c = k0 + offs
            xv = tl.load(X + c, mask=c < K, other=0.0)
            ss += xv * xv
        inv = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if BLOCK_SUMS:                                  # one sum a block
        accb = tl.zeros([BLOCK_N, BLOCK_K // QB], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        c = k0 + offs
        cm = c < K
        if PRO >= 2:                               # act(gate) * up from [gate | up]
            a = tl.load(X + c, mask=cm, other=0.0)
            b = tl.load(X + K + c, mask=cm, other=0.0)
            if PRO == 2:
                a = a * tl.sigmoid(a)
            else:
                z = 0.7978845608028654 * (a + 0.044715 * a * a * a)
                a = 0.5 * a * (1.0 + (2.0 * tl.sigmoid(2.0 * z) - 1.0))
            xv = a * b
        else:
            xv = tl.load(X + c, mask=cm, other=0.0)
            if PRO == 1:
                xv = xv * inv * tl.load(G + c, mask=cm, other=0.0)
                if HOUT:                           # the normed input itself, once (program 0)
                    if pid == 0:
                        tl.store(H + c, xv, mask=cm)
        if NARROW:
            xv = round_bf16(xv)
        m2 = rmask[:, None] & cm[None, :]
        if Q8:       # int8 quants times their block's fp16 scale (WD: the scales, stride_d a row)
            wv = tl.load(W + rows[:, None] * stride_w + c[None, :], mask=m2, other=0).to(tl.float32)
            if BLOCK_SUMS:    # a block's 32 products summed, then times its one scale
                part = tl.sum(tl.reshape(wv * xv[None, :], (BLOCK_N, BLOCK_K // QB, QB)), axis=2)
                cb = k0 // QB + tl.arange(0, BLOCK_K // QB)
                dv = tl.load(WD + rows[:, None] * stride_d + cb[None, :],
                             mask=rmask[:, None] & (cb < K // QB)[None, :], other=0.0)
                accb += part * dv.to(tl.float32)
            else:            # each value times its block's scale, gathered per value
                dv = tl.load(WD + rows[:, None] * stride_d + (c // QB)[None, :], mask=m2, other=0.0)
                acc += (wv * dv.to(tl.float32)) * xv[None, :]
        else:
            wv = tl.load(W + rows[:, None] * stride_w + c[None, :], mask=m2, other=0.0)
            acc += wv.to(tl.float32) * xv[None, :]
    if BLOCK_SUMS:
        y = tl.sum(accb, axis=1)
    else:
        y = tl.sum(acc, axis=1)
    if NARROW:
        y = round_bf16(y)
    if RES:
        y += tl.load(R + rows, mask=rmask, other=0.0)
    tl.store(Y + rows, y, mask=rmask)


def _check(x, w, prologue, g, residual) -> int:
    if prologue not in PROLOGUES:
        raise ValueError(f"gemv: prologue {prologue!r} is not one of {', '.join(PROLOGUES)}")
    if w.dim() != 2 or w.stride(1) != 1:
        raise ValueError(f"gemv: w {tuple(w.shape)} must be [N, K] with rows contiguous along K")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.int8):
        raise ValueError(f"gemv: w dtype {w.dtype} is not float32 / bfloat16 / int8 Q8_0 rows (the "
                         f"decode step's weight formats); use engine.model.mm")
    N, K = w.shape[0], (qweights.in_features(w) if w.dtype == torch.int8 else w.shape[1])
    want = 2 * K if prologue in ("silu", "gelu_tanh") else K
    if x.dtype != torch.float32 or x.numel() != want:
        raise ValueError(f"gemv: x must be float32 with {want} values for prologue {prologue!r} "
                         f"(w {tuple(w.shape)}), got {x.dtype} {tuple(x.shape)}")
    if prologue == "rms" and (g is None or g.numel() != K):
        raise ValueError(f"gemv: prologue 'rms' needs g with {K} values")
    if residual is not None and (residual.numel() != N or residual.dtype != torch.float32):
        raise ValueError(f"gemv: residual must be float32 with {N} values")
    return want


def _q8_form() -> str:
    """``KVBENCH_GEMV_Q8_FORM`` at this launch: "blocks" or "gather" (module docstring)."""
    from .. import settings
    return settings.get("KVBENCH_GEMV_Q8_FORM")


def _forced_tile(name: str) -> int | None:
    """A tile size set through ``name`` (a power of two: ``tl.arange`` needs one), else None."""
    from .. import settings
    forced = settings.get(name)
    if forced and forced & (forced - 1):
        from ..errors import ConfigError
        raise ConfigError(f"{name}={forced} is not a power of two", "use 1, 2, 4, 8, ...")
    return forced or None


def block_n(n: int, k: int = 512) -> int:
    """Rows per program: enough programs to spread one weight read over the SMs (a decode GEMV
    is a ~1 MB read, bound by latency: more, smaller programs beat fewer wide ones). 4 x 512
    was the fastest tile at all four SmolLM2 projection shapes on the H200, reading HBM
    (benchmarks/bench_gemv.py, reports/h200-2026-12-04e/call5: 2.4-3.6 us vs 3.0-4.7 at 4-8 x 256).
    ``KVBENCH_GEMV_BLOCK_N`` overrides it (benchmarks/bench_gemv.py sweeps it)."""
    forced = _forced_tile("KVBENCH_GEMV_BLOCK_N")
    if forced:
        return forced
    if interpreted():
        # the interpreter runs programs one by one, each paying a fixed cost per op: few, wide
        # ones, up to 2**20 values a tile (a tied 49152-row head at K 128: 6 launches of 8192 rows
        # took 0.4 s against 5.1 s for 768 of 64 on a 2-core AVX2 box)
        return min(max(64, (1 << 20) // block_k(k)), triton.next_power_of_2(n))
    return 4


def block_k(k: int) -> int:
    """Columns per unrolled step (``KVBENCH_GEMV_BLOCK_K`` overrides): 512 bf16 = 1 KB per row."""
    forced = _forced_tile("KVBENCH_GEMV_BLOCK_K")
    if forced:
        return forced
    return min(2048 if interpreted() else 512, triton.next_power_of_2(k))


def gemv(x: torch.Tensor, w: torch.Tensor, prologue: str = "none", g: torch.Tensor | None = None,
         eps: float = 0.0, residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
         norm_out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton launch (interpreted on CPU); see the module docstring. ``norm_out`` (prologue
    ``"rms"`` only): a float32 tensor of K values that also receives the normed input
    ``x * rsqrt(mean(x^2) + eps) * g`` (unrounded), so a caller that needs it (a MoE layer's
    experts, after the router's product) has no norm launch of its own."""
    _check(x, w, prologue, g, residual)
    q8 = w.dtype == torch.int8
    N, K = w.shape[0], (qweights.in_features(w) if q8 else w.shape[1])
    if norm_out is not None and (prologue != "rms" or norm_out.dtype != torch.float32
                                 or norm_out.numel() != K or not norm_out.is_contiguous()):
        raise ValueError(f"gemv: norm_out needs prologue 'rms' and a contiguous float32 tensor of "
                         f"{K} values")
    xin = x.reshape(-1)
    if not xin.is_contiguous():
        xin = xin.contiguous()
    y = torch.empty(1, N, dtype=torch.float32, device=x.device) if out is None else out
    bn = block_n(N, K)
    gg = g if g is not None else xin
    rr = residual.reshape(-1) if residual is not None else xin
    wd = w[:, K:].view(torch.float16) if q8 else xin       # a Q8_0 row's scales follow its quants
    bk = block_k(K)
    q8_blocks = q8 and _q8_form() == "blocks"
    if q8_blocks and bk % Q8_BLOCK:
        from ..errors import ConfigError
        raise ConfigError(f"KVBENCH_GEMV_BLOCK_K={bk} is below a Q8_0 block ({Q8_BLOCK} values)",
                          f"use {Q8_BLOCK} or more, or KVBENCH_GEMV_Q8_FORM=gather")
    _gemv_kernel[(triton.cdiv(N, bn),)](
        xin, w, y, gg, rr, xin if norm_out is None else norm_out, wd, N, w.stride(0),
        wd.stride(0) if q8 else 0, float(eps), K=K,
        PRO=PROLOGUES[prologue], RES=residual is not None, NARROW=w.dtype == torch.bfloat16,
        BLOCK_N=bn, BLOCK_K=bk, HOUT=norm_out is not None, Q8=q8, QB=Q8_BLOCK, BLOCK_SUMS=q8_blocks,
        num_warps=4, **pdl_launch())
    return y


def gemv_ref(x: torch.Tensor, w: torch.Tensor, prologue: str = "none", g: torch.Tensor | None = None,
             eps: float = 0.0, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch reference: ``engine.model``'s ``rms_norm`` and ``mm`` written out (this
    module is below ``engine.model``: no import back; ``engine.qweights`` for Q8_0 values) and
    torch's activations."""
    want = _check(x, w, prologue, g, residual)
    h = x.reshape(1, want)
    if prologue == "rms":
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * g
    elif prologue in ("silu", "gelu_tanh"):
        gate, up = h.split([want // 2, want // 2], dim=-1)
        gate = F.silu(gate) if prologue == "silu" else F.gelu(gate, approximate="tanh")
        h = gate * up
    if w.dtype == torch.int8:                       # Q8_0 rows: the exact values, float32
        y = h @ qweights.dequantize(w).T
    else:
        y = h @ w.T if w.dtype == torch.float32 else (h.to(w.dtype) @ w.T).float()
    return y if residual is None else residual.reshape(1, -1) + y
