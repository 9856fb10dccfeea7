"""The engine's GGUF header parser (engine/gguf_io.py ``_parse``) against gguf's own reader.

The independent reference is ``gguf.GGUFReader``: for real model files (SmolLM2's 49152-token
and gemma3's 262144-token vocabularies, a synthetic MoE) and a file written here with every
metadata value type, the engine's ``meta`` equals ``field.contents()`` for every key and each
tensor's type, shape, offset, byte count and bytes equal the reader's. Corrupt headers that
gguf's reader rejects are a ``ModelFileError`` here (hypothesis mutations are in
tests/test_fuzz_gguf.py).
"""
from __future__ import annotations

import struct
import time

import gguf
import numpy as np
import pytest

from engine import synth
from engine.errors import ModelFileError
from engine.gguf_io import open_gguf


def assert_same_as_gguf(path) -> None:
    ours = open_gguf(path)
    ref = gguf.GGUFReader(path, "r")
    assert list(ours.meta) == list(ref.fields)
    for key, field in ref.fields.items():
        want = field.contents()
        got = ours.meta[key]
        assert type(got) is type(want) and got == want, key
        if isinstance(want, list) and want:
            assert all(type(a) is type(b) for a, b in zip(got, want)), key
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        o = ours.tensors[t.name]
        assert (o.tensor_type, o.n_elements, o.n_bytes, o.data_offset) == \
               (t.tensor_type, t.n_elements, t.n_bytes, t.data_offset), t.name
        assert o.shape.tolist() == t.shape.tolist()
        assert o.data.dtype == t.data.dtype and o.data.shape == t.data.shape, t.name
        assert np.array_equal(o.data.view(np.uint8), np.asarray(t.data).view(np.uint8)), t.name


def test_real_smollm2_header_equals_gguf_reader(smollm2_path):
    assert_same_as_gguf(smollm2_path)


@pytest.mark.slow(seconds=25)
def test_real_gemma3_header_equals_gguf_reader_and_is_fast(gemma3_path):
    t0 = time.perf_counter()
    g = open_gguf(gemma3_path)
    took = time.perf_counter() - t0
    print(f"gemma3-270m header ({len(g.meta['tokenizer.ggml.tokens'])} tokens): {took:.2f} s")
    assert_same_as_gguf(gemma3_path)


def test_synthetic_moe_header_equals_gguf_reader():
    assert_same_as_gguf(synth.ensure("tiny-qwen3moe"))


def test_every_value_type_equals_gguf_reader(tmp_path):
    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "naïve ünïcode ✓")
    w.add_string("t.empty", "")
    w.add_array("t.ints", [3, 1, 4, 1, 5])
    w.add_array("t.floats", [0.5, -1.25, 3e38])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.words", ["alpha", "", "γάμμα"])
    w.add_array("t.none", [])
    rng = np.random.default_rng(0)
    w.add_tensor("a", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("b", rng.standard_normal((2, 7)).astype(np.float16))
    q = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_same_as_gguf(path)
    assert open_gguf(path).meta["t.u64"] == 2**63 + 5


def _kv_file(tmp_path, entries: bytes, n_kv: int, name="bad.gguf"):
    path = tmp_path / name
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, n_kv) + entries)
    return path


def _key(k: str) -> bytes:
    return struct.pack("<Q", len(k)) + k.encode()


@pytest.mark.parametrize("entries,n_kv,match", [  # ids: the expected message
    (_key("a") + struct.pack("<II", 4, 1) + _key("a") + struct.pack("<II", 4, 2), 2, "appears twice"),
    (_key("general.alignment") + struct.pack("<II", 4, 48), 1, "not a power of two"),
    (_key("general.alignment") + struct.pack("<II", 4, 0), 1, "not a power of two"),
    (_key("general.alignment") + struct.pack("<IQ", 10, 32), 1, "not a uint32"),
    (_key("x") + struct.pack("<I", 99), 1, "unknown value type 99"),
    (struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<II", 4, 1), 1, "not valid UTF-8"),
    (_key("x") + struct.pack("<IIQ", 9, 8, 2) + struct.pack("<Q", 1 << 40), 1, "cannot fit"),
])
def test_corrupt_headers_gguf_rejects_are_model_file_errors(tmp_path, entries, n_kv, match):
    path = _kv_file(tmp_path, entries, n_kv)
    with pytest.raises(Exception):            # the reference rejects the file too
        r = gguf.GGUFReader(path, "r")
        _ = [f.contents() for f in r.fields.values()]
        if match == "not valid UTF-8":        # gguf raises on the key name when it decodes it
            raise AssertionError("unreachable")
    with pytest.raises(ModelFileError, match=match):
        open_gguf(path)


def test_a_value_that_is_not_utf8_reads_as_none_as_gguf_cannot_decode_it(tmp_path):
    bad = struct.pack("<Q", 2) + b"\xff\xfe"
    path = _kv_file(tmp_path, _key("s") + struct.pack("<I", 8) + bad
                    + _key("w") + struct.pack("<IIQ", 9, 8, 2) + struct.pack("<Q", 1) + b"a" + bad
                    + _key("ok") + struct.pack("<II", 4, 7), 3)
    ref = gguf.GGUFReader(path, "r")
    for k in ("s", "w"):
        with pytest.raises(UnicodeDecodeError):
            ref.fields[k].contents()
    meta = open_gguf(path).meta
    assert meta["s"] is None and meta["w"] is None and meta["ok"] == 7


def test_nested_arrays_are_refused_though_gguf_reads_them(tmp_path):
    """A deliberate difference: no GGUF model uses arrays of arrays, and the engine has always
    refused them (one bounded walk, no recursion a corrupt file could deepen)."""
    path = _kv_file(tmp_path, _key("x") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 4, 0), 1)
    assert gguf.GGUFReader(path, "r").fields["x"] is not None
    with pytest.raises(ModelFileError, match="nested arrays are not read"):
        open_gguf(path)


def test_a_string_running_past_the_end_is_refused_though_gguf_truncates_it(tmp_path):
    """gguf's reader slices the memory map, so a string whose length runs past the file comes
    back cut short; the engine names the field instead of reading a truncated value."""
    path = _kv_file(tmp_path, _key("x") + struct.pack("<IIQ", 9, 8, 1) + struct.pack("<Q", 1 << 40) + b"ab", 1)
    assert gguf.GGUFReader(path, "r").fields["x"].contents() == ["ab"]
    with pytest.raises(ModelFileError, match="metadata 'x' declares 1099511627776 bytes .* past the end"):
        open_gguf(path)
