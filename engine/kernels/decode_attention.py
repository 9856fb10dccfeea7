"""Decode attention (one query row) over a KV cache read in its own format, flash-decoding style.

Contract: ``decode_attention(q, k_buf, v_buf, fmt, n_keys, scale, n_kv_heads)`` returns
[Hq, D] float32 for ``q`` [Hq, D] attending to cache rows ``[0, n_keys)``. GQA: query head
``i`` reads KV head ``i // (Hq // Hkv)``. One program per (KV head, context split) serves all
of that head's query heads and dequantizes only the tile it reads; the splits' partial softmax
states are combined by a second kernel (or, with ``fuse_combine``, by the last split to
finish). Arithmetic stays near float32 on tensor cores: float32 caches use tf32x3 dots; bf16
caches feed their exact values to bf16 dots against a three-term bf16 split of q and p (where a
KV head serves at most 4 query heads, ``bf16_stack`` "auto", the three terms are stacked along one
operand's rows: one dot each for the scores and the values, ``_decode_bf16_stacked_kernel``); q8_0
caches (the split layout of ``engine.kernels.q8_layout``: int8 quants and fp16 scales in two
arrays) have their own kernel: vector loads of each head's contiguous quants, the quants turned
into exact float16 in registers (no int->float conversion), and dots in which a block's scale
multiplies a dot's result and never enters it, against a two-term float16 split of q and of p
times the V scales, accumulated in float32. Forms (``q8_impl``, setting
``KVBENCH_DECODE_Q8_IMPL``): ``auto`` (default) takes ``cuda_mma`` where it runs as configured and
``rows`` elsewhere (``resolve_q8_impl``; the launch record's ``q8_impl`` and ``q8_impl_why`` say
which and why); ``rows`` makes each (query head, block) pair a row of
one 2-D [G*NB, D] operand, zero outside its block, so plain 2-D dots give every block's partial
product; ``batched`` makes the block a batch axis of
3-D dots (Triton lowers those poorly: ~0.8 TB/s on the H200); ``blocks`` (head_dim 32 / 64 / 128)
runs one 2-D dot a 32-value block for the scores and one for each block's output columns, each
block's quants their own tile, so no operand carries the rows form's zeros (3/4 of it at
head_dim 128) and p has one layout; ``streams`` and ``streams2`` (up to 8 query heads a KV
head) leave the tensor cores: the quants dequantized exactly into float32 (a magic add, or PTX
byte permutes where compiled: ``q8_unpack``) and float32 FMAs, R = ``block_n`` independent
softmax streams a program merged after the loop; ``streams2`` in two passes, K's scores through a
scratch then V with the split's max known (no rescaling); on the H100 at 16384 they took 40-43 us
against rows' 25.7 (reports/h100-2026-12-07b: ~8 warps a SM, latency-bound); they stay selectable for the
sweeps (timings: docs/perf-notes.md). ``cuda_mma`` is the split part written in CUDA C++
(``engine.kernels.cuda_q8``, ``engine/kernels/cuda/q8_decode.cu``: 64-key tiles that cp.async brings into
shared memory 2-4 at a time (``num_stages``), dots on mma.sync tensor cores over exact float16 quants against two
float16 terms of q and of p * scale, as the rows kernel; built with nvcc at first use, launched through the
driver API; compiled CUDA only, no fused combine; programmatic dependent launch as the Triton kernels): on the H100 it took 17.5 us against rows' 21.3 at
coder30b's geometry and 16384 keys, and made the captured coder30b step's q8_0 KV faster than its bf16 KV
(reports/h100-2026-12-07h); an earlier CUDA form on float32 FMAs (``cuda``) was level with rows and was
removed (commit 3850518 has it). ``q8_stack``
(``KVBENCH_DECODE_Q8_STACK``, off by default) stacks the rows kernel's two float16 terms along one
operand's rows (one dot a side instead of two; at G 8 a 64-row warpgroup MMA on sm_90): 40% fewer
instructions, not less time (reports/h100-2026-12-07c). Two more forms were measured slower and
removed: tiles dequantized in registers (reports/h100-2026-12-06b; commit f548d24 has it) and
int8 x int8 integer tensor-core dots over int8 terms of q and p (reports/h100-2026-12-06c;
commit b2a901c has it). ``cfg={"q8_kernel": False}`` reads q8_0 through the generic
kernel instead (dequantized to float32 tiles, tf32x3 dots).
Sliding windows (``window``) and ring buffers (``ring_rows``, ``engine.kv_ring``) are read by
the generic kernel: its splits cover only the window's keys, a ring's rows taken modulo.
K and V may hold different formats (``v_fmt``, default ``fmt``): the generic kernel reads each
in its own (``KFMT`` / ``VFMT`` constexprs: a bf16 K with ``dot_f32``, a q8_0 V dequantized to
float32 tiles, ...); q8_0's own kernel serves only q8_0 K with q8_0 V.
``pdl`` (setting ``KVBENCH_DECODE_PDL``; also ``KVBENCH_STEP_PDL``, whose default "auto" applies it
wherever a launch can take it) launches the split kernel and the combine with programmatic dependent
launch: each waits inside the kernel for the grid before it, so its launch overlaps that grid's tail
(compiled launches, the separate combine, the q8_0 rows form; asked by name elsewhere it raises;
recorded per launch).
``decode_attention_ref`` is the torch reference (the blocked CPU path with one row);
``last_scratch_bytes`` is the size of the last launch's partials.

    out = decode_attention(q[0], cache.k, cache.v, "q8_0", n, 64 ** -0.5, n_kv_heads=3)
    ref = decode_attention_ref(q[0], cache.k, cache.v, "q8_0", n, 64 ** -0.5, n_kv_heads=3)
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from .. import formats, settings
from . import KV_FORMAT_CODES, Q8_BLOCK, LaunchLog, interpreted, q8_layout
from .common import QK, cache_args, load_kv_tile, pdl_enter, pdl_launch

LOG2E = 1.4426950408889634

# Tunables' defaults (benchmarks/bench_attention.py --sweep compares them on the GPU); the
# variables in _LIVE_KEYS override them at each launch (``resolved_config``).
CONFIG = {
    "block_n": 64,
    "programs_per_sm": 2,
    "num_warps": 4,
    "num_stages": 3,
    "precision": "tf32x3",    # float32 caches
    "q8_kernel": True,        # q8_0's own kernel
    "fuse_combine": False,    # combine in the last program
    "q8_terms": (2, 2),       # float16 terms of q and p in the q8_0 dots (2: ~fp32, 1: ~2^-11)
    "q8_norms": (8192, 8192),  # the rows kernel's power-of-two targets for |q| and |p * dv| rows
    # the rows kernel's one-s guards (l per row, s in float64): l per row alone holds the H100
    # magnitude test (2.03e-7, as both; 8.47e-5 with neither) and costs 0.7 us at coder30b ctx
    # 16384 against 2.4 for both (reports/h100-2026-12-05f); s in float64 alone holds too (+1.7 us)
    "q8_guards": (True, False),
    # bf16 K and V: dot_f32's three terms stacked along one operand's rows (one dot each for
    # the scores and the values) instead of three dots. "auto": where the stacked operand is 16
    # rows (up to 4 query heads a KV head), measured faster there on the H100 (8 KV heads x 128,
    # 32 query heads: 29.8 against 30.5 us at 16384, 12.2 against 12.7 at 4096) and level at 32
    # rows (coder30b, 8 a KV head), where the captured step at depth 16 ran slower
    # (reports/h100-2026-12-06g); True / "1" everywhere but windows, False / "0" never
    "bf16_stack": "auto",
    # the rows kernel's V-scale normalisation: "split" (one power of two from the split's largest
    # V scale, found before the loop: no reduction in it; H100, coder30b 16384: 22.1 against
    # 24.1 us, reports/h100-2026-12-06g) or "tile" (from each tile's largest, the earlier form)
    "q8_vnorm": "split",
    # the rows kernel's two float16 terms of q and of p * dv stacked along one operand's rows
    # (``q8_stacked``): 957 against 1597 loop instructions a 64-key tile at G 8 offline, yet level or
    # slower at ctx 4096 / 16384 on the H100 and 2% faster at 32768 (reports/h100-2026-12-07c)
    "q8_stack": False,
    # cuda_mma's packed terms (G <= 4, 3 stages): the mma's 8 columns hold each head's hi and lo
    # float16 terms, one mma a k-step instead of two. "auto": where that applies (H100, bench geometry,
    # G 4: 22.82 / 37.02 us against 23.52 / 38.39 at 16384 / 32768 keys, level at 4096, same call,
    # reports/h100-2026-12-07h call 2); True / "1": asked (refused where it does not apply); False / "0"
    "q8_pack": "auto",
    # cuda_mma's softmax: "tile" (each tile's max over its 64 keys, scores through shared memory, three
    # barriers a tile) or "warp" (each warp's 16 keys their own stream, merged at the end; two barriers a
    # tile; thirty-seventh session, unmeasured; at cuda_q8.WSM_GEOMETRIES, 3 stages)
    "q8_softmax": "tile",
    # cuda_mma under programmatic dependent launch: "auto" / "1" issue the first tiles' loads of the rows
    # before the newest key before waiting for the grid ahead (the decode step's append, which writes that
    # key only), "0" waits first; "1" is refused without PDL (thirty-eighth session, unmeasured)
    "q8_early": "auto",
    "q8_ablate": "",          # the rows kernel's ablations, timing only (wrong results): "qk", "pv", "qk,pv"
    "q8_unpack": "auto",      # the streams forms' int8 -> float32: PTX byte permutes (compiled) or a magic add
    "q8_words": "none",       # the rows kernel's K / V read as int16 words (k, v, kv; kv_prmt: PTX unpack), float16 where they land
    "max_splits": 256,
    # programmatic dependent launch (sm_90+): the split kernel and the combine are launched with
    # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, each waiting (griddepcontrol.wait) for
    # the grid before it to finish before reading anything, so a launch's set-up overlaps the tail
    # of the kernel before it; compiled launches only (the interpreter cannot run the PTX)
    "pdl": False,
}
# Per-format defaults: fp32 / bf16 the fastest variants of the sweep on an H100 (triton 3.6,
# ctx 16384, 8 KV heads x 128, 32 query heads): fp32 67 us, bf16 40 us. q8_0 (split layout,
# its own kernel): not yet timed, a first guess to be replaced by the H200 sweep
# (benchmarks/bench_attention.py --sweep). Environment variables above, or ``cfg=``, still
# override them.
FORMAT_CONFIG = {
    "fp32": {"block_n": 32, "programs_per_sm": 2, "num_warps": 2, "num_stages": 3},
    "bf16": {"block_n": 32, "programs_per_sm": 2, "num_warps": 2, "num_stages": 3},
    "q8_0": {"block_n": 64, "programs_per_sm": 2, "num_warps": 4, "num_stages": 3},
}
# Per (format, head_dim) over the format's defaults: q8_0 at head_dim 64 (SmolLM2: 3 KV heads x 64,
# 9 query heads), timed inside the captured SmolLM2 step on the H200 (reports/h200-2026-12-04g
# call 7, variant bn64s3: the q8_0 kernel's us a step at depth 16 / 4096 / 16384): 64-key blocks with 3 stages
# 119 / 149 / 292, against 146 / 170 / 292 for the 128-key, 2-stage blocks the isolated sweep had
# picked (reports/h200-2026-12-04f/call1, where the two differed by 1 us in 28).
HEAD_DIM_CONFIG = {
    ("q8_0", 64): {"block_n": 64, "num_stages": 3},
}
# Variables read again at each launch (``settings.overrides``): a bench variant sets them after
# import, and CONFIG's import-time values would otherwise run in their place, silently.
_LIVE_KEYS = {"block_n": "KVBENCH_DECODE_BLOCK_N", "programs_per_sm": "KVBENCH_DECODE_PROGRAMS_PER_SM",
              "num_warps": "KVBENCH_DECODE_WARPS", "num_stages": "KVBENCH_DECODE_STAGES",
              "q8_kernel": "KVBENCH_DECODE_Q8_KERNEL", "fuse_combine": "KVBENCH_DECODE_FUSE",
              "precision": "KVBENCH_ATTN_PRECISION", "q8_words": "KVBENCH_DECODE_Q8_WORDS",
              "q8_vnorm": "KVBENCH_DECODE_Q8_VNORM", "bf16_stack": "KVBENCH_DECODE_BF16_STACK",
              "q8_stack": "KVBENCH_DECODE_Q8_STACK", "q8_pack": "KVBENCH_DECODE_Q8_PACK",
              "q8_softmax": "KVBENCH_DECODE_Q8_SOFTMAX", "q8_early": "KVBENCH_DECODE_Q8_EARLY",
              "pdl": "KVBENCH_DECODE_PDL"}
last_scratch_bytes = 0
LAUNCHES = LaunchLog()     # each launch's applied configuration, inside ``recording()``
recording = LAUNCHES.recording
"""Collect, in the list this yields, each ``decode_attention`` launch's applied configuration
(kernel, tiles, splits, combine) made inside the block: what a decode step ran, observable
(``StaticDecode.attn_launches``), not only what the settings asked."""


@triton.jit
def _bf16_split3(x):
    """float32 ``x`` as three bf16 terms a1 + a2 + a3 (~2^-24 relative)."""
    a1 = x.to(tl.bfloat16)
    r1 = x - a1.to(tl.float32)
    a2 = r1.to(tl.bfloat16)
    a3 = (r1 - a2.to(tl.float32)).to(tl.bfloat16)
    return a1, a2, a3


@triton.jit
def dot_f32(a, b, SPLIT: tl.constexpr):
    """a (float32) @ b (exact in bf16) at ~float32 fidelity: three bf16 terms of a on tensor
    cores. SPLIT=False (the interpreter, whose bf16 dot is not numeric) does one fp32 dot."""
    if SPLIT:
        a1, a2, a3 = _bf16_split3(a)
        bb = b.to(tl.bfloat16)
        acc = tl.dot(a1, bb, out_dtype=tl.float32)
        acc = tl.dot(a2, bb, acc, out_dtype=tl.float32)
        return tl.dot(a3, bb, acc, out_dtype=tl.float32)
    else:
        return tl.dot(a, b.to(tl.float32), input_precision="ieee")


@triton.jit
def _decode_split_kernel(Q, K, KS, V, VS, M_OUT, L_OUT, ACC_OUT, OUT, COUNTER, POS,
                         n_keys, keys_per_split, n_splits,
                         stride_k, stride_ks, stride_v, stride_vs, qk_scale,
                         G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                         BLOCK_N: tl.constexpr, KFMT: tl.constexpr, VFMT: tl.constexpr,
                         PREC: tl.constexpr, SPLIT: tl.constexpr, FUSE: tl.constexpr,
                         S_PAD: tl.constexpr, BLOCK_S: tl.constexpr, DEV_POS: tl.constexpr,
                         WINDOW: tl.constexpr = 0, RING: tl.constexpr = 0, PDL: tl.constexpr = False):
    # KFMT / VFMT: the K and V buffers' formats (KV_FORMAT_CODES), each read in its own: a bf16
    # buffer's exact values feed dot_f32, other formats are dequantized to float32 tiles.
    # WINDOW > 0: sliding-window attention, keys at positions (n_keys - 1 - WINDOW, n_keys - 1]
    # only (the splits cover that range); RING > 0: position p lives in row p % RING (RingKV).
    pdl_enter(PDL)
    h = tl.program_id(0)            # KV head
    sp = tl.program_id(1)           # context split
    if DEV_POS:                     # n_keys = position + 1 read on the device (CUDA graphs)
        n_keys = tl.load(POS).to(tl.int32) + 1
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    gmask = offs_g < G
    q = tl.load(Q + (h * G + offs_g)[:, None] * D + offs_d[None, :], mask=gmask[:, None], other=0.0)
    q = q * qk_scale                                                     # [G_PAD, D], log2 domain
    col = h * D + offs_d
    first = 0
    if WINDOW > 0:
        first = tl.maximum(n_keys - WINDOW, 0)
    lo = first + sp * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_keys)
    if not FUSE:                    # a split past the keys: the combine never reads it
        if lo >= n_keys:
            return
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        if RING > 0:
            offs_n = offs_n % RING
        rows = offs_n.to(tl.int64)
        if KFMT == 1:
            k = tl.load(K + rows[:, None] * stride_k + col[None, :], mask=mask_n[:, None], other=0.0)
            s = dot_f32(q, tl.trans(k), SPLIT)
        else:
            k = load_kv_tile(K, KS, offs_n, mask_n, col, stride_k, stride_ks, KFMT)  # [BLOCK_N, D]
            s = tl.dot(q, tl.trans(k), input_precision=PREC)              # [G_PAD, BLOCK_N]
        if VFMT == 1:
            v = tl.load(V + rows[:, None] * stride_v + col[None, :], mask=mask_n[:, None], other=0.0)
        else:
            v = load_kv_tile(V, VS, offs_n, mask_n, col, stride_v, stride_vs, VFMT)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if VFMT == 1:
            pv = dot_f32(p, v, SPLIT)
        else:
            pv = tl.dot(p, v, input_precision=PREC)
        acc = acc * alpha[:, None] + pv
        m = m_new
    o = (h * G + offs_g) * n_splits + sp
    tl.store(M_OUT + o, m, mask=gmask)
    tl.store(L_OUT + o, l, mask=gmask)
    tl.store(ACC_OUT + o[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None])
    if FUSE:
        _finish(M_OUT, L_OUT, ACC_OUT, OUT, COUNTER, h, n_splits, G, D, S_PAD, BLOCK_S)


@triton.jit
def _bf16_term(x, t):
    """Term ``t`` (0, 1, 2; any other: 0) of float32 ``x``'s three-term bf16 split (``dot_f32``'s
    terms), chosen elementwise: each row of a stacked operand carries its own term."""
    a1, a2, a3 = _bf16_split3(x)
    return tl.where(t == 0, a1, tl.where(t == 1, a2, tl.where(t == 2, a3, tl.zeros_like(a1))))


@triton.jit
def _decode_bf16_stacked_kernel(Q, K, V, M_OUT, L_OUT, ACC_OUT, OUT, COUNTER, POS,
                                n_keys, keys_per_split, n_splits, stride_k, stride_v, qk_scale,
                                G: tl.constexpr, GP: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
                                BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, FUSE: tl.constexpr,
                                S_PAD: tl.constexpr, BLOCK_S: tl.constexpr, DEV_POS: tl.constexpr,
                                PDL: tl.constexpr = False):
    # bf16 K and V with dot_f32's three bf16 terms of q and of p stacked along the rows of ONE
    # operand instead of three dots: row r = t * GP + g is term t of query head g (GP = G
    # padded to a power of two, M = 4 * GP or 16, rows past 3 * GP zero). One [M, D] x [D, BN]
    # dot gives every term's partial score; a head's score is the sum of its three rows, put
    # back on all of them (one reshape-sum and broadcast a tile), so the softmax runs in the row
    # layout and each row takes its own term of p elementwise: one [M, BN] x [BN, D] dot, the
    # terms summed once after the loop. With G = 4 (8 KV heads, 32 query heads) M is 16, the
    # smallest dot, where the three-dot form ran 3 dots of 16 rows, 12 of them padding.
    # SPLIT=False (the interpreter): the same terms, held in float32, through float32 dots.
    pdl_enter(PDL)
    h = tl.program_id(0)
    sp = tl.program_id(1)
    if DEV_POS:
        n_keys = tl.load(POS).to(tl.int32) + 1
    if not FUSE:
        if sp * keys_per_split >= n_keys:
            return
    orow = tl.arange(0, M)
    rt = orow // GP
    rg = orow % GP
    od = tl.arange(0, D)
    live = (rg < G) & (rt < 3)
    q = tl.load(Q + (h * G + rg)[:, None] * D + od[None, :], mask=live[:, None], other=0.0) * qk_scale
    qt = _bf16_term(q, rt[:, None])                                                   # [M, D]
    if not SPLIT:
        qt = qt.to(tl.float32)
    col = h * D + od
    lo = sp * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_keys)
    m = tl.full([M], float("-inf"), tl.float32)
    l = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        rows = offs_n.to(tl.int64)
        k = tl.load(K + rows[:, None] * stride_k + col[None, :], mask=mask_n[:, None], other=0.0)
        v = tl.load(V + rows[:, None] * stride_v + col[None, :], mask=mask_n[:, None], other=0.0)
        if SPLIT:
            sb = tl.dot(qt, tl.trans(k), out_dtype=tl.float32)                       # [M, BN]
        else:
            sb = tl.dot(qt, tl.trans(k.to(tl.float32)), input_precision="ieee")
        s_g = tl.sum(tl.reshape(sb, [M // GP, GP, BLOCK_N]), axis=0)                  # [GP, BN]
        s = tl.reshape(tl.broadcast_to(s_g[None, :, :], [M // GP, GP, BLOCK_N]), [M, BLOCK_N])
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        pt = _bf16_term(p, rt[:, None])                                               # [M, BN]
        if SPLIT:
            pv = tl.dot(pt, v, out_dtype=tl.float32)
        else:
            pv = tl.dot(pt.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        acc = acc * alpha[:, None] + pv
        m = m_new
    og = tl.arange(0, GP)
    gmask = og < G
    o = (h * G + og) * n_splits + sp
    # every row of head g holds the same m and l (computed from the same broadcast s); row t = 0's
    m_g = tl.sum(tl.where(tl.arange(0, M // GP)[:, None] == 0, tl.reshape(m, [M // GP, GP]), 0.0), axis=0)
    l_g = tl.sum(tl.where(tl.arange(0, M // GP)[:, None] == 0, tl.reshape(l, [M // GP, GP]), 0.0), axis=0)
    out = tl.sum(tl.reshape(acc, [M // GP, GP, D]), axis=0)                           # the terms' sum
    tl.store(M_OUT + o, m_g, mask=gmask)
    tl.store(L_OUT + o, l_g, mask=gmask)
    tl.store(ACC_OUT + o[:, None] * D + od[None, :], out, mask=gmask[:, None])
    if FUSE:
        _finish(M_OUT, L_OUT, ACC_OUT, OUT, COUNTER, h, n_splits, G, D, S_PAD, BLOCK_S)


@triton.jit
def _i8_to_f16(x):
    """int8 -> float16, exact, without an int->float conversion: the half with bits
    0x6400 + (x + 128) is 1024 + x + 128."""
    return (x.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0


@triton.jit
def _i8pairs_to_f16(w):
    """A tile of int16 words, each two int8 values (little-endian: the low byte first), -> the
    float16 tile of twice the columns, exact, by ``_i8_to_f16``'s magic per byte, interleaved
    in registers: the conversion runs where the words land, and the float16 tile reaches a dot
    operand by the 16-bit path (not the byte gather an int8 dot operand takes)."""
    u = w.to(tl.int32)
    lo = (((u & 0xFF) ^ 0x80) | 0x6400).to(tl.int16)
    hi = ((((u >> 8) & 0xFF) ^ 0x80) | 0x6400).to(tl.int16)
    return tl.interleave(lo, hi).to(tl.float16, bitcast=True) - 1152.0


@triton.jit
def _i8pairs_to_f16_prmt(w):
    """``_i8pairs_to_f16`` with the bytes unpacked by PTX byte permutes: two int16 words a
    register, their four bytes flipped to x + 128 and placed under 0x64 (one ``prmt`` for the low
    bytes, one for the high), then one float16x2 subtract of 1152 each. Compiled only."""
    lo, hi = tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, c;
        xor.b32 t, $2, 0x80808080;
        mov.b32 c, 0x64806480;
        prmt.b32 $0, t, 0x64646464, 0x5240;
        prmt.b32 $1, t, 0x64646464, 0x5341;
        sub.f16x2 $0, $0, c;
        sub.f16x2 $1, $1, c;
        }""",
        constraints="=r,=r,r", args=[w], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    return tl.interleave(lo, hi)


@triton.jit
def _q8_tile(P, rows, mask_n, h, RQ: tl.constexpr, D: tl.constexpr, WORDS: tl.constexpr, PRMT: tl.constexpr):
    """Head ``h``'s quants of cache ``rows`` (int8 [BN, D] from a [rows, RQ] array), masked rows
    0: as int8 (``WORDS`` False), or read as int16 words and turned into float16 where they land
    (``_i8pairs_to_f16``, by PTX permutes with ``PRMT``), before any layout change."""
    if WORDS:
        w = tl.load(P.to(tl.pointer_type(tl.int16)) + rows[:, None] * (RQ // 2)
                    + (h * (D // 2) + tl.arange(0, D // 2))[None, :], mask=mask_n[:, None], other=0)
        if PRMT:
            t = _i8pairs_to_f16_prmt(w)
        else:
            t = _i8pairs_to_f16(w)
    else:
        t = tl.load(P + rows[:, None] * RQ + (h * D + tl.arange(0, D))[None, :], mask=mask_n[:, None], other=0)
    return t


@triton.jit
def _stack_terms(hi, lo, M: tl.constexpr, N: tl.constexpr):
    """Two [M, N] tiles (M a multiple of 8) as one [2M, N]: rows 16 j .. 16 j + 7 are ``hi``'s
    rows 8 j .. 8 j + 7 and rows 16 j + 8 .. 16 j + 15 are ``lo``'s same rows. In an MMA
    accumulator's layout a thread holds rows r and r + 8 of each 16-row tile, so a row's two
    halves meet in one thread (``_unstack_sum``)."""
    t = tl.join(tl.reshape(hi, [M // 8, 8, N]), tl.reshape(lo, [M // 8, 8, N]))       # [M/8, 8, N, 2]
    return tl.reshape(tl.permute(t, (0, 3, 1, 2)), [2 * M, N])


@triton.jit
def _unstack_sum(x, M: tl.constexpr, N: tl.constexpr):
    """[2M, N] stacked as ``_stack_terms`` stacks -> [M, N], each row's two halves summed."""
    return tl.reshape(tl.sum(tl.reshape(x, [M // 8, 2, 8, N]), axis=1), [M, N])


@triton.jit
def _pow2_at_least(x):
    """Smallest power of two >= x (x a normal float32 > 0, below 2^127), exact, as float32: from
    the exponent bits. (``exp2(ceil(log2(x)))`` compiles to the GPU's approximate ``lg2`` and
    ``ex2``, which promise neither a power of two nor the right one at a binade's edge.)"""
    bits = x.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return (e << 23).to(tl.float32, bitcast=True)


@triton.jit
def _split2(x, TERMS: tl.constexpr):
    """float32 (|x| <= 2^13) -> (hi, lo) float16 with hi + lo * 2^-11 = x to ~2^-22 relative
    (TERMS=1: lo = 0, ~2^-11). lo is stored scaled by 2^11: unscaled, the remainder of a value
    near 16 is often below float16's smallest normal (2^-14), and the H200's tensor-core path
    loses such subnormals (an error of ~2^-14 / x: 5.4e-6 against the float64 oracle where the
    interpreter gave 1e-7, reports/h200-2026-12-04g call 9). Scaled, |lo| <= 2^13: it fits."""
    hi = x.to(tl.float16)
    if TERMS == 2:
        lo = ((x - hi.to(tl.float32)) * 2048.0).to(tl.float16)
    else:
        lo = hi * 0.0
    return hi, lo


@triton.jit
def _dot2(a_hi, a_lo, b, TERMS: tl.constexpr):
    """(a_hi + a_lo * 2^-11) @ b, b exact in float16 (int8 values): float16 tensor-core dots
    with float32 accumulation (TERMS=1: a_hi only). The interpreter computes float16 dots in
    float32 (exact products), so the same arithmetic is tested on the CPU."""
    acc = tl.dot(a_hi, b, out_dtype=tl.float32)
    if TERMS == 2:                  # its own accumulator, scaled back by 2^-11 (exact)
        acc += tl.dot(a_lo, b, out_dtype=tl.float32) * (1.0 / 2048.0)
    return acc


@triton.jit
def _decode_q8_kernel(Q, KQ, KS, VQ, VS, M_OUT, L_OUT, ACC_OUT, OUT, COUNTER, POS,
                      n_keys, keys_per_split, n_splits, qk_scale,
                      HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                      NB: tl.constexpr, BLOCK_N: tl.constexpr,
                      Q_TERMS: tl.constexpr, P_TERMS: tl.constexpr, FUSE: tl.constexpr,
                      S_PAD: tl.constexpr, BLOCK_S: tl.constexpr, DEV_POS: tl.constexpr):
    # One program: KV head h, context split sp, all G query heads of the group. The q8_0 cache
    # is the split layout (q8_layout): quants int8 [rows, HKV, D], scales fp16 [rows, HKV, NB].
    # A head's row is NB blocks of QK values; every tensor here carries the block as a leading
    # batch axis, [NB, ., .], so the per-block scales never enter a dot:
    #   s[g, n]    = sum_b dk[n, b] * (q[b, g, :] . kq[n, b, :])      (batched dot over b)
    #   acc[b,g,:] += (p[g, n] * dv[n, b]) @ vq[n, b, :]             (batched dot over b)
    # Quants are exact in float16 (|q| <= 127); q and p * dv are float32 split into two float16
    # terms after power-of-two normalisation, so the dots are ~float32 and accumulate in
    # float32. The int8 tiles are 16-byte vector loads of each head's contiguous quants.
    RQ: tl.constexpr = HKV * D          # quants per token
    RS: tl.constexpr = HKV * NB         # scales per token
    h = tl.program_id(0)
    sp = tl.program_id(1)
    if DEV_POS:                         # n_keys = position + 1 read on the device (CUDA graphs)
        n_keys = tl.load(POS).to(tl.int32) + 1
    if not FUSE:                        # a split past the keys: the combine never reads it
        if sp * keys_per_split >= n_keys:
            return
    ob = tl.arange(0, NB)
    og = tl.arange(0, G_PAD)
    oj = tl.arange(0, QK)
    gmask = og < G
    qo = (h * G + og)[None, :, None] * D + ob[:, None, None] * QK + oj[None, None, :]   # [NB, G_PAD, QK]
    q = tl.load(Q + qo, mask=gmask[None, :, None], other=0.0) * qk_scale             # log2 domain
    qmax = tl.max(tl.max(tl.max(tl.abs(q), axis=2), axis=1), axis=0)
    qnorm = _pow2_at_least(tl.maximum(qmax, 1e-30)) / 8192.0                          # |q/qnorm| <= 2^13
    qh, ql = _split2(q / qnorm, Q_TERMS)
    kcol = h * D + ob[:, None, None] * QK + oj[None, :, None]                         # [NB, QK, 1]
    vcol = h * D + ob[:, None, None] * QK + oj[None, None, :]                         # [NB, 1, QK]
    scol = h * NB + ob[:, None]                                                       # [NB, 1]
    lo = sp * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_keys)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([NB, G_PAD, QK], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        rows = offs_n.to(tl.int64)
        kq = tl.load(KQ + rows[None, None, :] * RQ + kcol, mask=mask_n[None, None, :], other=0)  # [NB, QK, BN]
        dk = tl.load(KS + rows[None, :] * RS + scol, mask=mask_n[None, :], other=0.0)          # [NB, BN]
        s3 = _dot2(qh, ql, _i8_to_f16(kq), Q_TERMS)                                          # [NB, G_PAD, BN]
        s = tl.sum(s3 * dk.to(tl.float32)[:, None, :], axis=0) * qnorm                      # [G_PAD, BN]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])                                                     # <= 1
        l = l * alpha + tl.sum(p, axis=1)
        vq = tl.load(VQ + rows[None, :, None] * RQ + vcol, mask=mask_n[None, :, None], other=0)  # [NB, BN, QK]
        dv = tl.load(VS + rows[None, :] * RS + scol, mask=mask_n[None, :], other=0.0).to(tl.float32)
        pn = _pow2_at_least(tl.maximum(tl.max(dv, axis=1), 1e-30)) / 8192.0                 # [NB]
        pbh, pbl = _split2(p[None, :, :] * (dv / pn[:, None])[:, None, :], P_TERMS)         # [NB, G_PAD, BN]
        pv = _dot2(pbh, pbl, _i8_to_f16(vq), P_TERMS)                                       # [NB, G_PAD, QK]
        acc = acc * alpha[None, :, None] + pv * pn[:, None, None]
        m = m_new
    o = (h * G + og) * n_splits + sp
    tl.store(M_OUT + o, m, mask=gmask)
    tl.store(L_OUT + o, l, mask=gmask)
    ao = o[None, :, None] * D + ob[:, None, None] * QK + oj[None, None, :]
    tl.store(ACC_OUT + ao, acc, mask=gmask[None, :, None])
    if FUSE:
        _finish(M_OUT, L_OUT, ACC_OUT, OUT, COUNTER, h, n_splits, G, D, S_PAD, BLOCK_S)


@triton.jit
def _decode_q8_rows_kernel(Q, KQ, KS, VQ, VS, M_OUT, L_OUT, ACC_OUT, OUT, COUNTER, POS,
                           n_keys, keys_per_split, n_splits, qk_scale,
                           HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                           NB: tl.constexpr, BLOCK_N: tl.constexpr,
                           Q_TERMS: tl.constexpr, P_TERMS: tl.constexpr, FUSE: tl.constexpr,
                           S_PAD: tl.constexpr, BLOCK_S: tl.constexpr, DEV_POS: tl.constexpr,
                           QN: tl.constexpr = 8192.0, PN: tl.constexpr = 8192.0,
                           ROW_L: tl.constexpr = True, S64: tl.constexpr = False,
                           SKIP_QK: tl.constexpr = False, SKIP_PV: tl.constexpr = False,
                           K16: tl.constexpr = False, V16: tl.constexpr = False,
                           PRMT: tl.constexpr = False, VN_SPLIT: tl.constexpr = False,
                           STACK: tl.constexpr = False, PDL: tl.constexpr = False):
    # q8_0's decode kernel with plain 2-D dots ("block rows"; the batched kernel above made the
    # block a batch axis of 3-D dots, which Triton lowers poorly: ~0.8 TB/s on the H200).
    # Row r = g * NB + b of an [M = G_PAD * NB, D] operand is query head g restricted to block b
    # (zero elsewhere), so ONE [M, D] x [D, BLOCK_N] dot over the raw int8 values (exact in
    # float16) gives every block's partial score, and the per-(key, block) scales multiply its
    # result, never its operands:
    #   s[g, n]    = sum_b dk[n, b] * S[(g, b), n],   S = Qrows @ kq^T
    #   A[(g,b),:] += (p[g, n] * dv[n, b]) @ vq[n, :]   (only block b's columns of row (g, b) used)
    # For G * NB <= 16 the zero columns cost nothing (a dot's M is at least 16 anyway). q and
    # p * dv are float32 split into two float16 terms after power-of-two normalisation (~2^-22
    # relative), float32 accumulation, as in the batched kernel.
    # STACK (Q_TERMS = P_TERMS = 2, VN_SPLIT): the two terms stacked along the rows of one
    # [2M, D] operand (``_stack_terms``), so the scores and the values take one dot each instead of
    # two; at M = 32 (G 8, NB 4) the stacked dot has 64 rows, which sm_90 runs as one warpgroup
    # MMA (wgmma) reading its other operand from shared memory. The value accumulator is stacked
    # too, its two halves summed once after the loop.
    M: tl.constexpr = G_PAD * NB
    RQ: tl.constexpr = HKV * D          # quants per token
    RS: tl.constexpr = HKV * NB         # scales per token
    pdl_enter(PDL)
    h = tl.program_id(0)
    sp = tl.program_id(1)
    if DEV_POS:                         # n_keys = position + 1 read on the device (CUDA graphs)
        n_keys = tl.load(POS).to(tl.int32) + 1
    if not FUSE:                        # a split past the keys: the combine never reads it
        if sp * keys_per_split >= n_keys:
            return
    orow = tl.arange(0, M)
    rg = orow // NB
    rb = orow % NB
    od = tl.arange(0, D)
    inblk = (od[None, :] // QK) == rb[:, None]                                        # [M, D]
    q = tl.load(Q + (h * G + rg)[:, None] * D + od[None, :], mask=(rg < G)[:, None] & inblk,
                other=0.0) * qk_scale                                                 # log2 domain
    # one power of two per row (query head g, block b), so |q/qnorm| <= 2^13 and each row's values
    # sit near the top of float16's range: a head or block far below the group's largest would
    # otherwise fall into float16's subnormals, which the GPU's tensor cores flush to zero
    qnorm = _pow2_at_least(tl.maximum(tl.max(tl.abs(q), axis=1), 1e-30)) / QN        # [M]
    qh, ql = _split2(q / qnorm[:, None], Q_TERMS)
    if STACK:
        qs = _stack_terms(qh, ql, M, D)                                               # [2M, D]
        # each stacked row's factor: qnorm for the high term, qnorm * 2^-11 for the low (exact)
        qsc = tl.reshape(_stack_terms(qnorm[:, None], qnorm[:, None] * (1.0 / 2048.0), M, 1), [2 * M])
    scol = h * NB + tl.arange(0, NB)
    lo = sp * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_keys)
    # One s, whichever row reads it. Compiled, the top key's p of some rows (g, b) was 2^(1 ulp
    # of s), not the 1 that l summed: s = 1121 in the magnitude test, 2^-13 * ln 2 = 8.46e-5
    # relative, the whole of the error measured on the H100 (reports/h100-2026-12-05e). The
    # suspect: p (and s under it) recomputed in the rows' layout instead of moved there, with
    # the NB-term sum behind s rounded in another order. Two guards, each a constexpr so the
    # GPU can show which one holds (benchmarks/oneoff/q8_rows_map.py):
    #   S64:   s's products and NB-term sum in float64 (exact products, the sum ~2^-53), so any
    #          order rounds to the same float32;
    #   ROW_L: l kept per row from the same [M, BN] tensor of p that weighs the row, and the
    #          rows rescaled to one l per head at the end: a row's deviation then cancels.
    # Measured on the H100 (reports/h100-2026-12-05f): either guard alone holds (2.03e-7), ROW_L
    # is the cheaper (28.9 us against 29.9 at coder30b ctx 16384; 28.2 with neither): the default.
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    l_r = tl.zeros([M], tl.float32)
    if STACK:
        acc2 = tl.zeros([2 * M, D], tl.float32)
    else:
        acc = tl.zeros([M, D], tl.float32)
    if VN_SPLIT:
        # The V scales' power of two, one per block for the whole split (VN_SPLIT), instead of a
        # max over each tile: an elementwise max over the split's tiles first (the scales alone,
        # 2 bytes a key and block, read again from cache by the loop), then ONE reduction. Every
        # tile's |p * dv / pn| <= PN as with the tile's max; a tile whose scales sit far below the
        # split's largest has smaller values (2^-14, float16's smallest normal, is still 2^-27 of
        # the top), and pn leaves the loop: the accumulator is scaled by it once at the end.
        dvm = tl.zeros([NB, BLOCK_N], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            dvm = tl.maximum(dvm, tl.load(VS + offs_n.to(tl.int64)[None, :] * RS + scol[:, None],
                                          mask=(offs_n < hi)[None, :], other=0.0).to(tl.float32))
        pn_s = _pow2_at_least(tl.maximum(tl.max(dvm, axis=1), 1e-30)) / PN                   # [NB]
        inv_pn_s = 1.0 / pn_s                                                                 # exact
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        rows = offs_n.to(tl.int64)
        kq = _q8_tile(KQ, rows, mask_n, h, RQ, D, K16, PRMT)                                 # [BN, D]
        dk = tl.load(KS + rows[None, :] * RS + scol[:, None], mask=mask_n[None, :], other=0.0)  # [NB, BN]
        if SKIP_QK:     # ablation (timing only, wrong scores): no conversion, no dots; K still read
            sb = tl.max(kq, axis=1).to(tl.float32)[None, :] * qnorm[:, None]
        else:
            kf = kq if K16 else _i8_to_f16(kq)
            if STACK:
                sb = _unstack_sum(tl.dot(qs, tl.trans(kf), out_dtype=tl.float32) * qsc[:, None], M, BLOCK_N)
            else:
                sb = _dot2(qh, ql, tl.trans(kf), Q_TERMS) * qnorm[:, None]                     # [M, BN]
        if S64:
            s = tl.sum(tl.reshape(sb, [G_PAD, NB, BLOCK_N]).to(tl.float64)
                       * dk.to(tl.float64)[None, :, :], axis=1).to(tl.float32)
        else:
            s = tl.sum(tl.reshape(sb, [G_PAD, NB, BLOCK_N]) * dk.to(tl.float32)[None, :, :], axis=1)
        s = tl.where(mask_n[None, :], s, float("-inf"))                                      # [G_PAD, BN]
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])                                                      # <= 1
        p_r = tl.reshape(tl.broadcast_to(p[:, None, :], [G_PAD, NB, BLOCK_N]), [M, BLOCK_N])  # row (g, b)
        vq = _q8_tile(VQ, rows, mask_n, h, RQ, D, V16, PRMT)                                 # [BN, D]
        dv = tl.load(VS + rows[None, :] * RS + scol[:, None], mask=mask_n[None, :], other=0.0).to(tl.float32)
        if VN_SPLIT:
            dvn = dv * inv_pn_s[:, None]
        else:
            pn = _pow2_at_least(tl.maximum(tl.max(dv, axis=1), 1e-30)) / PN                  # [NB]
            dvn = dv / pn[:, None]
        dvn_r = tl.reshape(tl.broadcast_to(dvn[None, :, :], [G_PAD, NB, BLOCK_N]), [M, BLOCK_N])
        if SKIP_PV:     # ablation (timing only, wrong values): no split, no conversion, no dots
            pv = tl.sum(p_r * dvn_r, axis=1)[:, None] * tl.max(vq, axis=0).to(tl.float32)[None, :]
        else:
            pbh, pbl = _split2(p_r * dvn_r, P_TERMS)
            vf = vq if V16 else _i8_to_f16(vq)
            if not STACK:
                pv = _dot2(pbh, pbl, vf, P_TERMS)                                            # [M, D]
        alpha_r = tl.reshape(tl.broadcast_to(alpha[:, None], [G_PAD, NB]), [M])
        if ROW_L:
            l_r = l_r * alpha_r + tl.sum(p_r, axis=1)
        else:
            l = l * alpha + tl.sum(p, axis=1)
        if STACK:       # (the launcher refuses the ablations with it)
            alpha_s = tl.reshape(_stack_terms(alpha_r[:, None], alpha_r[:, None], M, 1), [2 * M])
            acc2 = tl.dot(_stack_terms(pbh, pbl, M, BLOCK_N), vf, acc2 * alpha_s[:, None], out_dtype=tl.float32)
        elif VN_SPLIT:
            acc = acc * alpha_r[:, None] + pv
        else:
            pn_r = tl.reshape(tl.broadcast_to(pn[None, :], [G_PAD, NB]), [M])
            acc = acc * alpha_r[:, None] + pv * pn_r[:, None]
        m = m_new
    if STACK:       # the low term's rows (8..15 of each 16, _stack_terms) were accumulated at 2^11
        lo_w = tl.where(tl.arange(0, 2 * M) % 16 < 8, 1.0, 1.0 / 2048.0)
        acc = _unstack_sum(acc2 * lo_w[:, None], M, D)
    if VN_SPLIT:
        acc = acc * tl.reshape(tl.broadcast_to(pn_s[None, :], [G_PAD, NB]), [M])[:, None]
    og = tl.arange(0, G_PAD)
    gmask = og < G
    o = (h * G + og) * n_splits + sp
    # one l per head for the combine: block 0's row; the other rows rescaled to it (l_r / l_r is
    # exactly 1 where the rows agree; an empty split has l 0 and writes 0)
    if ROW_L:
        l = tl.sum(tl.where(tl.arange(0, NB)[None, :] == 0, tl.reshape(l_r, [G_PAD, NB]), 0.0), axis=1)
        l_g = tl.reshape(tl.broadcast_to(l[:, None], [G_PAD, NB]), [M])
        acc = acc * tl.where(l_r > 0, l_g / tl.where(l_r > 0, l_r, 1.0), 0.0)[:, None]
    tl.store(M_OUT + o, m, mask=gmask)
    tl.store(L_OUT + o, l, mask=gmask)
    out = tl.sum(tl.reshape(tl.where(inblk, acc, 0.0), [G_PAD, NB, D]), axis=1)           # [G_PAD, D]
    tl.store(ACC_OUT + o[:, None] * D + od[None, :], out, mask=gmask[:, None])
    if FUSE:
        _finish(M_OUT, L_OUT, ACC_OUT, OUT, COUNTER, h, n_splits, G, D, S_PAD, BLOCK_S)


@triton.jit
def _q8_q_block(Q, qrow, gmask, oj, b: tl.constexpr, qk_scale, QN: tl.constexpr, Q_TERMS: tl.constexpr):
    """Block ``b`` of the group's query heads [G_PAD, QK] in the log2 domain, normalised per head
    by a power of two (|q/qn| <= QN) and split into float16 terms; returns (hi, lo, qn [G_PAD])."""
    q = tl.load(Q + qrow[:, None] + b * QK + oj[None, :], mask=gmask[:, None], other=0.0) * qk_scale
    qn = _pow2_at_least(tl.maximum(tl.max(tl.abs(q), axis=1), 1e-30)) / QN
    qh, ql = _split2(q / qn[:, None], Q_TERMS)
    return qh, ql, qn


@triton.jit
def _q8_qk_block(KQ, KS, rows, mask_n, kcol, scol, b: tl.constexpr, oj, RQ: tl.constexpr, RS: tl.constexpr,
                 qh, ql, qn, Q_TERMS: tl.constexpr):
    """Block ``b``'s part of the scores [G_PAD, BN]: (q_b . kq_b) * qn * dk_b, the int8 quants
    exact in float16, the block's scales applied to the dot's result."""
    kq = tl.load(KQ + rows[:, None] * RQ + kcol + b * QK + oj[None, :], mask=mask_n[:, None], other=0)   # [BN, QK]
    dk = tl.load(KS + rows * RS + scol + b, mask=mask_n, other=0.0).to(tl.float32)                       # [BN]
    return _dot2(qh, ql, tl.trans(_i8_to_f16(kq)), Q_TERMS) * qn[:, None] * dk[None, :]


@triton.jit
def _q8_pv_block(VQ, VS, rows, mask_n, kcol, scol, b: tl.constexpr, oj, RQ: tl.constexpr, RS: tl.constexpr,
                 p, acc, alpha, PN: tl.constexpr, P_TERMS: tl.constexpr):
    """Block ``b``'s columns of the output [G_PAD, QK], rescaled by ``alpha`` and advanced by this
    tile: (p * dv_b) @ vq_b, p * dv_b normalised by a power of two and split into float16 terms."""
    vq = tl.load(VQ + rows[:, None] * RQ + kcol + b * QK + oj[None, :], mask=mask_n[:, None], other=0)   # [BN, QK]
    dv = tl.load(VS + rows * RS + scol + b, mask=mask_n, other=0.0).to(tl.float32)                       # [BN]
    pn = _pow2_at_least(tl.maximum(tl.max(dv, axis=0), 1e-30)) / PN
    ph, pl = _split2(p * (dv / pn)[None, :], P_TERMS)
    return acc * alpha[:, None] + _dot2(ph, pl, _i8_to_f16(vq), P_TERMS) * pn


@triton.jit
def _decode_q8_blocks_kernel(Q, KQ, KS, VQ, VS, M_OUT, L_OUT, ACC_OUT, OUT, COUNTER, POS,
                             n_keys, keys_per_split, n_splits, qk_scale,
                             HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                             NB: tl.constexpr, BLOCK_N: tl.constexpr,
                             Q_TERMS: tl.constexpr, P_TERMS: tl.constexpr, FUSE: tl.constexpr,
                             S_PAD: tl.constexpr, BLOCK_S: tl.constexpr, DEV_POS: tl.constexpr,
                             QN: tl.constexpr = 8192.0, PN: tl.constexpr = 8192.0):
    # q8_0's decode kernel one block of 32 values at a time ("blocks"; NB = 1, 2 or 4 blocks a
    # head, i.e. head_dim 32, 64 or 128): every dot is 2-D and carries no zeros beyond G_PAD's,
    #   s[g, n]       = sum_b dk[n, b] * (q[g, b-block] . kq[n, b-block])     NB dots [G_PAD, QK] x [QK, BN]
    #   acc_b[g, :]  += (p[g, n] * dv[n, b]) @ vq[n, b-block]                 NB dots [G_PAD, BN] x [BN, QK]
    # against the rows kernel's [G_PAD * NB, D] operands, 3/4 zeros at NB = 4. Each block's quants
    # are their own [BN, 32] tile (32 contiguous bytes a row); p is formed once, in one layout, and
    # both weighs V and sums into l (no per-row copy of it to disagree: the rows kernel's guard).
    # q and p * dv are float32 split into two float16 terms after power-of-two normalisation (~2^-22
    # relative), float32 accumulation, as the other q8_0 kernels.
    RQ: tl.constexpr = HKV * D          # quants per token
    RS: tl.constexpr = HKV * NB         # scales per token
    h = tl.program_id(0)
    sp = tl.program_id(1)
    if DEV_POS:                         # n_keys = position + 1 read on the device (CUDA graphs)
        n_keys = tl.load(POS).to(tl.int32) + 1
    if not FUSE:                        # a split past the keys: the combine never reads it
        if sp * keys_per_split >= n_keys:
            return
    og = tl.arange(0, G_PAD)
    gmask = og < G
    oj = tl.arange(0, QK)
    qrow = (h * G + og) * D
    kcol = h * D
    scol = h * NB
    q0h, q0l, q0n = _q8_q_block(Q, qrow, gmask, oj, 0, qk_scale, QN, Q_TERMS)
    acc0 = tl.zeros([G_PAD, QK], tl.float32)
    if NB >= 2:
        q1h, q1l, q1n = _q8_q_block(Q, qrow, gmask, oj, 1, qk_scale, QN, Q_TERMS)
        acc1 = tl.zeros([G_PAD, QK], tl.float32)
    if NB == 4:
        q2h, q2l, q2n = _q8_q_block(Q, qrow, gmask, oj, 2, qk_scale, QN, Q_TERMS)
        q3h, q3l, q3n = _q8_q_block(Q, qrow, gmask, oj, 3, qk_scale, QN, Q_TERMS)
        acc2 = tl.zeros([G_PAD, QK], tl.float32)
        acc3 = tl.zeros([G_PAD, QK], tl.float32)
    lo = sp * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_keys)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        rows = offs_n.to(tl.int64)
        s = _q8_qk_block(KQ, KS, rows, mask_n, kcol, scol, 0, oj, RQ, RS, q0h, q0l, q0n, Q_TERMS)
        if NB >= 2:
            s += _q8_qk_block(KQ, KS, rows, mask_n, kcol, scol, 1, oj, RQ, RS, q1h, q1l, q1n, Q_TERMS)
        if NB == 4:
            s += _q8_qk_block(KQ, KS, rows, mask_n, kcol, scol, 2, oj, RQ, RS, q2h, q2l, q2n, Q_TERMS)
            s += _q8_qk_block(KQ, KS, rows, mask_n, kcol, scol, 3, oj, RQ, RS, q3h, q3l, q3n, Q_TERMS)
        s = tl.where(mask_n[None, :], s, float("-inf"))                                      # [G_PAD, BN]
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])                                                      # <= 1
        l = l * alpha + tl.sum(p, axis=1)
        acc0 = _q8_pv_block(VQ, VS, rows, mask_n, kcol, scol, 0, oj, RQ, RS, p, acc0, alpha, PN, P_TERMS)
        if NB >= 2:
            acc1 = _q8_pv_block(VQ, VS, rows, mask_n, kcol, scol, 1, oj, RQ, RS, p, acc1, alpha, PN, P_TERMS)
        if NB == 4:
            acc2 = _q8_pv_block(VQ, VS, rows, mask_n, kcol, scol, 2, oj, RQ, RS, p, acc2, alpha, PN, P_TERMS)
            acc3 = _q8_pv_block(VQ, VS, rows, mask_n, kcol, scol, 3, oj, RQ, RS, p, acc3, alpha, PN, P_TERMS)
        m = m_new
    o = (h * G + og) * n_splits + sp
    tl.store(M_OUT + o, m, mask=gmask)
    tl.store(L_OUT + o, l, mask=gmask)
    ao = o[:, None] * D + oj[None, :]
    tl.store(ACC_OUT + ao, acc0, mask=gmask[:, None])
    if NB >= 2:
        tl.store(ACC_OUT + ao + QK, acc1, mask=gmask[:, None])
    if NB == 4:
        tl.store(ACC_OUT + ao + 2 * QK, acc2, mask=gmask[:, None])
        tl.store(ACC_OUT + ao + 3 * QK, acc3, mask=gmask[:, None])
    if FUSE:
        _finish(M_OUT, L_OUT, ACC_OUT, OUT, COUNTER, h, n_splits, G, D, S_PAD, BLOCK_S)


@triton.jit
def _i8_to_f32(x):
    """int8 -> float32, exact, without an int->float conversion: the float with bits
    0x4B400000 + x (x sign-extended) is 1.5 * 2^23 + x."""
    return (x.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _i8x4_to_f32_prmt(w):
    """Four int8 in each int32 word (little-endian) -> four float32, exact: the bytes flipped to
    x + 128 (one xor a word), each placed under 0x4B000000 by a PTX byte permute (2^23 + x + 128)
    and 2^23 + 128 subtracted. Compiled only."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t;
        xor.b32 t, $4, 0x80808080;
        prmt.b32 $0, t, 0x4B000000, 0x7540;
        prmt.b32 $1, t, 0x4B000000, 0x7541;
        prmt.b32 $2, t, 0x4B000000, 0x7542;
        prmt.b32 $3, t, 0x4B000000, 0x7543;
        sub.f32 $0, $0, 0f4B000080;
        sub.f32 $1, $1, 0f4B000080;
        sub.f32 $2, $2, 0f4B000080;
        sub.f32 $3, $3, 0f4B000080;
        }""",
        constraints="=r,=r,=r,=r,r", args=[w], dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
        is_pure=True, pack=1)


@triton.jit
def _q8_rows_f32(P, r64, valid, h, RQ: tl.constexpr, D: tl.constexpr, NB: tl.constexpr, R: tl.constexpr,
                 PRMT: tl.constexpr):
    """Head ``h``'s quants of ``R`` cache rows as float32 [R, NB, QK], exact, masked rows 0:
    int8 loads and a magic add, or (``PRMT``) int32 words unpacked by PTX byte permutes."""
    if PRMT:
        w = tl.load(P.to(tl.pointer_type(tl.int32)) + r64[:, None] * (RQ // 4)
                    + (h * (D // 4) + tl.arange(0, D // 4))[None, :], mask=valid[:, None], other=0)
        a, b, c, d = _i8x4_to_f32_prmt(w)
        # join's new axis is the last: [.., i0, i1] holds (a, c)[i0] for i1 0 and (b, d)[i0] for
        # i1 1, so flattened (i0, i1) reads a, b, c, d: bytes 0..3 in order
        x = tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), [R, D])
    else:
        x = _i8_to_f32(tl.load(P + r64[:, None] * RQ + h * D + tl.arange(0, D)[None, :], mask=valid[:, None],
                               other=0))
    return tl.reshape(x, [R, NB, QK])


@triton.jit
def _stream_step(kd, vd, dk, dv, q, m, l, acc, valid):
    """One key a stream (row r of the tile) for one query head: the score from the dequantized
    quants' block sums times the block scales (float32 throughout), the stream's running max,
    sum and accumulator updated (log2 domain). ``m`` starts finite (-1e30), so a stream that has
    seen no key yet has alpha 1 and p 0 and never a NaN."""
    sb = tl.sum(kd * q[None, :, :], axis=2)                         # [R, NB] block sums
    sc = tl.sum(sb * dk, axis=1)                                     # [R]
    sc = tl.where(valid, sc, float("-inf"))
    m_new = tl.maximum(m, sc)
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(sc - m_new)
    l = l * alpha + p
    acc = acc * alpha[:, None, None] + (p[:, None] * dv)[:, :, None] * vd
    return m_new, l, acc


@triton.jit
def _stream_store(m, l, acc, M_OUT, L_OUT, ACC_OUT, o, D: tl.constexpr, NB: tl.constexpr):
    """A query head's R streams merged into the split's one (m, l, acc) for the combine."""
    mx = tl.max(m, axis=0)
    w = tl.exp2(m - mx)                                              # streams with no key: 0
    tl.store(M_OUT + o, mx)
    tl.store(L_OUT + o, tl.sum(l * w, axis=0))
    a = tl.sum(acc * w[:, None, None], axis=0)                       # [NB, QK]
    ob = tl.arange(0, NB)
    oi = tl.arange(0, QK)
    tl.store(ACC_OUT + o * D + ob[:, None] * QK + oi[None, :], a)


@triton.jit
def _decode_q8_streams_kernel(Q, KQ, KS, VQ, VS, M_OUT, L_OUT, ACC_OUT, POS,
                              n_keys, keys_per_split, n_splits, qk_scale,
                              HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, NB: tl.constexpr,
                              R: tl.constexpr, DEV_POS: tl.constexpr, PDL: tl.constexpr = False,
                              PRMT: tl.constexpr = False):
    # q8_0 decode without tensor cores: R independent softmax streams a program, stream r taking
    # keys r, r + R, r + 2R, ... of the split, each with its own running max, sum and float32
    # accumulator per query head; the streams merge once, after the loop. Every tensor is
    # [R, NB, 32] (a key's quants by block) or a slice of it, so the loads land where the
    # arithmetic runs: no tile crosses threads except the block sums' reduction. The quants are
    # dequantized exactly (int8 -> float32 by a magic add, times the fp16 scale: <= 19 bits, exact
    # in float32), so the maths is the torch reference's up to summation order.
    RQ: tl.constexpr = HKV * D
    RS: tl.constexpr = HKV * NB
    pdl_enter(PDL)
    h = tl.program_id(0)
    sp = tl.program_id(1)
    if DEV_POS:
        n_keys = tl.load(POS).to(tl.int32) + 1
    if sp * keys_per_split >= n_keys:
        return
    ob = tl.arange(0, NB)
    oi = tl.arange(0, QK)
    qoff = ob[:, None] * QK + oi[None, :]                            # [NB, QK]
    q0 = tl.load(Q + (h * G + 0) * D + qoff) * qk_scale
    m0 = tl.full([R], -1e30, tl.float32)
    l0 = tl.zeros([R], tl.float32)
    a0 = tl.zeros([R, NB, QK], tl.float32)
    if G > 1:
        q1 = tl.load(Q + (h * G + 1) * D + qoff) * qk_scale
        m1 = tl.full([R], -1e30, tl.float32)
        l1 = tl.zeros([R], tl.float32)
        a1 = tl.zeros([R, NB, QK], tl.float32)
    if G > 2:
        q2 = tl.load(Q + (h * G + 2) * D + qoff) * qk_scale
        m2 = tl.full([R], -1e30, tl.float32)
        l2 = tl.zeros([R], tl.float32)
        a2 = tl.zeros([R, NB, QK], tl.float32)
    if G > 3:
        q3 = tl.load(Q + (h * G + 3) * D + qoff) * qk_scale
        m3 = tl.full([R], -1e30, tl.float32)
        l3 = tl.zeros([R], tl.float32)
        a3 = tl.zeros([R, NB, QK], tl.float32)
    if G > 4:
        q4 = tl.load(Q + (h * G + 4) * D + qoff) * qk_scale
        m4 = tl.full([R], -1e30, tl.float32)
        l4 = tl.zeros([R], tl.float32)
        a4 = tl.zeros([R, NB, QK], tl.float32)
    if G > 5:
        q5 = tl.load(Q + (h * G + 5) * D + qoff) * qk_scale
        m5 = tl.full([R], -1e30, tl.float32)
        l5 = tl.zeros([R], tl.float32)
        a5 = tl.zeros([R, NB, QK], tl.float32)
    if G > 6:
        q6 = tl.load(Q + (h * G + 6) * D + qoff) * qk_scale
        m6 = tl.full([R], -1e30, tl.float32)
        l6 = tl.zeros([R], tl.float32)
        a6 = tl.zeros([R, NB, QK], tl.float32)
    if G > 7:
        q7 = tl.load(Q + (h * G + 7) * D + qoff) * qk_scale
        m7 = tl.full([R], -1e30, tl.float32)
        l7 = tl.zeros([R], tl.float32)
        a7 = tl.zeros([R, NB, QK], tl.float32)
    lo = sp * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_keys)
    orr = tl.arange(0, R)
    for n0 in range(lo, hi, R):
        rows = n0 + orr
        valid = rows < hi
        r64 = rows.to(tl.int64)
        # [R, D] loads (16 bytes a thread, a key's row over 8 threads, the warps along the keys),
        # then [R, NB, QK]: the block sums reduce inside a warp
        sp_ = r64[:, None] * RS + h * NB + ob[None, :]
        kd = _q8_rows_f32(KQ, r64, valid, h, RQ, D, NB, R, PRMT)
        vd = _q8_rows_f32(VQ, r64, valid, h, RQ, D, NB, R, PRMT)
        dk = tl.load(KS + sp_, mask=valid[:, None], other=0.0).to(tl.float32)
        dv = tl.load(VS + sp_, mask=valid[:, None], other=0.0).to(tl.float32)
        m0, l0, a0 = _stream_step(kd, vd, dk, dv, q0, m0, l0, a0, valid)
        if G > 1:
            m1, l1, a1 = _stream_step(kd, vd, dk, dv, q1, m1, l1, a1, valid)
        if G > 2:
            m2, l2, a2 = _stream_step(kd, vd, dk, dv, q2, m2, l2, a2, valid)
        if G > 3:
            m3, l3, a3 = _stream_step(kd, vd, dk, dv, q3, m3, l3, a3, valid)
        if G > 4:
            m4, l4, a4 = _stream_step(kd, vd, dk, dv, q4, m4, l4, a4, valid)
        if G > 5:
            m5, l5, a5 = _stream_step(kd, vd, dk, dv, q5, m5, l5, a5, valid)
        if G > 6:
            m6, l6, a6 = _stream_step(kd, vd, dk, dv, q6, m6, l6, a6, valid)
        if G > 7:
            m7, l7, a7 = _stream_step(kd, vd, dk, dv, q7, m7, l7, a7, valid)
    o = (h * G) * n_splits + sp
    _stream_store(m0, l0, a0, M_OUT, L_OUT, ACC_OUT, o, D, NB)
    if G > 1:
        _stream_store(m1, l1, a1, M_OUT, L_OUT, ACC_OUT, o + n_splits, D, NB)
    if G > 2:
        _stream_store(m2, l2, a2, M_OUT, L_OUT, ACC_OUT, o + 2 * n_splits, D, NB)
    if G > 3:
        _stream_store(m3, l3, a3, M_OUT, L_OUT, ACC_OUT, o + 3 * n_splits, D, NB)
    if G > 4:
        _stream_store(m4, l4, a4, M_OUT, L_OUT, ACC_OUT, o + 4 * n_splits, D, NB)
    if G > 5:
        _stream_store(m5, l5, a5, M_OUT, L_OUT, ACC_OUT, o + 5 * n_splits, D, NB)
    if G > 6:
        _stream_store(m6, l6, a6, M_OUT, L_OUT, ACC_OUT, o + 6 * n_splits, D, NB)
    if G > 7:
        _stream_store(m7, l7, a7, M_OUT, L_OUT, ACC_OUT, o + 7 * n_splits, D, NB)


@triton.jit
def _s2_scores(kd, dk, q, valid, m, SB, R: tl.constexpr):
    """The two-pass streams kernel's first pass for one query head: the tile's scores (log2
    domain, -inf past the keys) stored at ``SB`` (R consecutive floats), and the running max."""
    sc = tl.sum(tl.sum(kd * q[None, :, :], axis=2) * dk, axis=1)
    sc = tl.where(valid, sc, float("-inf"))
    tl.store(SB + tl.arange(0, R), sc)
    return tl.maximum(m, sc)


@triton.jit
def _s2_values(vd, dv, mx, l, acc, SB, R: tl.constexpr):
    """The second pass for one query head: p from the stored scores and the split's max (no
    rescaling: the max is known), the stream's sum and accumulator."""
    p = tl.exp2(tl.load(SB + tl.arange(0, R)) - mx)
    l = l + p
    acc = acc + (p[:, None] * dv)[:, :, None] * vd
    return l, acc


@triton.jit
def _s2_store(mx, l, acc, M_OUT, L_OUT, ACC_OUT, o, D: tl.constexpr, NB: tl.constexpr):
    tl.store(M_OUT + o, mx)
    tl.store(L_OUT + o, tl.sum(l, axis=0))
    a = tl.sum(acc, axis=0)                                          # [NB, QK]
    ob = tl.arange(0, NB)
    oi = tl.arange(0, QK)
    tl.store(ACC_OUT + o * D + ob[:, None] * QK + oi[None, :], a)


@triton.jit
def _decode_q8_streams2_kernel(Q, KQ, KS, VQ, VS, M_OUT, L_OUT, ACC_OUT, S_BUF, POS,
                               n_keys, keys_per_split, n_splits, qk_scale,
                               HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, NB: tl.constexpr,
                               R: tl.constexpr, DEV_POS: tl.constexpr, PDL: tl.constexpr = False,
                               PRMT: tl.constexpr = False):
    # The streams form in two passes over the split: the first reads K only and writes every
    # key's score (G floats a key, to a scratch the second pass reads back from L2) and each
    # head's max; the second reads V only, p = exp2(s - max) with the max known, so no
    # accumulator is ever rescaled and each pass holds half the live state of one (q and K, or
    # the accumulators and V): fewer registers a program. Same bytes of K and V as one pass.
    RQ: tl.constexpr = HKV * D
    RS: tl.constexpr = HKV * NB
    pdl_enter(PDL)
    h = tl.program_id(0)
    sp = tl.program_id(1)
    if DEV_POS:
        n_keys = tl.load(POS).to(tl.int32) + 1
    if sp * keys_per_split >= n_keys:
        return
    ob = tl.arange(0, NB)
    oi = tl.arange(0, QK)
    orr = tl.arange(0, R)
    lo = sp * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_keys)
    # the scratch: [G, keys_per_split] floats of this (KV head, split)
    sb = S_BUF + (h * n_splits + sp).to(tl.int64) * (G * keys_per_split)
    qoff = ob[:, None] * QK + oi[None, :]
    q0 = tl.load(Q + (h * G + 0) * D + qoff) * qk_scale
    m0 = tl.full([R], float("-inf"), tl.float32)
    if G > 1:
        q1 = tl.load(Q + (h * G + 1) * D + qoff) * qk_scale
        m1 = tl.full([R], float("-inf"), tl.float32)
    if G > 2:
        q2 = tl.load(Q + (h * G + 2) * D + qoff) * qk_scale
        m2 = tl.full([R], float("-inf"), tl.float32)
    if G > 3:
        q3 = tl.load(Q + (h * G + 3) * D + qoff) * qk_scale
        m3 = tl.full([R], float("-inf"), tl.float32)
    if G > 4:
        q4 = tl.load(Q + (h * G + 4) * D + qoff) * qk_scale
        m4 = tl.full([R], float("-inf"), tl.float32)
    if G > 5:
        q5 = tl.load(Q + (h * G + 5) * D + qoff) * qk_scale
        m5 = tl.full([R], float("-inf"), tl.float32)
    if G > 6:
        q6 = tl.load(Q + (h * G + 6) * D + qoff) * qk_scale
        m6 = tl.full([R], float("-inf"), tl.float32)
    if G > 7:
        q7 = tl.load(Q + (h * G + 7) * D + qoff) * qk_scale
        m7 = tl.full([R], float("-inf"), tl.float32)
    for n0 in range(lo, hi, R):
        rows = n0 + orr
        valid = rows < hi
        r64 = rows.to(tl.int64)
        kd = _q8_rows_f32(KQ, r64, valid, h, RQ, D, NB, R, PRMT)
        dk = tl.load(KS + r64[:, None] * RS + h * NB + ob[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        t = sb + (n0 - lo)
        m0 = _s2_scores(kd, dk, q0, valid, m0, t, R)
        if G > 1:
            m1 = _s2_scores(kd, dk, q1, valid, m1, t + keys_per_split, R)
        if G > 2:
            m2 = _s2_scores(kd, dk, q2, valid, m2, t + 2 * keys_per_split, R)
        if G > 3:
            m3 = _s2_scores(kd, dk, q3, valid, m3, t + 3 * keys_per_split, R)
        if G > 4:
            m4 = _s2_scores(kd, dk, q4, valid, m4, t + 4 * keys_per_split, R)
        if G > 5:
            m5 = _s2_scores(kd, dk, q5, valid, m5, t + 5 * keys_per_split, R)
        if G > 6:
            m6 = _s2_scores(kd, dk, q6, valid, m6, t + 6 * keys_per_split, R)
        if G > 7:
            m7 = _s2_scores(kd, dk, q7, valid, m7, t + 7 * keys_per_split, R)
    tl.debug_barrier()                  # the scores' stores before any thread reads them back
    x0 = tl.max(m0, axis=0)
    l0 = tl.zeros([R], tl.float32)
    a0 = tl.zeros([R, NB, QK], tl.float32)
    if G > 1:
        x1 = tl.max(m1, axis=0)
        l1 = tl.zeros([R], tl.float32)
        a1 = tl.zeros([R, NB, QK], tl.float32)
    if G > 2:
        x2 = tl.max(m2, axis=0)
        l2 = tl.zeros([R], tl.float32)
        a2 = tl.zeros([R, NB, QK], tl.float32)
    if G > 3:
        x3 = tl.max(m3, axis=0)
        l3 = tl.zeros([R], tl.float32)
        a3 = tl.zeros([R, NB, QK], tl.float32)
    if G > 4:
        x4 = tl.max(m4, axis=0)
        l4 = tl.zeros([R], tl.float32)
        a4 = tl.zeros([R, NB, QK], tl.float32)
    if G > 5:
        x5 = tl.max(m5, axis=0)
        l5 = tl.zeros([R], tl.float32)
        a5 = tl.zeros([R, NB, QK], tl.float32)
    if G > 6:
        x6 = tl.max(m6, axis=0)
        l6 = tl.zeros([R], tl.float32)
        a6 = tl.zeros([R, NB, QK], tl.float32)
    if G > 7:
        x7 = tl.max(m7, axis=0)
        l7 = tl.zeros([R], tl.float32)
        a7 = tl.zeros([R, NB, QK], tl.float32)
    for n0 in range(lo, hi, R):
        rows = n0 + orr
        valid = rows < hi
        r64 = rows.to(tl.int64)
        vd = _q8_rows_f32(VQ, r64, valid, h, RQ, D, NB, R, PRMT)
        dv = tl.load(VS + r64[:, None] * RS + h * NB + ob[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        t = sb + (n0 - lo)
        l0, a0 = _s2_values(vd, dv, x0, l0, a0, t, R)
        if G > 1:
            l1, a1 = _s2_values(vd, dv, x1, l1, a1, t + keys_per_split, R)
        if G > 2:
            l2, a2 = _s2_values(vd, dv, x2, l2, a2, t + 2 * keys_per_split, R)
        if G > 3:
            l3, a3 = _s2_values(vd, dv, x3, l3, a3, t + 3 * keys_per_split, R)
        if G > 4:
            l4, a4 = _s2_values(vd, dv, x4, l4, a4, t + 4 * keys_per_split, R)
        if G > 5:
            l5, a5 = _s2_values(vd, dv, x5, l5, a5, t + 5 * keys_per_split, R)
        if G > 6:
            l6, a6 = _s2_values(vd, dv, x6, l6, a6, t + 6 * keys_per_split, R)
        if G > 7:
            l7, a7 = _s2_values(vd, dv, x7, l7, a7, t + 7 * keys_per_split, R)
    o = (h * G) * n_splits + sp
    _s2_store(x0, l0, a0, M_OUT, L_OUT, ACC_OUT, o, D, NB)
    if G > 1:
        _s2_store(x1, l1, a1, M_OUT, L_OUT, ACC_OUT, o + n_splits, D, NB)
    if G > 2:
        _s2_store(x2, l2, a2, M_OUT, L_OUT, ACC_OUT, o + 2 * n_splits, D, NB)
    if G > 3:
        _s2_store(x3, l3, a3, M_OUT, L_OUT, ACC_OUT, o + 3 * n_splits, D, NB)
    if G > 4:
        _s2_store(x4, l4, a4, M_OUT, L_OUT, ACC_OUT, o + 4 * n_splits, D, NB)
    if G > 5:
        _s2_store(x5, l5, a5, M_OUT, L_OUT, ACC_OUT, o + 5 * n_splits, D, NB)
    if G > 6:
        _s2_store(x6, l6, a6, M_OUT, L_OUT, ACC_OUT, o + 6 * n_splits, D, NB)
    if G > 7:
        _s2_store(x7, l7, a7, M_OUT, L_OUT, ACC_OUT, o + 7 * n_splits, D, NB)


@triton.jit
def _combine_head(M_IN, L_IN, ACC_IN, OUT, hq, n_splits, D: tl.constexpr, S_PAD: tl.constexpr,
                  BLOCK_S: tl.constexpr, n_used):
    """out[hq] = sum_s w_s acc_s / sum_s w_s l_s with w_s = 2^(m_s - max m) over the splits.
    Only splits [0, n_used) hold keys and are read: the split kernels return before writing
    anything for the others (their scratch is left as allocated), which would weigh 0 anyway."""
    offs_d = tl.arange(0, D)
    offs = tl.arange(0, S_PAD)
    m_all = tl.load(M_IN + hq * n_splits + offs, mask=offs < n_used, other=float("-inf"),
                    cache_modifier=".cg")
    m_max = tl.max(m_all, axis=0)
    num = tl.zeros([D], tl.float32)
    den = tl.zeros([BLOCK_S], tl.float32)
    for s0 in range(0, n_used, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = offs_s < n_used
        base = hq * n_splits + offs_s
        m = tl.load(M_IN + base, mask=smask, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(L_IN + base, mask=smask, other=0.0, cache_modifier=".cg")
        acc = tl.load(ACC_IN + base[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0,
                      cache_modifier=".cg")
        w = tl.exp2(m - m_max)                                           # empty splits weigh 0
        num += tl.sum(w[:, None] * acc, axis=0)
        den += w * l
    tl.store(OUT + hq * D + offs_d, num / tl.sum(den, axis=0))


@triton.jit
def _finish(M_OUT, L_OUT, ACC_OUT, OUT, COUNTER, h, n_splits, G: tl.constexpr, D: tl.constexpr,
            S_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """Fused combine: the last split program of KV head h to finish combines its G query heads
    (partials are released by the counter's acq_rel atomic) and resets the counter."""
    tl.debug_barrier()
    done = tl.atomic_add(COUNTER + h, 1, sem="acq_rel")
    if done == n_splits - 1:
        for g in tl.static_range(G):
            _combine_head(M_OUT, L_OUT, ACC_OUT, OUT, h * G + g, n_splits, D, S_PAD, BLOCK_S, n_splits)
        tl.atomic_xchg(COUNTER + h, 0)


@triton.jit
def _decode_combine_kernel(M_IN, L_IN, ACC_IN, OUT, POS, n_keys, keys_per_split, n_splits, D: tl.constexpr,
                           S_PAD: tl.constexpr, BLOCK_S: tl.constexpr, DEV_POS: tl.constexpr,
                           WINDOW: tl.constexpr = 0, PDL: tl.constexpr = False):
    # Only the splits that hold keys are read: at a short depth in a long buffer (the captured
    # step's splits cover the whole buffer) that is one or a few of ~100.
    pdl_enter(PDL)
    if DEV_POS:
        n_keys = tl.load(POS).to(tl.int32) + 1
    first = 0
    if WINDOW > 0:
        first = tl.maximum(n_keys - WINDOW, 0)
    n_used = tl.minimum((n_keys - first + keys_per_split - 1) // keys_per_split, n_splits)
    _combine_head(M_IN, L_IN, ACC_IN, OUT, tl.program_id(0), n_splits, D, S_PAD, BLOCK_S, n_used)


def _n_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def split_plan(n_keys: int, n_kv_heads: int, device: torch.device, cfg: dict = CONFIG):
    """(keys per split, number of splits): about programs_per_sm programs per SM, whole tiles."""
    bn = cfg["block_n"]
    target = max(1, cfg["programs_per_sm"] * _n_sms(device) // n_kv_heads)
    splits = max(1, min(target, cfg["max_splits"], triton.cdiv(n_keys, bn)))
    per = triton.cdiv(triton.cdiv(n_keys, splits), bn) * bn
    return per, triton.cdiv(n_keys, per)


def bf16_stack_rows(group: int) -> int:
    """Rows of the stacked bf16 operand for ``group`` query heads a KV head: three terms of each
    head's q, the group padded to a power of two, four row blocks, at least 16 (a dot's M)."""
    return max(16, 4 * triton.next_power_of_2(group))


def bf16_stacked(asked, group: int, window: int | None = None) -> bool:
    """Whether a bf16 decode launch takes the stacked kernel: ``asked`` is ``bf16_stack``'s value
    ("auto": where its operand is 16 rows and there is no window; on / off), ``group`` the query
    heads a KV head. Asked on with a window, it raises: the stacked kernel reads no window."""
    key = str(asked).lower()
    if key not in ("auto", "1", "0", "true", "false"):
        raise ValueError(f"bf16_stack {asked!r}: 'auto', '1' (on) or '0' (off)")
    if key == "auto":
        return window is None and bf16_stack_rows(group) == 16
    if key in ("1", "true") and window is not None:
        raise ValueError("bf16_stack (KVBENCH_DECODE_BF16_STACK=1) serves full-context bf16 decode only, "
                         "not a sliding window: set it to auto or 0 for this model")
    return key in ("1", "true")


def q8_stacked(asked, terms, vnorm: str, ablate) -> bool:
    """Whether a q8_0 rows launch stacks its float16 terms (``_stack_terms``): ``asked`` is
    ``q8_stack``'s value. Stacking needs two terms a side and the split normalisation, and takes
    no ablation: asked without them, it raises rather than run unstacked."""
    key = str(asked).lower()
    if key not in ("0", "1", "true", "false"):
        raise ValueError(f"q8_stack {asked!r}: True / '1' (on) or False / '0' (off)")
    if key in ("0", "false"):
        return False
    if tuple(terms) != (2, 2) or vnorm != "split" or ablate:
        raise ValueError(f"q8_stack (KVBENCH_DECODE_Q8_STACK=1) needs q8_terms (2, 2), q8_vnorm 'split' and no "
                         f"q8_ablate (this launch: q8_terms {tuple(terms)}, q8_vnorm {vnorm!r}, "
                         f"q8_ablate {sorted(ablate)}): unset it or change those")
    return True


def q8_kernel_fits(head_dim: int) -> bool:
    """Whether q8_0's own kernel serves this head size: whole 32-value blocks per head."""
    return not head_dim % Q8_BLOCK


Q8_IMPLS = ("auto", "rows", "batched", "blocks", "streams", "streams2", "cuda_mma")


def resolve_q8_impl(cfg: dict, device: torch.device, group: int, head_dim: int,
                    rows_only: list[str]) -> tuple[str, str]:
    """(form, why) of q8_0's own decode kernel for a launch under ``cfg``. A form asked by name is
    returned as asked (the launch checks it can run). ``"auto"`` (the default) takes ``cuda_mma``
    where it runs as configured: compiled on a CUDA device of compute capability 8.0 or newer,
    an entry point for (``group``, ``head_dim``), nvcc found, the launch's tiles its own (64 keys,
    4 warps, 2-4 stages) and none of ``rows_only`` (the rows kernel's options that were asked by
    name) asked; otherwise ``rows``. ``why`` says which, for the launch record."""
    asked = str(cfg["q8_impl"])
    if asked not in Q8_IMPLS:
        if asked == "cuda":
            raise ValueError("q8_impl 'cuda' (the CUDA C++ form on float32 FMAs) was removed: 'cuda_mma' is the same "
                             "kernel on tensor cores, 1.2x faster (reports/h100-2026-12-07h); use it, 'auto' or 'rows'")
        raise ValueError(f"q8_impl must be one of {', '.join(map(repr, Q8_IMPLS))}, not {asked!r}")
    if asked != "auto":
        return asked, "asked"
    from . import cuda_q8
    if interpreted() or device.type != "cuda":
        return "rows", "auto: rows (cuda_mma runs compiled on a CUDA device only)"
    if _capability_of(device) < (8, 0):
        return "rows", "auto: rows (cuda_mma needs compute capability 8.0 or newer)"
    if not cuda_q8.supports(group, head_dim):
        return "rows", f"auto: rows (cuda_mma has no entry point for {group} query heads a KV head at head_dim {head_dim})"
    if (cfg["block_n"], cfg["num_warps"]) != (cuda_q8.TILE, cuda_q8.THREADS // 32) \
            or cfg["num_stages"] not in cuda_q8.STAGE_CHOICES:
        return "rows", (f"auto: rows (the launch's tiles {cfg['block_n']}x{cfg['num_stages']}st {cfg['num_warps']}w "
                        f"are not cuda_mma's: {cuda_q8.TILE} keys, {cuda_q8.THREADS // 32} warps, "
                        f"{'/'.join(map(str, cuda_q8.STAGE_CHOICES))} stages)")
    if rows_only:
        return "rows", f"auto: rows ({', '.join(rows_only)} asked: the rows kernel's options)"
    if not _nvcc_found(settings.get("KVBENCH_NVCC"), os.environ.get("PATH", ""), os.environ.get("CUDA_HOME", "")):
        return "rows", "auto: rows (no nvcc to build cuda_mma: KVBENCH_NVCC, PATH, CUDA_HOME, /usr/local/cuda)"
    return "cuda_mma", "auto: cuda_mma"


@functools.lru_cache(maxsize=None)
def _capability_of(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def _nvcc_found(nvcc_setting, path: str, cuda_home: str) -> bool:
    """Whether ``cuda_q8.nvcc_path`` finds nvcc, once per (setting, PATH, CUDA_HOME): every eager
    decode launch resolves ``auto``, and the lookup walks PATH."""
    from . import cuda_q8
    return cuda_q8.nvcc_path() is not None


def resolved_config(fmt: str, v_fmt: str, head_dim: int, cfg: dict | None = None) -> dict:
    """The launch configuration in force: ``CONFIG``, then the format's (K and V alike) and the
    (format, head_dim) defaults, then the tile environment variables as set now (not at import:
    a variant that sets one after import gets its value), then q8_0's own tiles
    (``KVBENCH_DECODE_Q8_TILES``, q8_0 K and V only), then ``cfg``."""
    same = fmt if v_fmt == fmt else ""
    fmt_cfg = {**FORMAT_CONFIG.get(same, {}), **HEAD_DIM_CONFIG.get((same, head_dim), {})}
    q8_tiles = (settings.get("KVBENCH_DECODE_Q8_TILES") or {}) if same == "q8_0" else {}
    return {**CONFIG, "q8_impl": settings.get("KVBENCH_DECODE_Q8_IMPL"), **fmt_cfg,
            **settings.overrides(_LIVE_KEYS), **q8_tiles, **(cfg or {})}


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, fmt: str,
                     n_keys: int | None, scale: float, n_kv_heads: int, cfg: dict | None = None,
                     pos: torch.Tensor | None = None, v_fmt: str | None = None, window: int | None = None,
                     ring_rows: int | None = None) -> torch.Tensor:
    """q [Hq, D] float32 -> [Hq, D] float32 over cache rows [0, n_keys) (Triton). ``fmt`` is
    the K buffer's format, ``v_fmt`` the V buffer's (None: the same); q8_0's own kernel serves
    q8_0 K with q8_0 V, any other pair the generic kernel (each buffer read in its format).

    ``pos``: a one-element int device tensor holding ``n_keys - 1`` instead of ``n_keys``; the
    launch then does not depend on the position (the splits cover the whole buffer and empty
    ones weigh nothing), so it can be captured in a CUDA graph.

    ``window``: sliding-window attention, only keys at positions > n_keys - 1 - window (the
    splits cover those alone). ``ring_rows``: the buffer is a ring (``engine.kv_ring``), position
    p in row p % ring_rows, which must hold the window. Both go through the generic kernel."""
    global last_scratch_bytes
    v_fmt = fmt if v_fmt is None else v_fmt
    # asked for by name (cfg or its variable), not a default: a rows-only option asked for a
    # launch of another form is refused, a default is not applied there (the record omits it)
    asked_cfg = dict(cfg or {})
    vnorm_asked = "q8_vnorm" in (cfg or {}) or bool(settings.overrides({"q8_vnorm": _LIVE_KEYS["q8_vnorm"]}))
    cfg = resolved_config(fmt, v_fmt, q.shape[1], cfg)
    Hq, D = q.shape
    if Hq % n_kv_heads or D & (D - 1) or D < 16:
        raise ValueError(f"decode kernel needs Hq % Hkv == 0 and a power-of-two head_dim >= 16 "
                         f"(Hq={Hq}, Hkv={n_kv_heads}, D={D})")
    if window is not None and window < 1:
        raise ValueError(f"sliding window {window} must be positive")
    if ring_rows is not None and (window is None or ring_rows < window):
        raise ValueError(f"a ring of {ring_rows} rows needs a window of at most that many keys (window={window})")
    if pos is not None:
        n_keys, grid_keys = 1, q8_layout.rows_view(k_buf, fmt, n_kv_heads, D).shape[0]
    elif n_keys < 1:
        raise ValueError("decode attention needs at least one key")
    else:
        grid_keys = n_keys
    if window is not None:
        grid_keys = min(grid_keys, window)
    win = {"WINDOW": window or 0, "RING": ring_rows or 0}
    G = Hq // n_kv_heads
    split = not interpreted()
    # programmatic dependent launch: asked by name (cfg / KVBENCH_DECODE_PDL, or KVBENCH_STEP_PDL=1) it
    # is refused where this launch cannot take it; from KVBENCH_STEP_PDL=auto it applies where it can
    step_pdl = bool(pdl_launch())
    pdl_asked = bool(cfg["pdl"]) or str(settings.get("KVBENCH_STEP_PDL")) == "1"
    q8_own = fmt == v_fmt == "q8_0" and cfg["q8_kernel"] and q8_kernel_fits(D) and window is None
    q8_why = None
    if q8_own:
        # the rows kernel's own options asked by name (cfg or their variables): "auto" keeps rows for them
        rows_only = [k for k, on in (("q8_words", str(cfg["q8_words"] or "none") != "none"),
                                     ("q8_ablate", bool(str(cfg["q8_ablate"] or ""))),
                                     ("q8_stack", str(cfg["q8_stack"]).lower() in ("1", "true")),
                                     ("fuse_combine", bool(cfg["fuse_combine"])), ("q8_vnorm", vnorm_asked)) if on]
        rows_only += sorted({"q8_terms", "q8_norms", "q8_guards"} & set(asked_cfg))
        cfg["q8_impl"], q8_why = resolve_q8_impl(cfg, q.device, G, D, rows_only)
    no_pdl = ("the Triton interpreter cannot run griddepcontrol" if interpreted() else
              "the fused combine (fuse_combine) has no second kernel to wait" if cfg["fuse_combine"] else
              f"the q8_0 {cfg['q8_impl']!r} form has none (the rows, streams and cuda_mma forms have)"
              if q8_own and cfg["q8_impl"] not in ("rows", "streams", "streams2", "cuda_mma")
              else None)
    if pdl_asked and no_pdl:
        raise ValueError(f"pdl (KVBENCH_DECODE_PDL / KVBENCH_STEP_PDL=1) cannot apply to this launch: {no_pdl}; "
                         f"unset it or change the launch")
    # cuda_mma takes PDL when asked by name (cfg "pdl", KVBENCH_DECODE_PDL, KVBENCH_STEP_PDL=1) only, not from
    # KVBENCH_STEP_PDL=auto, until its PDL launch is measured on the GPU (written in the thirty-seventh session)
    auto_pdl = step_pdl and not (q8_own and cfg["q8_impl"] == "cuda_mma")
    pdl = (pdl_asked or auto_pdl) and not no_pdl
    q = q.to(torch.float32).contiguous()
    per, splits = split_plan(grid_keys, n_kv_heads, q.device, cfg)
    dev_pos = {"DEV_POS": pos is not None}
    pos = q if pos is None else pos
    m = torch.empty(Hq, splits, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(Hq, splits, D, device=q.device, dtype=torch.float32)
    last_scratch_bytes = m.nbytes + l.nbytes + acc.nbytes
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if pdl:     # the constexpr that makes each kernel wait, and the launch attribute
        launch.update(PDL=True, launch_pdl=True)
    out = torch.empty(Hq, D, device=q.device, dtype=torch.float32)
    fuse = bool(cfg["fuse_combine"])
    counter = _counter(q.device, n_kv_heads)
    block_s = triton.next_power_of_2(int(settings.get("KVBENCH_DECODE_COMBINE_BLOCK")))
    comb = {"FUSE": fuse, "S_PAD": triton.next_power_of_2(splits),
            "BLOCK_S": min(block_s, triton.next_power_of_2(splits))}
    if q8_own:
        kr, vr = q8_layout.split(k_buf, n_kv_heads, D), q8_layout.split(v_buf, n_kv_heads, D)
        nb = D // Q8_BLOCK
        cuda_form = cfg["q8_impl"] == "cuda_mma"
        if cuda_form:
            from . import cuda_q8
            if interpreted() or q.device.type != "cuda":
                raise ValueError(f"q8_impl {cfg['q8_impl']!r} is a CUDA C++ kernel: it runs compiled on a CUDA device "
                                 "only (not under TRITON_INTERPRET, not on the CPU); use 'rows' or 'auto' there")
            if not cuda_q8.supports(G, D):
                raise ValueError(f"q8_impl {cfg['q8_impl']!r} serves {cuda_q8.GROUPS} query heads a KV head at head_dim "
                                 f"{cuda_q8.HEAD_DIMS}, not {G} at {D}: use 'rows'")
            if (cfg["block_n"], cfg["num_warps"]) != (cuda_q8.TILE, cuda_q8.THREADS // 32) \
                    or cfg["num_stages"] not in cuda_q8.STAGE_CHOICES:
                raise ValueError(f"q8_impl 'cuda_mma' runs {cuda_q8.TILE}-key tiles on {cuda_q8.THREADS // 32} warps, "
                                 f"{'/'.join(map(str, cuda_q8.STAGE_CHOICES))} stages, not block_n {cfg['block_n']}, "
                                 f"num_warps {cfg['num_warps']}, num_stages {cfg['num_stages']}: unset those "
                                 "(KVBENCH_DECODE_BLOCK_N / _WARPS / _STAGES / _Q8_TILES) or use 'rows'")
        if cfg["q8_impl"] in ("streams", "streams2") and G > 8:
            raise ValueError(f"q8_impl {cfg['q8_impl']!r} serves up to 8 query heads a KV head, not {G}: use 'rows'")
        if cfg["q8_impl"] == "blocks" and nb not in (1, 2, 4):
            raise ValueError(f"q8_impl 'blocks' serves head_dim 32, 64 or 128 (1, 2 or 4 blocks a head), "
                             f"not {D}: use 'rows'")
        pack_key = str(cfg["q8_pack"]).lower()
        if pack_key not in ("auto", "0", "1", "true", "false"):
            raise ValueError(f"q8_pack {cfg['q8_pack']!r}: 'auto', '1' (on) or '0' (off)")
        pack_fits = cuda_form and G in cuda_q8.PACK_GROUPS and cfg["num_stages"] == cuda_q8.PACK_STAGES
        pack = pack_fits if pack_key == "auto" else pack_key in ("1", "true")
        if pack and not pack_fits:
            raise ValueError(f"q8_pack (KVBENCH_DECODE_Q8_PACK) is cuda_mma's, at up to 4 query heads a KV head and "
                             f"3 stages; this launch: q8_impl {cfg['q8_impl']!r} ({q8_why}), {G} query heads a KV head, "
                             f"{cfg['num_stages']} stages: unset it or change those")
        wsm = str(cfg["q8_softmax"]) == "warp"
        if str(cfg["q8_softmax"]) not in ("tile", "warp"):
            raise ValueError(f"q8_softmax {cfg['q8_softmax']!r}: 'tile' or 'warp'")
        if wsm and not (cuda_form and (G, D) in cuda_q8.WSM_GEOMETRIES and cfg["num_stages"] == 3):
            raise ValueError(f"q8_softmax 'warp' (KVBENCH_DECODE_Q8_SOFTMAX) is cuda_mma's, at (query heads a KV head, "
                             f"head_dim) (3, 64), (4, 128) or (8, 128) and 3 stages; this launch: q8_impl "
                             f"{cfg['q8_impl']!r} ({q8_why}), ({G}, {D}), {cfg['num_stages']} stages: unset it")
        early_key = str(cfg["q8_early"]).lower()
        if early_key not in ("auto", "0", "1", "true", "false"):
            raise ValueError(f"q8_early {cfg['q8_early']!r}: 'auto', '1' (on) or '0' (off)")
        early = cuda_form and pdl and early_key != "0" and early_key != "false"
        if early_key in ("1", "true") and not early:
            raise ValueError(f"q8_early (KVBENCH_DECODE_Q8_EARLY) is cuda_mma's under programmatic dependent launch; "
                             f"this launch: q8_impl {cfg['q8_impl']!r} ({q8_why}), pdl {pdl}: unset it or set "
                             f"KVBENCH_DECODE_PDL=1 with cuda_mma")
        rows_form = cfg["q8_impl"] == "rows"
        streams = cfg["q8_impl"] in ("streams", "streams2", "cuda_mma")     # no fused combine, no terms knobs
        ablate = {x for x in str(cfg["q8_ablate"] or "").split(",") if x}
        words = str(cfg["q8_words"] or "none")
        if words not in ("none", "k", "v", "kv", "kv_prmt") or (words != "none" and not rows_form):
            raise ValueError(f"q8_words {words!r}: 'none', 'k', 'v', 'kv' or 'kv_prmt', on the rows kernel only "
                             f"(this launch: {cfg['q8_impl']})")
        if words == "kv_prmt" and interpreted():
            raise ValueError("q8_words 'kv_prmt' unpacks with PTX byte permutes, which the Triton interpreter "
                             "cannot run: use 'kv' (the same values) or a compiled launch")
        vnorm = str(cfg["q8_vnorm"])
        if vnorm not in ("tile", "split") or (vnorm_asked and vnorm != "tile" and not rows_form):
            raise ValueError(f"q8_vnorm {vnorm!r}: 'tile' or 'split', 'split' on the rows kernel only "
                             f"(this launch: {cfg['q8_impl']})")
        if ablate - {"qk", "pv"} or (ablate and not rows_form):
            raise ValueError(f"q8_ablate {cfg['q8_ablate']!r}: 'qk' and/or 'pv', on the rows kernel only "
                             f"(this launch: {cfg['q8_impl']})")
        if streams and fuse:
            raise ValueError(f"q8_impl {cfg['q8_impl']!r} has no fused combine: unset fuse_combine (KVBENCH_DECODE_FUSE)")
        if streams and ({"q8_terms", "q8_norms", "q8_guards"} & set(asked_cfg)):
            raise ValueError(f"q8_impl {cfg['q8_impl']!r} " + ("fixes its own two float16 terms and norms"
                             if cfg["q8_impl"] == "cuda_mma" else "computes in float32 (no float16 terms, norms or guards)") + ": "
                             "unset q8_terms / q8_norms / q8_guards for it")
        unpack = str(cfg["q8_unpack"])
        if unpack not in ("auto", "prmt", "magic") or (unpack == "prmt" and interpreted()):
            raise ValueError(f"q8_unpack {unpack!r}: 'auto' (PTX byte permutes compiled, the magic add "
                             f"interpreted), 'prmt' (compiled only) or 'magic'")
        prmt = unpack == "prmt" or (unpack == "auto" and not interpreted())
        if not rows_form and q8_stacked(cfg["q8_stack"], (2, 2), "split", set()):     # asked on (value checked)
            raise ValueError(f"q8_stack stacks the rows kernel's terms; this launch is q8_impl {cfg['q8_impl']!r}: "
                             f"unset q8_stack (KVBENCH_DECODE_Q8_STACK) or use 'rows'")
        if cuda_form:
            LAUNCHES.record({"kernel": cuda_q8.kernel_name(G, D, cfg["num_stages"], pack, wsm), "q8_impl": "cuda_mma",
                             "q8_impl_why": q8_why, "q8_pack": pack, "q8_softmax": "warp" if wsm else "tile", "block_n": cuda_q8.TILE, "num_warps": cuda_q8.THREADS // 32,
                             "num_stages": cfg["num_stages"], "splits": splits, "keys_per_split": per,
                             "combine_block": comb["BLOCK_S"], "pdl": pdl, "q8_early": early})
            cuda_q8.launch(q, kr, vr, m, l, acc, pos if dev_pos["DEV_POS"] else None, n_keys, per, splits,
                           scale * LOG2E, n_kv_heads, cfg["num_stages"], pack, pdl, wsm, early)
        elif streams and cfg["q8_impl"] == "streams2":
            # the scores' scratch: G floats a key of each (KV head, split)
            sbuf = torch.empty(n_kv_heads * splits * G * per, device=q.device, dtype=torch.float32)
            last_scratch_bytes += sbuf.nbytes
            LAUNCHES.record({"kernel": "_decode_q8_streams2_kernel", "q8_impl": "streams2", "block_n": cfg["block_n"],
                             "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "splits": splits,
                             "keys_per_split": per, "combine_block": comb["BLOCK_S"], "pdl": pdl,
                             "q8_unpack": "prmt" if prmt else "magic"})
            LAUNCHES.compiled(_decode_q8_streams2_kernel[(n_kv_heads, splits)](
                q, kr.quants, kr.scales, vr.quants, vr.scales, m, l, acc, sbuf, pos, n_keys, per,
                splits, scale * LOG2E, HKV=n_kv_heads, G=G, D=D, NB=nb, R=cfg["block_n"], PRMT=prmt,
                **dev_pos, **launch))
        elif streams:
            LAUNCHES.record({"kernel": "_decode_q8_streams_kernel", "q8_impl": "streams", "block_n": cfg["block_n"],
                             "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "splits": splits,
                             "keys_per_split": per, "combine_block": comb["BLOCK_S"], "pdl": pdl,
                             "q8_unpack": "prmt" if prmt else "magic"})
            LAUNCHES.compiled(_decode_q8_streams_kernel[(n_kv_heads, splits)](
                q, kr.quants, kr.scales, vr.quants, vr.scales, m, l, acc, pos, n_keys, per,
                splits, scale * LOG2E, HKV=n_kv_heads, G=G, D=D, NB=nb, R=cfg["block_n"], PRMT=prmt,
                **dev_pos, **launch))
        else:
            kern = {"rows": _decode_q8_rows_kernel, "batched": _decode_q8_kernel,
                    "blocks": _decode_q8_blocks_kernel}[cfg["q8_impl"]]
            g_pad = max(triton.next_power_of_2(G), max(1, 16 // nb)) if rows_form else max(16, triton.next_power_of_2(G))
            terms = {"Q_TERMS": cfg["q8_terms"][0], "P_TERMS": cfg["q8_terms"][1]}
            if cfg["q8_impl"] == "blocks":
                terms.update(QN=float(cfg["q8_norms"][0]), PN=float(cfg["q8_norms"][1]))
            if rows_form:
                stack = q8_stacked(cfg["q8_stack"], (terms["Q_TERMS"], terms["P_TERMS"]), vnorm, ablate)
                terms.update(QN=float(cfg["q8_norms"][0]), PN=float(cfg["q8_norms"][1]), STACK=stack,
                             ROW_L=bool(cfg["q8_guards"][0]), S64=bool(cfg["q8_guards"][1]),
                             SKIP_QK="qk" in ablate, SKIP_PV="pv" in ablate, K16="k" in words, V16="v" in words,
                             PRMT=words == "kv_prmt", VN_SPLIT=vnorm == "split")
            LAUNCHES.record({"kernel": kern.__name__, "q8_impl": cfg["q8_impl"], "q8_impl_why": q8_why, "block_n": cfg["block_n"],
                             "num_warps": cfg["num_warps"],
                             "num_stages": cfg["num_stages"], "splits": splits, "keys_per_split": per,
                             "combine_block": 0 if fuse else comb["BLOCK_S"],
                             "q8_terms": [terms["Q_TERMS"], terms["P_TERMS"]], "pdl": pdl,
                             **({"q8_guards": list(map(bool, cfg["q8_guards"])), "q8_words": words,
                                 "q8_vnorm": vnorm, "q8_stack": stack} if rows_form else {}),
                             **({"q8_ablate": sorted(ablate)} if ablate else {})})
            LAUNCHES.compiled(kern[(n_kv_heads, splits)](
                q, kr.quants, kr.scales, vr.quants, vr.scales, m, l, acc, out, counter, pos, n_keys, per,
                splits, scale * LOG2E,
                HKV=n_kv_heads, G=G, G_PAD=g_pad, D=D, NB=nb, BLOCK_N=cfg["block_n"],
                **terms, **comb, **dev_pos, **launch))
    elif fmt == v_fmt == "bf16" and bf16_stacked(cfg["bf16_stack"], G, window):
        gp = triton.next_power_of_2(G)
        stacked_m = bf16_stack_rows(G)
        LAUNCHES.record({"kernel": "_decode_bf16_stacked_kernel", "block_n": cfg["block_n"],
                         "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "splits": splits,
                         "keys_per_split": per, "combine_block": 0 if fuse else comb["BLOCK_S"],
                         "bf16_stack": str(cfg["bf16_stack"]).lower(), "rows": stacked_m, "pdl": pdl})
        LAUNCHES.compiled(_decode_bf16_stacked_kernel[(n_kv_heads, splits)](
            q, k_buf, v_buf, m, l, acc, out, counter, pos, n_keys, per, splits, k_buf.stride(0), v_buf.stride(0),
            scale * LOG2E, G=G, GP=gp, M=stacked_m, D=D, BLOCK_N=cfg["block_n"], SPLIT=split,
            **comb, **dev_pos, **launch))
    else:
        kv, ks, sk, sks = cache_args(k_buf, fmt, n_kv_heads, D)
        vv, vs, sv, svs = cache_args(v_buf, v_fmt, n_kv_heads, D)
        LAUNCHES.record({"kernel": "_decode_split_kernel", "block_n": cfg["block_n"],
                         "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], "splits": splits,
                         "keys_per_split": per, "combine_block": 0 if fuse else comb["BLOCK_S"],
                         "precision": cfg["precision"], "pdl": pdl})
        LAUNCHES.compiled(_decode_split_kernel[(n_kv_heads, splits)](
            q, kv, ks, vv, vs, m, l, acc, out, counter, pos, n_keys, per, splits, sk, sks, sv, svs,
            scale * LOG2E,
            G=G, G_PAD=max(16, triton.next_power_of_2(G)), D=D, BLOCK_N=cfg["block_n"],
            KFMT=KV_FORMAT_CODES[fmt], VFMT=KV_FORMAT_CODES[v_fmt], PREC=cfg["precision"], SPLIT=split,
            **comb, **dev_pos, **win, **launch))
    if not fuse:
        _decode_combine_kernel[(Hq,)](m, l, acc, out, pos, n_keys, per, splits, D=D, S_PAD=comb["S_PAD"],
                                      DEV_POS=dev_pos["DEV_POS"], WINDOW=win["WINDOW"],
                                      BLOCK_S=comb["BLOCK_S"], num_warps=4,
                                      **({"PDL": True, "launch_pdl": True} if pdl else {}))
    return out


_counters: dict = {}


def _counter(device: torch.device, n: int) -> torch.Tensor:
    """Per-device int32 arrival counters for the fused combine (each launch leaves them at 0)."""
    key = (device.type, device.index)
    c = _counters.get(key)
    if c is None or c.numel() < n:
        c = _counters[key] = torch.zeros(max(n, 64), dtype=torch.int32, device=device)
    return c


def decode_attention_ref(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, fmt: str,
                         n_keys: int, scale: float, n_kv_heads: int, v_fmt: str | None = None) -> torch.Tensor:
    """Torch reference: the blocked CPU attention with one query row at position n_keys - 1
    (``v_fmt``: the V buffer's format when it differs from K's ``fmt``)."""
    from .prefill_attention import plan_waves, prefill_attention_ref
    Hq, D = q.shape
    plan = plan_waves(1, n_keys - 1, Hq, n_kv_heads, D, budget=formats.DEFAULT_WAVE_BUDGET)
    out, _ = prefill_attention_ref(q[None], k_buf, v_buf, fmt, n_keys - 1, scale, n_kv_heads, plan, v_fmt=v_fmt)
    return out[0]


def decode_bytes_read(n_keys: int, n_kv_heads: int, head_dim: int, fmt: str, v_fmt: str | None = None) -> int:
    """K+V cache bytes one decode step reads (the bandwidth figure of merit)."""
    per_value = formats.kv_format(fmt).bytes_per_value + formats.kv_format(v_fmt or fmt).bytes_per_value
    return int(math.ceil(n_keys * n_kv_heads * head_dim * per_value))
