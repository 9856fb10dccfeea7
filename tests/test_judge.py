"""The judge never passes what it did not measure: gated metrics that are skipped, missing or
not finite make a case ``incomplete`` (exit 1) unless the suite marks the gate ``optional``
with a reason; gates that can never be measured are refused when the suite loads; bad input
to ``harness run`` (a corrupt model, NaN thresholds, ``--max-cases 0``) is exit 2 before
anything is written; ``--resume`` reruns error and incomplete cases; a run stopped before
its matrix is complete is not a pass."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from harness.checks import Metric, Outcome
from harness.errors import SuiteError, UsageError
from harness.results import read_records
from harness.runner import Runner, judge
from harness.suite import load_suite, parse_suite

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-qwen3"


def _suite(extra: str = "", checks: str | None = None, tmp: Path | None = None):
    text = f'''
[suite]
name = "judge"
models = ["{MODEL}"]
kv_dtypes = ["q8_0"]
device = "cpu"
ctx = 256
{extra}
''' + (checks if checks is not None else '''
[[check]]
kind = "argmax"
positions = 24
noise_chunk = 8
messages = [[{ role = "user", content = "Say hello." }]]
max_abs = { fp32 = 0.001, q8_0 = 5.0 }
''')
    if tmp is None:
        import tomllib
        return parse_suite(tomllib.loads(text), "<judge>")
    p = tmp / "suite.toml"
    p.write_text(text)
    return p


TOP = Metric("Top-1 in top-5", 100.0)     # the argmax check's default gate (>= 100)


def _cfg(**kw):
    s = _suite(checks=f'''
[[check]]
kind = "argmax"
positions = 24
max_abs = {{ fp32 = 0.001, q8_0 = 5.0 }}
max_mean_kld = 0.1
{"".join(f"{k} = {v}" + chr(10) for k, v in kw.items())}''')
    return s.checks[0]


def test_a_skipped_gated_metric_makes_the_case_incomplete():
    cfg = _cfg()
    out = Outcome([Metric("Max abs logit diff", 0.5, better="lower"),
                   Metric("Mean KLD", None, skipped="engine has no logits", better="lower"), TOP])
    recs, failures, unmeasured = judge(out, cfg, MODEL, "q8_0")
    assert failures == [] and len(unmeasured) == 1
    assert unmeasured[0].startswith("Mean KLD not measured (engine has no logits)")
    assert {r["metric"]: r["passed"] for r in recs} == {"Max abs logit diff": True, "Mean KLD": None,
                                                          "Top-1 in top-5": True}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "n/a", None, True])
def test_a_non_finite_or_non_numeric_gated_value_is_not_a_pass(value):
    cfg = _cfg()
    out = Outcome([Metric("Max abs logit diff", value), Metric("Mean KLD", 0.01), TOP])
    recs, failures, unmeasured = judge(out, cfg, MODEL, "q8_0")
    assert not failures and len(unmeasured) == 1 and unmeasured[0].startswith("Max abs logit diff not measured")
    assert recs[0]["passed"] is None


def test_a_gate_the_check_never_reported_is_incomplete_and_optional_needs_a_reason():
    cfg = _cfg()
    recs, failures, unmeasured = judge(Outcome([Metric("Max abs logit diff", 0.1), TOP]), cfg, MODEL, "q8_0")
    assert unmeasured == ["Mean KLD not measured (not reported by the check); required <= 0.1"]
    opt = _cfg(optional='{ "max_mean_kld.q8_0" = "this engine reports top-k log-probabilities only" }')
    recs, failures, unmeasured = judge(Outcome([Metric("Max abs logit diff", 0.1), TOP]), opt, MODEL, "q8_0")
    assert unmeasured == [] and recs[-1]["optional"] == "this engine reports top-k log-probabilities only"
    # optional for q8_0 only: fp32 still counts it
    assert judge(Outcome([Metric("Max abs logit diff", 0.0), TOP]), opt, MODEL, "fp32")[2]
    with pytest.raises(SuiteError, match="needs its reason"):
        _cfg(optional='{ max_mean_kld = "" }')
    with pytest.raises(SuiteError, match="unknown threshold"):
        _cfg(optional='{ max_kld = "typo" }')


def test_a_gate_declared_not_applicable_is_neither_measured_nor_unmeasured():
    """An engine without a planner cannot be held to plan == runtime: the check declares that
    gate n/a (with the reason) and the judge neither passes nor counts it as missing; a gate
    merely skipped is still incomplete."""
    cfg = _cfg()
    out = Outcome([Metric("Max abs logit diff", 0.5, better="lower"), TOP])
    out.not_applicable("Mean KLD", "engine llama.cpp does not provide full logits")
    recs, failures, unmeasured = judge(out, cfg, MODEL, "q8_0")
    assert failures == [] and unmeasured == []
    kld = next(r for r in recs if r["metric"] == "Mean KLD")
    assert kld["passed"] is None and kld["na"] == "engine llama.cpp does not provide full logits"
    out = Outcome([Metric("Max abs logit diff", 0.5), TOP, Metric("Mean KLD", None, skipped="engine has no logits")])
    assert judge(out, cfg, MODEL, "q8_0")[2]


def test_measured_gates_still_fail():
    cfg = _cfg()
    recs, failures, unmeasured = judge(Outcome([Metric("Max abs logit diff", 7.0), Metric("Mean KLD", 0.2), TOP]),
                                       cfg, MODEL, "q8_0")
    assert len(failures) == 2 and not unmeasured and [r["passed"] for r in recs] == [False, False, True]


def test_per_platform_thresholds_sit_between_the_check_and_per_model():
    s = _suite(checks='''
[[check]]
kind = "argmax"
max_abs = { fp32 = 0.01, q8_0 = 3.5 }
per_platform.cuda-bf16 = { max_abs = { fp32 = 1.0 } }
per_model.tiny-qwen3 = { max_abs = { q8_0 = 5.0 } }
''')
    c = s.checks[0]
    assert c.threshold_for("max_abs", MODEL, "fp32", "cpu-f32") == 0.01
    assert c.threshold_for("max_abs", MODEL, "fp32", "cuda-bf16") == 1.0
    assert c.threshold_for("max_abs", MODEL, "q8_0", "cuda-bf16") == 5.0
    assert c.threshold_for("max_abs", "other", "q8_0", "cuda-bf16") == 3.5
    with pytest.raises(SuiteError, match="unknown platform 'gpu'"):
        _suite(checks='[[check]]\nkind = "argmax"\nper_platform.gpu = { max_abs = 1.0 }\n')


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_nan_and_inf_thresholds_and_budgets_are_refused(bad):
    with pytest.raises(SuiteError, match="not a finite number"):
        _suite(checks=f'[[check]]\nkind = "argmax"\nmax_abs = {{ q8_0 = {bad} }}\n')
    with pytest.raises(SuiteError, match="not a finite number"):
        _suite(extra=f"vram_budget_gib = {bad}")


def test_a_baseline_gate_that_can_never_be_measured_is_refused_at_load():
    with pytest.raises(SuiteError, match=r"check\[0\]\.max_abs\.fp32: gate on 'Max abs logit diff' for the "
                                         r"baseline can never be measured: reference_run = false"):
        _suite(checks='[[check]]\nkind = "wave_prefill"\ntokens = 300\ncompare_from = 200\n'
                      'reference_run = false\nmax_abs = { fp32 = 0.0, q8_0 = 3.5 }\n')
    with pytest.raises(SuiteError, match="Identical prefix"):
        _suite(checks='[[check]]\nkind = "coherence"\nmin_identical_prefix = { fp32 = 4 }\n')
    # the shipped suites load (their baseline gates are all measurable)
    for name in ("kv_dtype", "smoke", "nightly"):
        load_suite(ROOT / "suites" / f"{name}.toml")


def test_a_check_that_skips_its_gated_metric_makes_the_run_incomplete(tmp_path, monkeypatch):
    """Plant a check that silently skips its gated metric: the case is incomplete, the run
    exits 1, and the report says which gate went unmeasured."""
    from harness.checks import get
    argmax = get("argmax")
    real = argmax.measure

    def skipping(eng, cfg, state, ctx):
        out = real(eng, cfg, state, ctx)
        out.metrics = [m for m in out.metrics if m.name != "Max abs logit diff"]
        return out

    monkeypatch.setattr(argmax, "measure", skipping)
    summary = Runner(_suite(), tmp_path / "r", progress=False).run()
    assert summary.exit_code == 1 and summary.verdict == "fail"
    st = {(c["kv_dtype"], c["check"]): c for c in summary.cases}
    assert {k: c["status"] for k, c in st.items()} == {("fp32", "argmax"): "incomplete",
                                                       ("q8_0", "argmax"): "incomplete"}
    assert st[("q8_0", "argmax")]["unmeasured"] == [
        "Max abs logit diff not measured (not reported by the check); required <= 5"]
    from harness.report import build_report
    md = build_report(tmp_path / "r", tmp_path / "rep").read_text()
    assert "⚠️ **incomplete**: Max abs logit diff not measured" in md and "2 incomplete" in md


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "harness", "run", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def test_bad_input_to_run_is_exit_2_before_anything_is_written(tmp_path):
    suite = _suite(tmp=tmp_path)
    bad = tmp_path / "truncated.gguf"
    from engine.models import resolve
    bad.write_bytes(resolve("tiny-llama").read_bytes()[:5000])
    for args, want in [
        ([str(suite), "--model", str(bad)], "truncated.gguf"),
        ([str(suite), "--max-cases", "0"], "--max-cases 0: must be at least 1"),
        ([str(suite), "--max-cases", "-1"], "--max-cases -1: must be at least 1"),
        ([str(suite), "--model", MODEL, "--model", MODEL], "--model tiny-qwen3 is given more than once"),
        ([str(suite), "--device", "tpu"], "--device 'tpu'"),
    ]:
        out = tmp_path / "out"
        proc = _cli(*args, "--out", str(out), "--no-progress")
        assert proc.returncode == 2, (args, proc.stderr)
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], (args, proc.stderr)
        assert not out.exists(), args


@pytest.mark.slow(seconds=22)
def test_a_stopped_run_is_incomplete_and_resume_reruns_errors(tmp_path):
    suite = _suite(tmp=tmp_path)
    out = tmp_path / "r"
    proc = _cli(str(suite), "--out", str(out), "--max-cases", "1", "--no-progress")
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1 and last["verdict"] == "incomplete" and last["not_run"] == 1
    # turn the finished case into an error (as a broken model file would have), then resume:
    # the error case runs again, the finished pass is kept
    recs = read_records(out)
    for r in recs:
        if r["type"] == "case":
            r["status"], r["error"] = "error", "planted"
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    proc = _cli(str(suite), "--out", str(out), "--resume", "--no-progress")
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and last["verdict"] == "pass" and last["ran"] == 2, proc.stdout[-2000:]
    cases = [r for r in read_records(out) if r["type"] == "case"]
    assert [(c["kv_dtype"], c["status"]) for c in cases] == [("fp32", "pass"), ("q8_0", "pass")]


def test_a_check_needing_a_capability_the_engine_lacks_is_na(tmp_path, monkeypatch):
    """An engine without a plan/ledger (as an external engine would be): the vram check's
    capability list allows it (dtype and bytes are still checked) and declares its plan gates
    n/a (recorded with the reason, listed by the report), so the case stands on the gates it
    measured; an engine without KV observables makes the whole check n/a."""
    import engine as eng_mod
    from harness.engine_api import missing
    from harness.checks import get
    vram = get("vram")
    full = eng_mod.Engine.capabilities
    assert missing(eng_mod.Engine, vram.requires) is None
    monkeypatch.setattr(eng_mod.Engine, "capabilities", full - {"kv_applied"})
    summary = Runner(_suite(checks='[[check]]\nkind = "vram"\nexercise_tokens = 8\n'), tmp_path / "a",
                     progress=False).run()
    assert {c["status"] for c in summary.cases} == {"n/a"}
    assert summary.cases[0]["reason"] == "engine kvbench does not provide kv_applied"
    # every case n/a: nothing was measured, which is not a pass
    assert summary.verdict == "nothing measured" and summary.exit_code == 1
    monkeypatch.setattr(eng_mod.Engine, "capabilities", full - {"plan"})
    summary = Runner(_suite(checks='[[check]]\nkind = "vram"\nexercise_tokens = 8\n'), tmp_path / "b",
                     progress=False).run()
    assert {c["status"] for c in summary.cases} == {"pass"} and summary.exit_code == 0
    recs = read_records(tmp_path / "b")
    plan_gates = [r for r in recs if r.get("type") == "metric" and r["metric"] == "Plan vs runtime max diff"]
    assert plan_gates and all(r["na"] == "engine kvbench does not provide plan" and r["passed"] is None
                              for r in plan_gates)
    measured = [r for r in recs if r.get("type") == "metric" and r.get("threshold") is not None and not r.get("na")]
    assert measured and all(r["passed"] is True for r in measured)     # KV dtype and bytes still judged
    from harness.report import build_report
    md = build_report(tmp_path / "b", tmp_path / "rep").read_text()
    assert "Plan vs runtime max diff: engine kvbench does not provide plan" in md
