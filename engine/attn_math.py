"""The attention kernel's precision, as an axis separate from the KV cache's storage format.

Contract: ``MODES`` are the kernel precisions the engine can apply, the observable is
``Engine.attn_math`` (and each result's manifest), and an unknown mode is a ``ConfigError``:

- ``exact``: the query stays float32 and every dot product is float32 maths on the values the
  cache holds (dequantized K and V). A narrowed KV dtype's error is then its storage alone.
- ``ggml-cpu``: what llama.cpp's CPU flash attention does (``ggml_compute_forward_flash_attn_ext_f16``
  in ggml-cpu/ops.cpp, read, not copied): the query row of each head is converted to the K
  type's ``vec_dot_type`` before the K·Q dot product, i.e. rounded to bf16 for bf16 K, quantized
  to q8_0 blocks (32 values, one fp16 scale ``amax/127``, int8 ``round(x/d)``) for q8_0 K, and
  left float32 for fp32 K; the dot product accumulates in float32 (as ggml's vec_dot does; ours
  sums the dequantized products, equal to ggml's per-block ``sumi * dx * dy`` up to float32
  rounding); V is converted to float32 and accumulated in float32 for the types kvbench stores
  (ggml accumulates in fp16 only for an f16 V, which kvbench does not store).

``q_for_k(q, k_format, mode)`` returns the query the K·Q product must use: ``q`` itself for
``exact`` or float32 K, else the converted values as float32 (so the cache's own kernels,
Triton or torch, then run unchanged on that query). The difference between a dtype's KLD under
``ggml-cpu`` and under ``exact`` is the share its kernel maths adds to its storage error.

    q2 = q_for_k(q, "q8_0", "ggml-cpu")       # [T, Hq, D] float32, q8_0-representable per head
"""
from __future__ import annotations

import torch

from .errors import ConfigError

MODES = ("exact", "ggml-cpu")
DEFAULT = "exact"
Q8_BLOCK = 32


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"attention maths {mode!r} is unknown (known: {', '.join(MODES)})",
                          "pick one of those")
    return mode


def q8_0_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` [..., n] (n % 32 == 0) through ggml's ``quantize_row_q8_0`` and back: per block of
    32, ``d = amax / 127`` stored as fp16, ``q = round(x / d)`` (half away from zero, as the
    reference C's ``roundf``), value ``q * fp16(d)`` in float32."""
    n = x.shape[-1]
    if n % Q8_BLOCK:
        raise ConfigError(f"q8_0 query conversion needs a head size divisible by {Q8_BLOCK}, got {n}")
    b = x.to(torch.float32).reshape(*x.shape[:-1], n // Q8_BLOCK, Q8_BLOCK)
    d = b.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    v = b * inv
    q = torch.sign(v) * torch.floor(v.abs() + 0.5)          # roundf: half away from zero
    return (q * d.to(torch.float16).to(torch.float32)).reshape(x.shape)


def q_for_k(q: torch.Tensor, k_format: str, mode: str) -> torch.Tensor:
    """The query the K·Q product uses under ``mode`` for a K cache in ``k_format`` (module doc)."""
    if mode == "exact" or k_format == "fp32":
        return q
    if mode != "ggml-cpu":
        check_mode(mode)
    if k_format == "bf16":
        return q.to(torch.bfloat16).to(torch.float32)
    if k_format == "f16":
        return q.to(torch.float16).to(torch.float32)
    if k_format == "q8_0":
        return q8_0_round(q)
    raise ConfigError(f"attention maths {mode!r} has no query conversion for K stored as {k_format!r}",
                      "use attn_math='exact' for this KV dtype")
