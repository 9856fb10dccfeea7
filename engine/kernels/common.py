"""Shared Triton helpers: read a [BLOCK_N, D] float32 tile of K or V from a cache in its format.

Contract: ``load_kv_tile`` dequantizes only the tile it loads (no copy of the cache). Cache
layouts, all token-major: fp32 / bf16 ``[tokens, Hkv, D]``; q8_0 the split layout of
``engine.kernels.q8_layout`` (int8 quants ``[tokens, Hkv, D]`` and fp16 scales ``[tokens,
Hkv*D/32]``, block geometry from ``engine.formats`` as the constexpr ``QK``), passed as the two
arrays. ``cache_args(buf, fmt, n_kv_heads, head_dim)`` builds the (values, scales, token stride,
scale token stride) launch arguments for a buffer. ``bf16_bits`` / ``round_bf16``: float32 ->
bfloat16 rounded to nearest even on the bits (the interpreter's casts truncate), as int16 bits
(NaN -> 0x7FC0, torch's) or as the float32 value.

    k = load_kv_tile(K, KS, offs_n, mask_n, h * D + offs_d, stride_k, stride_ks, FMT)
    args = cache_args(buf, "q8_0", 4, 128)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import Q8_BLOCK, q8_layout

QK = tl.constexpr(Q8_BLOCK)                   # q8_0 values per block (engine.formats)


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """With programmatic dependent launch (``PDL``): wait until the grid launched before this one
    has finished and its writes are visible, then let the next grid be scheduled (it waits the
    same way before it reads anything). A kernel calls it first, before any load or store."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def pdl_launch() -> dict:
    """Launch arguments of the decode step's kernels under ``KVBENCH_STEP_PDL``: the ``PDL``
    constexpr that makes a kernel wait (``pdl_enter``) and the launch attribute; ``{}`` when off.
    On, with the Triton interpreter (no griddepcontrol), it raises instead of running without."""
    from .. import settings
    if not settings.get("KVBENCH_STEP_PDL"):
        return {}
    from . import interpreted
    if interpreted():
        from ..errors import ConfigError
        raise ConfigError("KVBENCH_STEP_PDL=1 needs compiled kernels (the Triton interpreter cannot run "
                          "griddepcontrol)", "unset KVBENCH_STEP_PDL on this machine")
    return {"PDL": True, "launch_pdl": True}


@triton.jit
def bf16_bits(x):
    """float32 -> bfloat16 bits (int16), round to nearest even; NaN -> 0x7FC0 (torch's)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, 0x7FC0, rounded).to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def round_bf16(v):
    """float32 -> the nearest bfloat16 (ties to even), kept in float32. Integer maths, not a
    cast: Triton's interpreter truncates float32 -> bfloat16 casts whatever rounding is asked."""
    u = v.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def load_kv_tile(P, PS, offs_n, mask_n, col, stride_n, stride_ns, FMT: tl.constexpr):
    # offs_n: [BLOCK_N] token rows; col: [D] flattened column h * D + d of the token's row.
    rows = offs_n.to(tl.int64)
    if FMT == 2:
        q = tl.load(P + rows[:, None] * stride_n + col[None, :], mask=mask_n[:, None], other=0)
        d = tl.load(PS + rows[:, None] * stride_ns + (col // QK)[None, :], mask=mask_n[:, None], other=0.0)
        return q.to(tl.float32) * d.to(tl.float32)
    else:
        x = tl.load(P + rows[:, None] * stride_n + col[None, :], mask=mask_n[:, None], other=0.0)
        return x.to(tl.float32)


def cache_args(buf: torch.Tensor, fmt: str, n_kv_heads: int, head_dim: int):
    """(values, scales, stride, scale stride) for ``load_kv_tile`` from a cache buffer."""
    if fmt == "q8_0":
        r = q8_layout.split(buf, n_kv_heads, head_dim)
        return r.quants, r.scales, r.quants.stride(0), r.scales.stride(0)
    return buf, buf, buf.stride(0), 0
