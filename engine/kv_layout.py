"""KV buffers in memory: allocate a cache buffer for a format, and recognise a buffer's format.

Contract: both read ``engine.formats.KV`` only, so a format added there is allocated and
recognised here without an edit. ``alloc_kv(rows, n_kv_heads, head_dim, dtype, device)``
returns one zeroed buffer (K or V) of ``rows`` token rows: a plain format (``torch_dtype``
set) as ``[rows, Hkv, D]`` of that element type, a block format (q8_0) as ``uint8 [rows,
Hkv*D/block*block_bytes]``, blocks running along each token's flattened row (ggml's layout);
``nbytes == rows * formats.kv_row_bytes(dtype, Hkv, D)`` exactly (what the planner prices).
The q8_0-style geometry guard is ``formats.check_kv_geometry`` (raised here too, naming the
layer). ``buffer_format(buf, n_kv_heads, head_dim)`` is the format a buffer holds, read from
its element type and row width (never from a request); ``None`` when it is no known format.
Both ``engine.kv.LayerKV`` and ``engine.kv_ring.RingKV`` allocate through here, so neither
imports the other's module for storage (imports go kv -> kv_ring -> kv_layout).

    k = alloc_kv(4096, 4, 128, "q8_0", "cpu")      # uint8 [4096, 544]
    buffer_format(k, 4, 128)                       # "q8_0"
"""
from __future__ import annotations

import torch

from . import formats


def _torch_dtype(f: formats.Format) -> torch.dtype:
    return getattr(torch, f.torch_dtype) if f.torch_dtype else torch.uint8


def alloc_kv(rows: int, n_kv_heads: int, head_dim: int, dtype: str, device: str | torch.device = "cpu",
             layer: int | None = None) -> torch.Tensor:
    """A zeroed K (or V) buffer of ``rows`` tokens in ``dtype``'s layout (see the module doc)."""
    f = formats.kv_format(dtype)
    formats.check_kv_geometry(dtype, n_kv_heads, head_dim, layer=layer)
    if f.torch_dtype:
        return torch.zeros((rows, n_kv_heads, head_dim), dtype=_torch_dtype(f), device=device)
    return torch.zeros((rows, formats.kv_row_bytes(dtype, n_kv_heads, head_dim)), dtype=torch.uint8,
                       device=device)


def buffer_format(buf: torch.Tensor, n_kv_heads: int, head_dim: int) -> str | None:
    """The KV format ``buf`` holds, from its element type and row shape; None if none fits."""
    n = n_kv_heads * head_dim
    for name, f in formats.KV.items():
        if f.torch_dtype:
            if buf.dtype == _torch_dtype(f) and tuple(buf.shape[1:]) == (n_kv_heads, head_dim):
                return name
        elif buf.dtype == torch.uint8 and buf.dim() == 2 and n % f.block == 0 \
                and buf.shape[-1] == n // f.block * f.block_bytes:
            return name
    return None
