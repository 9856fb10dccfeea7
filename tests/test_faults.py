"""The harness catches what it exists to catch (issue 16 item 8): each planted bug, one at a
time, makes the default suite fail (or go incomplete), and the failure names the cause.

Faults (``KVBENCH_FAULT``, declared in engine/settings.py; the last one planted in a check):
- ``ignore_kv_dtype``: the trunk allocates fp32 KV whatever was requested (the seed's bug);
- ``skip_narrow_layer:N``: one layer keeps fp32 (a partial version of it);
- ``kv_priced_fp32``: the planner prices KV at fp32 whatever the dtype (the seed's planner bug);
- a check that silently drops its gated metric (the judge must not pass it).

The default suite (suites/kv_dtype.toml) runs whole, every check, scaled to the tiny model
(shorter prompts and prefill: the same code paths, seconds instead of minutes)."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.runner import Runner
from harness.suite import load_suite

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-qwen3"


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
