"""KV cache: one interface for fp32, bf16 and q8_0; callers never branch on the dtype.

Contract: a ``LayerKV`` preallocates ``max_tokens`` rows of K and V for one layer, K in the
requested format ``dtype`` and V in ``v_dtype`` (default: the same; a KV spec's K/V split,
``engine.kv_spec``), each buffer in its format (DESIGN.md "KV formats"): fp32 ``[max_tokens, Hkv, D]`` float32, bf16 the
same in bfloat16 (round to nearest even), q8_0 the values of ggml ``block_q8_0`` along each
token's flattened row, stored as two aligned arrays in one flat uint8 buffer (int8 quants
``[max_tokens, Hkv, D]``, then fp16 scales ``[max_tokens, Hkv*D/32]``:
``engine.kernels.q8_layout``), 34 bytes per 32 values as priced; ``to_ggml_blocks(n)`` is the
tested view of rows ``[0, n)`` as ggml's interleaved block bytes (equal to
``gguf.quants.quantize``). ``write(start, k, v)`` stores rows
``start..start+T-1`` (k, v: [T, Hkv, D] float32) in that format; ``attend(q, start, scale)``
returns [T, Hq, D] float32 for queries at positions ``start..start+T-1`` attending causally to
rows ``[0, start+T)`` (with ``window=W``: only keys at positions > qpos - W, Gemma's sliding
window; torch path only, the Triton kernels raise ConfigError), reading the values the cache
holds (Triton kernels on CUDA, their torch references elsewhere; ``engine.kernels.set_backend``
forces either; off Triton a decode step, T = 1, takes ``decode_rows_ref``: its one row over the
filled rows, the blocked reference's maths without its 128-row padded chunk, equal to it up to
float32 summation order; ``KVBENCH_DECODE_ROWS=0`` restores the blocked path). Prefills take waves of
query rows sized from ``wave_budget_bytes`` (``last_waves``, ``peak_scratch_bytes``); a wave
that raises ``torch.OutOfMemoryError`` is redone in halves, same results (``last_wave_retries``,
``last_wave_rows``), and only a failing smallest wave lets the error through.
``kv_dtypes`` is the applied-dtype observable of (K, V), read from the allocated buffers, never
from the request, each qualified when its format's write path does not give its reference bytes
(``engine.kv_layout.observed_dtype``); ``dtype`` is that pair as one cell (``q8_0``, or
``k-q8_0.v-bf16`` when they differ: ``kv_spec.layer_label``). ``k_format`` / ``v_format`` are
the buffers' formats, what the kernels read and write each buffer in (the torch references and
the Triton kernels take K's and V's format apart: ``fmt`` and ``v_fmt``, never one for both);
``format`` is the pair as one cell; ``nbytes`` is exact (K bytes + V bytes).
Formats, their bytes and the q8_0 geometry guard come from ``engine.formats``; buffers are
allocated and recognised by ``engine.kv_layout`` (imports go kv -> kv_ring -> kv_layout, one
way). ``make_layer_kv(spec, layer, max_tokens, dtype, v_dtype=)`` applies the geometry guard to each buffer; ``quantize_q8_0``/``dequantize_q8_0`` are
byte-exact with ``gguf.quants``.

    cache = make_layer_kv(spec, layer=0, max_tokens=4096, dtype="q8_0", device="cpu")
    cache.write(0, k, v); out = cache.attend(q, 0, scale=64 ** -0.5); cache.dtype  # "q8_0"
"""
from __future__ import annotations

import bisect

import torch

from . import formats, kernels, settings
from .errors import ConfigError, ContextOverflowError
from .kernels.kv_append import kv_append, kv_append_at, quantize_q8_0_ref, dequantize_q8_0_ref, rope_append_at
from .kernels.decode_attention import decode_attention
from .kernels.prefill_attention import (MAX_WAVE_ROWS, WavePlan, decode_rows_ref, plan_waves, prefill_attention,
                                        prefill_attention_fast,
                                        prefill_attention_ref)
from .kv_layout import CacheObservables, alloc_kv, to_ggml_bytes
from .kv_ring import RingKV, layer_kv_rows

KV_DTYPES = formats.KV_DTYPES                    # format facts live in engine.formats
DEFAULT_WAVE_BUDGET = formats.DEFAULT_WAVE_BUDGET
FAULT_ENV = "KVBENCH_FAULT"


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """float32 [..., n], n % 32 == 0 -> uint8 [..., n/32*34]; bytes equal gguf.quants Q8_0."""
    return quantize_q8_0_ref(x)


def dequantize_q8_0(q: torch.Tensor, shape) -> torch.Tensor:
    """uint8 q8_0 blocks -> float32 tensor of ``shape``; equal to gguf.quants.dequantize."""
    return dequantize_q8_0_ref(q, shape)


def kv_bytes_per_token(n_kv_heads: int, head_dim: int, dtype: str, v_dtype: str | None = None) -> int:
    """Exact K+V bytes one token occupies: a row of Hkv * D values in ``dtype`` (K) and one in
    ``v_dtype`` (V; None: the same) (``engine.formats``: 4, 2 or 34/32 bytes a value;
    KVGeometryError on ragged blocks)."""
    total = 0
    for f in (dtype, v_dtype or dtype):
        formats.check_kv_geometry(f, n_kv_heads, head_dim)
        total += formats.kv_row_bytes(f, n_kv_heads, head_dim)
    return total


MIN_RETRY_ROWS = 16        # a Triton wave that runs out of memory is halved down to this many rows


def _cut_at(cuts: list[int], r0: int, limit: int) -> int:
    """The last cut in (r0, limit], else the first cut after r0 (``cuts`` sorted, ends at T)."""
    i = bisect.bisect_right(cuts, limit)
    if i and cuts[i - 1] > r0:
        return cuts[i - 1]
    return cuts[bisect.bisect_right(cuts, r0)]


def _run_waves(waves, cuts: list[int], run, where: str) -> tuple[int, int, int]:
    """Call ``run(r0, r1)`` for every wave. A wave that raises ``torch.OutOfMemoryError`` is
    redone with at most half its rows, ending on ``cuts`` (row offsets where a wave may end),
    and every later wave is held to that size; when a wave of one cut step still fails, the
    error goes up with ``exc.wave_prefill`` saying where. Returns (waves run, retries, largest
    wave run since the last retry)."""
    cap, ran, retries, largest = None, 0, 0, 0
    for w0, w1 in waves:
        r0 = w0
        while r0 < w1:
            r1 = w1 if cap is None else _cut_at(cuts, r0, min(w1, r0 + cap))
            try:
                run(r0, r1)
            except torch.OutOfMemoryError as exc:
                if _cut_at(cuts, r0, r0 + (r1 - r0) // 2) >= r1:
                    exc.wave_prefill = (f"{where}: the smallest wave, rows {r0}..{r1}, failed "
                                        f"(smaller-wave retries: {retries})")
                    raise
                cap, retries, largest = (r1 - r0) // 2, retries + 1, 0
                continue
            ran, largest, r0 = ran + 1, max(largest, r1 - r0), r1
    return ran, retries, largest


def _one_wave(plan: WavePlan, r0: int, r1: int) -> WavePlan:
    """``plan`` restricted to rows [r0, r1) (whole chunks): the reference then runs those rows
    with the same chunks and key blocks as in the full plan, so each row's result is unchanged."""
    chunks = tuple(c for c in plan.chunks if r0 <= c[0] and c[1] <= r1)
    return WavePlan(r1 - r0, plan.chunk_rows, plan.key_block, ((r0, r1),), chunks)


class LayerKV(CacheObservables):
    def __init__(self, layer: int, n_kv_heads: int, head_dim: int, max_tokens: int,
                 dtype: str = "fp32", device: str | torch.device = "cpu",
                 wave_budget_bytes: int = DEFAULT_WAVE_BUDGET, wave_max_rows: int = MAX_WAVE_ROWS,
                 v_dtype: str | None = None):
        v_dtype = dtype if v_dtype is None else v_dtype
        formats.kv_format(dtype)          # ConfigError naming the known formats
        formats.kv_format(v_dtype)
        if wave_budget_bytes <= 0 or wave_max_rows <= 0:
            raise ConfigError(f"wave_budget_bytes={wave_budget_bytes} and wave_max_rows={wave_max_rows} "
                              f"must be positive", "pass positive values")
        self.layer, self.n_kv_heads, self.head_dim, self.max_tokens = layer, n_kv_heads, head_dim, max_tokens
        self.wave_budget_bytes, self.wave_max_rows = wave_budget_bytes, wave_max_rows
        self.k = alloc_kv(max_tokens, n_kv_heads, head_dim, dtype, device, layer=layer)   # + the guard
        self.v = alloc_kv(max_tokens, n_kv_heads, head_dim, v_dtype, device, layer=layer)
        self.last_waves = 0
        self.peak_scratch_bytes = 0
        self.decode_fast = settings.get("KVBENCH_DECODE_ROWS")   # decode_rows_ref off Triton

    def to_ggml_blocks(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V rows ``[0, n)`` (all rows by default) as gguf lays the format out, uint8
        ``[n, row bytes]``: for q8_0 ggml's block_q8_0 bytes (``kv_layout.to_ggml_bytes``);
        K and V each in its own format."""
        k, v = (to_ggml_bytes(b, f, self.n_kv_heads, self.head_dim)
                for b, f in ((self.k, self.k_format), (self.v, self.v_format)))
        return (k, v) if n is None else (k[:n], v[:n])

    @property
    def device(self) -> torch.device:
        return self.k.device

    def reset(self) -> None:
        """Forget the sequence (rows are overwritten before they are read again; no clearing)."""
        self.last_waves = 0
        self.peak_scratch_bytes = 0

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        T = k.shape[0]
        if start < 0 or start + T > self.max_tokens:
            raise ContextOverflowError(f"layer {self.layer}: {start + T} tokens exceed the KV cache of "
                                       f"{self.max_tokens}", "load the engine with a larger ctx")
        if tuple(k.shape[1:]) != (self.n_kv_heads, self.head_dim) or k.shape != v.shape:
            raise ValueError(f"layer {self.layer}: k/v must be [T, {self.n_kv_heads}, {self.head_dim}], "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        kv_append(self.k, start, k, self.k_format)
        kv_append(self.v, start, v, self.v_format)

    def attend(self, q: torch.Tensor, start: int, scale: float, window: int | None = None) -> torch.Tensor:
        T, Hq, D = q.shape
        if D != self.head_dim or Hq % self.n_kv_heads:
            raise ValueError(f"layer {self.layer}: q [T, Hq, D] = {tuple(q.shape)} does not fit "
                             f"{self.n_kv_heads} kv heads x {self.head_dim}")
        if start + T > self.max_tokens:
            raise ContextOverflowError(f"layer {self.layer}: {start + T} tokens exceed the KV cache of "
                                       f"{self.max_tokens}", "load the engine with a larger ctx")
        fmt, vfmt = self.k_format, self.v_format
        plan = plan_waves(T, start, Hq, self.n_kv_heads, D, self.wave_budget_bytes, self.wave_max_rows)
        self.last_waves, self.last_wave_retries = plan.n_waves, 0
        self.last_wave_rows = max(r1 - r0 for r0, r1 in plan.waves)
        if window is not None and window <= 0:
            raise ConfigError(f"layer {self.layer}: sliding window {window} must be positive",
                              "pass window=None for global attention")
        where = f"layer {self.layer}"
        # A wave that runs out of memory is redone in smaller waves (_run_waves). The reference
        # splits only at chunk ends (its rows stay bit-identical); the kernels at 16-row steps.
        # kernels need pow2 D >= 16; a sliding-window prefill (T > 1) runs the torch reference on
        # any device (same exact maths: the Triton prefill kernel has no window), a window's
        # decode step the Triton decode kernel
        if not kernels.use_triton(q.device) or D < 16 or D & (D - 1) or (window is not None and T > 1):
            if T == 1 and self.decode_fast:
                self.last_waves, self.last_wave_retries, self.last_wave_rows = 1, 0, 1
                out, self.peak_scratch_bytes = decode_rows_ref(q, self.k, self.v, fmt, start, scale,
                                                               self.n_kv_heads, window=window, v_fmt=vfmt)
                return out
            out, peak = None, 0

            def ref_wave(r0: int, r1: int) -> None:
                nonlocal out, peak
                part, scratch = prefill_attention_ref(q, self.k, self.v, fmt, start, scale, self.n_kv_heads,
                                                      _one_wave(plan, r0, r1), window=window, v_fmt=vfmt)
                peak = max(peak, scratch)
                if (r0, r1) == (0, T):
                    out = part
                    return
                if out is None:
                    out = torch.empty(T, Hq, D, device=q.device, dtype=torch.float32)
                out[r0:r1] = part[r0:r1]

            self.last_waves, self.last_wave_retries, self.last_wave_rows = _run_waves(
                plan.waves, [c1 for _, c1 in plan.chunks], ref_wave, where)
            self.peak_scratch_bytes = peak
            return out
        q = q.to(torch.float32).contiguous()
        if T == 1:
            from .kernels import decode_attention as dmod
            out = decode_attention(q[0], self.k, self.v, fmt, start + 1, scale, self.n_kv_heads, v_fmt=vfmt,
                                   window=window)[None]
            self.peak_scratch_bytes = dmod.last_scratch_bytes
            return out
        out = torch.empty_like(q)
        wave_fault = kernels.planted("wave_mask_off_by_one")

        def kernel_wave(r0: int, r1: int) -> None:
            prefill_attention(q[r0:r1], self.k, self.v, fmt, start + r0, scale, self.n_kv_heads,
                              out=out[r0:r1], mask_shift=int(r0 > 0 and wave_fault), v_fmt=vfmt)

        step = MIN_RETRY_ROWS   # cuts at absolute multiples of 16 rows, plus every planned wave end
        cuts = sorted({x - start for x in range((start // step + 1) * step, start + T, step)}
                      | {r1 for _, r1 in plan.waves})
        self.last_waves, self.last_wave_retries, self.last_wave_rows = _run_waves(
            plan.waves, cuts, kernel_wave, where)
        self.peak_scratch_bytes = 0        # the flash kernel keeps its tiles in registers
        return out

    def attend_fast(self, q: torch.Tensor, start: int, scale: float, window: int | None = None,
                    out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``attend`` on the fast prefill path (``prefill_attention_fast``: bfloat16 q/K/V, torch
        SDPA, one pass): throughput numbers only, never accuracy. ``out_dtype``: the rows'
        dtype (the fast path's bf16 activations take bf16: one copy instead of two)."""
        T, Hq, D = q.shape
        if start + T > self.max_tokens:
            raise ContextOverflowError(f"layer {self.layer}: {start + T} tokens exceed the KV cache of "
                                       f"{self.max_tokens}", "load the engine with a larger ctx")
        self.last_waves, self.last_wave_retries, self.last_wave_rows = 1, 0, T
        self.peak_scratch_bytes = 0
        return prefill_attention_fast(q, self.k, self.v, self.k_format, start, scale, self.n_kv_heads,
                                      v_fmt=self.v_format, window=window, out_dtype=out_dtype)

    # -- position on the device (CUDA-graph decode) ------------------------------------------
    def write_at(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """``write`` of one token at the position held by ``pos`` (one-element int tensor on
        the cache's device); Triton only, no host sync, so a CUDA graph can capture it. The
        caller guarantees ``pos < max_tokens`` (the graph's owner checks it on the host)."""
        kv_append_at(self.k, self.v, k, v, self.k_format, self.v_format, pos)

    def rope_write_at(self, pos: torch.Tensor, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      n_heads: int, kind: str, head_norm=None) -> torch.Tensor:
        """RoPE and ``write_at`` in one launch from the fused projection row ``qkv``: stores k
        rotated and v at ``pos``, returns q [1, Hq, D] rotated (``kv_append.rope_append_at``; ``head_norm``: (q_norm, k_norm, eps), per-head norms first)."""
        return rope_append_at(qkv, cos, sin, pos, self.k, self.v, self.k_format, self.v_format, n_heads,
                              self.n_kv_heads, self.head_dim, kind,
                              head_norm=head_norm)

    def attend_at(self, q: torch.Tensor, pos: torch.Tensor, scale: float, window: int | None = None) -> torch.Tensor:
        """``attend`` for one query row [1, Hq, D] at the position held by ``pos`` (``window``:
        sliding-window attention over this full-length buffer)."""
        q = q.to(torch.float32).contiguous()
        return decode_attention(q[0], self.k, self.v, self.k_format, None, scale, self.n_kv_heads, pos=pos,
                                v_fmt=self.v_format, window=window)[None]


def _fault() -> tuple[str, int | None]:
    """KVBENCH_FAULT (harness self-tests only), validated by ``engine.settings``: the faults
    planted here are ``ignore_kv_dtype`` and ``skip_narrow_layer:N``; others live elsewhere."""
    from . import settings
    return settings.get(FAULT_ENV) or ("", None)


def make_layer_kv(spec, layer: int, max_tokens: int, dtype: str, device: str | torch.device = "cpu",
                  wave_budget_bytes: int = DEFAULT_WAVE_BUDGET, v_dtype: str | None = None, **kw) -> LayerKV:
    """Build layer ``layer``'s cache with K in ``dtype`` and V in ``v_dtype`` (None: ``dtype``)
    for a ModelSpec, with the geometry guard.

    Only a narrowed buffer (a block format such as q8_0) can fail the guard
    (``formats.check_kv_geometry``): n_kv_heads*head_dim not whole blocks raises
    KVGeometryError naming the layer (never a fallback). A sliding-window layer whose ring
    (``engine.kv_ring``: window + chunk rows) is smaller than ``max_tokens`` gets a ``RingKV``.
    """
    v_dtype = dtype if v_dtype is None else v_dtype
    formats.kv_format(dtype)
    formats.kv_format(v_dtype)
    fault, arg = _fault()
    if fault == "ignore_kv_dtype" or (fault == "skip_narrow_layer" and arg == layer):
        # the seed's bug, on purpose, so the harness can prove it catches it
        dtype = v_dtype = formats.WIDEST_KV
    hkv, d = spec.n_kv_heads, spec.head_dim
    for f in (dtype, v_dtype):
        formats.check_kv_geometry(f, hkv, d, layer=layer)
    if layer_kv_rows(spec, layer, max_tokens) < max_tokens:   # sliding window: a ring of window + chunk
        return RingKV(layer, hkv, d, max_tokens, spec.window(layer), dtype, device,
                      wave_budget_bytes=wave_budget_bytes, v_dtype=v_dtype, **kw)
    return LayerKV(layer, hkv, d, max_tokens, dtype, device, wave_budget_bytes=wave_budget_bytes,
                   v_dtype=v_dtype, **kw)
