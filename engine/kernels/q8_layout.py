"""q8_0 KV in memory: quants and scales in two aligned arrays, ggml's block bytes as a view.

Contract: a q8_0 K (or V) buffer of ``rows`` tokens is one flat ``uint8`` tensor of exactly
``rows * formats.kv_row_bytes("q8_0", Hkv, D)`` bytes (34 per 32 values: what the planner
prices and the ledger records) holding two arrays back to back:

- quants, int8 ``[rows, Hkv, D]``: a token's ``Hkv*D`` values contiguous, so one head's ``D``
  quants are one contiguous run (16-byte aligned whenever ``D % 16 == 0``: vector loads);
- scales, fp16 ``[rows, Hkv*D/32]`` from byte ``rows*Hkv*D`` (a multiple of 32): scale ``b`` of
  a token covers values ``[32 b, 32 b + 32)`` of its flattened row, ggml's blocks (with
  ``D % 32 == 0`` that is ``[rows, Hkv, D/32]``: a head's blocks never straddle heads).

The values are ggml ``block_q8_0``'s (d = amax/127 rounded to fp16, q = round-half-away(x/d)):
``to_ggml_blocks`` interleaves them into ``uint8 [rows, Hkv*D/32*34]``, byte for byte what
``gguf.quants.quantize(x, Q8_0)`` writes (the tested view), ``from_ggml_blocks`` is its inverse.
``split(buf, Hkv, D)`` returns the two arrays as views (``Q8Rows``); ``Q8Rows`` is indexed by
token rows like a plain buffer (``[j0:j1]``, ``index_select(0, idx)``, ``shape``, ``nbytes``)
so the torch references and the ring cache read it as they read fp32 rows; ``rows_view(buf,
fmt, Hkv, D)`` gives that row-indexable form of any KV buffer. ``quantize(x)`` is the float32
arithmetic of ``gguf.quants`` returning (quants, scales); ``dequantize(rows)`` is ``q * d`` in
float32 (exact). Torch only: the kernels, the references and ``engine.kv_layout`` import it.

    buf = alloc(4096, 4, 128, "cpu")            # uint8 [4096 * 544], all zero
    r = split(buf, 4, 128)                      # r.quants int8 [4096, 4, 128], r.scales fp16 [4096, 16]
    blocks = to_ggml_blocks(r[0:10])            # uint8 [10, 544] == gguf.quants.quantize(x[0:10], Q8_0)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import formats

FMT = "q8_0"
QK = formats.Q8_BLOCK                          # values per block (and per scale)
SCALE_BYTES = formats.Q8_SCALE_BYTES           # one fp16 scale per block


def nbytes(rows: int, n_kv_heads: int, head_dim: int) -> int:
    return rows * formats.kv_row_bytes(FMT, n_kv_heads, head_dim)


def alloc(rows: int, n_kv_heads: int, head_dim: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """A zeroed flat uint8 buffer of ``rows`` tokens (quants then scales)."""
    return torch.zeros(nbytes(rows, n_kv_heads, head_dim), dtype=torch.uint8, device=device)


def is_buffer(buf: torch.Tensor, n_kv_heads: int, head_dim: int) -> bool:
    """Whether ``buf`` has this layout's shape for the geometry (flat uint8, whole rows)."""
    n = n_kv_heads * head_dim
    if buf.dtype != torch.uint8 or buf.dim() != 1 or n % QK:
        return False
    return buf.numel() % formats.kv_row_bytes(FMT, n_kv_heads, head_dim) == 0


def n_rows(buf: torch.Tensor, n_kv_heads: int, head_dim: int) -> int:
    return buf.numel() // formats.kv_row_bytes(FMT, n_kv_heads, head_dim)


@dataclass(frozen=True)
class Q8Rows:
    """Token rows of a q8_0 cache as two views: ``quants`` int8 [rows, Hkv, D] and ``scales``
    fp16 [rows, Hkv*D/32]. Sliced and gathered by row like a plain ``[rows, Hkv, D]`` buffer."""
    quants: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.quants.shape)

    @property
    def nbytes(self) -> int:
        return self.quants.nbytes + self.scales.nbytes

    @property
    def device(self) -> torch.device:
        return self.quants.device

    def __getitem__(self, rows) -> "Q8Rows":
        if not isinstance(rows, slice):
            raise TypeError("Q8Rows is indexed by a slice of token rows")
        return Q8Rows(self.quants[rows], self.scales[rows])

    def index_select(self, dim: int, idx: torch.Tensor) -> "Q8Rows":
        if dim != 0:
            raise ValueError("Q8Rows gathers token rows (dim 0) only")
        return Q8Rows(self.quants.index_select(0, idx), self.scales.index_select(0, idx))


def split(buf: torch.Tensor, n_kv_heads: int, head_dim: int) -> Q8Rows:
    """The quants and scales arrays of a flat q8_0 buffer, as views (no copy)."""
    if not is_buffer(buf, n_kv_heads, head_dim):
        raise ValueError(f"not a q8_0 buffer for {n_kv_heads} x {head_dim}: {buf.dtype} {tuple(buf.shape)}")
    rows, n = n_rows(buf, n_kv_heads, head_dim), n_kv_heads * head_dim
    quants = buf[:rows * n].view(torch.int8).view(rows, n_kv_heads, head_dim)
    scales = buf[rows * n:].view(torch.float16).view(rows, n // QK)
    return Q8Rows(quants, scales)


def rows_view(buf, fmt: str, n_kv_heads: int, head_dim: int):
    """A KV buffer in row-indexable form: a q8_0 buffer as ``Q8Rows``, anything else as is."""
    if fmt == FMT and isinstance(buf, torch.Tensor):
        return split(buf, n_kv_heads, head_dim)
    return buf


def quantize(x: torch.Tensor, scale_hook=None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [..., n] (n % 32 == 0) -> (int8 quants [..., n], fp16 scales [..., n/32]) with the
    same float32 operations, in the same order, as ``gguf.quants`` Q8_0 (d = amax / 127,
    id = 1 / d, q = round-half-away(x * id), NaN -> 0). ``scale_hook(d)`` (fault injection
    only) may change the float32 scales before they are rounded to fp16."""
    if x.shape[-1] % QK:
        raise ValueError(f"q8_0 needs the last dim to be a multiple of {QK}, got {x.shape[-1]}")
    lead, n = x.shape[:-1], x.shape[-1]
    blocks = x.to(torch.float32).reshape(-1, QK)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    # tensor / tensor: CUDA turns a division by a Python scalar into a reciprocal multiply.
    d = amax / torch.full_like(amax, 127.0)
    inv = torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)
    v = blocks * inv
    a = v.abs()
    f = a.floor()
    r = f + (2 * (a - f)).floor()
    r = torch.where(v < 0, -r, r)
    r = torch.where(torch.isnan(r), torch.zeros_like(r), r)
    if scale_hook is not None:
        d = scale_hook(d)
    return r.to(torch.int8).reshape(*lead, n), d.to(torch.float16).reshape(*lead, n // QK)


def dequantize(rows: Q8Rows) -> torch.Tensor:
    """float32 [rows, Hkv, D] = q * d (exact in float32: 8-bit times 11-bit significands)."""
    L, H, D = rows.shape
    q = rows.quants.reshape(L, -1, QK).to(torch.float32)
    return (q * rows.scales.to(torch.float32)[..., None]).reshape(L, H, D)


def to_ggml_blocks(rows: Q8Rows) -> torch.Tensor:
    """uint8 [rows, Hkv*D/32*34]: ggml block_q8_0 bytes (fp16 scale little-endian, then 32 int8)
    along each token's flattened row, equal to ``gguf.quants.quantize(values, Q8_0)``."""
    L = rows.shape[0]
    nb = rows.scales.shape[1]
    d = rows.scales.contiguous().view(torch.uint8).reshape(L, nb, SCALE_BYTES)
    q = rows.quants.contiguous().view(torch.uint8).reshape(L, nb, QK)
    return torch.cat([d, q], dim=2).reshape(L, nb * (SCALE_BYTES + QK))


def from_ggml_blocks(blocks: torch.Tensor, n_kv_heads: int, head_dim: int) -> Q8Rows:
    """ggml block_q8_0 bytes uint8 [rows, Hkv*D/32*34] -> fresh ``Q8Rows`` (the inverse view)."""
    L = blocks.shape[0]
    nb = n_kv_heads * head_dim // QK
    b = blocks.reshape(L, nb, SCALE_BYTES + QK)
    scales = b[..., :SCALE_BYTES].contiguous().view(torch.float16).reshape(L, nb)
    quants = b[..., SCALE_BYTES:].contiguous().view(torch.int8).reshape(L, n_kv_heads, head_dim)
    return Q8Rows(quants, scales)
