"""KV append: store float32 K or V rows into a cache buffer in the cache's own format.

Contract: ``kv_append(buf, start, x, fmt)`` writes ``x`` [T, Hkv, D] float32 into rows
``start..start+T-1`` of ``buf``: fp32 copies, bf16 rounds to nearest even (bytes equal to
torch's ``.to(torch.bfloat16)`` and to ``gguf.quants`` BF16 on every non-NaN value; NaN
becomes 0x7FC0 as in torch), q8_0 quantizes each token's flattened row of ``Hkv*D`` values
into ggml ``block_q8_0`` values (fp16 scale + 32 int8 per block), stored in the split layout
of ``engine.kernels.q8_layout`` (quants and scales arrays; its ``to_ggml_blocks`` view equals
``gguf.quants.quantize(x, Q8_0)`` byte for byte). ``kv_append_ref`` is the torch reference and
CPU path. ``quantize_q8_0_ref`` / ``dequantize_q8_0_ref`` are the ggml block-byte codec (the
interleaved bytes gguf writes and reads). Planted faults (``KVBENCH_FAULT``, self-tests only), in
both paths: ``q8_scale_bf16`` rounds each q8_0 scale to bfloat16 before storing it as fp16 (an
error as small as q8_0's own); ``q8_scale_shift`` stores each block with the scale of the block
before it in its row (a block-index off-by-one: the values come back at a neighbour's scale).

    buf = q8_layout.alloc(4096, 3, 64)               # flat uint8: quants, then scales
    kv_append(buf, 0, k, "q8_0")                     # k: [T, 3, 64] float32

``kv_append_pair(k_buf, v_buf, k, v, k_fmt, v_fmt, pos)``: both in one launch at a device
position (the captured decode step; ``KVBENCH_DECODE_KV_PAIR``), the same bytes as two calls.

``rope_append_at(qkv, cos, sin, pos, k_buf, v_buf, ...)``: the captured step's RoPE and append
in one launch (``KVBENCH_DECODE_ROPE_APPEND``): from a fused projection row ``[q | k | v]`` it
returns q rotated at the device-held position and stores k rotated and v as they are, in the
cache's formats (``engine.model.rotate``'s maths: ``x1 cos - x2 sin``, ``x2 cos + x1 sin`` in
float32, neox halves or adjacent pairs; the same per-format stores as ``kv_append``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import KV_FORMAT_CODES, Q8_BLOCK, Q8_BYTES, Q8_SCALE_BYTES, planted, use_triton
from . import q8_layout
from .common import QK, bf16_bits, pdl_enter, pdl_launch


# --- Triton kernel --------------------------------------------------------------------------
@triton.jit
def _store_row(x, OUT, OUT_S, row, c, mask, n_cols, stride_out, stride_out_s, pid1,
               FMT: tl.constexpr, BLOCK: tl.constexpr, SCALE_BF16: tl.constexpr, SCALE_SHIFT: tl.constexpr):
    # BLOCK float32 values ``x`` of one token row -> row ``row`` of OUT in format FMT.
    # q8_0: OUT is the quants array (int8, row stride n_cols), OUT_S the scales array (fp16).
    if FMT == 0:
        tl.store(OUT + row * stride_out + c, x, mask=mask)
    elif FMT == 1:
        # Round to nearest even on the bits (the interpreter's fp32->bf16 cast truncates).
        tl.store(OUT + row * stride_out + c, bf16_bits(x), mask=mask)
    else:
        # BLOCK values = BLOCK // 32 q8_0 blocks; same float32 ops, in the same order, as
        # gguf.quants.Q8_0 (d = amax / 127, id = 1 / d, q = round-half-away(x * id)).
        NB: tl.constexpr = BLOCK // QK
        xb = tl.reshape(x, (NB, QK))
        amax = tl.max(tl.abs(xb), axis=1)
        d = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))
        inv = tl.where(d == 0.0, 0.0, tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), tl.where(d == 0.0, 1.0, d)))
        n = xb * inv[:, None]
        a = tl.abs(n)
        f = tl.floor(a)
        r = f + tl.floor(2.0 * (a - f))
        r = tl.where(n < 0, -r, r)
        r = tl.where(r == r, r, 0.0)          # NaN (only from 0*inf or inf inputs) -> 0, as numpy on x86
        q = tl.reshape(r, (BLOCK,)).to(tl.int8)
        tl.store(OUT + row * stride_out + c, q, mask=mask)
        b = pid1 * NB + tl.arange(0, NB)
        if SCALE_BF16:              # planted fault q8_scale_bf16: the scale at the wrong width
            d = d.to(tl.bfloat16).to(tl.float32)
        if SCALE_SHIFT:             # planted fault q8_scale_shift: block b's scale lands on block b+1
            b_to = (b + 1) % (n_cols // QK)
        else:
            b_to = b
        tl.store(OUT_S + row * stride_out_s + b_to, d.to(tl.float16), mask=b * QK < n_cols)


@triton.jit
def _kv_append_kernel(X, OUT, OUT_S, POS, n_cols, stride_x, stride_out, stride_out_s,
                      FMT: tl.constexpr, BLOCK: tl.constexpr, DEV_POS: tl.constexpr,
                      SCALE_BF16: tl.constexpr = False, SCALE_SHIFT: tl.constexpr = False,
                      RING: tl.constexpr = 0, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    # grid: (T, cdiv(n_cols, BLOCK)); one program stores BLOCK values of one token row.
    # DEV_POS: OUT is the whole buffer and the first row is read from POS (a device int), so
    # the launch is the same at every position (CUDA graphs).
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < n_cols
    x = tl.load(X + t * stride_x + c, mask=mask, other=0.0)
    row = t.to(tl.int64)
    if DEV_POS:
        row += tl.load(POS).to(tl.int64)
    if RING > 0:                    # a sliding-window ring (engine.kv_ring): position p in row p % RING
        row = row % RING
    _store_row(x, OUT, OUT_S, row, c, mask, n_cols, stride_out, stride_out_s, tl.program_id(1),
               FMT, BLOCK, SCALE_BF16, SCALE_SHIFT)


@triton.jit
def _kv_append_pair_kernel(XK, XV, OK, OKS, OV, OVS, POS, n_cols, stride_xk, stride_xv, stride_ok, stride_oks,
                           stride_ov, stride_ovs, KFMT: tl.constexpr, VFMT: tl.constexpr, BLOCK: tl.constexpr,
                           K_SCALE_BF16: tl.constexpr = False, K_SCALE_SHIFT: tl.constexpr = False,
                           V_SCALE_BF16: tl.constexpr = False, V_SCALE_SHIFT: tl.constexpr = False,
                           RING: tl.constexpr = 0, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    # grid: (T, cdiv(n_cols, BLOCK), 2): axis 2 picks K (0) or V (1); rows from POS (device).
    t = tl.program_id(0)
    pid1 = tl.program_id(1)
    c = pid1 * BLOCK + tl.arange(0, BLOCK)
    mask = c < n_cols
    row = t.to(tl.int64) + tl.load(POS).to(tl.int64)
    if RING > 0:
        row = row % RING
    if tl.program_id(2) == 0:
        x = tl.load(XK + t * stride_xk + c, mask=mask, other=0.0)
        _store_row(x, OK, OKS, row, c, mask, n_cols, stride_ok, stride_oks, pid1, KFMT, BLOCK,
                   K_SCALE_BF16, K_SCALE_SHIFT)
    else:
        x = tl.load(XV + t * stride_xv + c, mask=mask, other=0.0)
        _store_row(x, OV, OVS, row, c, mask, n_cols, stride_ov, stride_ovs, pid1, VFMT, BLOCK,
                   V_SCALE_BF16, V_SCALE_SHIFT)


@triton.jit
def _rope_append_kernel(QKV, COS, SIN, POS, QOUT, OK, OKS, OV, OVS, stride_ok, stride_oks, stride_ov, stride_ovs,
                        QN, KN, eps,
                        HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, NEOX: tl.constexpr,
                        KFMT: tl.constexpr, VFMT: tl.constexpr,
                        K_SCALE_BF16: tl.constexpr = False, K_SCALE_SHIFT: tl.constexpr = False,
                        V_SCALE_BF16: tl.constexpr = False, V_SCALE_SHIFT: tl.constexpr = False,
                        RING: tl.constexpr = 0, HEAD_NORM: tl.constexpr = False, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    # grid: (HQ + 2 * HKV,): program h takes head h of the row [q heads | k heads | v heads].
    # HEAD_NORM: q and k heads are RMS-normed per head first (qk_norm "head": Qwen3), with the
    # weights QN / KN [D]: x * rsqrt(mean(x^2) + eps) * w, engine.model.rms_norm's maths.
    h = tl.program_id(0)
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, D)
    p = tl.load(POS).to(tl.int64)
    x = tl.load(QKV + h * D + d).to(tl.float32)
    row = p
    if RING > 0:
        row = row % RING
    if h < HQ + HKV:
        if NEOX:                                  # halves: (x1, x2) = (x[j], x[j + D/2])
            partner = (d + HALF) % D
            first = d < HALF
            j = d % HALF
        else:                                     # adjacent pairs: (x1, x2) = (x[2j], x[2j + 1])
            partner = d ^ 1
            first = (d % 2) == 0
            j = d // 2
        xp = tl.load(QKV + h * D + partner).to(tl.float32)
        if HEAD_NORM:
            r = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
            if h < HQ:
                x, xp = x * r * tl.load(QN + d), xp * r * tl.load(QN + partner)
            else:
                x, xp = x * r * tl.load(KN + d), xp * r * tl.load(KN + partner)
        c = tl.load(COS + p * HALF + j)
        sn = tl.load(SIN + p * HALF + j)
        # first of a pair: x1 cos - x2 sin; second: x2 cos + x1 sin (x = own value, xp = partner's)
        y = tl.where(first, x * c - xp * sn, x * c + xp * sn)
        if h < HQ:
            tl.store(QOUT + h * D + d, y)
        else:
            _store_row(y, OK, OKS, row, (h - HQ) * D + d, d < D, HKV * D, stride_ok, stride_oks, h - HQ,
                       KFMT, D, K_SCALE_BF16, K_SCALE_SHIFT)
    else:
        _store_row(x, OV, OVS, row, (h - HQ - HKV) * D + d, d < D, HKV * D, stride_ov, stride_ovs, h - HQ - HKV,
                   VFMT, D, V_SCALE_BF16, V_SCALE_SHIFT)


def _dst(buf: torch.Tensor, start: int | None, x: torch.Tensor, fmt: str, pos):
    """(x as [T, n] float32, out, out_s, stride_s, n_cols) for a launch into ``buf``."""
    T = x.shape[0]
    x2 = x.reshape(T, x.shape[1] * x.shape[2]).to(torch.float32).contiguous()
    return (x2, *_out(buf, start, T, x.shape[1], x.shape[2], fmt, pos))


def _out(buf: torch.Tensor, start: int | None, T: int, n_kv_heads: int, head_dim: int, fmt: str, pos):
    """(out, out_s, stride_s, n_cols): the arrays a launch stores ``T`` rows of ``buf`` through."""
    n_cols = n_kv_heads * head_dim
    if fmt == "q8_0":
        if n_cols % Q8_BLOCK:
            raise ValueError(f"q8_0 rows need a multiple of {Q8_BLOCK} values, got {n_cols}")
        dst = q8_layout.split(buf, n_kv_heads, head_dim)
    else:
        dst = buf
    if pos is None:
        dst = dst[start:start + T]
    if fmt == "fp32":
        out, out_s, stride_s = dst.view(dst.shape[0], n_cols), dst, 0
    elif fmt == "bf16":
        out, out_s, stride_s = dst.view(dst.shape[0], n_cols).view(torch.int16), dst, 0
    elif fmt == "q8_0":
        out, out_s = dst.quants, dst.scales
        stride_s = out_s.stride(0)
    else:
        raise ValueError(f"unknown KV format {fmt!r}")
    return out, out_s, stride_s, n_cols


def _block(fmt: str, n_cols: int) -> int:
    return min(1024, triton.next_power_of_2(n_cols)) if fmt != "q8_0" else min(256, triton.next_power_of_2(n_cols))


def kv_append(buf: torch.Tensor, start: int | None, x: torch.Tensor, fmt: str,
              pos: torch.Tensor | None = None, ring_rows: int | None = None) -> None:
    """Store ``x`` [T, Hkv, D] float32 into ``buf`` rows ``start..``; Triton or torch per backend.

    ``pos`` (Triton only): a one-element int device tensor holding ``start`` instead, so the
    launch does not depend on the position (no host sync, capturable in a CUDA graph).
    ``ring_rows`` (with ``pos`` only): ``buf`` is a ring, position p goes to row p % ring_rows."""
    if pos is not None and not use_triton(buf.device):
        raise ValueError("kv_append(pos=...) needs the Triton backend")
    if ring_rows is not None and pos is None:
        raise ValueError("kv_append(ring_rows=...) takes the position on the device (pos=...)")
    if not use_triton(buf.device):
        kv_append_ref(buf, start, x, fmt)
        return
    x2, out, out_s, stride_s, n_cols = _dst(buf, start, x, fmt, pos)
    BLOCK = _block(fmt, n_cols)
    grid = (x2.shape[0], triton.cdiv(n_cols, BLOCK))
    _kv_append_kernel[grid](x2, out, out_s, x2 if pos is None else pos, n_cols, x2.stride(0),
                            out.stride(0), stride_s, FMT=KV_FORMAT_CODES[fmt], BLOCK=BLOCK,
                            DEV_POS=pos is not None,
                            SCALE_BF16=fmt == "q8_0" and planted("q8_scale_bf16"),
                            SCALE_SHIFT=fmt == "q8_0" and planted("q8_scale_shift"),
                            RING=ring_rows or 0, **pdl_launch())


def kv_append_pair(k_buf: torch.Tensor, v_buf: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   k_fmt: str, v_fmt: str, pos: torch.Tensor, ring_rows: int | None = None) -> None:
    """``kv_append(k_buf, None, k, k_fmt, pos)`` and the same for V in one launch (Triton, the
    position on the device: the captured decode step's append, one kernel instead of two).
    The bytes written are those of the two single appends (same per-format code)."""
    if not use_triton(k_buf.device):
        raise ValueError("kv_append_pair needs the Triton backend")
    if k.shape != v.shape:
        raise ValueError(f"kv_append_pair: K {tuple(k.shape)} and V {tuple(v.shape)} differ")
    xk, ok, oks, sks, n_cols = _dst(k_buf, None, k, k_fmt, pos)
    xv, ov, ovs, svs, _ = _dst(v_buf, None, v, v_fmt, pos)
    BLOCK = min(_block(k_fmt, n_cols), _block(v_fmt, n_cols))
    grid = (xk.shape[0], triton.cdiv(n_cols, BLOCK), 2)
    _kv_append_pair_kernel[grid](xk, xv, ok, oks, ov, ovs, pos, n_cols, xk.stride(0), xv.stride(0), ok.stride(0),
                                 sks, ov.stride(0), svs, KFMT=KV_FORMAT_CODES[k_fmt], VFMT=KV_FORMAT_CODES[v_fmt],
                                 BLOCK=BLOCK,
                                 K_SCALE_BF16=k_fmt == "q8_0" and planted("q8_scale_bf16"),
                                 K_SCALE_SHIFT=k_fmt == "q8_0" and planted("q8_scale_shift"),
                                 V_SCALE_BF16=v_fmt == "q8_0" and planted("q8_scale_bf16"),
                                 V_SCALE_SHIFT=v_fmt == "q8_0" and planted("q8_scale_shift"),
                                 RING=ring_rows or 0, **pdl_launch())


def kv_append_at(k_buf: torch.Tensor, v_buf: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 k_fmt: str, v_fmt: str, pos: torch.Tensor, ring_rows: int | None = None) -> None:
    """A cache's one-token write at a device position (``LayerKV``/``RingKV.write_at``): K and V
    in one launch when ``KVBENCH_DECODE_KV_PAIR`` is on, else two ``kv_append`` launches."""
    from .. import settings
    if settings.get("KVBENCH_DECODE_KV_PAIR"):
        kv_append_pair(k_buf, v_buf, k, v, k_fmt, v_fmt, pos, ring_rows=ring_rows)
        return
    kv_append(k_buf, None, k, k_fmt, pos=pos, ring_rows=ring_rows)
    kv_append(v_buf, None, v, v_fmt, pos=pos, ring_rows=ring_rows)


def rope_append_at(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                   k_buf: torch.Tensor, v_buf: torch.Tensor, k_fmt: str, v_fmt: str, n_heads: int,
                   n_kv_heads: int, head_dim: int, kind: str, ring_rows: int | None = None,
                   head_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """RoPE and the K/V append of one decode token in one launch (Triton, position on the
    device). ``qkv`` [1, (n_heads + 2 n_kv_heads) head_dim] float32 or bfloat16, contiguous;
    ``cos``/``sin`` [positions, head_dim / 2] float32 tables (``engine.model.Rope``), which must
    cover the position; ``kind`` "neox" or "norm". Returns q [1, n_heads, head_dim] float32
    rotated; stores k rotated and v into row ``pos`` (``% ring_rows``) of the buffers in their
    formats, the bytes ``kv_append`` writes for the same float32 rows. ``head_norm`` (q_norm,
    k_norm float32 [head_dim], eps): each q and k head RMS-normed before RoPE (qk_norm "head")."""
    if not use_triton(k_buf.device):
        raise ValueError("rope_append_at needs the Triton backend")
    if kind not in ("neox", "norm"):
        raise ValueError(f"rope_append_at: RoPE kind {kind!r} is not 'neox' or 'norm'")
    D = head_dim
    if D & (D - 1) or D < 2:
        raise ValueError(f"rope_append_at needs a power-of-two head_dim, got {D}")
    n = (n_heads + 2 * n_kv_heads) * D
    if qkv.dim() != 2 or qkv.shape[0] != 1 or qkv.shape[1] != n or not qkv.is_contiguous():
        raise ValueError(f"rope_append_at: qkv must be a contiguous [1, {n}] row, got {tuple(qkv.shape)}")
    if cos.shape[-1] != D // 2 or sin.shape != cos.shape or cos.dtype != torch.float32:
        raise ValueError(f"rope_append_at: cos/sin must be float32 [positions, {D // 2}]")
    if head_norm is not None:
        qn, kn, eps = head_norm
        if qn.shape != (D,) or kn.shape != (D,) or qn.dtype != torch.float32 or kn.dtype != torch.float32:
            raise ValueError(f"rope_append_at: head norm weights must be float32 [{D}]")
    else:
        qn, kn, eps = cos, cos, 0.0              # unread (HEAD_NORM off)
    ok, oks, sks, _ = _out(k_buf, None, 1, n_kv_heads, D, k_fmt, pos)
    ov, ovs, svs, _ = _out(v_buf, None, 1, n_kv_heads, D, v_fmt, pos)
    q = torch.empty(1, n_heads, D, device=qkv.device, dtype=torch.float32)
    _rope_append_kernel[(n_heads + 2 * n_kv_heads,)](
        qkv, cos, sin, pos, q, ok, oks, ov, ovs, ok.stride(0), sks, ov.stride(0), svs, qn, kn, float(eps),
        HQ=n_heads, HKV=n_kv_heads, D=D, NEOX=kind == "neox", HEAD_NORM=head_norm is not None,
        KFMT=KV_FORMAT_CODES[k_fmt], VFMT=KV_FORMAT_CODES[v_fmt],
        K_SCALE_BF16=k_fmt == "q8_0" and planted("q8_scale_bf16"),
        K_SCALE_SHIFT=k_fmt == "q8_0" and planted("q8_scale_shift"),
        V_SCALE_BF16=v_fmt == "q8_0" and planted("q8_scale_bf16"),
        V_SCALE_SHIFT=v_fmt == "q8_0" and planted("q8_scale_shift"),
        RING=ring_rows or 0, **pdl_launch())
    return q


# --- torch references -----------------------------------------------------------------------
def _scale_fault(d: torch.Tensor) -> torch.Tensor:
    """The planted fault q8_scale_bf16 (harness self-test): the scale rounded to the wrong width."""
    return d.to(torch.bfloat16).to(torch.float32)


def _shift_fault(n: int):
    """The planted fault q8_scale_shift (harness self-test): each block stored with the scale
    of the block before it in its row of ``n`` values (the first with the row's last)."""
    return lambda d: d.reshape(-1, n // Q8_BLOCK).roll(1, dims=-1).reshape(d.shape)


def quantize_q8_0_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [..., n] (n % 32 == 0) -> (int8 quants [..., n], fp16 scales [..., n // 32]):
    ``q8_layout.quantize`` with the planted fault applied when it is set."""
    hook = _scale_fault if planted("q8_scale_bf16") else \
        _shift_fault(x.shape[-1]) if planted("q8_scale_shift") else None
    return q8_layout.quantize(x, hook)


def quantize_q8_0_ref(x: torch.Tensor) -> torch.Tensor:
    """float32 [..., n] (n % 32 == 0) -> uint8 [..., n // 32 * 34], ggml block_q8_0 bytes."""
    lead, n = x.shape[:-1], x.shape[-1]
    qs, ds = quantize_q8_0_parts(x)
    rows = q8_layout.Q8Rows(qs.reshape(-1, 1, n), ds.reshape(-1, n // Q8_BLOCK))
    return q8_layout.to_ggml_blocks(rows).reshape(*lead, n // Q8_BLOCK * Q8_BYTES)


def dequantize_q8_0_ref(q: torch.Tensor, shape) -> torch.Tensor:
    """uint8 [..., n // 32 * 34] -> float32 of ``shape`` (d * q, exact in float32)."""
    blocks = q.reshape(-1, Q8_BYTES)
    d = blocks[:, :Q8_SCALE_BYTES].contiguous().view(torch.float16).to(torch.float32)   # [nblk, 1]
    qs = blocks[:, Q8_SCALE_BYTES:].contiguous().view(torch.int8).to(torch.float32)     # [nblk, 32]
    return (qs * d).reshape(shape)


def bf16_round_ref(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).to(torch.bfloat16)


def kv_append_ref(buf: torch.Tensor, start: int, x: torch.Tensor, fmt: str) -> None:
    T = x.shape[0]
    if fmt == "fp32":
        buf[start:start + T] = x
    elif fmt == "bf16":
        buf[start:start + T] = bf16_round_ref(x)
    elif fmt == "q8_0":
        rows = q8_layout.split(buf, x.shape[1], x.shape[2])[start:start + T]
        qs, ds = quantize_q8_0_parts(x.reshape(T, -1))
        rows.quants.copy_(qs.reshape(rows.quants.shape))
        rows.scales.copy_(ds)
    else:
        raise ValueError(f"unknown KV format {fmt!r}")
