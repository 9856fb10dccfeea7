"""Out-of-memory on CPU through an injected allocator failure: one line with the plan's numbers.

The injection is the real failure type: ``torch.OutOfMemoryError`` raised from
``engine.ledger.Ledger.alloc`` (every scratch buffer of a load goes through it), from the
model's forward pass (prefill, decode) or from a wave of attention. ``Engine._step`` turns it
into ``engine.errors.OutOfMemoryError`` naming the stage, and the engine CLI prints that as
``error: out of memory ...`` (exit 2) carrying the planner's trunk/host totals for the same
request, the free memory and a fix; never a traceback (exit 3). (Waves that fail and succeed
smaller are tests/test_wave_oom.py.)

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

import engine
from engine import cli, kv as kvmod, planner, synth
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
    assert "during prefill of" in line and _mib(p.trunk.total) in line and _mib(p.trunk.kv) in line


def test_wave_prefill_oom_through_cli(model_path, monkeypatch, capsys):
    """A chat prompt is one chunk: a wave that cannot be split fails at once, named as such."""
    monkeypatch.setattr(kvmod, "prefill_attention_ref", _raise_oom)
    rc = cli.main(["generate", str(model_path), "What is the capital of France?", "--ctx", "256"])
    assert rc == 2
    line = _one_error_line(capsys)
    assert "during wave prefill of" in line and "layer 0: the smallest wave" in line
    assert "(smaller-wave retries: 0)" in line and "Tried to allocate 20.00 GiB" in line


@pytest.fixture(scope="module")
def eng(model_path):
    return engine.load(model_path, kv_dtype="q8_0", ctx=128)


def _plan_numbers(kv_dtype: str, ctx: int) -> list[str]:
    p = planner.plan(planner.spec_for_model(MODEL), kv_dtype=kv_dtype, ctx=ctx, device="cpu")
    return [_mib(v) for v in (p.trunk.total, p.trunk.weights, p.trunk.kv, p.trunk.scratch, p.host.total)]


def test_engine_raises_out_of_memory_error_in_prefill(eng, monkeypatch):
    monkeypatch.setattr(Transformer, "forward", _raise_oom)
    with pytest.raises(OutOfMemoryError) as e:
        eng.logits(list(range(10, 50)))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("out of memory on cpu during prefill of 40 tokens at position 0 [")
    assert "kv q8_0" in msg and all(n in msg for n in _plan_numbers("q8_0", 128)), msg
    assert e.value.__suppress_context__                   # raised from None: one clean error


def test_engine_raises_out_of_memory_error_in_decode(eng, monkeypatch):
    eng.prefill(list(range(10, 30)))
    monkeypatch.setattr(Transformer, "forward", _raise_oom)
    with pytest.raises(OutOfMemoryError, match=r"during decode at position 20 \[OutOfMemoryError"):
        eng.decode(7)
    assert eng.pos == 20                                   # the failed step did not advance


def test_out_of_memory_message_without_plan_is_still_one_actionable_line():
    err = out_of_memory("wave prefill", None, "cpu", torch.OutOfMemoryError("a\nb"))
    assert isinstance(err, OutOfMemoryError)
    msg = str(err)
    assert "\n" not in msg and "during wave prefill" in msg and "no plan was made" in msg
    assert "--vram-budget" in msg and "free now" in msg
