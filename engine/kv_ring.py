"""Ring KV for sliding-window layers: ``window + chunk`` rows instead of ``max_tokens``.

Contract: ``RingKV`` has ``LayerKV``'s interface (``write(start, k, v)``, ``attend(q, start,
scale, window=)``, ``dtype``, ``kv_dtypes``, ``k_format``/``v_format`` (K and V may hold
different formats: ``v_dtype``), ``nbytes``, ``reset``, ``k``/``v``, ``last_waves``,
``peak_scratch_bytes``) for a layer whose queries only see keys in ``(qpos - window, qpos]``.
Position ``p`` lives in row ``p % rows`` with ``rows = ring_rows(window) = window + chunk``
(``chunk`` = ``RING_CHUNK`` = 512 by default, a whole number of the reference's 128-row
chunks). The rule: a call of ``T <= chunk`` tokens is written at once (its queries need the
``window - 1`` keys before it plus its own ``T``: at most ``rows - 1`` live keys); a longer
call's K/V are held (the caller's tensors, no copy) until ``attend``, which runs the prefill in
waves of at most ``chunk`` rows and writes each wave's keys just before its queries read them,
so no row still needed is ever overwritten. Rows are stored in the cache's format through the
same ``kv_append`` as ``LayerKV`` (fp32, bf16 round-to-nearest-even, q8_0 ggml block values
in the split layout: the stored bytes of a position equal a full-length cache's). ``attend`` runs the torch reference
(``prefill_attention_ref``) on the same wave plan rules, chunks and key blocks as a full-length
``LayerKV`` of ``max_tokens`` rows, reading the ring through a view that maps absolute
positions to rows (positions that the ring no longer holds come back as other positions'
finite values, and the reference masks them for every row that reads them), so the output is
bit-identical to a full-length cache (``torch.equal``) for fp32, bf16 and q8_0; a decode step
off Triton takes ``decode_rows_ref`` over the window's positions, as a full-length cache's does
(still ``torch.equal``). Where the
Triton kernels serve the device, a decode step (T = 1) runs the Triton decode kernel over the
ring (``window``, ``ring_rows``); a prefill stays on the torch reference. Buffers come from
``engine.kv_layout`` (as ``LayerKV``'s do); this module does not import ``engine.kv``.

    cache = RingKV(0, n_kv_heads=1, head_dim=256, max_tokens=32768, window=512, dtype="q8_0")
    cache.write(0, k, v); out = cache.attend(q, 0, scale, window=512); cache.rows  # 1024
"""
from __future__ import annotations

import torch

from . import kernels, settings
from .errors import ConfigError, ContextOverflowError
from .formats import DEFAULT_WAVE_BUDGET
from .kernels.kv_append import kv_append, kv_append_at, rope_append_at
from .kernels.prefill_attention import (CHUNK_ROWS, MAX_WAVE_ROWS, WavePlan, decode_rows_ref, plan_waves,
                                        prefill_attention_ref)
from .kernels import decode_attention as dattn, q8_layout
from .kernels.decode_attention import decode_attention
from .kv_layout import CacheObservables, alloc_kv, to_ggml_bytes

RING_CHUNK = 4 * CHUNK_ROWS      # 512: tokens one call may write at once; longer calls take waves


def ring_rows(window: int, chunk: int = RING_CHUNK) -> int:
    """Rows a sliding-window layer's ring holds: the window plus one chunk of new tokens."""
    return int(window) + int(chunk)


class _Positions:
    """A ring buffer read by absolute position: ``view[j0:j1]`` is rows ``j % n`` for
    ``j in [j0, j1)`` as a ``[j1 - j0, ...]`` tensor laid out like a slice of a full-length
    buffer (a view when the range does not wrap, else a gathered copy); ``shape[0]`` is the
    full-length cache's row count, which the reference's key-block bounds depend on. ``buf``
    is row-indexable: a plain buffer, or a q8_0 one as ``q8_layout.Q8Rows``."""

    def __init__(self, buf, n_positions: int):
        self.buf, self.shape = buf, (n_positions, *buf.shape[1:])
        self.gathered_bytes = 0

    def __getitem__(self, sl: slice) -> torch.Tensor:
        j0, j1 = sl.start, sl.stop
        n = self.buf.shape[0]
        s0 = j0 % n
        if j1 - j0 <= n - s0:
            return self.buf[s0:s0 + j1 - j0]
        idx = torch.arange(j0, j1, device=self.buf.device) % n
        out = self.buf.index_select(0, idx)
        self.gathered_bytes = max(self.gathered_bytes, out.nbytes)
        return out


class RingKV(CacheObservables):
    def __init__(self, layer: int, n_kv_heads: int, head_dim: int, max_tokens: int, window: int,
                 dtype: str = "fp32", device: str | torch.device = "cpu",
                 wave_budget_bytes: int = DEFAULT_WAVE_BUDGET, wave_max_rows: int = MAX_WAVE_ROWS,
                 chunk: int = RING_CHUNK, v_dtype: str | None = None):
        v_dtype = dtype if v_dtype is None else v_dtype
        if not isinstance(window, int) or window <= 0:
            raise ConfigError(f"layer {layer}: sliding window {window!r} must be a positive integer",
                              "check the model's attention.sliding_window metadata")
        if chunk < CHUNK_ROWS or chunk % CHUNK_ROWS:
            raise ConfigError(f"layer {layer}: ring chunk {chunk} must be a positive multiple of "
                              f"{CHUNK_ROWS} (the attention reference's row chunk)",
                              f"use a multiple of {CHUNK_ROWS}, e.g. {RING_CHUNK}")
        self.window, self.chunk, self.rows = window, chunk, ring_rows(window, chunk)
        if wave_budget_bytes <= 0 or wave_max_rows <= 0:
            raise ConfigError(f"wave_budget_bytes={wave_budget_bytes} and wave_max_rows={wave_max_rows} "
                              f"must be positive", "pass positive values")
        # The storage (format, geometry guard, layout) is engine.kv_layout's, as for LayerKV, with
        # `rows` rows; positions and attention are the ring's own.
        self.k = alloc_kv(self.rows, n_kv_heads, head_dim, dtype, device, layer=layer)
        self.v = alloc_kv(self.rows, n_kv_heads, head_dim, v_dtype, device, layer=layer)
        self.layer, self.n_kv_heads, self.head_dim, self.max_tokens = layer, n_kv_heads, head_dim, max_tokens
        self.wave_budget_bytes, self.wave_max_rows = wave_budget_bytes, wave_max_rows
        self._pending: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self.decode_fast = settings.get("KVBENCH_DECODE_ROWS")   # decode_rows_ref off Triton, as LayerKV
        self.reset()

    def to_ggml_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ring rows as gguf lays the format out, uint8 ``[rows, row bytes]`` (q8_0:
        ggml's block_q8_0 bytes, ``kv_layout.to_ggml_bytes``)."""
        return tuple(to_ggml_bytes(b, f, self.n_kv_heads, self.head_dim)
                     for b, f in ((self.k, self.k_format), (self.v, self.v_format)))

    @property
    def device(self) -> torch.device:
        return self.k.device

    def reset(self) -> None:
        """Forget the sequence (held K/V are dropped; rows are overwritten before being read)."""
        self._pending = None
        self.last_waves = self.last_wave_retries = self.last_wave_rows = 0
        self.peak_scratch_bytes = 0

    # -- writing ---------------------------------------------------------------------------
    def _store_rows(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Rows ``start..start+T-1`` into their ring rows (T <= rows), in at most two pieces."""
        T = k.shape[0]
        s0 = start % self.rows
        n1 = min(T, self.rows - s0)
        for buf, x, fmt in ((self.k, k, self.k_format), (self.v, v, self.v_format)):
            kv_append(buf, s0, x[:n1], fmt)
            if n1 < T:
                kv_append(buf, 0, x[n1:], fmt)

    def _flush(self) -> None:
        """Store held K/V that no attend() consumed: only the last ``rows`` positions matter."""
        if self._pending is None:
            return
        start, k, v = self._pending
        self._pending = None
        skip = max(0, k.shape[0] - self.rows)
        self._store_rows(start + skip, k[skip:], v[skip:])

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        T = k.shape[0]
        if start < 0 or start + T > self.max_tokens:
            raise ContextOverflowError(f"layer {self.layer}: {start + T} tokens exceed the KV cache of "
                                       f"{self.max_tokens}", "load the engine with a larger ctx")
        if tuple(k.shape[1:]) != (self.n_kv_heads, self.head_dim) or k.shape != v.shape:
            raise ValueError(f"layer {self.layer}: k/v must be [T, {self.n_kv_heads}, {self.head_dim}], "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        self._flush()
        if T <= self.chunk:
            self._store_rows(start, k, v)
        else:                       # stored wave by wave in attend(), or by the next write
            self._pending = (start, k, v)

    # -- position on the device (the captured decode step) -----------------------------------
    def flush(self) -> None:
        """Store prefill K/V still held (``engine.cuda_graph`` calls it before each step)."""
        self._flush()

    def write_at(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """``write`` of one token at the position held by ``pos`` (device), into row pos % rows;
        Triton only, no host sync, so a CUDA graph can capture it. Held prefill K/V must have
        been stored first (``flush``)."""
        kv_append_at(self.k, self.v, k, v, self.k_format, self.v_format, pos, ring_rows=self.rows)

    def rope_write_at(self, pos: torch.Tensor, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      n_heads: int, kind: str, head_norm=None) -> torch.Tensor:
        """``LayerKV.rope_write_at`` into row pos % rows (held prefill K/V stored first: ``flush``)."""
        return rope_append_at(qkv, cos, sin, pos, self.k, self.v, self.k_format, self.v_format, n_heads,
                              self.n_kv_heads, self.head_dim, kind, ring_rows=self.rows,
                              head_norm=head_norm)

    def attend_at(self, q: torch.Tensor, pos: torch.Tensor, scale: float, window: int | None = None) -> torch.Tensor:
        """``attend`` for one query row [1, Hq, D] at the position held by ``pos``: the window's
        keys read through the ring (Triton)."""
        window = self.window if window is None else window
        if window <= 0 or window > self.window:
            raise ConfigError(f"layer {self.layer}: a ring KV of window {self.window} cannot serve "
                              f"window={window}", "build a LayerKV for global or wider attention")
        q = q.to(torch.float32).contiguous()
        return decode_attention(q[0], self.k, self.v, self.k_format, None, scale, self.n_kv_heads, pos=pos,
                                v_fmt=self.v_format, window=window, ring_rows=self.rows)[None]

    # -- attention -------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, start: int, scale: float, window: int | None = None) -> torch.Tensor:
        T, Hq, D = q.shape
        if D != self.head_dim or Hq % self.n_kv_heads:
            raise ValueError(f"layer {self.layer}: q [T, Hq, D] = {tuple(q.shape)} does not fit "
                             f"{self.n_kv_heads} kv heads x {self.head_dim}")
        if start + T > self.max_tokens:
            raise ContextOverflowError(f"layer {self.layer}: {start + T} tokens exceed the KV cache of "
                                       f"{self.max_tokens}", "load the engine with a larger ctx")
        if window is None or window <= 0 or window > self.window:
            raise ConfigError(f"layer {self.layer}: a ring KV of window {self.window} cannot serve "
                              f"window={window}", "build a LayerKV for global or wider attention")
        held = self._pending
        if T == 1 and held is None and kernels.use_triton(q.device) and D >= 16 and not D & (D - 1):
            # a decode step: the Triton decode kernel over the ring's rows (p -> p % rows), the
            # window's keys only (a prefill, T > 1, runs the torch reference below on any device)
            self.last_waves, self.last_wave_retries, self.last_wave_rows = 1, 0, 1
            out = decode_attention(q[0].to(torch.float32).contiguous(), self.k, self.v, self.k_format, start + 1,
                                   scale, self.n_kv_heads, v_fmt=self.v_format, window=window,
                                   ring_rows=self.rows)[None]
            self.peak_scratch_bytes = dattn.last_scratch_bytes
            return out
        if held is not None and (held[0] != start or held[1].shape[0] != T):
            self._flush()           # queries for other positions: the held keys are just history
            held = None
        self._pending = None
        fmt, vfmt = self.k_format, self.v_format
        if T == 1 and held is None and self.decode_fast:
            # a decode step off Triton: LayerKV's one-row reference over the window's positions
            kview, vview = (_Positions(q8_layout.rows_view(b, f, self.n_kv_heads, D), self.max_tokens)
                            for b, f in ((self.k, fmt), (self.v, vfmt)))
            out, peak = decode_rows_ref(q, kview, vview, fmt, start, scale, self.n_kv_heads, window=window,
                                        v_fmt=vfmt)
            self.last_waves, self.last_wave_retries, self.last_wave_rows = 1, 0, 1
            self.peak_scratch_bytes = peak + kview.gathered_bytes + vview.gathered_bytes
            return out
        # Same chunks and key blocks as a full-length cache's plan; waves capped at `chunk`
        # rows (waves never change a row's result), so each wave's keys fit beside the window.
        plan = plan_waves(T, start, Hq, self.n_kv_heads, D, self.wave_budget_bytes,
                          min(self.wave_max_rows, self.chunk))
        kview, vview = (_Positions(q8_layout.rows_view(b, f, self.n_kv_heads, D), self.max_tokens)
                        for b, f in ((self.k, fmt), (self.v, vfmt)))
        peak = 0
        if len(plan.waves) == 1 and held is None:
            out, peak = prefill_attention_ref(q, kview, vview, fmt, start, scale, self.n_kv_heads, plan,
                                              window=window, v_fmt=vfmt)
        else:
            out = torch.empty(T, Hq, D, device=q.device, dtype=torch.float32)
            for r0, r1 in plan.waves:
                if held is not None:
                    self._store_rows(start + r0, held[1][r0:r1], held[2][r0:r1])
                # the whole q (T > CHUNK_ROWS) with a one-wave plan: the reference then reads
                # whole key blocks exactly as it does for the full plan
                one = WavePlan(r1 - r0, plan.chunk_rows, plan.key_block, ((r0, r1),),
                               tuple(c for c in plan.chunks if r0 <= c[0] and c[1] <= r1))
                part, scratch = prefill_attention_ref(q, kview, vview, fmt, start, scale, self.n_kv_heads,
                                                      one, window=window, v_fmt=vfmt)
                out[r0:r1] = part[r0:r1]
                peak = max(peak, scratch)
        self.last_waves, self.last_wave_retries = plan.n_waves, 0
        self.last_wave_rows = max(r1 - r0 for r0, r1 in plan.waves)
        self.peak_scratch_bytes = peak + kview.gathered_bytes + vview.gathered_bytes
        return out


def layer_kv_rows(spec, layer: int, max_tokens: int, chunk: int = RING_CHUNK) -> int:
    """KV rows layer ``layer`` gets for a ``max_tokens`` context: the ring for a sliding-window
    layer when the ring is smaller, else ``max_tokens`` (the planner prices exactly this)."""
    window = spec.window(layer)
    if window and ring_rows(window, chunk) < max_tokens:
        return ring_rows(window, chunk)
    return max_tokens
