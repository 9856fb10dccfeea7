"""benchmarks/stream_bound.py: the one-launch streaming kernel reads every word exactly once.

Each program XOR-sums its contiguous chunk of the buffer; checked against a plain torch XOR over
the same chunk (the last one ragged), so a bound kernel that skipped words or read some twice
(and so would time less or more than the bytes it claims) fails here. Interpreted on the CPU,
compiled on CUDA."""
from __future__ import annotations

import subprocess
import sys
from functools import reduce
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from stream_bound import stream_launch  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _xor(t: torch.Tensor) -> int:
    return reduce(lambda a, b: a ^ b, t.flatten().tolist(), 0)


@pytest.mark.parametrize("n_words,chunk,block", [(1000, 256, 128), (4096, 1024, 1024), (777, 512, 256)])
def test_stream_reads_each_word_once(n_words, chunk, block):
    gen = torch.Generator(device=DEV).manual_seed(n_words)
    buf = torch.randint(-2 ** 31, 2 ** 31 - 1, (n_words,), device=DEV, dtype=torch.int32, generator=gen)
    launch = stream_launch(n_words, chunk, block, num_warps=4, pdl=False, dev=torch.device(DEV))
    launch(buf)
    got = launch.out.cpu().tolist()
    assert len(got) == -(-n_words // chunk)
    want = [_xor(buf[p * chunk:(p + 1) * chunk].cpu()) for p in range(len(got))]
    assert got == want


def test_stream_refuses_a_ragged_tile():
    with pytest.raises(ValueError, match="multiple of block"):
        stream_launch(1000, 300, 128, num_warps=4, pdl=False, dev=torch.device(DEV))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU side of the CLI: it refuses without CUDA")
def test_cli_without_cuda_is_one_line_exit_2():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stream_bound.py")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: stream_bound needs CUDA") and "Traceback" not in r.stderr
