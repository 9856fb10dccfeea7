"""Out-of-memory on CPU through an injected allocator failure: one line with the plan's numbers.

The injection is the real failure type: ``torch.OutOfMemoryError`` raised from
``engine.ledger.Ledger.alloc`` (every scratch buffer of a load goes through it) or from the
model's forward pass (prefill). The engine CLI must turn it into ``error: out of memory ...``
(exit 2) carrying the planner's trunk/host totals for the same request, the free memory and a
fix; never a traceback (exit 3).

On the H100 (2026-11-25) the same path was driven by a real CUDA allocator failure (caching
allocator capped at 100 MiB with set_per_process_memory_fraction, planner budget = 78 GiB
driver-free): ``generate --device cuda`` exited 2 with "out of memory on cuda during load
[... Tried to allocate 256.00 MiB]; plan ... trunk 512.21 MiB ..."; ``plan --vram-budget
100MiB`` exited 2 with the planner's essentials (512.14 MiB) before allocating.

    .venv/bin/pytest -q tests/test_oom.py
"""
from __future__ import annotations

import pytest
import torch

from engine import cli, planner, synth
from engine.errors import OutOfMemoryError, out_of_memory
from engine.ledger import Ledger
from engine.model import Transformer

MODEL = "tiny-qwen3"


def _raise_oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of memory"), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.fixture(scope="module")
def model_path():
    return synth.ensure(MODEL)


@pytest.fixture
def small_path(tmp_path):
    from test_cli_errors import write_gguf   # a 1-layer llama without tokenizer: opens in ms
    return write_gguf(tmp_path / "small.gguf")


def test_load_oom_through_cli_names_the_plan(small_path, monkeypatch, capsys):
    model_path = small_path
    calls = []

    def failing_alloc(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("category"))
        _raise_oom()

    monkeypatch.setattr(Ledger, "alloc", failing_alloc)
    rc = cli.main(["generate", str(model_path), "hi", "--ctx", "256", "--kv-dtype", "bf16"])
    assert rc == 2 and calls == ["scratch"]   # the first scratch allocation failed
    line = _one_error_line(capsys)
    # the planner's numbers for the same request (metadata only, computed here afresh)
    p = planner.plan(planner.spec_for_model(str(model_path)), kv_dtype="bf16", ctx=256, device="cpu")
    for value in (p.trunk.total, p.trunk.weights, p.trunk.kv, p.trunk.scratch, p.host.total):
        assert _mib(value) in line, (_mib(value), line)
    assert "during load" in line and "kv bf16" in line and "free now" in line
    assert "--vram-budget" in line and "Tried to allocate 20.00 GiB" in line


def test_prefill_oom_through_cli_names_the_plan(model_path, monkeypatch, capsys):
    monkeypatch.setattr(Transformer, "forward", _raise_oom)
    rc = cli.main(["generate", str(model_path), "What is the capital of France?", "--ctx", "256"])
    assert rc == 2
    line = _one_error_line(capsys)
    p = planner.plan(planner.spec_for_model(str(model_path)), kv_dtype="fp32", ctx=256, device="cpu")
    assert "during prefill/decode" in line and _mib(p.trunk.total) in line and _mib(p.trunk.kv) in line


def test_out_of_memory_message_without_plan_is_still_one_actionable_line():
    err = out_of_memory("wave prefill", None, "cpu", torch.OutOfMemoryError("a\nb"))
    assert isinstance(err, OutOfMemoryError)
    msg = str(err)
    assert "\n" not in msg and "during wave prefill" in msg and "no plan was made" in msg
    assert "--vram-budget" in msg and "free now" in msg
