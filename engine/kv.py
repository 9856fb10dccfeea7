"""KV cache: one interface for fp32, bf16 and q8_0; callers never branch on the dtype.

Contract: a ``LayerKV`` preallocates ``max_tokens`` rows of K and V for one layer, in the
requested format (DESIGN.md "KV formats"): fp32 ``[max_tokens, Hkv, D]`` float32, bf16 the
same in bfloat16 (round to nearest even), q8_0 ``uint8 [max_tokens, Hkv*D/32*34]`` of ggml
``block_q8_0`` along each token's flattened row. ``write(start, k, v)`` stores rows
``start..start+T-1`` (k, v: [T, Hkv, D] float32) in that format; ``attend(q, start, scale)``
returns [T, Hq, D] float32 for queries at positions ``start..start+T-1`` attending causally to
rows ``[0, start+T)`` (with ``window=W``: only keys at positions > qpos - W, Gemma's sliding
window; torch path only, the Triton kernels raise ConfigError), reading the values the cache
holds (Triton kernels on CUDA, their torch references elsewhere; ``engine.kernels.set_backend``
forces either). Prefills take waves of
query rows sized from ``wave_budget_bytes`` (``last_waves``, ``peak_scratch_bytes``).
``dtype`` is read from the allocated buffers, never from the request; ``nbytes`` is exact.
``make_layer_kv`` applies the q8_0 geometry guard; ``quantize_q8_0``/``dequantize_q8_0`` are
byte-exact with ``gguf.quants``.

    cache = make_layer_kv(spec, layer=0, max_tokens=4096, dtype="q8_0", device="cpu")
    cache.write(0, k, v); out = cache.attend(q, 0, scale=64 ** -0.5); cache.dtype  # "q8_0"
"""
from __future__ import annotations

import os

import torch

from .errors import ConfigError, ContextOverflowError, KVGeometryError
from . import kernels
from .kernels import Q8_BLOCK, Q8_BYTES
from .kernels.kv_append import kv_append, quantize_q8_0_ref, dequantize_q8_0_ref
from .kernels.decode_attention import decode_attention
from .kernels.prefill_attention import MAX_WAVE_ROWS, plan_waves, prefill_attention, prefill_attention_ref

KV_DTYPES = ("fp32", "bf16", "q8_0")
DEFAULT_WAVE_BUDGET = 256 << 20
FAULT_ENV = "KVBENCH_FAULT"


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """float32 [..., n], n % 32 == 0 -> uint8 [..., n/32*34]; bytes equal gguf.quants Q8_0."""
    return quantize_q8_0_ref(x)


def dequantize_q8_0(q: torch.Tensor, shape) -> torch.Tensor:
    """uint8 q8_0 blocks -> float32 tensor of ``shape``; equal to gguf.quants.dequantize."""
    return dequantize_q8_0_ref(q, shape)


def kv_bytes_per_token(n_kv_heads: int, head_dim: int, dtype: str) -> int:
    """Exact K+V bytes one token occupies: 2 * Hkv * D values at 4, 2 or 34/32 bytes."""
    n = n_kv_heads * head_dim
    if dtype == "fp32":
        return 2 * n * 4
    if dtype == "bf16":
        return 2 * n * 2
    if dtype == "q8_0":
        if n % Q8_BLOCK:
            raise KVGeometryError(f"q8_0 needs n_kv_heads*head_dim % {Q8_BLOCK} == 0, got "
                                  f"{n_kv_heads} x {head_dim} = {n}", "use fp32 or bf16")
        return 2 * n // Q8_BLOCK * Q8_BYTES
    raise ConfigError(f"kv_dtype {dtype!r} is not one of {', '.join(KV_DTYPES)}", "pick one of those")


class LayerKV:
    def __init__(self, layer: int, n_kv_heads: int, head_dim: int, max_tokens: int,
                 dtype: str = "fp32", device: str | torch.device = "cpu",
                 wave_budget_bytes: int = DEFAULT_WAVE_BUDGET, wave_max_rows: int = MAX_WAVE_ROWS):
        if dtype not in KV_DTYPES:
            raise ConfigError(f"kv_dtype {dtype!r} is not supported (supported: {', '.join(KV_DTYPES)})",
                              "pick one of those")
        if wave_budget_bytes <= 0 or wave_max_rows <= 0:
            raise ConfigError(f"wave_budget_bytes={wave_budget_bytes} and wave_max_rows={wave_max_rows} "
                              f"must be positive", "pass positive values")
        self.layer, self.n_kv_heads, self.head_dim, self.max_tokens = layer, n_kv_heads, head_dim, max_tokens
        self.wave_budget_bytes, self.wave_max_rows = wave_budget_bytes, wave_max_rows
        n = n_kv_heads * head_dim
        if dtype == "q8_0":
            if n % Q8_BLOCK:
                raise KVGeometryError(
                    f"layer {layer}: kv_dtype q8_0 needs n_kv_heads*head_dim % {Q8_BLOCK} == 0, but "
                    f"{n_kv_heads} x {head_dim} = {n}", "use kv_dtype fp32 or bf16 for this model")
            shape, tdtype = (max_tokens, n // Q8_BLOCK * Q8_BYTES), torch.uint8
        else:
            shape, tdtype = (max_tokens, n_kv_heads, head_dim), \
                {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        self.k = torch.zeros(shape, dtype=tdtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.last_waves = 0
        self.peak_scratch_bytes = 0

    @property
    def dtype(self) -> str:
        """The format the buffers hold (from their dtype and row width, not the request)."""
        t = self.k.dtype
        if t == torch.float32:
            return "fp32"
        if t == torch.bfloat16:
            return "bf16"
        if t == torch.uint8 and self.k.shape[-1] * Q8_BLOCK == self.n_kv_heads * self.head_dim * Q8_BYTES:
            return "q8_0"
        raise AssertionError(f"layer {self.layer}: KV buffer of {t} {tuple(self.k.shape)} is no known format")

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

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
        fmt = self.dtype
        kv_append(self.k, start, k, fmt)
        kv_append(self.v, start, v, fmt)

    def attend(self, q: torch.Tensor, start: int, scale: float, window: int | None = None) -> torch.Tensor:
        T, Hq, D = q.shape
        if D != self.head_dim or Hq % self.n_kv_heads:
            raise ValueError(f"layer {self.layer}: q [T, Hq, D] = {tuple(q.shape)} does not fit "
                             f"{self.n_kv_heads} kv heads x {self.head_dim}")
        if start + T > self.max_tokens:
            raise ContextOverflowError(f"layer {self.layer}: {start + T} tokens exceed the KV cache of "
                                       f"{self.max_tokens}", "load the engine with a larger ctx")
        fmt = self.dtype
        plan = plan_waves(T, start, Hq, self.n_kv_heads, D, self.wave_budget_bytes, self.wave_max_rows)
        self.last_waves = plan.n_waves
        if window is not None and window <= 0:
            raise ConfigError(f"layer {self.layer}: sliding window {window} must be positive",
                              "pass window=None for global attention")
        if not kernels.use_triton(q.device) or D < 16 or D & (D - 1):   # kernels need pow2 D >= 16
            out, self.peak_scratch_bytes = prefill_attention_ref(q, self.k, self.v, fmt, start, scale,
                                                                 self.n_kv_heads, plan, window=window)
            return out
        if window is not None:
            raise ConfigError(f"layer {self.layer}: sliding-window attention is implemented only in the "
                              f"torch path", "use KVBENCH_ATTN_BACKEND=torch or device cpu")
        q = q.to(torch.float32).contiguous()
        if T == 1:
            from .kernels import decode_attention as dmod
            out = decode_attention(q[0], self.k, self.v, fmt, start + 1, scale, self.n_kv_heads)[None]
            self.peak_scratch_bytes = dmod.last_scratch_bytes
            return out
        out = torch.empty_like(q)
        for r0, r1 in plan.waves:
            prefill_attention(q[r0:r1], self.k, self.v, fmt, start + r0, scale, self.n_kv_heads,
                              out=out[r0:r1])
        self.peak_scratch_bytes = 0        # the flash kernel keeps its tiles in registers
        return out


def _fault() -> tuple[str, int | None]:
    """KVBENCH_FAULT: ``ignore_kv_dtype`` or ``skip_narrow_layer:N`` (harness self-tests only)."""
    raw = os.environ.get(FAULT_ENV, "").strip()
    if not raw:
        return "", None
    if raw == "ignore_kv_dtype":
        return raw, None
    name, _, arg = raw.partition(":")
    if name == "skip_narrow_layer" and arg.strip().lstrip("-").isdigit():
        return name, int(arg)
    raise ConfigError(f"{FAULT_ENV}={raw!r} is not a known fault",
                      "use ignore_kv_dtype or skip_narrow_layer:N, or unset it")


def make_layer_kv(spec, layer: int, max_tokens: int, dtype: str, device: str | torch.device = "cpu",
                  wave_budget_bytes: int = DEFAULT_WAVE_BUDGET, **kw) -> LayerKV:
    """Build layer ``layer``'s cache in ``dtype`` for a ModelSpec, with the q8_0 geometry guard.

    Only a narrowed layer (dtype != fp32) is checked; q8_0 on a layer whose
    n_kv_heads*head_dim is not a multiple of 32 raises KVGeometryError (never a fallback).
    """
    if dtype not in KV_DTYPES:
        raise ConfigError(f"kv_dtype {dtype!r} is not one of {', '.join(KV_DTYPES)}", "pick one of those")
    fault, arg = _fault()
    if fault == "ignore_kv_dtype" or (fault == "skip_narrow_layer" and arg == layer):
        dtype = "fp32"          # the seed's bug, on purpose, so the harness can prove it catches it
    hkv, d = spec.n_kv_heads, spec.head_dim
    if dtype == "q8_0" and (hkv * d) % Q8_BLOCK:
        raise KVGeometryError(
            f"layer {layer}: kv_dtype q8_0 needs n_kv_heads*head_dim % {Q8_BLOCK} == 0, but this layer "
            f"has {hkv} x {d} = {hkv * d}", "use kv_dtype fp32 or bf16 for this model")
    return LayerKV(layer, hkv, d, max_tokens, dtype, device, wave_budget_bytes=wave_budget_bytes, **kw)
