"""The harness catches what it exists to catch (issue 16 item 8): each planted bug, one at a
time, makes the default suite fail (or go incomplete), and the failure names the cause.

Faults (``KVBENCH_FAULT``, declared in engine/settings.py; the last one planted in a check):
- ``ignore_kv_dtype``: the trunk allocates fp32 KV whatever was requested (the seed's bug);
- ``skip_narrow_layer:N``: one layer keeps fp32 (a partial version of it);
- ``kv_priced_fp32``: the planner prices KV at fp32 whatever the dtype (the seed's planner bug);
- ``wave_mask_off_by_one``: waves after a prefill's first see one key past their position;
- ``q8_scale_bf16``: q8_0 block scales rounded to bfloat16's width before stored as fp16;
- ``q8_scale_shift``: each q8_0 block stored with the scale of the block before it in its row;
- a check that silently drops its gated metric (the judge must not pass it).

The three kernel faults are planted in the torch references (what the CPU runs, so the suite
runs below exercise them) and in the Triton kernels (tested here in Triton's interpreter).

The default suite (suites/kv_dtype.toml) runs whole, every check, scaled to the tiny model
(shorter prompts and prefill: the same code paths, seconds instead of minutes)."""
from __future__ import annotations

from pathlib import Path

import pytest

import torch

from harness.runner import Runner
from harness.suite import load_suite

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-qwen3"


@pytest.fixture(scope="module", autouse=True)
def _gc_frozen():
    """The Runner's engine loads and releases call ``gc.collect()`` (12 a run), and each walks
    every object the test process holds (torch, the harness, earlier tests' modules): ~0.2 s a
    call, ~2 s of each suite run below. What is alive when this module starts is collected once
    and then frozen (``gc.freeze``: left out of later collections, not freed) until the module
    ends; what the runs create, their engines included, is collected as before."""
    import gc
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def _default_suite_scaled():
    suite = load_suite(ROOT / "suites" / "kv_dtype.toml")
    for c in suite.checks:
        if c.KIND == "argmax":
            c.positions, c.noise_chunk = 48, 16
        elif c.KIND == "wave_prefill":
            c.tokens, c.compare_from, c.ctx = 300, 200, 1024
        elif c.KIND == "vram":
            c.ctx = 1024
        elif c.KIND == "throughput":
            c.pp, c.tg = 32, 8
    return suite


def _run(tmp_path, name):
    summary = Runner(_default_suite_scaled(), tmp_path / name, models=[MODEL], progress=False).run()
    return summary, {(c["kv_dtype"], c["check"]): c for c in summary.cases}


def _why(c) -> str:
    return "; ".join((c.get("failures") or []) + (c.get("unmeasured") or []) + [c.get("error") or ""])


def test_the_clean_default_suite_passes_on_the_tiny_model(tmp_path):
    """The control: without a fault the same scaled suite passes (so each failure below is
    the fault's doing)."""
    summary, cases = _run(tmp_path, "clean")
    assert summary.exit_code == 0, {k: _why(c) for k, c in cases.items() if c["status"] not in ("pass", "n/a")}


@pytest.mark.parametrize("fault,cause", [
    ("ignore_kv_dtype", "KV dtype mismatches = 4 layers (required <= 0): layer 0 holds fp32, requested {d}"),
    ("skip_narrow_layer:2", "KV dtype mismatches = 1 layers (required <= 0): layer 2 holds fp32, requested {d}"),
    ("kv_priced_fp32", "Plan vs runtime max diff = {pct} % (required <= 1): kv/trunk: planned"),
])
def test_each_planted_engine_bug_fails_the_default_suite_naming_it(tmp_path, monkeypatch, fault, cause):
    monkeypatch.setenv("KVBENCH_FAULT", fault)
    summary, cases = _run(tmp_path, fault.replace(":", "-"))
    assert summary.exit_code == 1
    pct = {"bf16": "50", "q8_0": "73.44"}
    for d in ("bf16", "q8_0"):
        c = cases[(d, "vram")]
        assert c["status"] == "fail" and _why(c).startswith(cause.format(d=d, pct=pct[d])), _why(c)
    assert cases[("fp32", "vram")]["status"] == "pass"          # the baseline is fp32 anyway
    # the manifest says the run was planted, and the report would say so
    from harness.results import load_results
    assert load_results(tmp_path / fault.replace(":", "-")).manifest["settings"]["KVBENCH_FAULT"]["set"]


def test_a_check_that_silently_drops_its_gated_metric_goes_incomplete(tmp_path, monkeypatch):
    from harness.checks import get
    wave = get("wave_prefill")
    real = wave.measure

    def dropping(eng, cfg, state, ctx):
        out = real(eng, cfg, state, ctx)
        out.metrics = [m for m in out.metrics if m.name != "Waves"]     # a gated metric, silently gone
        return out

    monkeypatch.setattr(wave, "measure", dropping)
    summary, cases = _run(tmp_path, "drop")
    assert summary.exit_code == 1
    for d in ("fp32", "bf16", "q8_0"):
        c = cases[(d, "wave_prefill")]
        assert c["status"] == "incomplete"
        assert c["unmeasured"] == ["Waves not measured (not reported by the check); required >= 2"]


def test_a_wave_mask_off_by_one_fails_the_wave_prefill_check(tmp_path, monkeypatch):
    """Waves after the first see one key past their position (the CPU runs the torch
    reference, where it is planted): waves no longer equal one pass, on every row."""
    monkeypatch.setenv("KVBENCH_FAULT", "wave_mask_off_by_one")
    summary, cases = _run(tmp_path, "wave-mask")
    assert summary.exit_code == 1
    c = cases[("fp32", "wave_prefill")]
    assert c["status"] == "fail" and _why(c).startswith("Max abs logit diff = "), _why(c)
    assert "(required <= 0)" in _why(c)
    for d in ("fp32", "bf16", "q8_0"):                  # memory and dtypes are untouched
        assert cases[(d, "vram")]["status"] == "pass"


def test_a_q8_0_scale_at_the_wrong_width_fails_the_applied_dtype_gate(tmp_path, monkeypatch):
    """q8_0 scales rounded to bfloat16 before stored as fp16: an error as small as q8_0's own
    rounding (no accuracy gate can tell), but the bytes are not ggml's block_q8_0, so the
    applied-dtype observable (engine.kv_layout.observed_dtype, held against gguf.quants) says
    so and the vram check fails naming the scale byte."""
    monkeypatch.setenv("KVBENCH_FAULT", "q8_scale_bf16")
    summary, cases = _run(tmp_path, "q8-scale")
    assert summary.exit_code == 1
    c = cases[("q8_0", "vram")]
    assert c["status"] == "fail", _why(c)
    assert _why(c).startswith("KV dtype mismatches = 4 layers (required <= 0): layer 0 holds q8_0 (q8_0 "
                              "written wrong: block 0 byte "), _why(c)
    assert "(its scale)" in _why(c) and "requested q8_0" in _why(c)
    for d in ("fp32", "bf16"):
        assert cases[(d, "vram")]["status"] == "pass"


def test_the_kernel_faults_are_planted_in_the_triton_kernels_too(monkeypatch):
    """What CUDA runs: the Triton kv_append writes bf16-width scales under the fault (held
    against gguf.quants by the same observable), and the Triton prefill's later waves see
    one key ahead (waves differ from one pass from the first row of the second wave on)."""
    from engine import kernels
    from engine.kv import LayerKV
    from engine.kv_layout import write_path_error
    prev = kernels.set_backend("triton")
    try:
        cpu = torch.device("cpu")
        assert write_path_error("q8_0", 2, 64, cpu) is None
        g = torch.Generator().manual_seed(0)
        T, Hq, Hkv, D = 256, 2, 1, 16
        q, k, v = (torch.randn(T, h, D, generator=g) for h in (Hq, Hkv, Hkv))

        def prefill(max_rows):
            c = LayerKV(0, Hkv, D, T, "fp32", wave_max_rows=max_rows)
            c.write(0, k, v)
            return c.attend(q, 0, D ** -0.5), c.last_waves

        (one, n1), (waves, n2) = prefill(4096), prefill(128)
        assert (n1, n2) == (1, 2) and torch.equal(one, waves)
        monkeypatch.setenv("KVBENCH_FAULT", "wave_mask_off_by_one")
        (one_f, _), (waves_f, _) = prefill(4096), prefill(128)
        assert torch.equal(one_f, one)                    # a single wave is untouched
        assert torch.equal(waves_f[:128], one[:128])      # so is the first wave
        moved = (waves_f[128:] - one[128:]).abs().amax(dim=(1, 2)) > 0
        assert moved[:-1].all() and not moved[-1]          # every later row but the last (no key after it)
        monkeypatch.setenv("KVBENCH_FAULT", "q8_scale_bf16")
        why = write_path_error("q8_0", 2, 64, cpu)
        assert why is not None and why.startswith("q8_0 written wrong: block ") and "(its scale)" in why
    finally:
        kernels.set_backend(prev)


def test_a_q8_0_scale_on_the_wrong_block_fails_argmax_and_the_applied_dtype_gate(tmp_path, monkeypatch):
    """Each q8_0 block stored with the scale of the block before it in its row (a block-index
    off-by-one, ``q8_scale_shift``): the values come back at a neighbour's scale, so the
    accuracy gates fail on the q8_0 row (not only the byte-level observable), and the other
    rows stay clean."""
    monkeypatch.setenv("KVBENCH_FAULT", "q8_scale_shift")
    summary, cases = _run(tmp_path, "q8-shift")
    assert summary.exit_code == 1
    arg = cases[("q8_0", "argmax")]
    assert arg["status"] == "fail" and "Max abs logit diff = " in _why(arg), _why(arg)
    vram = cases[("q8_0", "vram")]
    assert vram["status"] == "fail" and "(its scale)" in _why(vram), _why(vram)
    for d in ("fp32", "bf16"):
        assert cases[(d, "argmax")]["status"] == "pass" and cases[(d, "vram")]["status"] == "pass"
