"""The floor of a split + combine decode-attention launch: what reading the bytes costs alone.

Contract: ``read_floor(fmt, hkv, d, hq, n_keys, cfg, combine, pdl)`` returns ``launch(k, v)``,
which runs ``_read_floor_kernel`` on the production grid (KV heads x ``split_plan`` splits, the
same keys a split, tiles of ``cfg["block_n"]`` keys, the same warps and stages) over the K and V
buffers in their own format: every byte ``decode_attention`` reads (values, and q8_0's scales)
loaded as int32 words and XOR-summed, one word a program written, no arithmetic on them; with
``combine`` followed by the production combine kernel over partials of the production shape. No
kernel that splits the context this way and combines in a second kernel can beat it, so it is
the bound a target is checked against (``bench_attention``'s grid: ``floor_us``, and for each
target whether this floor could meet it). ``words(buf, fmt, hkv, d)`` is the int32 view it reads.
CUDA for timing; the kernel also runs under ``TRITON_INTERPRET=1`` (tested against a torch XOR).

    launch = read_floor("q8_0", 4, 128, 32, 16384, dmod.resolved_config("q8_0", "q8_0", 128), True, False)
    us, _ = layered_time(bufs, launch, 30)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import decode_attention as dmod
from engine.kernels import q8_layout
from engine.kernels.common import pdl_enter


@triton.jit
def _read_floor_kernel(A, B, SA, SB, OUT, n_keys, keys_per_split, n_splits, stride_a, stride_s,
                       W: tl.constexpr, WS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_S: tl.constexpr,
                       PDL: tl.constexpr):
    pdl_enter(PDL)
    h = tl.program_id(0)
    sp = tl.program_id(1)
    lo = sp * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_keys)
    cols = h * W + tl.arange(0, W)
    scols = h * WS + tl.arange(0, WS)
    acc = tl.zeros([BLOCK_N, W], tl.int32)
    acc_s = tl.zeros([BLOCK_N, WS], tl.int32)
    for n0 in range(lo, hi, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        mask = rows < hi
        r64 = rows.to(tl.int64)
        a = tl.load(A + r64[:, None] * stride_a + cols[None, :], mask=mask[:, None], other=0)
        b = tl.load(B + r64[:, None] * stride_a + cols[None, :], mask=mask[:, None], other=0)
        acc = acc ^ a ^ b
        if HAS_S:
            sa = tl.load(SA + r64[:, None] * stride_s + scols[None, :], mask=mask[:, None], other=0)
            sb = tl.load(SB + r64[:, None] * stride_s + scols[None, :], mask=mask[:, None], other=0)
            acc_s = acc_s ^ sa ^ sb
    tot = tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0)
    if HAS_S:
        tot = tot ^ tl.xor_sum(tl.xor_sum(acc_s, axis=1), axis=0)
    tl.store(OUT + h * n_splits + sp, tot)


@triton.jit
def _empty_kernel(OUT, PDL: tl.constexpr):
    pdl_enter(PDL)


def words(buf: torch.Tensor, fmt: str, hkv: int, d: int):
    """(values as int32 [rows, words], q8_0's scales as int32 [rows, words] or None)."""
    if fmt == "q8_0":
        r = q8_layout.split(buf, hkv, d)
        return (r.quants.reshape(r.quants.shape[0], -1).view(torch.int32),
                r.scales.reshape(r.scales.shape[0], -1).view(torch.int32))
    return buf.reshape(buf.shape[0], -1).view(torch.int32), None


def read_floor(fmt: str, hkv: int, d: int, hq: int, n_keys: int, cfg: dict, combine: bool, pdl: bool,
               empty: bool = False):
    """``launch(k, v)`` of the floor kernel (``empty``: an empty kernel on the same grid) and,
    with ``combine``, the production combine after it; ``pdl`` launches both with programmatic
    dependent launch (compiled only)."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    per, splits = dmod.split_plan(n_keys, hkv, dev, cfg)
    out = torch.empty(hkv * splits, device=dev, dtype=torch.int32)
    m = torch.zeros(hq, splits, device=dev)
    l = torch.ones(hq, splits, device=dev)
    acc = torch.zeros(hq, splits, d, device=dev)
    res = torch.empty(hq, d, device=dev)
    s_pad = triton.next_power_of_2(splits)
    extra = {"launch_pdl": True} if pdl else {}

    def launch(k, v):
        if empty:
            _empty_kernel[(hkv, splits)](out, PDL=pdl, num_warps=cfg["num_warps"], **extra)
        else:
            ka, ks = words(k, fmt, hkv, d)
            va, vs = words(v, fmt, hkv, d)
            _read_floor_kernel[(hkv, splits)](
                ka, va, ks if ks is not None else ka, vs if vs is not None else va, out, n_keys, per, splits,
                ka.stride(0), ks.stride(0) if ks is not None else 0,
                W=ka.shape[1] // hkv, WS=(ks.shape[1] // hkv) if ks is not None else 1,
                BLOCK_N=cfg["block_n"], HAS_S=ks is not None, PDL=pdl,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra)
        if combine:
            if empty:
                _empty_kernel[(hq,)](out, PDL=pdl, num_warps=4, **extra)
            else:
                dmod._decode_combine_kernel[(hq,)](m, l, acc, res, out, n_keys, per, splits, D=d, S_PAD=s_pad,
                                                   DEV_POS=False, WINDOW=0, BLOCK_S=min(128, s_pad),
                                                   num_warps=4, **({"PDL": True} if pdl else {}), **extra)
    launch.splits, launch.keys_per_split, launch.out = splits, per, out
    return launch
