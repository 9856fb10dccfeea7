"""Suites ask for llama.cpp's expert placement (``expert_format``, ``cpu_moe``): validated at
load (one line, exit-2 class errors), passed to the engine, priced in the preflight plan, and
visible in what the vram check records (the plan the engine applied, held to its ledger)."""
from __future__ import annotations

import json

import pytest

from harness.errors import SuiteError
from harness.runner import Runner
from harness.suite import load_suite

SUITE = """
[suite]
name = "experts"
models = ["tiny-olmoe-q4_0"]
kv_dtypes = ["q8_0"]
device = "cpu"
ctx = 64
{suite_extra}

[[check]]
kind = "vram"
ctx = 64
{check_extra}
"""


def write(tmp_path, suite_extra="", check_extra=""):
    p = tmp_path / "s.toml"
    p.write_text(SUITE.format(suite_extra=suite_extra, check_extra=check_extra))
    return p


@pytest.mark.parametrize("suite_extra,check_extra,match", [
    ('expert_format = "bytes"', "", "unknown expert format 'bytes'"),
    ("cpu_moe = 1", "", "computes experts from their GGUF blocks"),
    ('expert_format = "blocks"\ncpu_moe = "most"', "", "'most' is not auto or a count"),
    ('expert_format = "blocks"', "cpu_moe = -1", "-1 is not auto or a count"),
    ("", "cpu_moe = true", "cpu_moe"),
    ('expert_format = "blocks"', 'host_experts = "gpu"', "unknown host_experts 'gpu'"),
    ("", 'host_experts = "pcie"', "needs them in the file's blocks"),
])
def test_bad_expert_options_are_refused_at_load(tmp_path, suite_extra, check_extra, match):
    with pytest.raises(SuiteError, match=match):
        load_suite(write(tmp_path, suite_extra, check_extra))


@pytest.mark.parametrize("host,applied", [("cpu", "cpu"), ("pcie", "pcie"), ("auto", "cpu")])
def test_the_vram_check_sees_the_placement_it_asked_for(tmp_path, host, applied):
    """... and "auto" the one load chose (on a CPU device: the CPU), with the request recorded."""
    suite = load_suite(write(tmp_path, f'expert_format = "blocks"\ncpu_moe = 1\nhost_experts = "{host}"'))
    out = tmp_path / "res"
    summary = Runner(suite, out, progress=False).run()
    assert summary.verdict == "pass", summary.cases
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    plans = [r["info"]["plan"] for r in recs if r.get("type") == "info" and "plan" in r.get("info", {})]
    assert len(plans) == 2                                   # the fp32 and q8_0 rows
    for p in plans:
        assert p["expert_format"] == "q4_0" and p["cpu_moe"] == 1 and p["layer_expert_tiers"][0] == applied
        assert p["host_experts"] == applied
        assert p["host_experts_requested"] == ("auto" if host == "auto" else "")
    rows = [r for r in recs if r.get("type") == "metric" and r["metric"] == "Plan vs runtime max diff"]
    assert rows and all(r["value"] == 0.0 for r in rows)


def test_models_the_placement_cannot_apply_to_are_na_with_the_reason(tmp_path):
    """A suite over several models: a dense model, and one whose experts are not Q4_0/Q8_0
    blocks, declare the blocks cases n/a (never pass), naming why; the MoE in blocks runs."""
    text = SUITE.format(suite_extra='expert_format = "blocks"\ncpu_moe = "auto"', check_extra="").replace(
        'models = ["tiny-olmoe-q4_0"]', 'models = ["tiny-llama", "tiny-qwen3moe", "tiny-olmoe-q4_0"]')
    p = tmp_path / "s.toml"
    p.write_text(text)
    summary = Runner(load_suite(p), tmp_path / "res", progress=False).run()
    by_model = {}
    for c in summary.cases:
        by_model.setdefault(c["model"], set()).add(c["status"])
    assert by_model == {"tiny-llama": {"n/a"}, "tiny-qwen3moe": {"n/a"}, "tiny-olmoe-q4_0": {"pass"}}
    reasons = {c["model"]: c["reason"] for c in summary.cases if c["status"] == "n/a"}
    assert "has no routed experts" in reasons["tiny-llama"]
    assert "blk.0.ffn_down_exps.weight is F32" in reasons["tiny-qwen3moe"]
    assert summary.verdict == "pass"


def test_a_check_runs_at_its_own_weight_format(tmp_path):
    """``weight_format`` on a check (the nightly's speed check under llama.cpp's placement asks
    for q8_0): that check's engine stores Q8_0 matrices, the other check keeps the run's format,
    each case records what it ran at, and an unknown format is refused at load."""
    text = SUITE.format(suite_extra='expert_format = "blocks"', check_extra='weight_format = "q8_0"\n\n'
                        '[[check]]\nkind = "vram"\nname = "vram_run_format"\nctx = 64\n')
    p = tmp_path / "s.toml"
    p.write_text(text)
    out = tmp_path / "res"
    summary = Runner(load_suite(p), out, progress=False, weight_format="f32").run()
    assert summary.verdict == "pass", summary.cases
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    plans = {}
    for r in recs:
        if r.get("type") == "info" and "plan" in r.get("info", {}):
            plans.setdefault(r["check"], set()).add(r["info"]["plan"]["weight_format"])
    assert plans == {"vram": {"q8_0"}, "vram_run_format": {"f32"}}
    man = json.loads((out / "manifest.json").read_text())
    assert man["weight_format"]["checks"] == {"vram": "q8_0"}
    from harness.report import build_report
    md = build_report(out, tmp_path / "report").read_text()
    assert "check `vram` at **q8_0** (its own)" in md
    cases = [r for r in recs if r.get("type") == "case"]
    fmts = {(r["check"], r["engine"]["weight_format"], r["engine"]["platform"]) for r in cases}
    assert fmts == {("vram", "q8_0", "cpu-q8_0"), ("vram_run_format", "f32", "cpu-f32")}, fmts
    p.write_text(text.replace('weight_format = "q8_0"', 'weight_format = "q4_k"'))
    with pytest.raises(SuiteError, match="unknown weight format 'q4_k'"):
        load_suite(p)


def test_a_checks_own_q8_0_is_na_where_it_cannot_apply(tmp_path):
    """Q8_0 matrices on a MoE model whose experts stay at the weight format: that model's cases
    of the check are n/a with the planner's reason (never a pass, never a refused run); the dense
    model runs at q8_0."""
    text = SUITE.format(suite_extra="", check_extra='weight_format = "q8_0"').replace(
        'models = ["tiny-olmoe-q4_0"]', 'models = ["tiny-llama", "tiny-olmoe-q4_0"]')
    p = tmp_path / "s.toml"
    p.write_text(text)
    summary = Runner(load_suite(p), tmp_path / "res", progress=False).run()
    status = {(c["model"], c["status"]) for c in summary.cases}
    assert status == {("tiny-llama", "pass"), ("tiny-olmoe-q4_0", "n/a")}, summary.cases
    reason = next(c["reason"] for c in summary.cases if c["status"] == "n/a")
    assert "weight_format q8_0 does not apply" in reason and "blocks" in reason
