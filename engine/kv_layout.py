"""KV buffers in memory: allocate a cache buffer for a format, and recognise a buffer's format.

Contract: both read ``engine.formats.KV`` only, so a format added there is allocated and
recognised here without an edit. ``alloc_kv(rows, n_kv_heads, head_dim, dtype, device)``
returns one zeroed buffer (K or V) of ``rows`` token rows: a plain format (``torch_dtype``
set) as ``[rows, Hkv, D]`` of that element type; q8_0 in the split layout of
``engine.kernels.q8_layout`` (one flat uint8 buffer: int8 quants ``[rows, Hkv, D]``, then fp16
scales ``[rows, Hkv*D/32]``; ggml's interleaved blocks are the view ``to_ggml_bytes``); any
other block format as ``uint8 [rows, Hkv*D/block*block_bytes]``, blocks running along each
token's flattened row (ggml's layout). ``nbytes == rows * formats.kv_row_bytes(dtype, Hkv, D)``
exactly (what the planner prices). ``to_ggml_bytes(buf, fmt, Hkv, D)`` is a buffer's bytes as
gguf lays the format out (``uint8 [rows, row bytes]``).
The q8_0-style geometry guard is ``formats.check_kv_geometry`` (raised here too, naming the
layer). ``buffer_format(buf, n_kv_heads, head_dim)`` is the format a buffer holds, read from
its element type and row width (never from a request); ``None`` when it is no known format.
``observed_dtype`` is the caches' applied-dtype observable: that format, qualified with the
reason when ``write_path_error`` finds the format's write path (``kv_append``, the backend in
force) does not give the bytes of the format's independent reference (``gguf.quants`` of its
``gguf_type``: a q8_0 whose scales are rounded to the wrong width is not q8_0).
A cache's K and V are two buffers, each allocated and recognised on its own, so they may hold
different formats (a KV spec's ``k-q8_0.v-bf16``): ``cache_format(cache, "k"|"v")`` is one
buffer's format, ``cache_dtypes(cache)`` the (K, V) observables.
Both ``engine.kv.LayerKV`` and ``engine.kv_ring.RingKV`` allocate through here, so neither
imports the other's module for storage (imports go kv -> kv_ring -> kv_layout).

    k = alloc_kv(4096, 4, 128, "q8_0", "cpu")      # uint8 [4096 * 544]: quants, then scales
    buffer_format(k, 4, 128)                       # "q8_0"
"""
from __future__ import annotations

import numpy as np
import torch

from . import formats, kernels, settings
from .kv_spec import layer_label
from .kernels import q8_layout
from .kernels.kv_append import kv_append


def _torch_dtype(f: formats.Format) -> torch.dtype:
    return getattr(torch, f.torch_dtype) if f.torch_dtype else torch.uint8


def alloc_kv(rows: int, n_kv_heads: int, head_dim: int, dtype: str, device: str | torch.device = "cpu",
             layer: int | None = None) -> torch.Tensor:
    """A zeroed K (or V) buffer of ``rows`` tokens in ``dtype``'s layout (see the module doc)."""
    f = formats.kv_format(dtype)
    formats.check_kv_geometry(dtype, n_kv_heads, head_dim, layer=layer)
    if f.torch_dtype:
        return torch.zeros((rows, n_kv_heads, head_dim), dtype=_torch_dtype(f), device=device)
    if dtype == q8_layout.FMT:
        return q8_layout.alloc(rows, n_kv_heads, head_dim, device)
    return torch.zeros((rows, formats.kv_row_bytes(dtype, n_kv_heads, head_dim)), dtype=torch.uint8,
                       device=device)


def buffer_format(buf: torch.Tensor, n_kv_heads: int, head_dim: int) -> str | None:
    """The KV format ``buf`` holds, from its element type and row shape; None if none fits."""
    n = n_kv_heads * head_dim
    for name, f in formats.KV.items():
        if f.torch_dtype:
            if buf.dtype == _torch_dtype(f) and tuple(buf.shape[1:]) == (n_kv_heads, head_dim):
                return name
        elif name == q8_layout.FMT:
            if q8_layout.is_buffer(buf, n_kv_heads, head_dim):
                return name
        elif buf.dtype == torch.uint8 and buf.dim() == 2 and n % f.block == 0 \
                and buf.shape[-1] == n // f.block * f.block_bytes:
            return name
    return None


def cache_format(cache, which: str = "k") -> str:
    """The format a cache's K (``which="k"``) or V (``"v"``) buffer holds (``buffer_format``);
    a buffer no format fits is a bug."""
    buf = cache.k if which == "k" else cache.v
    fmt = buffer_format(buf, cache.n_kv_heads, cache.head_dim)
    if fmt is None:
        raise AssertionError(f"layer {cache.layer}: {which.upper()} buffer of {buf.dtype} {tuple(buf.shape)} "
                             f"is no known format")
    return fmt


def cache_dtypes(cache) -> tuple[str, str]:
    """The applied-dtype observables (``observed_dtype``) of a cache's K and V buffers."""
    return tuple(observed_dtype(b, cache.n_kv_heads, cache.head_dim, f"layer {cache.layer} {w}")
                 for w, b in (("K", cache.k), ("V", cache.v)))


def to_ggml_bytes(buf: torch.Tensor, fmt: str, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """The buffer's token rows as gguf lays ``fmt`` out: ``uint8 [rows, row bytes]`` (a copy on
    the buffer's device for q8_0: ggml's interleaved block_q8_0 bytes; the bytes as they are
    otherwise)."""
    if fmt == q8_layout.FMT:
        return q8_layout.to_ggml_blocks(q8_layout.split(buf, n_kv_heads, head_dim))
    return buf.contiguous().view(torch.uint8).reshape(buf.shape[0], -1)


_written: dict[tuple, str | None] = {}


def write_path_error(dtype: str, n_kv_heads: int, head_dim: int, device: torch.device) -> str | None:
    """Why ``dtype``'s write path (``kv_append`` on ``device``, the backend in force) does not
    give the format's reference bytes, or None when it does (or gguf has no reference for it).

    A fixed probe of 2 tokens x ``n_kv_heads*head_dim`` values (magnitudes 1e-3 to 1e3, a zero
    row segment, exact ties) is written through the same path the cache uses and compared with
    ``gguf.quants.quantize(probe, <gguf_type>)``: the first differing byte is named (for a
    block format, whether it sits in the block's scale or its values). Cached per format,
    geometry, device type, backend and planted fault."""
    f = formats.kv_format(dtype)
    if not f.gguf_type:
        return None
    dev = torch.device(device)
    key = (dtype, n_kv_heads, head_dim, dev.type, kernels.use_triton(dev), settings.get("KVBENCH_FAULT"))
    if key in _written:
        return _written[key]
    import gguf
    from gguf.quants import quantize
    n = n_kv_heads * head_dim
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2, n, generator=g) * torch.logspace(-3, 3, n).roll(n // 3)
    x[1, : min(n, f.block)] = 0.0                                   # an all-zero block
    x[1, -1] = 0.5                                                  # a tie
    buf = alloc_kv(2, n_kv_heads, head_dim, dtype, dev)
    kv_append(buf, 0, x.reshape(2, n_kv_heads, head_dim).to(dev), dtype)
    got = to_ggml_bytes(buf, dtype, n_kv_heads, head_dim).cpu().numpy()
    want = np.ascontiguousarray(quantize(x.numpy(), gguf.GGMLQuantizationType[f.gguf_type])).view(np.uint8)
    want = want.reshape(2, -1)
    why = None
    if got.shape != want.shape:
        why = f"{dtype} rows of {got.shape[1]} bytes, gguf {f.gguf_type} writes {want.shape[1]}"
    elif not np.array_equal(got, want):
        t, b = (int(v[0]) for v in np.nonzero(got != want))
        if f.block > 1:
            blk, off = divmod(b, f.block_bytes)
            part = "scale" if off < f.block_bytes - f.block else "quants"
            why = (f"{dtype} written wrong: block {blk} byte {off} (its {part}) is 0x{got[t, b]:02x}, "
                   f"gguf {f.gguf_type} writes 0x{want[t, b]:02x}")
        else:
            why = f"{dtype} written wrong: byte {b} is 0x{got[t, b]:02x}, gguf {f.gguf_type} writes 0x{want[t, b]:02x}"
    _written[key] = why
    return why


def observed_dtype(buf: torch.Tensor, n_kv_heads: int, head_dim: int, where: str) -> str:
    """The applied-dtype observable of a cache: the format its buffer holds (``buffer_format``),
    qualified when that format's write path does not produce the format's reference bytes
    (``"q8_0 (q8_0 written wrong: ...)"``), so a request-vs-applied check fails naming it."""
    fmt = buffer_format(buf, n_kv_heads, head_dim)
    if fmt is None:
        raise AssertionError(f"{where}: KV buffer of {buf.dtype} {tuple(buf.shape)} is no known format")
    why = write_path_error(fmt, n_kv_heads, head_dim, buf.device)
    return fmt if why is None else f"{fmt} ({why})"


class CacheObservables:
    """What a layer cache (``engine.kv.LayerKV``, ``engine.kv_ring.RingKV``) says about itself,
    read from its ``k`` and ``v`` buffers (never from the request): ``k_format`` / ``v_format``
    (what the kernels are told to read and write), ``format`` (both as one cell,
    ``kv_spec.layer_label``: ``q8_0`` or ``k-q8_0.v-bf16``), ``kv_dtypes`` (each format qualified
    when its write path is not that format's bytes: ``observed_dtype``), ``dtype`` (those as one
    cell) and ``nbytes`` (exact)."""

    @property
    def k_format(self) -> str:
        return cache_format(self, "k")

    @property
    def v_format(self) -> str:
        return cache_format(self, "v")

    @property
    def format(self) -> str:
        return layer_label(self.k_format, self.v_format)

    @property
    def kv_dtypes(self) -> tuple[str, str]:
        return cache_dtypes(self)

    @property
    def dtype(self) -> str:
        return layer_label(*self.kv_dtypes)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
