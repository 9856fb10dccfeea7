"""The kernel-precision axis (engine/attn_math.py) against independent references.

q8_0 query conversion equals ``gguf.quants`` Q8_0 quantize + dequantize bit for bit; bf16
equals numpy's round-to-nearest-even on the float32 bits; ``exact`` and fp32 K leave the query
untouched; an unknown mode or a K format without a conversion is a ConfigError.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from engine import attn_math
from engine.errors import ConfigError


def _q(seed=0, shape=(5, 4, 64)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x[0, 0, :32] = 0.0                     # an all-zero block: scale 0, values 0
    x[1, 1, 5] = 1e4                       # one outlier dominating its block
    return x


def test_q8_0_conversion_equals_gguf_quants_round_trip():
    x = _q()
    want = dequantize(quantize(x.numpy(), QT.Q8_0), QT.Q8_0).reshape(x.shape)
    got = attn_math.q_for_k(x, "q8_0", "ggml-cpu")
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want)
    assert not torch.equal(got, x)


def test_bf16_conversion_is_round_to_nearest_even_of_the_float32_bits():
    x = _q(1)
    u = x.numpy().view(np.uint32).astype(np.uint64)
    rne = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16).astype(np.uint32).view(np.float32)
    got = attn_math.q_for_k(x, "bf16", "ggml-cpu")
    assert np.array_equal(got.numpy(), rne)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "q8_0"])
def test_exact_mode_and_fp32_k_leave_the_query_alone(fmt):
    x = _q(2)
    assert attn_math.q_for_k(x, fmt, "exact") is x
    assert attn_math.q_for_k(x, "fp32", "ggml-cpu") is x


def test_unknown_mode_and_unconvertible_format_are_config_errors():
    with pytest.raises(ConfigError, match="attention maths 'fast' is unknown"):
        attn_math.check_mode("fast")
    with pytest.raises(ConfigError, match="no query conversion"):
        attn_math.q_for_k(_q(), "q4_0", "ggml-cpu")
    with pytest.raises(ConfigError, match="divisible by 32"):
        attn_math.q_for_k(torch.ones(2, 2, 48), "q8_0", "ggml-cpu")
