"""GGUF access through the upstream ``gguf`` package: open, metadata, tensors as torch.

Contract: ``open_gguf(path)`` returns a ``GGUFFile`` or raises ``ModelFileError`` with a
one-line reason (missing, directory, unreadable, empty, not GGUF, truncated, bad version).
Tensors come back as float32 torch tensors in PyTorch order (ggml shape reversed),
dequantized by ``gguf.quants.dequantize``; no GGUF parsing or block decoding lives here.

    g = open_gguf("model.gguf")
    g.meta["general.architecture"], g.tensor("blk.0.attn_q.weight").shape
"""
from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGML_QUANT_SIZES, GGUFReader
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


def _prescan(path: Path, size: int) -> None:
    """Walk the header with struct only to check every declared count and size against the
    file size before GGUFReader loops or builds arrays over them (absurd counts, lengths and
    dims from a corrupt file are rejected here, not allocated). Values are skipped, not kept."""
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

        def string(what: str) -> bytes:
            (n,) = take("<Q")
            start = pos
            skip(n, what)
            return bytes(buf[start:pos])

        def value(vtype: int, what: str, depth: int = 0):
            if vtype in _SCALAR_SIZE:
                start = pos
                skip(_SCALAR_SIZE[vtype], what)
                return bytes(buf[start:pos])
            if vtype == 8:
                return string(what)
            if vtype == 9 and depth == 0:
                etype, count = take("<IQ")
                least = _SCALAR_SIZE.get(etype, 8)  # a string or nested array takes >= 8 bytes
                if count * least > size - pos:
                    raise ModelFileError(path, f"{what}: array of {count} elements cannot fit in the "
                                         f"{size - pos} bytes left", "the file is corrupt; re-download it")
                if etype in _SCALAR_SIZE:
                    skip(count * _SCALAR_SIZE[etype], what)
                else:
                    for _ in range(count):
                        value(etype, what, depth + 1)
                return None
            raise ModelFileError(path, f"{what} has unknown value type {vtype}", "the file is corrupt; re-download it")

        try:
            n_tensors, n_kv = take("<QQ")
            if n_kv * 13 > size or n_tensors * 24 > size:  # smallest kv / tensor-info entry
                raise ModelFileError(path, f"truncated or corrupt GGUF header: it declares {n_tensors} tensors and {n_kv} metadata keys, "
                                     f"more than a {size}-byte file can hold", "the file is corrupt; re-download it")
            alignment = 32
            for i in range(n_kv):
                key = string(f"metadata key #{i}")
                (vtype,) = take("<I")
                name = key.decode("utf-8", "replace")
                raw = value(vtype, f"metadata {name!r}")
                if name == "general.alignment" and vtype == 4:
                    alignment = struct.unpack("<I", raw)[0]
            infos = []
            for i in range(n_tensors):
                name = string(f"tensor info #{i}").decode("utf-8", "replace")
                (n_dims,) = take("<I")
                if n_dims > GGML_MAX_DIMS:
                    raise ModelFileError(path, f"tensor {name} declares {n_dims} dimensions (ggml has at most "
                                         f"{GGML_MAX_DIMS})", "the file is corrupt; re-download it")
                dims = take(f"<{n_dims}Q")
                qtype, offset = take("<IQ")
                infos.append((name, dims, qtype, offset))
        except _Truncated:
            raise ModelFileError(path, f"truncated GGUF header (ends at byte {size} inside the header)",
                                 "re-download the file") from None
        if alignment == 0 or alignment & (alignment - 1):
            return  # GGUFReader reports a bad alignment itself
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
            end = data_start + offset + n // block * type_size
            if end > size:
                raise ModelFileError(path, f"truncated tensor data ({name} ends at byte {end}, file has {size})",
                                     "re-download the file")


class GGUFFile:
    """An open GGUF file: ``meta`` (plain Python values) and lazily dequantized tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        _check_path(self.path)
        _prescan(self.path, self.path.stat().st_size)
        try:
            self.reader = GGUFReader(self.path, "r")
        except (ValueError, IndexError, KeyError, OverflowError, MemoryError, EOFError, OSError,
                TypeError, UnicodeDecodeError) as exc:
            raise ModelFileError(self.path, f"corrupt or truncated GGUF ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})",
                                 "re-download or regenerate the file") from None
        self.meta: dict[str, Any] = {}
        for name, field in self.reader.fields.items():
            try:
                self.meta[name] = field.contents()
            except Exception:  # noqa: BLE001 - a malformed field is reported when used
                self.meta[name] = None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._check_block_count()
        file_size = self.path.stat().st_size
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > file_size:
                raise ModelFileError(self.path, f"truncated tensor data ({t.name} ends at byte "
                                     f"{t.data_offset + t.n_bytes}, file has {file_size})",
                                     "re-download the file")

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

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Dequantized float32 tensor in PyTorch order; ``shape`` (if given) is checked."""
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
        if t.tensor_type == QT.F32:
            arr = np.asarray(t.data, dtype=np.float32)
        else:
            arr = dequantize(np.asarray(t.data), t.tensor_type)
        arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(want)
        return torch.from_numpy(arr.copy())


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    return GGUFFile(path)
