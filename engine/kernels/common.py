"""Shared Triton helpers: read a [BLOCK_N, D] float32 tile of K or V from a cache in its format.

Contract: ``load_kv_tile`` dequantizes only the tile it loads (no copy of the cache). Cache
layouts, all token-major: fp32 / bf16 ``[tokens, Hkv, D]``; q8_0 ``uint8 [tokens, Hkv*D/32*34]``
(block geometry from ``engine.formats``, here as the constexprs ``QK``, ``QB``, ``QD``) passed twice, as an int8 view (quants) and a float16 view (scales). ``cache_args`` builds
the (values, scales, token stride, scale token stride) launch arguments for a buffer.

    k = load_kv_tile(K, KS, offs_n, mask_n, h * D + offs_d, stride_k, stride_ks, FMT)
    args = cache_args(buf, "q8_0")
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import Q8_BLOCK, Q8_BYTES, Q8_SCALE_BYTES

# q8_0 block geometry (engine.formats) as Triton compile-time constants
QK = tl.constexpr(Q8_BLOCK)                   # values per block
QB = tl.constexpr(Q8_BYTES)                   # bytes per block
QD = tl.constexpr(Q8_SCALE_BYTES)             # bytes of the fp16 scale before the quants
QB_HALF = tl.constexpr(Q8_BYTES // 2)         # a block in float16 units (where the scales sit)


@triton.jit
def load_kv_tile(P, PS, offs_n, mask_n, col, stride_n, stride_ns, FMT: tl.constexpr):
    # offs_n: [BLOCK_N] token rows; col: [D] flattened column h * D + d of the token's row.
    rows = offs_n.to(tl.int64)
    if FMT == 2:
        qcol = (col // QK) * QB + QD + col % QK
        q = tl.load(P + rows[:, None] * stride_n + qcol[None, :], mask=mask_n[:, None], other=0)
        scol = (col // QK) * QB_HALF
        d = tl.load(PS + rows[:, None] * stride_ns + scol[None, :], mask=mask_n[:, None], other=0.0)
        return q.to(tl.float32) * d.to(tl.float32)
    else:
        x = tl.load(P + rows[:, None] * stride_n + col[None, :], mask=mask_n[:, None], other=0.0)
        return x.to(tl.float32)


def cache_args(buf: torch.Tensor, fmt: str):
    """(values, scales, stride, scale stride) for ``load_kv_tile`` from a cache buffer."""
    if fmt == "q8_0":
        qv, sv = buf.view(torch.int8), buf.view(torch.float16)
        return qv, sv, qv.stride(0), sv.stride(0)
    return buf, buf, buf.stride(0), 0
