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
    constexpr that makes a kernel wait (``pdl_enter``) and the launch attribute, or ``{}``.
    "auto" (the default): on for compiled kernels on a device of compute capability 9.0 or newer
    (griddepcontrol is sm_90 PTX), off otherwise; "1": on, and where it cannot run (the Triton
    interpreter, an older GPU) it raises instead of running without; "0": off."""
    from .. import settings
    mode = str(settings.get("KVBENCH_STEP_PDL"))
    if mode == "0":
        return {}
    from . import interpreted
    why = None
    if interpreted():
        why = "the Triton interpreter cannot run griddepcontrol"
    elif not torch.cuda.is_available() or _capability() < (9, 0):
        why = "programmatic dependent launch needs a GPU of compute capability 9.0 or newer"
    if why is None:
        return {"PDL": True, "launch_pdl": True}
    if mode == "auto":
        return {}
    from ..errors import ConfigError
    raise ConfigError(f"KVBENCH_STEP_PDL=1: {why}", "set KVBENCH_STEP_PDL=auto or 0 on this machine")


_CAPABILITY: dict = {}


def _capability() -> tuple[int, int]:
    dev = torch.cuda.current_device()
    if dev not in _CAPABILITY:
        _CAPABILITY[dev] = torch.cuda.get_device_capability(dev)
    return _CAPABILITY[dev]


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
