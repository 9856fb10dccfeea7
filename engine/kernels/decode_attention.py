"""Decode attention (one query row) over a KV cache read in its own format, flash-decoding style.

Contract: ``decode_attention(q, k_buf, v_buf, fmt, n_keys, scale, n_kv_heads)`` returns
[Hq, D] float32 for ``q`` [Hq, D] attending to cache rows ``[0, n_keys)``. GQA: query head
``i`` reads KV head ``i // (Hq // Hkv)``. One program per (KV head, context split) serves all
of that head's query heads and dequantizes only the tile it reads; the splits' partial softmax
states are combined by a second kernel (or, with ``fuse_combine``, by the last split to
finish). Arithmetic stays near float32 on tensor cores: float32 caches use tf32x3 dots; bf16
caches feed their exact values to bf16 dots against a three-term bf16 split of q and p; q8_0
caches (head_dim % 64 == 0) are read as 4-byte words of whole head segments (34-byte blocks
are only 2-byte aligned), their int8 quants turned into exact float16 without int->float
conversions, and dotted in "byte space" against a two-term float16 split of q and p.
``decode_attention_ref`` is the torch reference (the blocked CPU path with one row);
``last_scratch_bytes`` is the size of the last launch's partials.

    out = decode_attention(q[0], cache.k, cache.v, "q8_0", n, 64 ** -0.5, n_kv_heads=3)
    ref = decode_attention_ref(q[0], cache.k, cache.v, "q8_0", n, 64 ** -0.5, n_kv_heads=3)
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .. import formats
from . import KV_FORMAT_CODES, Q8_BLOCK, interpreted
from .common import QB, QB_HALF, QD, QK, cache_args, load_kv_tile

LOG2E = 1.4426950408889634

# Tunables (benchmarks/bench_attention.py --sweep compares them on the GPU).
CONFIG = {
    "block_n": int(os.environ.get("KVBENCH_DECODE_BLOCK_N", "64")),
    "programs_per_sm": int(os.environ.get("KVBENCH_DECODE_PROGRAMS_PER_SM", "2")),
    "num_warps": int(os.environ.get("KVBENCH_DECODE_WARPS", "4")),
    "num_stages": int(os.environ.get("KVBENCH_DECODE_STAGES", "3")),
    "precision": os.environ.get("KVBENCH_ATTN_PRECISION", "tf32x3"),   # float32 caches
    "q8_words": os.environ.get("KVBENCH_DECODE_Q8_WORDS", "1") == "1",  # word-load q8_0 path
    "fuse_combine": os.environ.get("KVBENCH_DECODE_FUSE", "0") == "1",   # combine in the last program
    "q8_terms": (2, 2),       # float16 terms of q and p in the q8_0 dots (2: ~fp32, 1: ~2^-11)
    "max_splits": 256,
}
# Per-format defaults: the fastest variants of the sweep on an H100 (triton 3.6, ctx 16384,
# 8 KV heads x 128, 32 query heads): fp32 67 us, bf16 40 us, q8_0 58 us. Environment
# variables above, or ``cfg=``, still override them.
FORMAT_CONFIG = {
    "fp32": {"block_n": 32, "programs_per_sm": 2, "num_warps": 2, "num_stages": 3},
    "bf16": {"block_n": 32, "programs_per_sm": 2, "num_warps": 2, "num_stages": 3},
    "q8_0": {"block_n": 32, "programs_per_sm": 4, "num_warps": 2, "num_stages": 3},
}
_ENV_KEYS = {"block_n": "KVBENCH_DECODE_BLOCK_N", "programs_per_sm": "KVBENCH_DECODE_PROGRAMS_PER_SM",
             "num_warps": "KVBENCH_DECODE_WARPS", "num_stages": "KVBENCH_DECODE_STAGES"}
last_scratch_bytes = 0


@triton.jit
def dot_f32(a, b, SPLIT: tl.constexpr):
    """a (float32) @ b (exact in bf16) at ~float32 fidelity: three bf16 terms of a on tensor
    cores. SPLIT=False (the interpreter, whose bf16 dot is not numeric) does one fp32 dot."""
    if SPLIT:
        a1 = a.to(tl.bfloat16)
        r1 = a - a1.to(tl.float32)
        a2 = r1.to(tl.bfloat16)
        a3 = (r1 - a2.to(tl.float32)).to(tl.bfloat16)
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
                         BLOCK_N: tl.constexpr, FMT: tl.constexpr, PREC: tl.constexpr,
                         SPLIT: tl.constexpr, FUSE: tl.constexpr, S_PAD: tl.constexpr,
                         BLOCK_S: tl.constexpr, DEV_POS: tl.constexpr):
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
    lo = sp * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_keys)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        if FMT == 1:
            rows = offs_n.to(tl.int64)
            k = tl.load(K + rows[:, None] * stride_k + col[None, :], mask=mask_n[:, None], other=0.0)
            v = tl.load(V + rows[:, None] * stride_v + col[None, :], mask=mask_n[:, None], other=0.0)
            s = dot_f32(q, tl.trans(k), SPLIT)
        else:
            k = load_kv_tile(K, KS, offs_n, mask_n, col, stride_k, stride_ks, FMT)   # [BLOCK_N, D]
            v = load_kv_tile(V, VS, offs_n, mask_n, col, stride_v, stride_vs, FMT)
            s = tl.dot(q, tl.trans(k), input_precision=PREC)              # [G_PAD, BLOCK_N]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if FMT == 1:
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
def _word_bytes(w):
    """int32 [N, W] little-endian words -> their 4W signed bytes in memory order, as exact
    float16, without int->float conversions: 0x6400 | (byte ^ 0x80) is the half 1024 + byte + 128."""
    u = w.to(tl.uint32, bitcast=True) ^ 0x80808080
    h0 = ((u & 0xFF) | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True)
    h1 = (((u >> 8) & 0xFF) | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True)
    h2 = (((u >> 16) & 0xFF) | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True)
    h3 = ((u >> 24) | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True)
    x = tl.join(tl.join(h0, h2), tl.join(h1, h3))       # [N, W, 2, 2]; [.., i, j] = byte 2 i + j
    return tl.reshape(x, (w.shape[0], w.shape[1] * 4)) - 1152.0


@triton.jit
def _half(w, shift):
    """The float16 held in the low (shift 0) or high (shift 16) half of int32 words, as float32."""
    return ((w >> shift) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _pow2_at_least(x):
    """Smallest power of two >= x (x > 0), exact, as float32."""
    return tl.exp2(tl.ceil(tl.log2(x)))


@triton.jit
def _split2(x, SPLIT: tl.constexpr):
    """float32 (|x| <= 2^14) -> (hi, lo) float16 with hi + lo = x to ~2^-22 (SPLIT=False: (x, 0))."""
    if SPLIT:
        hi = x.to(tl.float16)
        lo = (x - hi.to(tl.float32)).to(tl.float16)
        return hi, lo
    else:
        return x, x * 0.0


@triton.jit
def _dot2(a, bh, bl, SPLIT: tl.constexpr, TERMS: tl.constexpr = 2):
    """a (exact in float16) @ (bh + bl) with float32 accumulation (TERMS=1: bh only, ~2^-11);
    one float32 dot without SPLIT (the interpreter)."""
    if SPLIT:
        acc = tl.dot(a, bh, out_dtype=tl.float32)
        if TERMS == 2:
            acc = tl.dot(a, bl, acc, out_dtype=tl.float32)
        return acc
    else:
        return tl.dot(a.to(tl.float32), bh, input_precision="ieee")


@triton.jit
def _decode_q8_kernel(Q, KW, VW, M_OUT, L_OUT, ACC_OUT, OUT, COUNTER, POS,
                      n_keys, keys_per_split, n_splits, stride_kw, stride_vw, qk_scale,
                      G: tl.constexpr, D: tl.constexpr, NB: tl.constexpr, GB: tl.constexpr,
                      BLOCK_N: tl.constexpr, TAIL_W: tl.constexpr, SPLIT: tl.constexpr,
                      Q_TERMS: tl.constexpr, P_TERMS: tl.constexpr, FUSE: tl.constexpr,
                      S_PAD: tl.constexpr, BLOCK_S: tl.constexpr, DEV_POS: tl.constexpr):
    # A head segment is NB blocks of 34 bytes = SEG_W 4-byte words. The tensor-core dots run in
    # "byte space": column c = g * NB + b of the query operand holds head g's values of block
    # b at the byte offsets where block b's quants sit (zero elsewhere, scale bytes included),
    # so a dot with the segment's raw bytes gives per-block partial scores, then scaled by d.
    # Float16 operands (bytes are exact in them) carry power-of-two-normalised hi/lo halves.
    SEG_W: tl.constexpr = NB * QB_HALF // 2
    MAIN_W: tl.constexpr = NB * QK // 4                 # words holding bytes [0, 32 NB)
    MAIN_B: tl.constexpr = NB * QK
    TAIL_B: tl.constexpr = TAIL_W * 4                   # bytes [32 NB, 34 NB) + padding
    GP: tl.constexpr = GB // NB
    h = tl.program_id(0)
    sp = tl.program_id(1)
    if DEV_POS:
        n_keys = tl.load(POS).to(tl.int32) + 1
    c = tl.arange(0, GB)
    g = c // NB
    b = c % NB
    t1 = tl.arange(0, MAIN_B)
    t2 = MAIN_B + tl.arange(0, TAIL_B)
    j1 = t1[:, None] - QB * b[None, :] - QD             # index inside block b, valid in [0, 32)
    j2 = t2[:, None] - QB * b[None, :] - QD
    v1 = (j1 >= 0) & (j1 < QK) & (g < G)[None, :]
    v2 = (j2 >= 0) & (j2 < QK) & (g < G)[None, :]
    qcol = (h * G + g)[None, :] * D + QK * b[None, :]
    q1 = tl.load(Q + qcol + j1, mask=v1, other=0.0)                    # [MAIN_B, GB]
    q2 = tl.load(Q + qcol + j2, mask=v2, other=0.0)                    # [TAIL_B, GB]
    qmax = tl.maximum(tl.max(tl.max(tl.abs(q1), axis=1), axis=0), tl.max(tl.max(tl.abs(q2), axis=1), axis=0))
    qnorm = _pow2_at_least(tl.maximum(qmax, 1e-30)) / 8192.0           # q / qnorm <= 2^13
    q1h, q1l = _split2(q1 / qnorm, SPLIT)
    q2h, q2l = _split2(q2 / qnorm, SPLIT)
    s_scale = qnorm * qk_scale
    w1 = tl.arange(0, MAIN_W)
    w2 = MAIN_W + tl.arange(0, TAIL_W)
    tail_ok = w2 < SEG_W
    swcol = h * SEG_W + (QB_HALF * b) // 2              # word holding block b's fp16 scale
    sshift = 16 * (b % 2)                               # ... in its low or high half
    lo = sp * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_keys)
    m = tl.full([GP], float("-inf"), tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc1 = tl.zeros([MAIN_B, GB], tl.float32)
    acc2 = tl.zeros([TAIL_B, GB], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        rows = offs_n.to(tl.int64)
        kp = KW + rows[:, None] * stride_kw + h * SEG_W
        vp = VW + rows[:, None] * stride_vw + h * SEG_W
        kb1 = _word_bytes(tl.load(kp + w1[None, :], mask=mask_n[:, None], other=0))
        kb2 = _word_bytes(tl.load(kp + w2[None, :], mask=mask_n[:, None] & tail_ok[None, :], other=0))
        dk = _half(tl.load(KW + rows[:, None] * stride_kw + swcol[None, :], mask=mask_n[:, None], other=0), sshift)
        sp_ = _dot2(kb1, q1h, q1l, SPLIT, Q_TERMS) + _dot2(kb2, q2h, q2l, SPLIT, Q_TERMS)      # [BLOCK_N, GB]
        s = tl.sum(tl.reshape(sp_ * dk, (BLOCK_N, GP, NB)), axis=2) * s_scale
        s = tl.where(mask_n[:, None], s, float("-inf"))                  # [BLOCK_N, GP]
        # Lazy rescaling: move the running max only when it grows by more than 2^8, so most
        # tiles skip rescaling the byte-space accumulators (p stays <= 256, exact either way).
        m_new = tl.maximum(m, tl.max(s, axis=0))
        if tl.max(m_new - m, axis=0) > 8.0:
            alpha = tl.exp2(m - m_new)
            l = l * alpha
            ac = tl.reshape(tl.broadcast_to(alpha[:, None], (GP, NB)), (GB,))
            acc1 = acc1 * ac[None, :]
            acc2 = acc2 * ac[None, :]
            m = m_new
        p = tl.exp2(s - m[None, :])
        l = l + tl.sum(p, axis=0)
        dv = _half(tl.load(VW + rows[:, None] * stride_vw + swcol[None, :], mask=mask_n[:, None], other=0), sshift)
        pb = tl.reshape(tl.broadcast_to(p[:, :, None], (BLOCK_N, GP, NB)), (BLOCK_N, GB)) * dv
        pnorm = _pow2_at_least(tl.maximum(tl.max(pb, axis=0), 1e-30)) / 8192.0      # per column
        pbh, pbl = _split2(pb / pnorm[None, :], SPLIT)
        vb1 = tl.trans(_word_bytes(tl.load(vp + w1[None, :], mask=mask_n[:, None], other=0)))
        vb2 = tl.trans(_word_bytes(tl.load(vp + w2[None, :], mask=mask_n[:, None] & tail_ok[None, :],
                                           other=0)))
        acc1 += _dot2(vb1, pbh, pbl, SPLIT, P_TERMS) * pnorm[None, :]            # [MAIN_B, GB]
        acc2 += _dot2(vb2, pbh, pbl, SPLIT, P_TERMS) * pnorm[None, :]
    gi = tl.arange(0, GP)
    o = (h * G + gi) * n_splits + sp
    tl.store(M_OUT + o, m, mask=gi < G)
    tl.store(L_OUT + o, l, mask=gi < G)
    ocol = ((h * G + g) * n_splits + sp)[None, :] * D + QK * b[None, :]
    tl.store(ACC_OUT + ocol + j1, acc1, mask=v1)                         # byte space -> values
    tl.store(ACC_OUT + ocol + j2, acc2, mask=v2)
    if FUSE:
        _finish(M_OUT, L_OUT, ACC_OUT, OUT, COUNTER, h, n_splits, G, D, S_PAD, BLOCK_S)


@triton.jit
def _combine_head(M_IN, L_IN, ACC_IN, OUT, hq, n_splits, D: tl.constexpr, S_PAD: tl.constexpr,
                  BLOCK_S: tl.constexpr):
    """out[hq] = sum_s w_s acc_s / sum_s w_s l_s with w_s = 2^(m_s - max m) over the splits."""
    offs_d = tl.arange(0, D)
    offs = tl.arange(0, S_PAD)
    m_all = tl.load(M_IN + hq * n_splits + offs, mask=offs < n_splits, other=float("-inf"),
                    cache_modifier=".cg")
    m_max = tl.max(m_all, axis=0)
    num = tl.zeros([D], tl.float32)
    den = tl.zeros([BLOCK_S], tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = offs_s < n_splits
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
            _combine_head(M_OUT, L_OUT, ACC_OUT, OUT, h * G + g, n_splits, D, S_PAD, BLOCK_S)
        tl.atomic_xchg(COUNTER + h, 0)


@triton.jit
def _decode_combine_kernel(M_IN, L_IN, ACC_IN, OUT, n_splits, D: tl.constexpr, S_PAD: tl.constexpr,
                           BLOCK_S: tl.constexpr):
    _combine_head(M_IN, L_IN, ACC_IN, OUT, tl.program_id(0), n_splits, D, S_PAD, BLOCK_S)


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


def q8_word_path(head_dim: int) -> bool:
    """Whether a q8_0 head segment is whole 4-byte words (an even number of 32-value blocks)."""
    return head_dim % (2 * Q8_BLOCK) == 0


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, fmt: str,
                     n_keys: int | None, scale: float, n_kv_heads: int, cfg: dict | None = None,
                     pos: torch.Tensor | None = None) -> torch.Tensor:
    """q [Hq, D] float32 -> [Hq, D] float32 over cache rows [0, n_keys) (Triton).

    ``pos``: a one-element int device tensor holding ``n_keys - 1`` instead of ``n_keys``; the
    launch then does not depend on the position (the splits cover the whole buffer and empty
    ones weigh nothing), so it can be captured in a CUDA graph."""
    global last_scratch_bytes
    fmt_cfg = {k: v for k, v in FORMAT_CONFIG.get(fmt, {}).items() if _ENV_KEYS[k] not in os.environ}
    cfg = {**CONFIG, **fmt_cfg, **(cfg or {})}
    Hq, D = q.shape
    if Hq % n_kv_heads or D & (D - 1) or D < 16:
        raise ValueError(f"decode kernel needs Hq % Hkv == 0 and a power-of-two head_dim >= 16 "
                         f"(Hq={Hq}, Hkv={n_kv_heads}, D={D})")
    if pos is not None:
        n_keys, grid_keys = 1, k_buf.shape[0]
    elif n_keys < 1:
        raise ValueError("decode attention needs at least one key")
    else:
        grid_keys = n_keys
    G = Hq // n_kv_heads
    split = not interpreted()
    q = q.to(torch.float32).contiguous()
    per, splits = split_plan(grid_keys, n_kv_heads, q.device, cfg)
    dev_pos = {"DEV_POS": pos is not None}
    pos = q if pos is None else pos
    m = torch.empty(Hq, splits, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(Hq, splits, D, device=q.device, dtype=torch.float32)
    last_scratch_bytes = m.nbytes + l.nbytes + acc.nbytes
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    out = torch.empty(Hq, D, device=q.device, dtype=torch.float32)
    fuse = bool(cfg["fuse_combine"])
    counter = _counter(q.device, n_kv_heads)
    comb = {"FUSE": fuse, "S_PAD": triton.next_power_of_2(splits), "BLOCK_S": min(32, triton.next_power_of_2(splits))}
    if fmt == "q8_0" and cfg["q8_words"] and q8_word_path(D):
        nb = D // Q8_BLOCK
        kw, vw = k_buf.view(torch.int32), v_buf.view(torch.int32)
        _decode_q8_kernel[(n_kv_heads, splits)](
            q, kw, vw, m, l, acc, out, counter, pos, n_keys, per, splits, kw.stride(0), vw.stride(0),
            scale * LOG2E,
            G=G, D=D, NB=nb, GB=max(16, triton.next_power_of_2(G * nb)), BLOCK_N=cfg["block_n"],
            TAIL_W=max(4, triton.next_power_of_2(nb // 2)), SPLIT=split,
            Q_TERMS=cfg["q8_terms"][0], P_TERMS=cfg["q8_terms"][1], **comb, **dev_pos, **launch)
    else:
        kv, ks, sk, sks = cache_args(k_buf, fmt)
        vv, vs, sv, svs = cache_args(v_buf, fmt)
        _decode_split_kernel[(n_kv_heads, splits)](
            q, kv, ks, vv, vs, m, l, acc, out, counter, pos, n_keys, per, splits, sk, sks, sv, svs,
            scale * LOG2E,
            G=G, G_PAD=max(16, triton.next_power_of_2(G)), D=D, BLOCK_N=cfg["block_n"],
            FMT=KV_FORMAT_CODES[fmt], PREC=cfg["precision"], SPLIT=split, **comb, **dev_pos, **launch)
    if not fuse:
        _decode_combine_kernel[(Hq,)](m, l, acc, out, splits, D=D, S_PAD=comb["S_PAD"],
                                      BLOCK_S=comb["BLOCK_S"], num_warps=4)
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
                         n_keys: int, scale: float, n_kv_heads: int) -> torch.Tensor:
    """Torch reference: the blocked CPU attention with one query row at position n_keys - 1."""
    from .prefill_attention import plan_waves, prefill_attention_ref
    Hq, D = q.shape
    plan = plan_waves(1, n_keys - 1, Hq, n_kv_heads, D, budget=formats.DEFAULT_WAVE_BUDGET)
    out, _ = prefill_attention_ref(q[None], k_buf, v_buf, fmt, n_keys - 1, scale, n_kv_heads, plan)
    return out[0]


def decode_bytes_read(n_keys: int, n_kv_heads: int, head_dim: int, fmt: str) -> int:
    """K+V cache bytes one decode step reads (the bandwidth figure of merit)."""
    per_value = formats.kv_format(fmt).bytes_per_value
    return int(math.ceil(2 * n_keys * n_kv_heads * head_dim * per_value))
