"""Bad input to the engine: each case an engine.errors exception with a one-line message."""
from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest

import engine
from engine.errors import ConfigError, ModelFileError, ModelNotFoundError, UnsupportedModelError


def one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


def write_gguf(path, arch="llama", drop=(), n_head=2):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_head_count(n_head)
    w.add_head_count_kv(1)
    w.add_feed_forward_length(16)
    w.add_context_length(64)
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (32, 8), "output_norm.weight": (8,),
        "blk.0.attn_norm.weight": (8,), "blk.0.attn_q.weight": (8, 8),
        "blk.0.attn_k.weight": (4, 8), "blk.0.attn_v.weight": (4, 8),
        "blk.0.attn_output.weight": (8, 8), "blk.0.ffn_norm.weight": (8,),
        "blk.0.ffn_gate.weight": (16, 8), "blk.0.ffn_up.weight": (16, 8),
        "blk.0.ffn_down.weight": (8, 16),
    }
    for name, shape in shapes.items():
        if name not in drop:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_handmade_file_loads(tmp_path):
    eng = engine.load(write_gguf(tmp_path / "ok.gguf"), ctx=16)
    assert eng.logits([1, 2, 3]).shape == (3, 32)


def test_not_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip file" * 10)
    with pytest.raises(ModelFileError) as e:
        engine.load(p)
    assert "not a GGUF file" in one_line(e) and str(p) in one_line(e)


def test_truncated(tmp_path):
    p = write_gguf(tmp_path / "full.gguf")
    data = p.read_bytes()
    for cut in (6, 40, len(data) // 2, len(data) - 10):
        q = tmp_path / f"cut{cut}.gguf"
        q.write_bytes(data[:cut])
        with pytest.raises(ModelFileError) as e:
            engine.load(q)
        assert str(q) in one_line(e)


def test_unknown_architecture(tmp_path):
    p = write_gguf(tmp_path / "m.gguf", arch="mamba9")
    with pytest.raises(UnsupportedModelError) as e:
        engine.load(p)
    assert "mamba9" in one_line(e) and "supported" in one_line(e)


def test_missing_tensor(tmp_path):
    p = write_gguf(tmp_path / "m.gguf", drop=("blk.0.ffn_up.weight",))
    with pytest.raises(ModelFileError) as e:
        engine.load(p)
    assert "blk.0.ffn_up.weight" in one_line(e)


def test_metadata_contradicts_shapes(tmp_path):
    p = write_gguf(tmp_path / "m.gguf", n_head=4)
    with pytest.raises(ModelFileError) as e:
        engine.load(p)
    assert "contradicts" in one_line(e)


def test_unknown_registry_name():
    with pytest.raises(ModelNotFoundError) as e:
        engine.load("smollm2-13m")
    msg = one_line(e)
    assert "smollm2-13m" in msg and "smollm2-135m" in msg


def test_user_model_absent_names_file_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_MODELS_DIR", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as e:
        engine.load("coder30b")
    msg = one_line(e)
    assert "Qwen3-Coder-30B-A3B-Instruct-Q4_K_M.gguf" in msg and str(tmp_path) in msg


def test_directory_and_empty_file(tmp_path):
    with pytest.raises(ModelFileError, match="directory"):
        engine.load(tmp_path)
    empty = tmp_path / "e.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        engine.load(empty)


def test_bad_settings(tmp_path):
    p = write_gguf(tmp_path / "ok.gguf")
    with pytest.raises(ConfigError, match="kv_dtype"):
        engine.load(p, kv_dtype="fp8")
    with pytest.raises(ConfigError, match="ctx"):
        engine.load(p, ctx=0)
