"""engine/formats.py owns the format facts; they agree with the independent references
(gguf's GGML_QUANT_SIZES for block formats, numpy/torch item sizes for plain types), and the
planner and the vram check read them (a format added there is priced everywhere)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from engine import formats
from engine.errors import ConfigError, KVGeometryError
from engine.planner import kv_buffer_bytes, spec_for_model


def test_block_formats_match_ggml():
    q8 = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
    assert (formats.KV["q8_0"].block, formats.KV["q8_0"].block_bytes) == q8
    assert (formats.WEIGHTS["q8_0"].block, formats.WEIGHTS["q8_0"].block_bytes) == q8
    for name, t in (("f32", gguf.GGMLQuantizationType.F32), ("f16", gguf.GGMLQuantizationType.F16),
                    ("bf16", gguf.GGMLQuantizationType.BF16)):
        assert (formats.WEIGHTS[name].block, formats.WEIGHTS[name].block_bytes) == gguf.GGML_QUANT_SIZES[t]


def test_plain_formats_match_item_sizes():
    assert formats.KV["fp32"].block_bytes == np.dtype(np.float32).itemsize
    assert formats.KV["bf16"].block_bytes == torch.tensor([], dtype=torch.bfloat16).element_size()


def test_bytes_and_the_one_geometry_guard():
    assert formats.kv_format("q8_0").bytes_for(512) == 544
    assert formats.kv_row_bytes("bf16", 3, 64) == 384
    with pytest.raises(KVGeometryError, match=r"layer 5: kv_dtype q8_0 needs n_kv_heads\*head_dim % 32 == 0, "
                                              r"but 3 x 16 = 48"):
        formats.check_kv_geometry("q8_0", 3, 16, layer=5)
    formats.check_kv_geometry("bf16", 3, 16)
    with pytest.raises(ConfigError, match="kv_dtype 'fp8' is not one of fp32, bf16, q8_0"):
        formats.kv_format("fp8")
    assert formats.round_alloc(1, "cuda") == 512 and formats.round_alloc(513, "cuda") == 1024
    assert formats.round_alloc(513, "cpu") == 513


def test_a_new_format_is_one_entry(monkeypatch):
    """Pricing follows the table: a 4-bit block format added there (say q4_0: 18 bytes per 32)
    is priced by the planner without touching it."""
    monkeypatch.setitem(formats.KV, "q4_0", formats.Format("q4_0", 32, 18))
    spec = spec_for_model("tiny-qwen3")          # 2 kv heads x 32 = 64 values a row
    assert kv_buffer_bytes(spec, 100, "q4_0") == [100 * 36, 100 * 36]
    assert kv_buffer_bytes(spec, 100, "q8_0") == [100 * 68, 100 * 68]
