"""Weight matrices kept in ggml's Q8_0 (``weight_format="q8_0"``): one int8 tensor per matrix.

Contract: a Q8_0 matrix of logical shape [N, K] (K a multiple of 32) is an ``int8`` tensor
[N, K + K/16] whose row n holds the row's K quants, then its K/32 block scales as
little-endian float16 (two bytes each): value (n, k) = ``d[n, k // 32] * q[n, k]``, exact in
float32. These are ggml ``block_q8_0``'s bytes (34 per 32 values: what the planner prices
for ``weight_format="q8_0"`` and the ledger records), reordered within each row so the quants
are one aligned run (16-byte loads in ``engine.kernels.gemv``). Being a plain tensor, a Q8_0
matrix moves with ``.to()``, and row views of a fused buffer (q/k/v, gate/up) are rows of
it; an int8 2-D weight means Q8_0 everywhere in the engine (``is_q8``).

- ``from_ggml(raw)``: a GGUF Q8_0 tensor's bytes (uint8 [N, K/32*34]) -> the matrix, no
  arithmetic (the file's values exactly); ``to_ggml(w)`` is the inverse, byte for byte.
- ``quantize(x)``: float32 [N, K] -> the matrix, with ``gguf.quants``' Q8_0 arithmetic
  (``engine.kernels.q8_layout.quantize``), so ``to_ggml(quantize(x)) == gguf.quants.quantize(x)``.
- ``dequantize(w)`` -> float32 [N, K]; ``split(w)`` -> (quants int8 [N, K], scales fp16
  [N, K/32]) as views.
- ``mm(x, w)``: ``x [T, K] @ dequantize(w).T`` in float32 (the exact maths of the stored
  values), dequantising ``MM_CHUNK_BYTES`` of float32 rows at a time, so an output head of
  150k rows never needs its float32 copy at once. Returns float32 [T, N]; bfloat16 ``x`` (the
  fast prefill path) computes and returns bfloat16 over the values rounded to bfloat16.
- ``rows_mm(x, n, k, rows, dtype)``: that chunking for any matrix given a slice of rows at a time
  (``engine.model.mm`` widens bf16/f16 weights through it on CPUs without native narrow maths).

Torch only (no Triton): ``engine.model`` and the loader import it.

    w = from_ggml(g.blocks("blk.0.attn_q.weight", (2048, 2048), QT.Q8_0).reshape(2048, -1))
    y = mm(h, w)                       # == h @ dequantize(w).T
"""
from __future__ import annotations

import torch

from . import formats
from .kernels import q8_layout

QK = formats.Q8_BLOCK                 # values a block
BLOCK_BYTES = formats.Q8_BYTES        # ggml bytes a block (2 of scale + 32 of quants)
MM_CHUNK_BYTES = 64 << 20             # float32 bytes of weight rows ``mm`` dequantises at a time


def row_bytes(k: int) -> int:
    """Bytes of one Q8_0 row of ``k`` values (k a multiple of 32)."""
    if k % QK:
        raise ValueError(f"a Q8_0 row needs a multiple of {QK} values, got {k}")
    return k // QK * BLOCK_BYTES


def is_q8(w) -> bool:
    """Whether weight ``w`` is a Q8_0 matrix of this layout (2-D int8)."""
    return isinstance(w, torch.Tensor) and w.dtype == torch.int8 and w.dim() == 2


def in_features(w: torch.Tensor) -> int:
    """K, the values a row holds (the tensor's last dim is K + K/16 bytes)."""
    r = w.shape[-1]
    if r % BLOCK_BYTES:
        raise ValueError(f"an int8 weight of {r} bytes a row is not Q8_0 rows ({BLOCK_BYTES} bytes per {QK} values)")
    return r // BLOCK_BYTES * QK


def empty(n: int, k: int, device="cpu") -> torch.Tensor:
    return torch.empty(n, row_bytes(k), dtype=torch.int8, device=device)


def split(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(quants int8 [N, K], scales float16 [N, K/32]): views of ``w``'s two parts of each row."""
    if not is_q8(w) or w.stride(1) != 1:
        raise ValueError(f"not a Q8_0 matrix (2-D int8, rows contiguous): {w.dtype} {tuple(w.shape)}")
    k = in_features(w)
    return w[:, :k], w[:, k:].view(torch.float16)


def from_ggml(raw: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """ggml Q8_0 bytes uint8 [N, K/32*34] (rows of blocks) -> the matrix (into ``out`` when
    given, on ``out``'s device; else on ``raw``'s)."""
    n, r = raw.shape
    k = r // BLOCK_BYTES * QK
    if r % BLOCK_BYTES or raw.dtype != torch.uint8:
        raise ValueError(f"from_ggml: {raw.dtype} {tuple(raw.shape)} is not rows of Q8_0 blocks")
    out = empty(n, k, raw.device) if out is None else out
    if tuple(out.shape) != (n, r) or out.dtype != torch.int8:
        raise ValueError(f"from_ggml: out {out.dtype} {tuple(out.shape)} is not int8 {(n, r)}")
    blocks = raw.to(out.device).reshape(n, k // QK, BLOCK_BYTES)
    out[:, :k].copy_(blocks[..., 2:].reshape(n, k).view(torch.int8))
    out[:, k:].copy_(blocks[..., :2].reshape(n, k // QK * 2).view(torch.int8))
    return out


def to_ggml(w: torch.Tensor) -> torch.Tensor:
    """The ggml bytes uint8 [N, K/32*34], byte-identical to ``gguf.quants.quantize`` of the values."""
    q, d = split(w)
    n, k = q.shape
    return torch.cat([d.contiguous().view(torch.uint8).reshape(n, k // QK, 2),
                      q.contiguous().view(torch.uint8).reshape(n, k // QK, QK)], dim=-1).reshape(n, -1)


def quantize(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [N, K] -> the matrix (``gguf.quants``' Q8_0 arithmetic), into ``out`` when given."""
    n, k = x.shape
    row_bytes(k)
    q, d = q8_layout.quantize(x.float())
    out = empty(n, k, x.device) if out is None else out
    out[:, :k].copy_(q)
    out[:, k:].copy_(d.view(torch.int8))
    return out


def dequantize(w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Every value, float32 [N, K] (``q * d``, exact), then cast to ``dtype``."""
    q, d = split(w)
    n, k = q.shape
    v = (q.reshape(n, k // QK, QK).to(torch.float32) * d.to(torch.float32)[..., None]).reshape(n, k)
    return v if dtype == torch.float32 else v.to(dtype)


def mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x [T, K] @ dequantize(w).T`` in float32 -> float32 [T, N], a chunk of rows at a time.
    bfloat16 ``x`` (the fast prefill path's activations) gets the values rounded to bfloat16
    and a bfloat16 product back, as ``engine.model.mm`` over bf16 weights; any other dtype is
    computed in float32."""
    dt = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    x = x.to(dt)
    n, k = w.shape[0], in_features(w)
    if x.shape[-1] != k:
        raise ValueError(f"mm: x has {x.shape[-1]} features, the Q8_0 matrix {k}")
    return rows_mm(x, n, k, lambda r0, r1: dequantize(w[r0:r1], dt), dt)


def rows_mm(x: torch.Tensor, n: int, k: int, rows, dtype: torch.dtype) -> torch.Tensor:
    """``x [..., K] @ W.T`` -> ``dtype`` [..., N] for an N x K matrix given as ``rows(r0, r1)``
    (its rows r0..r1 in ``x``'s dtype), ``MM_CHUNK_BYTES`` of float32 rows at a time: a wide copy
    of a 150k-row output head never exists at once."""
    step = max(1, MM_CHUNK_BYTES // (4 * k))
    if step >= n:
        return (x @ rows(0, n).T).to(dtype)
    y = torch.empty(*x.shape[:-1], n, dtype=dtype, device=x.device)
    for r0 in range(0, n, step):
        y[..., r0:r0 + step] = x @ rows(r0, min(n, r0 + step)).T
    return y
