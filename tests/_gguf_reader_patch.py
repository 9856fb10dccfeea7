"""Test-only speed-up of ``gguf.GGUFReader`` on large model files.

Contract. ``gguf.GGUFReader`` (the independent reference that HF transformers and several tests
read GGUF files with) maps the file as an ``np.memmap`` and takes one numpy view per metadata
value: gemma3-270m's 262144-token vocabulary is ~2.1 M views, and ``np.memmap``'s Python-level
``__getitem__`` / ``__array_finalize__`` make each one slow (22 s a parse on the 2-core CI box).
HF transformers parses the same file twice for one ``from_pretrained`` (config, then weights),
and again for a tokenizer.

``install()`` changes two things, neither of which changes a value read:
- read-only readers (mode ``"r"``) map the file through ``mmap`` and ``np.frombuffer``: the same
  read-only bytes as a plain ``ndarray``, whose views cost no Python code (gemma3: 22 -> 11 s).
  Other modes keep ``np.memmap``;
- readers of files of at least ``MEMO_MIN_BYTES`` (real model weights, which no test rewrites)
  are kept per process and handed out again while the file's identity (device, inode, size,
  modification time) is unchanged. Smaller files (the ones tests write, fuzz and rewrite) are
  parsed every time.

``tests/test_gguf_reader_patch.py`` holds the patched reader to the unpatched one (every field's
parts and every tensor's bytes) and checks the memo's rules. If ``gguf.gguf_reader`` lacks the
names it wraps (another version), it installs nothing and says so by returning False.
"""
from __future__ import annotations

import mmap
import os
import types

import numpy as np

MEMO_MIN_BYTES = 64 << 20


class _NumpyShim(types.ModuleType):
    """numpy, but ``memmap(path, mode="r")`` is a plain read-only ndarray over an mmap."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def memmap(path, mode="r", *args, **kwargs):
        if mode != "r" or args or kwargs:
            return np.memmap(path, mode=mode, *args, **kwargs)
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:      # mmap refuses empty files; so does memmap
                return np.memmap(path, mode=mode)
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(m, dtype=np.uint8)


def _identity(path) -> tuple | None:
    try:
        st = os.stat(path)
    except (OSError, TypeError, ValueError):
        return None
    if st.st_size < MEMO_MIN_BYTES:
        return None
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def install() -> bool:
    """Patch ``gguf.gguf_reader`` once; True when the patch is (now) in place."""
    try:
        import gguf
        from gguf import gguf_reader
    except Exception:
        return False
    orig = getattr(gguf_reader, "GGUFReader", None)
    if orig is None or getattr(gguf_reader, "np", None) is None:
        return False
    if getattr(orig, "_kvbench_patched", False):
        return True
    gguf_reader.np = _NumpyShim("numpy")
    memo: dict = {}

    class GGUFReader(orig):
        _kvbench_patched = True

        def __new__(cls, path, mode="r"):
            key = _identity(path) if mode == "r" else None
            if key is not None and key in memo:
                return memo[key]
            self = super().__new__(cls)
            self._kvbench_key = key
            return self

        def __init__(self, path, mode="r"):
            if getattr(self, "_kvbench_ready", False):
                return
            super().__init__(path, mode)
            self._kvbench_ready = True
            if self._kvbench_key is not None:
                memo[self._kvbench_key] = self

    GGUFReader.__name__ = GGUFReader.__qualname__ = "GGUFReader"
    GGUFReader.__doc__ = orig.__doc__
    GGUFReader._kvbench_memo = memo
    GGUFReader._kvbench_orig = orig
    gguf_reader.GGUFReader = GGUFReader
    gguf.GGUFReader = GGUFReader
    return True
