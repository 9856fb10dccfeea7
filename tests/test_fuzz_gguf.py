"""Fuzz the GGUF loader: mutated real GGUF files load or raise ``engine.errors`` only.

A small valid llama GGUF (F32 and Q8_0 tensors, scalar, string and array metadata) is written
with gguf.GGUFWriter; hypothesis flips bytes, truncates, rewrites the tensor/kv counts and
writes absurd values into the header's own size fields (string lengths, array lengths, dims,
tensor offsets, type ids), whose offsets come from gguf.GGUFReader on the valid file. Each
case runs ``engine.load``: success or an ``EngineError`` are the only outcomes allowed; each
case is bounded in time (SIGALRM) and the whole run in resident-memory growth.
``make test`` runs 500 derandomized cases; ``make fuzz`` sets KVBENCH_FUZZ_EXAMPLES=10000.

    .venv/bin/pytest -q tests/test_fuzz_gguf.py
    KVBENCH_FUZZ_EXAMPLES=10000 .venv/bin/pytest -q tests/test_fuzz_gguf.py
"""
from __future__ import annotations

import os
import resource
import signal
import struct
from datetime import timedelta

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine
from engine.errors import EngineError

N_EXAMPLES = int(os.environ.get("KVBENCH_FUZZ_EXAMPLES", "500"))
CASE_SECONDS = 5           # a hang is a failure, not a stuck CI job
RSS_GROWTH_MIB = 300       # absurd declared sizes must not turn into allocations

ABSURD_U64 = [0, 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
ABSURD_U32 = [0, 1, 5, 9, 13, 31, 255, 2**16, 2**31, 2**32 - 1]


def write_base(path) -> bytes:
    """A valid 1-layer llama, d=32 (Q8_0 matrices, F32 norms), plus array metadata."""
    d, ff, vocab = 32, 64, 40
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(d)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_feed_forward_length(ff)
    w.add_context_length(64)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_array("kvbench.fuzz.ints", [3, 1, 4, 1, 5])
    w.add_array("kvbench.fuzz.words", ["alpha", "", "gamma"])
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (vocab, d), "output_norm.weight": (d,),
        "blk.0.attn_norm.weight": (d,), "blk.0.attn_q.weight": (d, d),
        "blk.0.attn_k.weight": (16, d), "blk.0.attn_v.weight": (16, d),
        "blk.0.attn_output.weight": (d, d), "blk.0.ffn_norm.weight": (d,),
        "blk.0.ffn_gate.weight": (ff, d), "blk.0.ffn_up.weight": (ff, d),
        "blk.0.ffn_down.weight": (d, ff),
    }
    for name, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 2 and name != "token_embd.weight":
            q = quantize(x, QT.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=QT.Q8_0)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def size_fields(path) -> tuple[list[int], list[int]]:
    """Byte offsets of every u64 and u32 header part (lengths, counts, dims, offsets, types)."""
    r = gguf.GGUFReader(path)
    u64, u32 = [], []
    fields = list(r.fields.values()) + [t.field for t in r.tensors]
    for f in fields:
        off = f.offset
        for part in f.parts:
            if part.dtype == np.uint64:
                u64.extend(off + 8 * i for i in range(part.size))
            elif part.dtype == np.uint32:
                u32.extend(off + 4 * i for i in range(part.size))
            off += part.nbytes
    return sorted(set(u64)), sorted(set(u32))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    data = write_base(d / "base.gguf")
    u64, u32 = size_fields(d / "base.gguf")
    return d, data, u64, u32


def mutations(data: bytes, u64: list[int], u32: list[int]):
    n = len(data)
    flips = st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, 255)), min_size=1, max_size=8)
    return st.one_of(
        st.tuples(st.just("flip"), flips),
        st.tuples(st.just("truncate"), st.integers(0, n - 1)),
        st.tuples(st.just("count"), st.tuples(st.sampled_from([8, 16]),
                                               st.one_of(st.sampled_from(ABSURD_U64), st.integers(0, 64)))),
        st.tuples(st.just("u64"), st.tuples(st.sampled_from(u64), st.sampled_from(ABSURD_U64))),
        st.tuples(st.just("u32"), st.tuples(st.sampled_from(u32), st.sampled_from(ABSURD_U32))),
    )


def apply(data: bytes, mutation) -> bytes:
    kind, arg = mutation
    buf = bytearray(data)
    if kind == "flip":
        for pos, x in arg:
            buf[pos] ^= x
    elif kind == "truncate":
        del buf[arg:]
    elif kind in ("count", "u64"):
        struct.pack_into("<Q", buf, arg[0], arg[1])
    elif kind == "u32":
        struct.pack_into("<I", buf, arg[0], arg[1])
    return bytes(buf)


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout(f"one fuzz case ran past {CASE_SECONDS} s")


def load_bounded(path) -> str:
    """engine.load under a hard time bound; EngineError (or success) is the contract.
    Returns "loaded" or the EngineError's class name."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        engine.load(path, ctx=16)
        return "loaded"
    except EngineError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and str(path) in msg, msg
        return type(exc).__name__
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_base_file_loads_and_mutations_hit_real_fields(base):
    d, data, u64, u32 = base
    eng = engine.load(d / "base.gguf", ctx=16)
    assert eng.logits([1, 2, 3]).shape == (3, 40)
    # the size fields found are real: the tensor count sits at byte 8, kv count at 16
    assert struct.unpack_from("<QQ", data, 8) == (11, 10)
    assert {8, 16} <= set(u64) and len(u64) > 30


def test_fuzz_gguf_loader(base):
    d, data, u64, u32 = base
    path = d / "case.gguf"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    @settings(max_examples=N_EXAMPLES, derandomize=True, database=None, deadline=timedelta(seconds=5),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutations(data, u64, u32))
    def case(mutation):
        path.write_bytes(apply(data, mutation))
        outcome = load_bounded(path)
        seen[outcome] = seen.get(outcome, 0) + 1

    seen: dict[str, int] = {}
    case()
    print(f"fuzz outcomes over {sum(seen.values())} cases: {seen}")
    assert sum(seen.values()) >= N_EXAMPLES and seen.get("loaded", 0) > 0 and len(seen) >= 2
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert grown < RSS_GROWTH_MIB, f"peak RSS grew {grown:.0f} MiB during the fuzz run"


@pytest.mark.skipif("KVBENCH_FUZZ_EXAMPLES" not in os.environ,
                    reason="synth tiny-llama fuzz (~2 s a case) runs under `make fuzz` only")
def test_fuzz_synth_tiny_llama(tmp_path):
    from engine import synth
    src = synth.ensure("tiny-llama")
    data = src.read_bytes()
    u64, u32 = size_fields(src)
    path = tmp_path / "case.gguf"

    @settings(max_examples=max(10, N_EXAMPLES // 200), derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutations(data, u64[:4000], u32[:4000]))
    def case(mutation):
        path.write_bytes(apply(data, mutation))
        load_bounded(path)

    case()
