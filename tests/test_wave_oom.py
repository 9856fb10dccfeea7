"""Wave prefill under memory pressure: a wave that runs out of memory is redone smaller.

The failure is injected where a real one happens: the function each wave calls
(``prefill_attention_ref`` on the torch path, the Triton ``prefill_attention`` launch on the
kernel path) raises ``torch.OutOfMemoryError`` for any wave of more than ``cap`` rows, as an
allocator with that much room would. The oracle is the same attention without the failure:
``prefill_attention_ref`` over the full wave plan in one call (the pre-retry code path), and
the engine's logits from an uninterrupted run. On CPU fp32 the torch path must be
bit-identical (waves split only at its fixed chunk ends); when even a one-chunk wave fails,
``engine.errors.OutOfMemoryError`` names the wave prefill and the plan's numbers.

    .venv/bin/pytest -q tests/test_wave_oom.py
"""
from __future__ import annotations

import pytest
import torch

import engine
from engine import kernels, kv as kvmod, planner
from engine.errors import OutOfMemoryError
from engine.kernels.prefill_attention import CHUNK_ROWS, plan_waves, prefill_attention_ref
from engine.kv import KV_DTYPES, LayerKV

MODEL = "tiny-qwen3"
DEV = "cuda" if torch.cuda.is_available() else "cpu"     # the kernel test: Triton on CUDA, else interpreted


class CappedAllocator:
    """Wraps a wave function: a wave of more than ``cap`` query rows raises OOM (counted)."""

    def __init__(self, fn, cap: int, rows_of):
        self.fn, self.cap, self.rows_of = fn, cap, rows_of
        self.failed: list[int] = []
        self.ran: list[int] = []

    def __call__(self, *args, **kwargs):
        rows = self.rows_of(*args, **kwargs)
        if rows > self.cap:
            self.failed.append(rows)
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {rows} rows (injected)")
        self.ran.append(rows)
        return self.fn(*args, **kwargs)


def ref_rows(q, k, v, fmt, start, scale, hkv, plan, window=None, v_fmt=None):
    return sum(r1 - r0 for r0, r1 in plan.waves)


def kernel_rows(q, *args, **kwargs):
    return q.shape[0]


def filled(fmt, T, start, Hq=6, Hkv=2, D=64, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(start + T, Hkv, D, generator=g), torch.randn(start + T, Hkv, D, generator=g)
    cache = LayerKV(0, Hkv, D, start + T, fmt, device=device)
    cache.write(0, k.to(device), v.to(device))
    return cache, torch.randn(T, Hq, D, generator=g).to(device)


@pytest.mark.parametrize("fmt", KV_DTYPES)
def test_reference_waves_retried_smaller_are_bit_identical(fmt, monkeypatch):
    T, start, D = 700, 37, 64                 # 6 chunks: 91 rows to the first multiple of 128, then 128s
    cache, q = filled(fmt, T, start)
    plan = plan_waves(T, start, 6, 2, D, cache.wave_budget_bytes)
    assert plan.n_waves == 1                  # the default budget wants one wave of 700 rows
    oracle, _ = prefill_attention_ref(q, cache.k, cache.v, fmt, start, D ** -0.5, 2, plan)

    capped = CappedAllocator(kvmod.prefill_attention_ref, 300, ref_rows)
    monkeypatch.setattr(kvmod, "prefill_attention_ref", capped)
    out = cache.attend(q, start, D ** -0.5)
    assert torch.equal(out, oracle)
    assert capped.failed and capped.failed[0] == T and all(r > 300 for r in capped.failed)
    assert cache.last_wave_retries == len(capped.failed)
    assert sum(capped.ran) == T and max(capped.ran) <= 300 and cache.last_waves == len(capped.ran)
    assert cache.last_wave_rows == max(capped.ran)


def test_transient_failures_then_full_waves_again(monkeypatch):
    """The first two wave attempts fail whatever their size; the rest of the prefill keeps the
    smaller wave, and a fresh attend starts from the planned size again."""
    T, start, D = 600, 0, 64
    cache, q = filled("q8_0", T, start, seed=3)
    plan = plan_waves(T, start, 6, 2, D, cache.wave_budget_bytes)
    oracle, _ = prefill_attention_ref(q, cache.k, cache.v, "q8_0", start, D ** -0.5, 2, plan)
    calls, failures = [], [2]

    def flaky(*args, **kwargs):
        calls.append(ref_rows(*args, **kwargs))
        if failures[0]:
            failures[0] -= 1
            raise torch.OutOfMemoryError("injected")
        return prefill_attention_ref(*args, **kwargs)

    monkeypatch.setattr(kvmod, "prefill_attention_ref", flaky)
    assert torch.equal(cache.attend(q, start, D ** -0.5), oracle)
    # 600 rows -> 256 (cut at a chunk end <= 300) -> 128, then 128-row waves to the end
    assert calls == [600, 256, 128, 128, 128, 128, 88]
    assert (cache.last_wave_retries, cache.last_waves, cache.last_wave_rows) == (2, 5, 128)
    calls.clear()
    assert torch.equal(cache.attend(q, start, D ** -0.5), oracle)
    assert calls == [600] and cache.last_wave_retries == 0


def test_smallest_reference_wave_failing_lets_the_error_through(monkeypatch):
    cache, q = filled("fp32", 300, 0)
    capped = CappedAllocator(kvmod.prefill_attention_ref, CHUNK_ROWS - 1, ref_rows)
    monkeypatch.setattr(kvmod, "prefill_attention_ref", capped)
    with pytest.raises(torch.OutOfMemoryError) as e:
        cache.attend(q, 0, 0.125)
    assert capped.failed == [300, 128] and not capped.ran          # halved down to one chunk
    assert e.value.wave_prefill == "layer 0: the smallest wave, rows 0..128, failed (smaller-wave retries: 1)"


@pytest.fixture
def triton_backend():
    prev = kernels.set_backend("triton")
    yield
    kernels.set_backend(prev)


def test_kernel_waves_retried_down_to_16_rows(triton_backend, monkeypatch):
    """The Triton path (interpreted on CPU) splits at 16-row steps; same rows, same results."""
    T, start, D = 150, 5, 32
    cache, q = filled("q8_0", T, start, Hq=4, Hkv=2, D=D, seed=5, device=DEV)
    clean = cache.attend(q, start, D ** -0.5)
    assert cache.last_waves == 1
    capped = CappedAllocator(kvmod.prefill_attention, 40, kernel_rows)
    monkeypatch.setattr(kvmod, "prefill_attention", capped)
    out = cache.attend(q, start, D ** -0.5)
    # 150 -> 75 -> 27 (37 rows at most, ending on an absolute multiple of 16), then <= 37-row waves
    assert capped.failed == [150, 75] and capped.ran == [27, 32, 32, 32, 27]
    assert (cache.last_wave_retries, cache.last_wave_rows) == (2, 32)
    torch.testing.assert_close(out, clean, atol=1e-5, rtol=1e-5)   # a wave is a grid of rows
    capped.cap = 15                           # one whole 16-row step does not fit: give up there
    with pytest.raises(torch.OutOfMemoryError) as e:
        cache.attend(q, start, D ** -0.5)
    assert capped.ran[-1] == 11 and "rows 11..27, failed" in e.value.wave_prefill


# -- through the engine --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eng():
    return engine.load(MODEL, ctx=512)


@pytest.fixture(scope="module")
def prompt(eng):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, eng.spec.vocab_size, (300,), generator=g).tolist()


def test_engine_logits_equal_with_wave_retries(eng, prompt, monkeypatch):
    clean = eng.logits(prompt)
    assert eng.last_prefill_stats["wave_retries"] == 0 and eng.last_prefill_stats["wave_rows"] == 300
    capped = CappedAllocator(kvmod.prefill_attention_ref, 200, ref_rows)
    monkeypatch.setattr(kvmod, "prefill_attention_ref", capped)
    retried = eng.logits(prompt)
    assert torch.equal(retried, clean)
    stats = eng.last_prefill_stats
    n = eng.spec.n_layers
    assert len(capped.failed) == n and stats["wave_retries"] == n      # one halving per layer
    assert stats["wave_rows"] == 128 and max(capped.ran) <= 200 and stats["waves"] == 3


def test_engine_smallest_wave_oom_names_the_plan(eng, prompt, monkeypatch):
    monkeypatch.setattr(kvmod, "prefill_attention_ref",
                        CappedAllocator(kvmod.prefill_attention_ref, 100, ref_rows))
    with pytest.raises(OutOfMemoryError) as e:
        eng.logits(prompt)
    msg = str(e.value)
    p = planner.plan(planner.spec_for_model(MODEL), kv_dtype="fp32", ctx=512, device="cpu")
    mib = lambda n: f"{n / (1 << 20):.2f} MiB"        # noqa: E731
    assert "\n" not in msg and "during wave prefill of 300 tokens at position 0" in msg
    assert "(layer 0: the smallest wave, rows 0..128, failed (smaller-wave retries: 1))" in msg
    assert mib(p.trunk.total) in msg and mib(p.trunk.kv) in msg and "--vram-budget" in msg
