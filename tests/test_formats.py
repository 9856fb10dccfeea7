"""engine/formats.py owns the format facts; they agree with the independent references
(gguf's GGML_QUANT_SIZES for block formats, numpy/torch item sizes for plain types), and the
planner, the KV caches (engine.kv_layout) and the kernels read them: a format added there is
priced and allocated everywhere (its kernels are the other half)."""
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


def test_a_new_format_is_one_entry_for_the_caches_too(monkeypatch):
    """The caches allocate and recognise formats from the table (engine.kv_layout): a plain fp8
    e4m3 entry and a 4-bit block entry, added there only, get buffers of exactly the bytes the
    planner prices, in the element type / byte layout the entry says, read back as that dtype
    (the observable), with the block guard on a ragged row. Their kernels are the other half."""
    from engine.kv import LayerKV, kv_bytes_per_token, make_layer_kv
    from engine.kv_layout import alloc_kv, buffer_format
    from engine.kv_ring import RingKV
    monkeypatch.setitem(formats.KV, "fp8_e4m3", formats.Format("fp8_e4m3", 1, 1, "fp8 e4m3", "float8_e4m3fn"))
    monkeypatch.setitem(formats.KV, "q4_0", formats.Format("q4_0", 32, 18))
    spec = spec_for_model("tiny-qwen3")                       # 2 kv heads x 32
    hkv, d = spec.n_kv_heads, spec.head_dim
    for dt, elem in (("fp8_e4m3", torch.float8_e4m3fn), ("q4_0", torch.uint8), ("q8_0", torch.uint8),
                     ("bf16", torch.bfloat16)):
        cache = make_layer_kv(spec, 0, 100, dt, "cpu")
        assert cache.k.dtype == elem and cache.dtype == dt
        assert [cache.k.nbytes, cache.v.nbytes] == kv_buffer_bytes(spec, 100, dt)
        assert cache.nbytes == 100 * kv_bytes_per_token(hkv, d, dt)
        ring = RingKV(0, hkv, d, 4096, window=128, dtype=dt)
        assert ring.dtype == dt and ring.k.nbytes == ring.rows * formats.kv_row_bytes(dt, hkv, d)
    # independent of our table: fp8 is one byte a value, q4_0 is gguf's 18 bytes per 32
    q4 = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_0]
    assert alloc_kv(10, hkv, d, "q4_0").shape == (10, hkv * d // q4[0] * q4[1])
    assert alloc_kv(10, hkv, d, "fp8_e4m3").nbytes == 10 * hkv * d * torch.finfo(torch.float8_e4m3fn).bits // 8
    assert buffer_format(torch.zeros(10, hkv * d // 32 * 18, dtype=torch.uint8), hkv, d) == "q4_0"
    with pytest.raises(KVGeometryError, match=r"layer 3: kv_dtype q4_0 needs n_kv_heads\*head_dim % 32 == 0"):
        LayerKV(3, 3, 16, 8, "q4_0")
    monkeypatch.delitem(formats.KV, "q4_0")
    with pytest.raises(ConfigError, match="kv_dtype 'q4_0' is not one of"):
        LayerKV(0, hkv, d, 8, "q4_0")


def test_q8_0_geometry_is_read_not_rewritten():
    """The engine's owners of KV bytes read engine.formats: no second table of q8_0 block sizes,
    wave budgets or allocator rounding in the engine's source (comments and docstrings aside)."""
    import ast
    import re
    from pathlib import Path
    root = Path(formats.__file__).parent
    offenders = []
    for p in [root / "kv.py", root / "kv_ring.py", root / "kv_layout.py", root / "ledger.py",
              *sorted((root / "kernels").glob("*.py"))]:
        tree = ast.parse(p.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and id(node) not in docs and isinstance(node.value, int) \
                    and node.value in (34, 17, 256 << 20, 8 << 20):
                offenders.append(f"{p.name}:{node.lineno}: {node.value}")
        for i, line in enumerate(p.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"Q8_(BLOCK|BYTES)\s*(,\s*Q8_\w+\s*)?=", code):
                offenders.append(f"{p.name}:{i}: {code.strip()}")
    assert not offenders, offenders
