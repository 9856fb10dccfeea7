"""GGUF access through the upstream ``gguf`` package: open, metadata, tensors as torch.

Contract: ``open_gguf(path)`` returns a ``GGUFFile`` or raises ``ModelFileError`` with a
one-line reason (missing, directory, unreadable, empty, not GGUF, truncated, bad version).
Tensors come back as float32 torch tensors in PyTorch order (ggml shape reversed),
dequantized by ``gguf.quants.dequantize``; no GGUF parsing or block decoding lives here.

    g = open_gguf("model.gguf")
    g.meta["general.architecture"], g.tensor("blk.0.attn_q.weight").shape
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize

from .errors import ModelFileError, UnsupportedModelError

SUPPORTED_TYPES = {
    QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
    QT.Q4_K, QT.Q5_K, QT.Q6_K,
}
GGUF_MAGIC = b"GGUF"


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


class GGUFFile:
    """An open GGUF file: ``meta`` (plain Python values) and lazily dequantized tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        _check_path(self.path)
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
        file_size = self.path.stat().st_size
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > file_size:
                raise ModelFileError(self.path, f"truncated tensor data ({t.name} ends at byte "
                                     f"{t.data_offset + t.n_bytes}, file has {file_size})",
                                     "re-download the file")

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
