"""GGUF access through the upstream ``gguf`` package: open, metadata, tensors as torch.

Contract: ``open_gguf(path)`` returns a ``GGUFFile`` or raises ``ModelFileError`` with a
one-line reason (missing, directory, unreadable, empty, not GGUF, truncated, bad version).
Tensors come back as torch tensors in PyTorch order (ggml shape reversed), float32 by
default. F32/F16/BF16/Q8_0/Q4_0/Q4_1 are decoded here with torch ops (bit-identical to
``gguf.quants.dequantize``, held to it by tests/test_gguf_fast_dequant.py), in chunks of rows
and optionally on the target device (the raw blocks cross PCIe, not float32); every other
type goes through ``gguf.quants.dequantize`` on the host. ``tensor(name, dtype=, device=,
out=)`` casts each chunk to the storage dtype as it goes, so no whole float32 copy exists.
The header is parsed here (``_parse``: every count and size checked against the file before
use; metadata values and tensor infos equal what ``gguf.GGUFReader`` reads, held to it by
tests/test_gguf_parse.py), because gguf's reader builds a numpy view per vocabulary string
(~11 s for gemma3's 262144 tokens, ~6 s for Qwen3's 151k, paid by every load); block payloads
are decoded by ``dequantize_torch`` / ``gguf.quants``.

    g = open_gguf("model.gguf")
    w = g.tensor("blk.0.attn_q.weight", dtype=torch.bfloat16, device="cuda")   # [out, in]
"""
from __future__ import annotations

import mmap
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from typing import TYPE_CHECKING

if TYPE_CHECKING:      # torch loads in the functions that use it: a bad input fails fast, in one line
    import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize

from .errors import ModelFileError, UnsupportedModelError

SUPPORTED_TYPES = {
    QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
    QT.Q4_K, QT.Q5_K, QT.Q6_K,
}
GGUF_MAGIC = b"GGUF"
GGML_MAX_DIMS = 4
# GGUF value types -> fixed byte size (8 = string, 9 = array are variable)
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _check_path(path: Path) -> None:
    if not path.exists():
        raise ModelFileError(path, "file does not exist", "check the path or the registry name")
    if path.is_dir():
        raise ModelFileError(path, "is a directory, not a GGUF file", "pass the .gguf file inside it")
    if not os.access(path, os.R_OK):
        raise ModelFileError(path, "no read permission", "fix the file's permissions (chmod +r)")
    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(path, "file is empty (0 bytes)", "re-download or regenerate it")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:4] != GGUF_MAGIC:
        raise ModelFileError(path, f"not a GGUF file (magic {head[:4]!r}, expected b'GGUF')",
                             "pass a .gguf model file")
    if len(head) < 8:
        raise ModelFileError(path, "truncated GGUF header", "re-download the file")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise ModelFileError(path, f"unsupported GGUF version {version} (supported: 2, 3)",
                             "convert it with a current llama.cpp")


class _Truncated(Exception):
    pass


# GGUF scalar value types -> numpy dtypes (little-endian), for arrays decoded in one call
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
       11: "<i8", 12: "<f8"}
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
               11: "<q", 12: "<d"}


class TensorInfo:
    """One tensor's header entry: ``name``, ``tensor_type`` (ggml type), ``shape`` (ggml order,
    numpy uint64 as gguf's reader gives it), ``n_elements``, ``n_bytes``, ``data_offset`` (from
    the start of the file) and ``data``: a read-only view of its bytes in the mapped file, typed
    and shaped as ``gguf.GGUFReader`` gives it (F32/F16 values in PyTorch order, block types as
    uint8 rows)."""

    __slots__ = ("name", "tensor_type", "shape", "n_elements", "n_bytes", "data_offset", "_mm")

    def __init__(self, name, tensor_type, shape, n_elements, n_bytes, data_offset, mm):
        self.name, self.tensor_type, self.shape = name, tensor_type, shape
        self.n_elements, self.n_bytes, self.data_offset, self._mm = n_elements, n_bytes, data_offset, mm

    @property
    def data(self) -> np.ndarray:
        dims = tuple(int(d) for d in reversed(self.shape.tolist()))
        raw = self._mm[self.data_offset:self.data_offset + self.n_bytes]
        if self.tensor_type == QT.F32:
            return raw.view(np.float32).reshape(dims)
        if self.tensor_type == QT.F16:
            return raw.view(np.float16).reshape(dims)
        block, size = GGML_QUANT_SIZES[self.tensor_type]
        return raw.reshape(*dims[:-1], dims[-1] // block * size)


def _parse(path: Path, size: int) -> tuple[dict[str, Any], list[tuple], int]:
    """Read the header: metadata as plain Python values (what ``gguf``'s ``field.contents()``
    gives: str, int, float, bool, lists of them; ``None`` for a value that is not valid UTF-8),
    the tensor infos ``(name, dims, ggml type id, offset)`` and the data section's start.

    Every declared count and size is checked against the file size before anything is built
    over it (absurd counts, lengths and dims from a corrupt file are rejected here, not
    allocated), so a corrupt file is a ``ModelFileError`` with a one-line reason. Arrays of
    numbers are decoded by numpy in one call and strings with ``struct``: a 262144-token
    vocabulary reads in well under a second (``gguf.GGUFReader`` builds a numpy view per string
    and takes ~11 s for it on a 2-core box, a cost every load paid)."""
    bad = "the file is corrupt; re-download it"
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 8

        def take(fmt: str):
            nonlocal pos
            n = struct.calcsize(fmt)
            if pos + n > size:
                raise _Truncated
            out = struct.unpack_from(fmt, buf, pos)
            pos += n
            return out

        def skip(n: int, what: str):
            nonlocal pos
            if n < 0 or pos + n > size:
                raise ModelFileError(path, f"{what} declares {n} bytes at offset {pos}, past the end "
                                     f"of the file ({size} bytes)", "the file is corrupt or truncated; re-download it")
            pos += n

        def raw_string(what: str) -> bytes:
            (n,) = take("<Q")
            start = pos
            skip(n, what)
            return buf[start:pos]

        def text(b: bytes):
            try:
                return b.decode("utf-8")
            except UnicodeDecodeError:
                return _BadText

        def value(vtype: int, what: str):
            nonlocal pos
            if vtype in _SCALAR_SIZE:
                start = pos
                skip(_SCALAR_SIZE[vtype], what)
                return struct.unpack_from(_SCALAR_FMT[vtype], buf, start)[0]
            if vtype == 8:
                return text(raw_string(what))
            if vtype == 9:
                etype, count = take("<IQ")
                least = _SCALAR_SIZE.get(etype, 8)  # a string or nested array takes >= 8 bytes
                if count * least > size - pos:
                    raise ModelFileError(path, f"{what}: array of {count} elements cannot fit in the "
                                         f"{size - pos} bytes left", bad)
                if etype in _SCALAR_SIZE:
                    start = pos
                    skip(count * _SCALAR_SIZE[etype], what)
                    return np.frombuffer(buf, dtype=_NP[etype], count=count, offset=start).tolist()
                if etype == 8:
                    out = []
                    for _ in range(count):
                        (n,) = take("<Q")
                        if n > size - pos:
                            skip(n, what)                      # raises, naming the array
                        out.append(text(buf[pos:pos + n]))
                        pos += n
                    return out
                raise ModelFileError(path, f"{what} is an array of value type {etype}, which GGUF "
                                     f"models do not use (nested arrays are not read)", bad)
            raise ModelFileError(path, f"{what} has unknown value type {vtype}", bad)

        try:
            n_tensors, n_kv = take("<QQ")
            if n_kv * 13 > size or n_tensors * 24 > size:  # smallest kv / tensor-info entry
                raise ModelFileError(path, f"truncated or corrupt GGUF header: it declares {n_tensors} tensors and {n_kv} metadata keys, "
                                     f"more than a {size}-byte file can hold", bad)
            version = int.from_bytes(buf[4:8], "little")
            meta: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors,
                                    "GGUF.kv_count": n_kv}
            types: dict[str, tuple[int, int | None]] = {}
            for i in range(n_kv):
                name = text(raw_string(f"metadata key #{i}"))
                if name is _BadText:
                    raise ModelFileError(path, f"metadata key #{i} is not valid UTF-8", bad)
                (vtype,) = take("<I")
                etype = struct.unpack_from("<I", buf, pos)[0] if vtype == 9 and pos + 4 <= size else None
                val = value(vtype, f"metadata {name!r}")
                types[name] = (vtype, etype)
                if name in meta:
                    raise ModelFileError(path, f"metadata key {name!r} appears twice", bad)
                if name == "general.alignment" and vtype != 4:
                    raise ModelFileError(path, "metadata general.alignment is not a uint32", bad)
                meta[name] = None if val is _BadText or (isinstance(val, list) and _BadText in val) else val
            infos, seen = [], set()
            for i in range(n_tensors):
                name = text(raw_string(f"tensor info #{i}"))
                if name is _BadText:
                    raise ModelFileError(path, f"tensor info #{i}: name is not valid UTF-8", bad)
                if name in seen:
                    raise ModelFileError(path, f"tensor {name} appears twice in the header", bad)
                seen.add(name)
                (n_dims,) = take("<I")
                if n_dims > GGML_MAX_DIMS:
                    raise ModelFileError(path, f"tensor {name} declares {n_dims} dimensions (ggml has at most "
                                         f"{GGML_MAX_DIMS})", bad)
                dims = take(f"<{n_dims}Q")
                qtype, offset = take("<IQ")
                infos.append((name, dims, qtype, offset))
        except _Truncated:
            raise ModelFileError(path, f"truncated GGUF header (ends at byte {size} inside the header)",
                                 "re-download the file") from None
        alignment = meta.get("general.alignment", 32)
        if alignment == 0 or alignment & (alignment - 1):
            raise ModelFileError(path, f"metadata general.alignment = {alignment} is not a power of two", bad)
        data_start = -(-pos // alignment) * alignment
        for name, dims, qtype, offset in infos:
            try:
                block, type_size = GGML_QUANT_SIZES[QT(qtype)]
            except (ValueError, KeyError):
                raise UnsupportedModelError(path, f"tensor {name} has unknown ggml type {qtype}",
                                            "requantize the model to a supported type") from None
            n = 1
            for d in dims:
                n *= d
            if n % block or (dims and dims[0] % block):
                raise ModelFileError(path, f"tensor {name}: {list(dims)} is not whole {QT(qtype).name} "
                                     f"blocks of {block}", bad)
            end = data_start + offset + n // block * type_size
            if end > size:
                raise ModelFileError(path, f"truncated tensor data ({name} ends at byte {end}, file has {size})",
                                     "re-download the file")
        return meta, infos, data_start, types


_BadText = object()      # a string that is not valid UTF-8 (its metadata value reads as None)


class GGUFFile:
    """An open GGUF file: ``meta`` (plain Python values), ``meta_types`` (key -> (GGUF value
    type, element type of an array or None), as the file declares them) and lazily dequantized
    tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        _check_path(self.path)
        size = self.path.stat().st_size
        self.meta, infos, self.data_start, self.meta_types = _parse(self.path, size)
        # the tensors' bytes: one read-only map of the file, viewed (never copied) per tensor
        self._mm = np.memmap(self.path, mode="r") if size else np.zeros(0, np.uint8)
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, qtype, offset in infos:
            t = QT(qtype)
            block, type_size = GGML_QUANT_SIZES[t]
            n = 1
            for d in dims:
                n *= d
            self.tensors[name] = TensorInfo(name, t, np.array(dims, dtype=np.uint64), n,
                                            n // block * type_size, self.data_start + offset, self._mm)
        self._check_block_count()

    def _check_block_count(self) -> None:
        """A block_count beyond the blocks that have tensors is rejected here, before any
        planner or loader loops over (or allocates for) layers that do not exist."""
        arch = self.meta.get("general.architecture")
        n = self.meta.get(f"{arch}.block_count") if isinstance(arch, str) else None
        if not isinstance(n, int) or isinstance(n, bool):
            return
        blocks = {int(k.split(".")[1]) for k in self.tensors if k.startswith("blk.") and k.split(".")[1].isdigit()}
        if n > (max(blocks) + 1 if blocks else 0):
            have = f"blocks 0..{max(blocks)}" if blocks else "no blk.* tensors"
            raise ModelFileError(self.path, f"metadata {arch}.block_count = {n} contradicts the tensors "
                                 f"({have})", "the file is corrupt or incomplete; re-download it")

    @property
    def arch(self) -> str:
        arch = self.meta.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFileError(self.path, "metadata has no general.architecture",
                                 "the file is not a model GGUF")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        value = self.meta.get(key, default)
        return default if value is None else value

    def require(self, key: str) -> Any:
        value = self.meta.get(key)
        if value is None:
            raise ModelFileError(self.path, f"metadata key {key!r} is missing",
                                 "the file is incomplete or for another architecture")
        return value

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        """PyTorch-order shape (ggml order reversed)."""
        t = self._get(name)
        return tuple(int(x) for x in reversed(t.shape.tolist()))

    def qtype(self, name: str) -> QT:
        return self._get(name).tensor_type

    def _get(self, name: str):
        t = self.tensors.get(name)
        if t is None:
            raise ModelFileError(self.path, f"missing tensor {name!r}",
                                 "the file is incomplete or for another architecture")
        return t

    def blocks(self, name: str, shape: tuple[int, ...], qtype: QT) -> torch.Tensor:
        """Tensor ``name``'s bytes as they are in the file (uint8, a read-only view of the mapped
        file, one row of blocks per row of ``shape``), after checking its shape and that it is
        stored as ``qtype``."""
        t = self._get(name)
        if t.tensor_type != qtype:
            raise UnsupportedModelError(self.path, f"tensor {name} is {t.tensor_type.name}, not {qtype.name} "
                                        "blocks", "keep the experts at the weight format (expert_format='weights')")
        if self.shape(name) != tuple(shape):
            raise ModelFileError(self.path, f"tensor {name} has shape {list(self.shape(name))}, metadata "
                                 f"implies {list(shape)}", "the file's metadata contradicts its tensors")
        return _raw_tensor(np.asarray(t.data).reshape(-1).view(np.uint8))

    def tensor(self, name: str, shape: tuple[int, ...] | None = None, *, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name`` in PyTorch order, dequantized to float32 then cast to ``dtype``.

        ``shape`` (if given) is checked. ``device``: where the blocks are decoded and the result
        lives (default cpu). ``out``: a tensor of the final shape and ``dtype`` to fill instead
        (any device, e.g. pinned host memory); it is returned. Work proceeds in chunks of rows
        (about ``DEQUANT_CHUNK_BYTES`` of float32 each), so peak extra memory is one chunk.
        ``dtype`` None is float32."""
        import torch
        dtype = torch.float32 if dtype is None else dtype
        t = self._get(name)
        if t.tensor_type not in SUPPORTED_TYPES:
            allowed = ", ".join(q.name for q in sorted(SUPPORTED_TYPES))
            raise UnsupportedModelError(self.path, f"tensor {name} has unsupported type "
                                        f"{t.tensor_type.name} (supported: {allowed})",
                                        "requantize the model to a supported type")
        want = self.shape(name)
        if shape is not None and tuple(shape) != want:
            raise ModelFileError(self.path, f"tensor {name} has shape {list(want)}, metadata "
                                 f"implies {list(shape)}", "the file's metadata contradicts its tensors")
        if 0 in want:
            raise ModelFileError(self.path, f"tensor {name} has shape {list(want)} with no elements",
                                 "the file is corrupt or was written wrongly; re-download or re-convert it")
        work = torch.device(device if device is not None else "cpu")
        if out is None:
            out = torch.empty(want, dtype=dtype, device=work)
        elif tuple(out.shape) != want or out.dtype != dtype or not out.is_contiguous():
            raise ModelFileError(self.path, f"tensor {name}: out= is {tuple(out.shape)} {out.dtype}, "
                                 f"needs contiguous {want} {dtype}", "allocate out with the tensor's shape")
        row_len = want[-1] if want else 1
        n_rows = out.numel() // max(row_len, 1)
        raw = np.asarray(t.data).reshape(-1).view(np.uint8).reshape(n_rows, -1)   # [rows, row bytes]
        dst = out.view(n_rows, row_len)
        step = max(1, min(n_rows, DEQUANT_CHUNK_BYTES // (4 * max(row_len, 1))))
        direct = dtype == torch.float32 and out.device == work      # decode straight into out
        buf = None if direct else torch.empty(step, row_len, dtype=torch.float32, device=work)
        for r0 in range(0, n_rows, step):
            rows = raw[r0:r0 + step]
            x = dst[r0:r0 + step] if direct else buf[:len(rows)]
            _decode_rows(t.tensor_type, rows, row_len, work, x)
            if not direct:   # cast where the values are (device -> host moves the stored dtype)
                dst[r0:r0 + step].copy_(x if out.device == work else x.to(dtype))
        return out

    def tensor_q8(self, name: str, shape: tuple[int, int], *, device: str | torch.device | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """Matrix ``name`` [N, K] as a Q8_0 matrix (``engine.qweights``: int8 [N, K + K/16]).
        Stored as Q8_0 in the file: its bytes exactly, no arithmetic. Stored otherwise: decoded
        to float32 and quantised (``gguf.quants``' Q8_0 arithmetic) on ``device`` (default cpu),
        ``DEQUANT_CHUNK_BYTES`` of float32 rows at a time. ``out``: a matrix to fill instead
        (any device, e.g. pinned host memory); it is returned."""
        import torch
        from . import qweights
        t = self._get(name)
        n, k = shape
        if self.shape(name) != (n, k):
            raise ModelFileError(self.path, f"tensor {name} has shape {list(self.shape(name))}, metadata "
                                 f"implies {list(shape)}", "the file's metadata contradicts its tensors")
        if k % qweights.QK or t.tensor_type not in SUPPORTED_TYPES:
            raise UnsupportedModelError(self.path, f"tensor {name} ({t.tensor_type.name}, rows of {k}) cannot be "
                                        f"stored as Q8_0 (rows must be whole {qweights.QK}-value blocks)",
                                        "use weight_format f32, bf16 or f16")
        work = torch.device(device if device is not None else "cpu")
        if out is None:
            out = qweights.empty(n, k, work)
        elif tuple(out.shape) != (n, qweights.row_bytes(k)) or out.dtype != torch.int8 or not out.is_contiguous():
            raise ModelFileError(self.path, f"tensor {name}: out= is {tuple(out.shape)} {out.dtype}, needs "
                                 f"contiguous int8 {(n, qweights.row_bytes(k))}", "allocate it with engine.qweights.empty")
        raw = np.asarray(t.data).reshape(-1).view(np.uint8).reshape(n, -1)
        step = max(1, min(n, DEQUANT_CHUNK_BYTES // (4 * k)))
        buf = None if t.tensor_type == QT.Q8_0 else torch.empty(step, k, dtype=torch.float32, device=work)
        for r0 in range(0, n, step):
            rows = raw[r0:r0 + step]
            if buf is None:            # the file's own blocks: reordered, never recomputed
                qweights.from_ggml(_raw_tensor(rows), out=out[r0:r0 + len(rows)])
                continue
            x = buf[:len(rows)]
            _decode_rows(t.tensor_type, rows, k, work, x)
            q = qweights.quantize(x)
            out[r0:r0 + len(rows)].copy_(q)
        return out


DEQUANT_CHUNK_BYTES = 64 << 20     # float32 bytes decoded per chunk


def _decode_rows(qtype: QT, rows: np.ndarray, row_len: int, work: torch.device, x: torch.Tensor) -> None:
    """Raw rows of a tensor's bytes decoded into float32 ``x`` [len(rows), row_len] on ``work``."""
    import torch
    if qtype in TORCH_DECODERS:
        dequantize_torch(_raw_tensor(rows).to(work), qtype, out=x)
    else:
        with np.errstate(invalid="ignore", over="ignore"):   # inf/NaN scales decode as they are
            x.copy_(torch.from_numpy(dequantize(rows, qtype).reshape(-1, row_len)))


def _raw_tensor(rows: np.ndarray) -> torch.Tensor:
    """A uint8 tensor over the memory-mapped bytes without copying them (never written to)."""
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)    # "non-writable array": we only read it
        return torch.from_numpy(rows)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 fields from byte columns [n, 2] -> float32 [n, 1, 1]."""
    import torch
    return b.contiguous().view(torch.float16).float()[:, :, None]


def _nibbles(qs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """ggml 4-bit packing: byte j holds value j (low nibble) and j+16 (high) -> out [n, 2, 16]."""
    out[:, 0].copy_(qs & 0x0F)
    out[:, 1].copy_(qs >> 4)
    return out


# Decoders write float32 into ``out`` with gguf.quants' operation order (same roundings):
# Q8_0 q*d, Q4_0 (q-8)*d (q-8 is exact in float32), Q4_1 d*q + m.
def _q8_0(b, out):
    import torch
    return out.copy_(b[:, 2:].view(torch.int8)).mul_(_f16(b[:, :2])[:, :, 0])


def _q4_0(b, out):
    return _nibbles(b[:, 2:], out.view(-1, 2, 16)).sub_(8).mul_(_f16(b[:, :2]))


def _q4_1(b, out):
    return _nibbles(b[:, 4:], out.view(-1, 2, 16)).mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


def _as(dtype_name: str):
    """decode for a float type: the bytes viewed as ``torch.<dtype_name>``, copied into ``out``."""
    def decode(b, out):
        import torch
        return out.copy_(b.contiguous().view(getattr(torch, dtype_name)))
    return decode


TORCH_DECODERS = {   # qtype -> (bytes per block, decode(raw [n, bytes] uint8, out [n, values] f32))
    QT.F32: (4, _as("float32")),
    QT.F16: (2, _as("float16")),
    QT.BF16: (2, _as("bfloat16")),
    QT.Q8_0: (34, _q8_0),
    QT.Q4_0: (18, _q4_0),
    QT.Q4_1: (20, _q4_1),
}


def dequantize_torch(raw: torch.Tensor, qtype: QT, out: torch.Tensor | None = None) -> torch.Tensor:
    """Raw GGUF bytes (uint8, whole blocks, any shape) -> float32 values, decoded on ``raw``'s
    device with the arithmetic of ``gguf.quants.dequantize`` (bit-identical). ``out``: a
    contiguous float32 tensor with room for exactly the decoded values (returned, flattened)."""
    import torch
    size, fn = TORCH_DECODERS[qtype]
    block = GGML_QUANT_SIZES[qtype][0]
    b = raw.reshape(-1, size)
    if out is None:
        out = torch.empty(b.shape[0] * block, dtype=torch.float32, device=raw.device)
    fn(b, out.view(b.shape[0], block))
    return out.view(-1)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    return GGUFFile(path)
