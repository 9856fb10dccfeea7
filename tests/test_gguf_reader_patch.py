"""tests/_gguf_reader_patch.py (gguf.GGUFReader over a plain mmap, large files' readers kept):
what a patched reader reads equals what gguf's own reader reads, and a reader is reused only
for the same, unchanged, large file."""
from __future__ import annotations

import os
import time

import gguf
import numpy as np
import pytest
from gguf import gguf_reader

from _gguf_reader_patch import MEMO_MIN_BYTES, install


def _fields_and_tensors(r) -> tuple[dict, list]:
    fields = {k: (list(f.types), [np.asarray(p).tobytes() for p in f.parts]) for k, f in r.fields.items()}
    tensors = [(t.name, t.tensor_type, list(t.shape), int(t.data_offset), np.asarray(t.data).tobytes())
               for t in r.tensors]
    return fields, tensors


def _write(path, n_values: int, fill: float) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("t.name", "ünïcode")
    w.add_array("t.ints", [3, 1, 4, 1, 5])
    w.add_tensor("x", np.full(n_values, fill, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_installed_and_gguf_names_the_patched_reader():
    assert install()
    assert gguf.GGUFReader is gguf_reader.GGUFReader and getattr(gguf.GGUFReader, "_kvbench_patched", False)


def test_patched_reader_reads_what_gguf_reads_on_a_real_model(smollm2_path, monkeypatch):
    assert install()
    patched = gguf.GGUFReader(smollm2_path, "r")
    assert type(patched.data) is np.ndarray and not patched.data.flags.writeable
    with monkeypatch.context() as m:     # gguf's own reader: its module's numpy, np.memmap
        m.setattr(gguf_reader, "np", np)
        ref = gguf.GGUFReader._kvbench_orig(smollm2_path, "r")
    assert isinstance(ref.data, np.memmap)
    got, want = _fields_and_tensors(patched), _fields_and_tensors(ref)
    assert got[0].keys() == want[0].keys() and got[0] == want[0]
    assert len(got[1]) == len(want[1]) > 100 and got[1] == want[1]


def test_large_files_reuse_a_reader_until_they_change_small_files_never(tmp_path):
    assert install()
    big = tmp_path / "big.gguf"
    _write(big, MEMO_MIN_BYTES // 4 + 1024, 1.5)
    a, b = gguf.GGUFReader(big), gguf.GGUFReader(str(big), "r")
    assert a is b and float(a.tensors[0].data[0]) == 1.5
    assert gguf.GGUFReader(big, "r+") is not a                  # a writable reader is its own
    time.sleep(0.01)
    _write(big, MEMO_MIN_BYTES // 4 + 1024, -2.0)               # same size, new bytes
    os.utime(big, ns=(time.time_ns(), time.time_ns() + 10**9))  # and surely a new mtime
    c = gguf.GGUFReader(big)
    assert c is not a and float(c.tensors[0].data[0]) == -2.0
    small = tmp_path / "small.gguf"
    _write(small, 1024, 3.0)
    s1 = gguf.GGUFReader(small)
    _write(small, 1024, 4.0)                                    # rewritten within the same tick
    s2 = gguf.GGUFReader(small)
    assert s1 is not s2 and float(s2.tensors[0].data[0]) == 4.0


def test_a_bad_file_still_raises_gguf_s_error(tmp_path):
    assert install()
    p = tmp_path / "not.gguf"
    p.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="magic"):
        gguf.GGUFReader(p)
