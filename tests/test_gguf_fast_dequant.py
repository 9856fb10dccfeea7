"""Torch block decoding in engine.gguf_io against the oracle ``gguf.quants.dequantize``.

Random blocks with every fp16 scale class (zero, -0, subnormal, max, inf, NaN) and every
payload value (int8 -128..127, all 16 nibbles) must decode to the same float32 bits; so must
``GGUFFile.tensor`` on a GGUF written here with every type (a 3-D expert-like stack; Q6_K /
Q5_0 through the numpy fallback), chunked or not, cast to bf16, into ``out=``, on CUDA.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

import engine.gguf_io as gio
import engine.synth as synth
from engine.errors import ModelFileError
from engine.gguf_io import dequantize_torch, open_gguf

EDGE_F16 = np.array([0.0, -0.0, 6e-8, -6e-8, 1e-5, 65504.0, -65504.0, np.inf, -np.inf, np.nan, 1.0, -0.5],
                    dtype=np.float16)


def random_blocks(qtype: QT, n: int, seed: int) -> np.ndarray:
    """``n`` blocks of random bytes whose fp16 fields are overwritten with edge and random values."""
    rng = np.random.default_rng(seed)
    size = GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    n_f16 = {QT.Q8_0: 1, QT.Q4_0: 1, QT.Q4_1: 2}.get(qtype, 0)
    for k in range(n_f16):
        vals = rng.standard_normal(n).astype(np.float16)
        vals[:len(EDGE_F16)] = EDGE_F16
        vals[len(EDGE_F16):2 * len(EDGE_F16)] = EDGE_F16[::-1]
        raw[:, 2 * k:2 * k + 2] = vals.view(np.uint8).reshape(n, 2)
    if qtype == QT.Q8_0:                      # every int8 payload value appears
        raw[:8, 2:] = np.arange(256, dtype=np.uint8).reshape(8, 32)
    elif qtype in (QT.Q4_0, QT.Q4_1):         # every nibble in both halves
        off = 2 * n_f16
        raw[:16, off:] = (np.arange(16, dtype=np.uint8)[:, None] * 0x11).repeat(16, axis=1)
    elif qtype in (QT.F16, QT.BF16, QT.F32):  # specials among random bit patterns
        item = np.float16 if qtype == QT.F16 else np.float32
        edge = EDGE_F16.astype(item).view(np.uint8)
        if qtype == QT.BF16:
            edge = EDGE_F16.astype(np.float32).view(np.uint32) >> 16
            edge = edge.astype(np.uint16).view(np.uint8)
        raw.reshape(-1)[:edge.size] = edge
    return raw


def bits(x: np.ndarray) -> np.ndarray:
    """float32 bit patterns with every NaN mapped to one value (payloads are not a contract)."""
    b = x.astype(np.float32).view(np.uint32).copy()
    b[np.isnan(x)] = 0x7FC00000
    return b


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.F16, QT.BF16, QT.F32], ids=lambda q: q.name)
def test_blocks_decode_to_the_oracles_bits(qtype):
    block, size = GGML_QUANT_SIZES[qtype]
    n = 4096 // block * block
    raw = random_blocks(qtype, n, seed=int(qtype))
    with np.errstate(invalid="ignore"):
        ref = dequantize(raw, qtype).reshape(-1)
    got = dequantize_torch(torch.from_numpy(raw), qtype).numpy()
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_array_equal(bits(got), bits(ref))
    assert np.isnan(ref).any() and np.isinf(ref).any()   # the edge values really were exercised


MIXED = {   # name -> (qtype, PyTorch shape): every torch-decoded type, a 3-D expert stack, two numpy-path types
    "q8_0": (QT.Q8_0, (96, 64)), "q4_0": (QT.Q4_0, (3, 40, 64)), "q4_1": (QT.Q4_1, (50, 96)),
    "f16": (QT.F16, (33, 64)), "bf16": (QT.BF16, (2, 17, 32)), "f32": (QT.F32, (40, 32)),
    "q6_k": (QT.Q6_K, (12, 256)), "q5_0": (QT.Q5_0, (20, 64)),
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A GGUF (no tokenizer: opens fast) holding random valid blocks of each type in MIXED."""
    import gguf
    path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
    w = gguf.GGUFWriter(path, "llama")
    for i, (name, (qtype, shape)) in enumerate(MIXED.items()):
        block, size = GGML_QUANT_SIZES[qtype]
        rows = int(np.prod(shape[:-1]))
        raw = random_blocks(qtype, rows * shape[-1] // block, seed=100 + i)
        raw = raw.reshape(*shape[:-1], shape[-1] // block * size)
        if qtype == QT.F32:
            w.add_tensor(name, raw.view(np.float32))
        elif qtype == QT.F16:
            w.add_tensor(name, raw.view(np.float16))
        else:
            w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return open_gguf(path)


def oracle(g, name) -> np.ndarray:
    t = g.tensors[name]
    with np.errstate(invalid="ignore"):
        return dequantize(np.array(t.data), t.tensor_type).reshape(g.shape(name))


@pytest.mark.parametrize("chunk", [256, 64 << 20], ids=["many-chunks", "one-chunk"])
def test_file_tensors_equal_gguf_dequantize(mixed, chunk, monkeypatch):
    monkeypatch.setattr(gio, "DEQUANT_CHUNK_BYTES", chunk)
    for name, (qtype, shape) in MIXED.items():
        assert mixed.qtype(name) == qtype and mixed.shape(name) == shape
        ref = oracle(mixed, name)
        got = mixed.tensor(name, shape)
        assert got.dtype == torch.float32 and tuple(got.shape) == shape
        np.testing.assert_array_equal(bits(got.numpy()), bits(ref), err_msg=name)
        half = mixed.tensor(name, dtype=torch.bfloat16)     # cast per chunk == cast of the whole
        np.testing.assert_array_equal(bits(half.float().numpy()),
                                      bits(torch.from_numpy(ref).to(torch.bfloat16).float().numpy()), err_msg=name)


def test_out_buffer_is_filled_and_checked(mixed):
    ref = oracle(mixed, "q4_1")
    out = torch.full(MIXED["q4_1"][1], 7.0, dtype=torch.float16)
    assert mixed.tensor("q4_1", dtype=torch.float16, out=out) is out
    np.testing.assert_array_equal(bits(out.float().numpy()), bits(torch.from_numpy(ref).to(torch.float16).float().numpy()))
    with pytest.raises(ModelFileError, match="out="):
        mixed.tensor("q4_1", out=torch.empty(3, 3))
    with pytest.raises(ModelFileError, match="shape"):
        mixed.tensor("q4_1", (96, 50))


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.F16, QT.BF16], ids=lambda q: q.name)
def test_cuda_decode_equals_the_oracle(qtype):
    raw = random_blocks(qtype, 1 << 14, seed=7)
    with np.errstate(invalid="ignore"):
        ref = dequantize(raw, qtype).reshape(-1)
    got = dequantize_torch(torch.from_numpy(raw).cuda(), qtype).cpu().numpy()
    np.testing.assert_array_equal(bits(got), bits(ref))
    g = open_gguf(synth.ensure("tiny-llama-q4_0"))
    name = "blk.1.ffn_down.weight"
    host = g.tensor(name, dtype=torch.bfloat16)
    assert torch.equal(g.tensor(name, dtype=torch.bfloat16, device="cuda").cpu(), host)
    pinned = torch.empty(host.shape, dtype=torch.bfloat16, pin_memory=True)
    assert torch.equal(g.tensor(name, dtype=torch.bfloat16, device="cuda", out=pinned), host)
