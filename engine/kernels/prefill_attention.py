"""Causal prefill attention over a KV cache in its own format, in waves of query rows.

Contract: queries ``q`` [T, Hq, D] sit at positions ``start..start+T-1`` and attend causally
to cache rows ``[0, start+T)``. ``fmt`` is the K buffer's format and ``v_fmt`` (default: the
same) the V buffer's: each is read in its own (the kernel's ``KFMT`` / ``VFMT`` constexprs, the
reference's per-buffer dequantization), so a K/V split (q8_0 K, bf16 V) is exact for both. ``plan_waves`` splits the rows into waves of at most
``wave_rows`` rows (<= ``max_rows``, default 4096, so a longer prefill always takes several
waves) from a scratch budget; wave boundaries fall on absolute multiples of ``CHUNK_ROWS`` so
that every row is computed the same way however the rows are grouped into waves.
``prefill_attention`` runs one wave with the Triton flash kernel (online softmax, tiles
dequantized in registers). ``prefill_attention_ref`` is the torch reference and the CPU
path: per wave it dequantizes ``key_block`` cache rows at a time (never the whole cache)
and updates each chunk's online-softmax state, so scratch is bounded by the budget and does
not grow with N^2; its result is bit-identical for any wave grouping. ``window=W`` (reference
only) also masks keys at positions <= qpos - W (sliding-window attention) and skips key
blocks no row of the wave can see. Planted fault ``wave_mask_off_by_one`` (``KVBENCH_FAULT``,
self-tests only): every wave after a prefill's first lets each row see one key past its own
position (the reference here; the kernel through ``mask_shift``, set by ``engine.kv``).

    plan = plan_waves(T, start, Hq, Hkv, D, budget=8 << 20)
    out, peak = prefill_attention_ref(q, cache.k, cache.v, "q8_0", start, D ** -0.5, Hkv, plan)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import settings
from ..errors import ConfigError
from ..formats import DEFAULT_WAVE_BUDGET  # noqa: F401  (the default budget callers plan with)
from . import KV_FORMAT_CODES, planted, q8_layout
from .common import cache_args, load_kv_tile

LOG2E = 1.4426950408889634
CHUNK_ROWS = 128           # rows per reference chunk; waves are whole chunks
MAX_WAVE_ROWS = 4096       # prefills longer than this always take several waves
PREFILL_KEY_BLOCK = 512    # cache rows the reference dequantizes at a time for long prefills
CONFIG = {                 # defaults; the variables in _LIVE_KEYS override them at each launch
    "block_m": 64,
    "block_n": 64,
    "precision": "tf32x3",
    "num_warps": 4,
    # bf16 caches on CUDA, opt-in: torch's flash attention (FlashAttention-2) over the cached
    # bf16 values, q and p rounded to bf16 as in HF's bf16 SDPA. 2.5x the Triton kernel's
    # prefill on the H100, but its rounding adds attention error of its own (SmolLM2, 6000
    # tokens: waves vs one pass 0.25 logits vs 0.0), which would be charged to the bf16 cache in
    # kvbench's accuracy numbers; so the default is the Triton kernel (docs/perf-notes.md).
    "bf16_flash": False,
}
# Read again at each launch when set (``settings.overrides``): a variant sets them after import.
_LIVE_KEYS = {"block_m": "KVBENCH_PREFILL_BLOCK_M", "block_n": "KVBENCH_PREFILL_BLOCK_N",
              "precision": "KVBENCH_ATTN_PRECISION", "num_warps": "KVBENCH_PREFILL_WARPS",
              "bf16_flash": "KVBENCH_PREFILL_BF16_FLASH"}


def resolved_config(cfg: dict | None = None) -> dict:
    """The prefill launch configuration in force: ``CONFIG``, then the variables set now, then
    ``cfg``."""
    return {**CONFIG, **settings.overrides(_LIVE_KEYS), **(cfg or {})}


# --- wave plan ------------------------------------------------------------------------------
@dataclass(frozen=True)
class WavePlan:
    wave_rows: int                      # W: rows per wave (a multiple of chunk_rows unless one wave)
    chunk_rows: int                     # R: reference row chunk (padded), at absolute multiples of R
    key_block: int                      # KB: cache rows dequantized at a time by the reference
    waves: tuple[tuple[int, int], ...]  # row ranges [r0, r1) of q, in order
    chunks: tuple[tuple[int, int], ...] # row ranges of the reference chunks, in order

    @property
    def n_waves(self) -> int:
        return len(self.waves)


def _block_bytes(kb: int, hkv: int, d: int) -> int:
    return 4 * 2 * hkv * kb * d                       # one dequantized K and V block (float32)


def _row_bytes(hq: int, d: int, kb: int) -> int:
    # per query row held for a wave: scaled q, accumulator, running max and sum, one block of
    # scores and its p @ v product (float32), plus its position and causal mask
    return 4 * hq * (2 * d + 2 + kb + d) + 8 + kb


def plan_waves(T: int, start: int, n_heads: int, n_kv_heads: int, head_dim: int, budget: int,
               max_rows: int = MAX_WAVE_ROWS, chunk_rows: int = CHUNK_ROWS) -> WavePlan:
    """Split T query rows at ``start`` into waves whose scratch fits ``budget`` bytes."""
    if T < 1:
        raise ValueError("plan_waves needs at least one query row")
    hq, hkv, d = n_heads, n_kv_heads, head_dim
    if T <= chunk_rows:                               # decode / short step: one chunk, one wave
        kb = 4096
        while kb > 64 and _block_bytes(kb, hkv, d) + T * _row_bytes(hq, d, kb) > budget:
            kb //= 2
        if _block_bytes(kb, hkv, d) + T * _row_bytes(hq, d, kb) > budget:
            _too_small(budget, hq, d, _block_bytes(kb, hkv, d) + T * _row_bytes(hq, d, kb))
        return WavePlan(T, T, kb, ((0, T),), ((0, T),))
    # Longer prefills: chunks of R rows at absolute multiples of R and a fixed key block, so a
    # row's arithmetic never depends on how the chunks are grouped into waves.
    R, kb = chunk_rows, PREFILL_KEY_BLOCK
    bounds = [start] + list(range((start // R + 1) * R, start + T, R)) + [start + T]
    chunks = tuple((x - start, y - start) for x, y in zip(bounds[:-1], bounds[1:]))
    fit = max(0, budget - _block_bytes(kb, hkv, d)) // _row_bytes(hq, d, kb)
    if T <= max_rows and fit >= len(chunks) * R:
        return WavePlan(T, R, kb, ((0, T),), chunks)
    W = min(max_rows, fit) // R * R
    if W < R:
        _too_small(budget, hq, d, _block_bytes(kb, hkv, d) + R * _row_bytes(hq, d, kb))
    per = W // R
    waves = tuple((chunks[i][0], chunks[min(i + per, len(chunks)) - 1][1])
                  for i in range(0, len(chunks), per))
    return WavePlan(W, R, kb, waves, chunks)


def _too_small(budget: int, hq: int, d: int, need: int):
    raise ConfigError(f"wave_budget_bytes={budget} is too small for attention with {hq} query heads "
                      f"x {d} (the smallest wave needs {need} bytes)", f"raise the wave budget to at least {need}")


# --- Triton kernel --------------------------------------------------------------------------
@triton.jit
def _attn_tile(acc, l, m, q, K, KS, V, VS, n0, hi, qpos, col, stride_k, stride_ks, stride_v, stride_vs,
               BLOCK_N: tl.constexpr, KFMT: tl.constexpr, VFMT: tl.constexpr, PREC: tl.constexpr,
               MASKED: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < hi
    k = load_kv_tile(K, KS, offs_n, mask_n, col, stride_k, stride_ks, KFMT)     # [BLOCK_N, D]
    v = load_kv_tile(V, VS, offs_n, mask_n, col, stride_v, stride_vs, VFMT)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)                            # [BLOCK_M, BLOCK_N]
    if MASKED:
        s = tl.where((offs_n[None, :] <= qpos[:, None]) & mask_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC)
    return acc, l, m_new


@triton.jit
def _prefill_kernel(Q, K, KS, V, VS, O, T, start,
                    stride_qt, stride_ot, stride_k, stride_ks, stride_v, stride_vs, qk_scale, mask_shift,
                    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    KFMT: tl.constexpr, VFMT: tl.constexpr, PREC: tl.constexpr):
    # KFMT / VFMT: the K and V buffers' formats (KV_FORMAT_CODES), each read in its own
    pid_m = tl.program_id(0)
    hq = tl.program_id(1)
    h = hq // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mmask = offs_m < T
    q = tl.load(Q + offs_m[:, None] * stride_qt + hq * D + offs_d[None, :], mask=mmask[:, None], other=0.0)
    q = q * qk_scale
    qpos = start + offs_m + mask_shift                  # mask_shift: 0 (1 only as a planted fault)
    col = h * D + offs_d
    first = start + pid_m * BLOCK_M                     # smallest query position in the block
    hi = tl.minimum(first + BLOCK_M + mask_shift, start + T)   # keys [0, hi) may be visible
    full = (first + 1) // BLOCK_N * BLOCK_N             # keys [0, full) are visible to every row
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, full, BLOCK_N):
        acc, l, m = _attn_tile(acc, l, m, q, K, KS, V, VS, n0, full, qpos, col, stride_k, stride_ks,
                               stride_v, stride_vs, BLOCK_N, KFMT, VFMT, PREC, False)
    for n0 in range(full, hi, BLOCK_N):
        acc, l, m = _attn_tile(acc, l, m, q, K, KS, V, VS, n0, hi, qpos, col, stride_k, stride_ks,
                               stride_v, stride_vs, BLOCK_N, KFMT, VFMT, PREC, True)
    out = acc / l[:, None]
    tl.store(O + offs_m[:, None] * stride_ot + hq * D + offs_d[None, :], out, mask=mmask[:, None])


def prefill_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, fmt: str,
                      start: int, scale: float, n_kv_heads: int, out: torch.Tensor | None = None,
                      cfg: dict | None = None, mask_shift: int = 0, v_fmt: str | None = None) -> torch.Tensor:
    """One wave (Triton): q [T, Hq, D] float32 at ``start`` -> [T, Hq, D] float32 (into ``out``).
    ``fmt`` is the K buffer's format, ``v_fmt`` the V buffer's (None: the same).
    ``mask_shift`` (fault injection only: 1 lets each row see one key past its position)."""
    cfg = resolved_config(cfg)
    v_fmt = fmt if v_fmt is None else v_fmt
    T, Hq, D = q.shape
    if fmt == v_fmt == "bf16" and cfg["bf16_flash"] and q.is_cuda and D % 8 == 0 and D <= 256:
        return prefill_attention_flash(q, k_buf, v_buf, start, scale, out)
    if Hq % n_kv_heads or D & (D - 1) or D < 16:
        raise ValueError(f"prefill kernel needs Hq % Hkv == 0 and a power-of-two head_dim >= 16 "
                         f"(Hq={Hq}, Hkv={n_kv_heads}, D={D})")
    if q.stride(2) != 1 or q.stride(1) != D or q.dtype != torch.float32:
        q = q.to(torch.float32).contiguous()
    if out is None:
        out = torch.empty(T, Hq, D, device=q.device, dtype=torch.float32)
    block_m = cfg["block_m"] if T > 16 else 16
    block_n = cfg["block_n"]
    if D >= 128 and not fmt == v_fmt == "bf16":   # 64 x 128 float32 K and V tiles x 3 stages overflow 227 KB
        block_n = min(block_n, 32)
    if D > 128:                                   # gemma3 (D = 256): fit the tiles to the device
        block_m, block_n = fit_tiles(D, block_m, block_n, smem_limit(q.device))
    kv, ks, sk, sks = cache_args(k_buf, fmt, n_kv_heads, D)
    vv, vs, sv, svs = cache_args(v_buf, v_fmt, n_kv_heads, D)
    grid = (triton.cdiv(T, block_m), Hq)
    _prefill_kernel[grid](q, kv, ks, vv, vs, out, T, start, q.stride(0), out.stride(0),
                          sk, sks, sv, svs, scale * LOG2E, mask_shift,
                          G=Hq // n_kv_heads, D=D, BLOCK_M=block_m, BLOCK_N=block_n,
                          KFMT=KV_FORMAT_CODES[fmt], VFMT=KV_FORMAT_CODES[v_fmt], PREC=cfg["precision"],
                          num_warps=cfg["num_warps"])
    return out


def tile_smem_bytes(D: int, block_m: int, block_n: int, stages: int = 3) -> int:
    """Shared memory the prefill kernel's tiles need, an upper bound: K and V tiles of
    ``block_n`` rows in every pipeline stage and the q tile twice (its hi/lo split for tf32x3),
    every operand as float32 (narrow tiles are widened for the dots). Matches what Triton 3.6
    asked for on the H200 for float32 tiles at D = 256 (327680 bytes at 64 x 32), over-estimates
    bf16 tiles (393216 asked at 64 x 64, 524288 estimated)."""
    return stages * block_n * D * 8 + 2 * block_m * D * 4


def smem_limit(device: torch.device) -> int:
    """Opt-in shared memory per block on ``device`` (CUDA), else the H100/H200's 227 KB."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        for name in ("shared_memory_per_block_optin", "shared_memory_per_multiprocessor"):
            v = getattr(props, name, None)
            if v:
                return int(v)
    return 232448


def fit_tiles(D: int, block_m: int, block_n: int, limit: int, margin: int = 8192) -> tuple[int, int]:
    """The largest (block_m, block_n) at or below the given ones whose tiles fit ``limit`` bytes
    of shared memory with ``margin`` to spare: block_n halves first (down to 16), then block_m.
    Raises when even 16 x 16 tiles do not fit (never silently launches a kernel that cannot run)."""
    while tile_smem_bytes(D, block_m, block_n) > limit - margin:
        if block_n > 16:
            block_n //= 2
        elif block_m > 16:
            block_m //= 2
        else:
            raise ValueError(f"prefill kernel: head_dim {D} needs {tile_smem_bytes(D, 16, 16)} bytes of shared "
                             f"memory at 16 x 16 tiles, the device offers {limit}")
    return block_m, block_n


def prefill_attention_flash(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, start: int,
                            scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """One wave over a bf16 cache with torch's flash attention (CUDA): q [T, Hq, D] at ``start``
    attends to cache rows [0, start+T), causal aligned to the last row (flash's causal mask is
    bottom-right when there are more keys than queries). GQA natively (no expanded K/V); the
    cache rows are read in place as [1, Hkv, n, D] views."""
    T, Hq, D = q.shape
    n = start + T
    qb = q.to(torch.bfloat16).transpose(0, 1)[None]                    # [1, Hq, T, D]
    k = k_buf[:n].transpose(0, 1)[None]                                # [1, Hkv, n, D] view
    v = v_buf[:n].transpose(0, 1)[None]
    o = torch.ops.aten._scaled_dot_product_flash_attention(
        qb, k, v, 0.0, is_causal=True, return_debug_mask=False, scale=scale)[0]
    o = o[0].transpose(0, 1)                                           # [T, Hq, D]
    if out is None:
        return o.float()
    out.copy_(o)
    return out


# --- fast path (throughput numbers; not for accuracy) -----------------------------------------
FAST_PREFILL = "bf16 SDPA"      # what the fast path is, as results record it


def prefill_attention_fast(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, fmt: str,
                           start: int, scale: float, n_kv_heads: int, v_fmt: str | None = None,
                           window: int | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The fast prefill path (``engine.Engine.set_prefill_path("fast")``): q [T, Hq, D] at
    ``start`` attends causally to cache rows [0, start+T) with bfloat16 q, K, V and torch's
    scaled-dot-product attention (flash on CUDA, its own CPU kernel elsewhere), in one pass.
    K and V are the cache's rows as stored, dequantized (q8_0) and rounded to bfloat16 (fp32
    caches; bf16 caches are read in place). Its rounding moves logits by far more than the
    KV dtypes under test (docs/perf-notes.md: 0.25 logits on SmolLM2), so accuracy checks
    never use it; throughput checks that do record it. ``window``: sliding-window attention
    (keys at positions <= qpos - window masked). Returns float32 [T, Hq, D]."""
    v_fmt = fmt if v_fmt is None else v_fmt
    T, Hq, D = q.shape
    n = start + T

    def rows(buf, f):
        if f == "bf16":
            return q8_layout.rows_view(buf, f, n_kv_heads, D)[:n].permute(1, 0, 2)[None]   # [1, Hkv, n, D] view
        return dequant_rows_ref(buf, f, 0, n, n_kv_heads, D).to(torch.bfloat16)[None]

    k, v = rows(k_buf, fmt), rows(v_buf, v_fmt)
    qb = q.to(torch.bfloat16).transpose(0, 1)[None]                                      # [1, Hq, T, D]
    if q.is_cuda and window is None and start == 0:
        # a whole prompt (keys == queries, so both causal alignments agree): torch's SDPA
        # dispatcher, which picks cuDNN's sm90 flash kernel where it can (HF's prefill got it:
        # 21.6 vs 35.7 ms for FlashAttention-2 on SmolLM2 at 16384, reports/h200-2026-12-04d);
        # K/V heads expanded for GQA (a copy of 2 x n x Hq x D bf16, microseconds)
        if Hq != n_kv_heads:
            k = k.repeat_interleave(Hq // n_kv_heads, dim=1)
            v = v.repeat_interleave(Hq // n_kv_heads, dim=1)
        o = torch.nn.functional.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale)
    elif q.is_cuda and window is None and D % 8 == 0 and D <= 256:
        # flash's causal mask is aligned to the last row (bottom-right) when keys outnumber queries
        o = torch.ops.aten._scaled_dot_product_flash_attention(
            qb, k, v, 0.0, is_causal=True, return_debug_mask=False, scale=scale)[0]
    else:
        qpos = torch.arange(start, n, device=q.device)[:, None]
        kpos = torch.arange(n, device=q.device)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        if Hq != n_kv_heads:                                  # GQA: each KV head serves G query heads
            k = k.repeat_interleave(Hq // n_kv_heads, dim=1)
            v = v.repeat_interleave(Hq // n_kv_heads, dim=1)
        o = torch.nn.functional.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale)
    return o[0].transpose(0, 1).to(out_dtype)          # [T, Hq, D]: one copy, float32 unless asked


# --- torch reference (the CPU path) ---------------------------------------------------------
def dequant_rows_ref(buf: torch.Tensor, fmt: str, j0: int, j1: int, n_kv_heads: int,
                     head_dim: int) -> torch.Tensor:
    """Cache rows [j0, j1) as float32 [Hkv, L, D] (a view for fp32, a fresh tensor otherwise).
    ``buf``: a buffer in row-indexable form (``q8_layout.rows_view``; q8_0 as ``Q8Rows``)."""
    rows = q8_layout.rows_view(buf, fmt, n_kv_heads, head_dim)[j0:j1]
    if fmt == "fp32":
        x = rows
    elif fmt == "bf16":
        x = rows.to(torch.float32)
    elif fmt == "q8_0":
        x = q8_layout.dequantize(rows)                                  # q * d, exact in float32
    else:
        raise ValueError(f"unknown KV format {fmt!r}")
    return x.permute(1, 0, 2)


def decode_rows_ref(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, fmt: str, pos: int,
                    scale: float, n_kv_heads: int, window: int | None = None,
                    v_fmt: str | None = None) -> tuple[torch.Tensor, int]:
    """One query row q [1, Hq, D] at position ``pos`` over cache rows [lo, pos] (lo = 0, or
    pos - window + 1 with a sliding window): (out [1, Hq, D] float32, scratch bytes). The same
    maths as ``prefill_attention_ref`` on the values the cache holds (each buffer dequantized
    by its own format, float32 softmax), in one block and without padding the row to a chunk:
    the torch decode step (``LayerKV.attend`` with T == 1 off Triton), O(position) work instead
    of a 128-row chunk's. Equal to the blocked reference up to float32 summation order."""
    _, Hq, D = q.shape
    Hkv, G = n_kv_heads, Hq // n_kv_heads
    v_fmt = fmt if v_fmt is None else v_fmt
    lo = 0 if window is None else max(0, pos - window + 1)
    kb = dequant_rows_ref(k_buf, fmt, lo, pos + 1, Hkv, D)                 # [Hkv, L, D]
    vb = dequant_rows_ref(v_buf, v_fmt, lo, pos + 1, Hkv, D)
    qs = (q[0].to(torch.float32) * scale).view(Hkv, G, D)
    s = torch.matmul(qs, kb.transpose(1, 2))                               # [Hkv, G, L]
    p = (s - s.amax(dim=-1, keepdim=True)).exp_()
    o = torch.matmul(p, vb).div_(p.sum(dim=-1, keepdim=True))             # [Hkv, G, D]
    scratch = (0 if fmt == "fp32" else kb.nbytes) + (0 if v_fmt == "fp32" else vb.nbytes) + 2 * s.nbytes
    return o.reshape(1, Hq, D), scratch


def prefill_attention_ref(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, fmt: str,
                          start: int, scale: float, n_kv_heads: int, plan: WavePlan,
                          window: int | None = None, v_fmt: str | None = None) -> tuple[torch.Tensor, int]:
    """Blocked causal attention in ``plan``'s waves; returns (out [T, Hq, D], peak scratch bytes).
    ``fmt`` is the K buffer's format, ``v_fmt`` the V buffer's (None: the same); each is
    dequantized by its own format.

    Per wave, every chunk of R query rows (zero-padded to R) is one batch entry; the cache is
    read KB rows at a time, always the same rows for a given block start (keys past a row's
    position are masked), and each chunk keeps its own online-softmax state. So each row sees
    the same operations on the same shapes whichever wave it falls in.
    """
    T, Hq, D = q.shape
    Hkv, G, R, KB = n_kv_heads, Hq // n_kv_heads, plan.chunk_rows, plan.key_block
    dev = q.device
    v_fmt = fmt if v_fmt is None else v_fmt
    k_buf = q8_layout.rows_view(k_buf, fmt, Hkv, D)                    # q8_0: quants + scales views
    v_buf = q8_layout.rows_view(v_buf, v_fmt, Hkv, D)
    n_rows = k_buf.shape[0]
    out = torch.empty(T, Hq, D, device=dev, dtype=torch.float32)
    peak = 0
    ci = 0
    wave_fault = planted("wave_mask_off_by_one")
    for w0, w1 in plan.waves:
        shift = 1 if wave_fault and w0 > 0 else 0     # the planted fault: later waves see one key ahead
        chunks = []
        while ci < len(plan.chunks) and plan.chunks[ci][1] <= w1:
            chunks.append(plan.chunks[ci])
            ci += 1
        C = len(chunks)
        qs = torch.zeros(C, R, Hq, D, device=dev, dtype=torch.float32)
        qpos = torch.empty(C, R, device=dev, dtype=torch.long)
        for i, (c0, c1) in enumerate(chunks):
            qs[i, :c1 - c0] = q[c0:c1]
            qpos[i] = torch.arange(start + c0, start + c0 + R, device=dev)
        qs = (qs * scale).view(C, R, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(C, Hkv, G * R, D)
        m = torch.full((C, Hkv, G * R, 1), float("-inf"), device=dev)
        l = torch.zeros(C, Hkv, G * R, 1, device=dev)
        acc = torch.zeros(C, Hkv, G * R, D, device=dev)
        held = qs.nbytes + qpos.nbytes + m.nbytes + l.nbytes + acc.nbytes
        ends = [start + c1 for _, c1 in chunks]
        # Long prefills read whole key blocks (the same rows for a block start, whatever the
        # wave grouping: bit-identical waves); a single short chunk (decode) reads only the
        # filled rows, so a decode step costs O(position), not O(block).
        limit = ends[-1] if len(plan.chunks) == 1 and T <= CHUNK_ROWS else n_rows
        # Sliding window: blocks wholly before every row's window are skipped. A skipped block
        # would be fully masked for those rows (alpha 1, p 0), so skipping is bit-exact and
        # the wave grouping still does not change any row's result.
        lo = 0 if window is None else max(0, start + w0 - window + 1) // KB * KB
        for j0 in range(lo, ends[-1], KB):
            j1 = min(j0 + KB, limit)
            first = next(i for i, e in enumerate(ends) if e > j0)
            kb = dequant_rows_ref(k_buf, fmt, j0, j1, Hkv, D)              # [Hkv, L, D]
            vb = dequant_rows_ref(v_buf, v_fmt, j0, j1, Hkv, D)
            L = j1 - j0
            sub = slice(first, C)
            s = torch.matmul(qs[sub], kb.transpose(1, 2).unsqueeze(0))     # [C', Hkv, G*R, L]
            kpos = torch.arange(j0, j1, device=dev)
            mask = kpos[None, None, :] > qpos[sub][:, :, None] + shift     # [C', R, L]
            if window is not None:
                mask = mask | (kpos[None, None, :] <= qpos[sub][:, :, None] - window)
            s.view(C - first, Hkv, G, R, L).masked_fill_(mask[:, None, None], float("-inf"))
            m_new = torch.maximum(m[sub], s.amax(dim=-1, keepdim=True))
            m_exp = m_new
            if window is not None:      # a row may have seen no key yet: keep exp() finite (its m
                m_exp = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # stays -inf)
            alpha = torch.exp(m[sub] - m_exp)
            s.sub_(m_exp).exp_()
            l[sub] = l[sub] * alpha + s.sum(dim=-1, keepdim=True)
            pv = torch.matmul(s, vb.unsqueeze(0))                          # [C', Hkv, G*R, D]
            acc[sub] = acc[sub] * alpha + pv
            m[sub] = m_new
            block = (0 if fmt == "fp32" else kb.nbytes) + (0 if v_fmt == "fp32" else vb.nbytes)
            peak = max(peak, held + block + s.nbytes + mask.nbytes + pv.nbytes)
        o = (acc / l).view(C, Hkv, G, R, D).permute(0, 3, 1, 2, 4).reshape(C, R, Hq, D)
        for i, (c0, c1) in enumerate(chunks):
            out[c0:c1] = o[i, :c1 - c0]
    return out, peak
