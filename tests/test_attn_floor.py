"""benchmarks/attn_floor.py: the floor kernel reads exactly the bytes a decode launch reads.

Each program of the production grid (KV heads x splits of ``split_plan``) XOR-sums its keys' words
of K and V (and q8_0's scale words) in its KV head's columns; checked against a plain torch XOR
over the same rows and columns of the cache, so a floor that skipped or double-read bytes (and so
would time less or more than the launch it bounds) fails here. Interpreted on the CPU, compiled
on CUDA."""
from __future__ import annotations

import sys
from functools import reduce
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from attn_floor import read_floor, words  # noqa: E402
from engine.kernels import decode_attention as dmod  # noqa: E402
from engine.kv import KV_DTYPES, LayerKV  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _xor(t: torch.Tensor) -> int:
    return reduce(lambda a, b: a ^ b, t.flatten().tolist(), 0)


@pytest.mark.parametrize("fmt", KV_DTYPES)
@pytest.mark.parametrize("hkv,d,hq,n", [(2, 128, 8, 100), (3, 64, 9, 77)])
def test_floor_reads_the_launch_bytes(fmt, hkv, d, hq, n):
    gen = torch.Generator(device=DEV).manual_seed(n)
    cache = LayerKV(0, hkv, d, n + 8, fmt, device=DEV)
    cache.write(0, torch.randn(n, hkv, d, device=DEV, generator=gen), torch.randn(n, hkv, d, device=DEV, generator=gen))
    cfg = dict(dmod.resolved_config(fmt, fmt, d), block_n=16, programs_per_sm=4)
    launch = read_floor(fmt, hkv, d, hq, n, cfg, combine=True, pdl=False)
    launch(cache.k, cache.v)
    got = launch.out.cpu().tolist()
    (ka, ks), (va, vs) = words(cache.k, fmt, hkv, d), words(cache.v, fmt, hkv, d)
    per, splits = launch.keys_per_split, launch.splits
    assert splits > 1 and per % 16 == 0
    for h in range(hkv):
        for s in range(splits):
            lo, hi = s * per, min(n, s * per + per)
            w, want = ka.shape[1] // hkv, 0
            if lo < hi:
                want = _xor(ka[lo:hi, h * w:(h + 1) * w].cpu()) ^ _xor(va[lo:hi, h * w:(h + 1) * w].cpu())
                if ks is not None:
                    ws = ks.shape[1] // hkv
                    want ^= _xor(ks[lo:hi, h * ws:(h + 1) * ws].cpu()) ^ _xor(vs[lo:hi, h * ws:(h + 1) * ws].cpu())
            assert got[h * splits + s] == want, f"{fmt} head {h} split {s}"
