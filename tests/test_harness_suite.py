"""Suite files: the shipped suites load; each kind of mistake gives its own one-line error
naming the file, the key and what is allowed; thresholds resolve per dtype and per model."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.errors import SuiteError
from harness.suite import load_suite

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
[suite]
name = "t"
models = ["tiny-qwen3"]
kv_dtypes = ["bf16", "q8_0"]

[[check]]
kind = "argmax"
positions = 32
max_abs = { bf16 = 2.5, q8_0 = 3.5 }
per_model.coder30b = { max_abs = { q8_0 = 5.0 } }

[[check]]
kind = "vram"
"""


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "suite.toml"
    p.write_text(textwrap.dedent(text))
    return p


def error_of(tmp_path, text: str) -> str:
    with pytest.raises(SuiteError) as ei:
        load_suite(write(tmp_path, text))
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(tmp_path / "suite.toml") in msg
    return msg


@pytest.mark.parametrize("name", ["kv_dtype", "smoke", "nightly"])
def test_shipped_suites_load(name):
    s = load_suite(ROOT / "suites" / f"{name}.toml")
    assert s.suite.baseline == "fp32" and s.suite.kv_dtypes == ["bf16", "q8_0"]
    assert {"argmax", "coherence", "wave_prefill", "vram", "throughput"} <= {c.KIND for c in s.checks}   # + issue 15 checks


def test_default_suite_sizes_meet_the_issue():
    s = load_suite(ROOT / "suites" / "kv_dtype.toml")
    argmax = s.check("argmax")
    assert argmax.positions * len(argmax.messages) >= 256 and argmax.top_k == 5
    coh = s.check("coherence")
    assert len(coh.messages) >= 24 and coh.collapse_run * 2 == coh.max_new_tokens   # half the answer
    wave = s.check("wave_prefill")
    assert wave.tokens > 4096 and wave.compare_from == 4096 and wave.min_waves >= 2
    # on smollm2-135m's geometry the derived budget splits the prefill into waves other than
    # the default budget's reference (which must split at 4096 rows), so the fp32 comparison
    # is not vacuous; the compared positions lie past 4096
    from types import SimpleNamespace
    from engine.formats import DEFAULT_WAVE_BUDGET
    from engine.kernels.prefill_attention import plan_waves
    from harness.checks.wave_prefill import wave_budget_for
    hq, hkv, d = 9, 3, 64
    spec = SimpleNamespace(n_heads=hq, n_kv_heads=hkv, head_dim=d)
    small = plan_waves(wave.tokens, 0, hq, hkv, d, wave_budget_for(spec, wave.tokens, wave.waves))
    ref = plan_waves(wave.tokens, 0, hq, hkv, d, DEFAULT_WAVE_BUDGET)
    assert small.n_waves == wave.waves and ref.n_waves >= 2 and small.waves != ref.waves
    tp = s.check("throughput")
    assert tp.pp >= 256 and tp.tg >= 32 and tp.repeats >= 5
    assert load_suite(ROOT / "suites" / "nightly.toml").suite.models == [
        "coder30b", "olmoe", "smollm2-135m", "smollm2-moe"]


def test_long_and_nightly_carry_issue_15s_long_context_checks():
    """Issue 15 items 2, 4, 5, 6 and 8 go in suites/long.toml and suites/nightly.toml: the corpus
    KLD over depths up to the trained context with the kernel-precision axis, the needle, the
    multi-turn / long generation and the per-layer sensitivity, each with a gate it can fail."""
    for name in ("long.toml", "nightly.toml"):
        s = load_suite(ROOT / "suites" / name)
        kinds = {c.kind for c in s.checks}
        assert {"corpus_kld", "needle", "multiturn", "layer_sensitivity"} <= kinds, (name, kinds)
        ck = s.check("corpus_kld")
        assert "trained" in ck.depths and 512 in ck.depths and ck.attn_math == ["exact", "ggml-cpu"]
        assert ck.threshold_for("max_mean_kld", "smollm2-135m", "q8_0") is not None
        assert s.check("needle").threshold_for("min_score", "smollm2-135m", "q8_0") is not None


def test_thresholds_per_dtype_and_per_model(tmp_path):
    s = load_suite(write(tmp_path, GOOD))
    a = s.check("argmax")
    assert a.threshold_for("max_abs", "tiny-qwen3", "bf16") == 2.5
    assert a.threshold_for("max_abs", "tiny-qwen3", "q8_0") == 3.5
    assert a.threshold_for("max_abs", "coder30b", "q8_0") == 5.0      # per-model override
    assert a.threshold_for("max_abs", "coder30b", "bf16") == 2.5      # merged, not replaced
    assert a.threshold_for("max_abs", "tiny-qwen3", "fp32") is None   # no bound for the baseline
    assert a.gates("tiny-qwen3", "q8_0")["Max abs logit diff"] == (3.5, "<=")
    assert a.gates("tiny-qwen3", "q8_0")["Top-1 in top-5"] == (100.0, ">=")   # default


def test_toml_syntax_error_names_the_line(tmp_path):
    msg = error_of(tmp_path, '[suite]\nname = "t"\nmodels = ["tiny-qwen3"\n\n[[check]]\nkind = "vram"\n')
    assert "TOML syntax error" in msg and "line 5" in msg


def test_unknown_key(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("positions = 32", "positons = 32"))
    assert "check[0].positons: unknown key; did you mean 'positions'?" in msg
    assert "allowed:" in msg and "top_k" in msg


def test_unknown_key_in_suite_table_and_top_level(tmp_path):
    assert "suite.modles: unknown key" in error_of(tmp_path, GOOD.replace("models =", "modles ="))
    msg = error_of(tmp_path, GOOD + "\n[extra]\nx = 1\n")
    assert "extra: unknown key" in msg and "allowed: check, suite" in msg


def test_wrong_type(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("positions = 32", 'positions = "many"'))
    assert "check[0].positions: expected an integer, got string 'many'" in msg
    msg = error_of(tmp_path, GOOD.replace('models = ["tiny-qwen3"]', 'models = "tiny-qwen3"'))
    assert "suite.models: expected an array of strings" in msg
    msg = error_of(tmp_path, GOOD.replace("bf16 = 2.5,", 'bf16 = "big",'))
    assert "check[0].max_abs" in msg and "got" in msg


def test_unknown_check_kind(tmp_path):
    msg = error_of(tmp_path, GOOD.replace('kind = "vram"', 'kind = "vrma"'))
    assert "check[1].kind: unknown check kind 'vrma'; did you mean 'vram'?" in msg
    assert "allowed: argmax, coherence, wave_prefill, vram, throughput" in msg


def test_unknown_model(tmp_path):
    msg = error_of(tmp_path, GOOD.replace('["tiny-qwen3"]', '["smollm2-13m"]'))
    assert "suite.models[0]: unknown model 'smollm2-13m'; did you mean smollm2-135m" in msg
    assert ".gguf" in msg
    load_suite(write(tmp_path, GOOD.replace('["tiny-qwen3"]', '["./mine.gguf"]')))  # paths are fine


def test_threshold_that_cannot_hold(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("bf16 = 2.5", "bf16 = -1.0"))
    assert "check[0].max_abs.bf16: threshold that can never hold: -1.0 (allowed: >= 0)" in msg
    msg = error_of(tmp_path, GOOD.replace("positions = 32", "positions = 32\nmin_top_k_pct = 101"))
    assert "check[0].min_top_k_pct: threshold that can never hold: 101" in msg and "<= 100" in msg


def test_top_k_zero(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("positions = 32", "positions = 32\ntop_k = 0"))
    assert "check[0].top_k: value out of range: 0 (allowed: >= 1)" in msg


def test_threshold_for_a_dtype_outside_the_matrix(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("bf16 = 2.5,", "f16 = 2.5,"))
    assert "check[0].max_abs.f16: KV dtype 'f16' is not in this suite's matrix" in msg


def test_per_model_override_of_unknown_threshold(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("{ max_abs = { q8_0 = 5.0 } }", "{ top_k = 3 }"))
    assert "check[0].per_model.coder30b.top_k: unknown threshold" in msg


@pytest.mark.parametrize("edit,key", [
    (('models = ["tiny-qwen3"]', "models = []"), "suite.models: empty matrix"),
    (('kv_dtypes = ["bf16", "q8_0"]', "kv_dtypes = []"), "suite.kv_dtypes: empty matrix"),
])
def test_empty_matrix(tmp_path, edit, key):
    assert key in error_of(tmp_path, GOOD.replace(*edit))


def test_no_checks(tmp_path):
    msg = error_of(tmp_path, '[suite]\nname = "t"\nmodels = ["tiny-qwen3"]\n')
    assert "check: empty matrix: the suite has no [[check]] tables" in msg


def test_unknown_dtype_and_baseline_in_list(tmp_path):
    assert "suite.kv_dtypes[1]: unknown KV dtype 'q4_0'" in error_of(
        tmp_path, GOOD.replace('"bf16", "q8_0"', '"bf16", "q4_0"'))
    assert "suite.kv_dtypes[0]: 'fp32' is the baseline" in error_of(
        tmp_path, GOOD.replace('"bf16", "q8_0"', '"fp32", "q8_0"'))


def test_bad_message_role(tmp_path):
    text = GOOD.replace("positions = 32", 'positions = 32\nmessages = [[{ role = "robot", content = "hi" }]]')
    assert "check[0].messages[0][0].role: unknown role 'robot'" in error_of(tmp_path, text)


def test_missing_file(tmp_path):
    with pytest.raises(SuiteError, match="suite file not found"):
        load_suite(tmp_path / "nope.toml")


def test_cli_bad_suite_exits_2_with_one_line(tmp_path):
    p = write(tmp_path, GOOD.replace("top_k", "top_k").replace("positions = 32", "positions = -3"))
    proc = subprocess.run([sys.executable, "-m", "harness", "run", str(p), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "check[0].positions: value out of range: -3" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "r").exists()
