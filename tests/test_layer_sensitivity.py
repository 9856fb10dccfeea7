"""layer_sensitivity (issue 15 item 6): one layer's K+V, K or V narrowed at a time, Mean KLD
per layer against fp32 KV, end to end on a tiny model.

References: an independent computation here (the engine loaded with the same one-layer spec,
KL divergence and its standard error in numpy float64 from the logits); the sum and ratio from
the per-layer records; planted faults (``KVBENCH_FAULT``) that make the applied-spec gate fail
naming the layer; the metric registry (every emitted metric declared with its unit and direction).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import engine
from harness import checks, metric_registry
from harness.errors import SuiteError
from harness.results import load_results
from harness.runner import Runner
from harness.suite import load_suite, parse_suite

MODEL = "tiny-llama"          # 4 layers
ROOT = Path(__file__).resolve().parent.parent
TEXT = "".join(f"Line {i}: the {['red', 'blue', 'green'][i % 3]} kite rose over hill {i * 7 % 11}, "
               f"then fell.\n" for i in range(60))


def _suite(tmp_path, dtypes=("q8_0",), **check):
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return parse_suite({"suite": {"name": "ls", "models": [MODEL], "ctx": 64, "kv_dtypes": list(dtypes)},
                        "check": [{"kind": "layer_sensitivity", "corpus": str(p), "tokens": 32, **check}]})


def _kld_np(base, test):
    """KL(base || test) per position, float64 numpy, and (mean, standard error)."""
    b, t = base.double().numpy(), test.double().numpy()

    def logsm(x):
        m = x.max(axis=1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))

    lb, lt = logsm(b), logsm(t)
    kld = np.clip((np.exp(lb) * (lb - lt)).sum(axis=1), 0.0, None)
    return kld.mean(), kld.std(ddof=1) / math.sqrt(len(kld))


def test_end_to_end_on_a_tiny_model_against_an_independent_computation(tmp_path, monkeypatch):
    emitted = []
    chk = checks.get("layer_sensitivity")
    real = chk.measure

    def spy(eng, cfg, state, ctx):
        out = real(eng, cfg, state, ctx)
        emitted.extend(out.metrics)
        return out

    monkeypatch.setattr(chk, "measure", spy)
    summary = Runner(_suite(tmp_path, max_layer_kld=1.0), tmp_path / "run", progress=False).run()
    cases = {c["kv_dtype"]: c for c in summary.cases}
    assert summary.exit_code == 0 and cases["q8_0"]["status"] == "pass", cases
    res = load_results(tmp_path / "run")
    df = res.metrics()
    val = {r.metric: r.value for r in df[(df.kv_dtype == "q8_0")].itertuples()}
    # every layer, every part, measured; the sum, ratio and worst from those records
    per = {(layer, part): val[f"Mean KLD @ layer {layer} {part}"] for layer in range(4) for part in ("K+V", "K", "V")}
    assert all(v > 0 for v in per.values())
    total = sum(per[(i, "K+V")] for i in range(4))
    assert val["Layer KLD sum"] == pytest.approx(total, rel=1e-12)
    assert val["Layer KLD sum / uniform"] == pytest.approx(total / val["Mean KLD (uniform)"], rel=1e-12)
    assert val["Largest layer KLD"] == max(per.values()) and val["KV dtype mismatches"] == 0
    assert val["Layers measured"] == 4 and val["Zero-KLD layers"] == 0
    # independent: the same spec loaded here, KLD and SE in numpy float64 on the same tokens
    info = res.info(MODEL, "q8_0", "layer_sensitivity")
    run = next(r for r in info["runs"] if (r["layer"], r["part"]) == (1, "V"))
    assert run["spec"] == "fp32.v-q8_0@1" and run["applied"] == "fp32.v-q8_0@1"
    from harness import corpus as corpora
    ref = engine.load(MODEL, ctx=64)
    ids = corpora.tokens(ref.tokenizer, corpora.load(str(tmp_path / "text.txt")), 33)[:32]
    base = ref.logits(ids)
    test = engine.load(MODEL, kv_dtype="fp32.v-q8_0@1", ctx=64, weights_from=ref).logits(ids)
    mean, se = _kld_np(base, test)
    assert per[(1, "V")] == pytest.approx(mean, rel=1e-9)
    assert val["Mean KLD @ layer 1 V SE"] == pytest.approx(se, rel=1e-6)
    # the baseline row narrows nothing: only its applied dtypes are checked
    assert cases["fp32"]["status"] == "pass"
    # every emitted metric is declared with the unit and direction it was emitted with
    for m in emitted:
        d = metric_registry.lookup("layer_sensitivity", m.name)
        assert d is not None, m.name
        assert not m.unit or m.unit == d.unit, m.name
        assert m.skipped is not None or m.better == d.better, m.name
    # the report: a table per row, the plot, the largest contributions named
    from harness.report import build_report
    md = build_report(tmp_path / "run", tmp_path / "rep").read_text()
    assert "## Per-layer sensitivity" in md and "Largest contributions: layer" in md
    assert (tmp_path / "rep" / f"layer_sensitivity_{MODEL}_q8_0.png").is_file()
    assert md.count("| 3 | ") >= 1


@pytest.mark.parametrize("fault,first", [("skip_narrow_layer:1", "layer 1 K+V: applied fp32, requested fp32.q8_0@1"),
                                         ("ignore_kv_dtype", "bf16 on every layer: applied fp32, requested bf16")])
def test_a_planted_bad_kv_dtype_fails_the_check_naming_it(tmp_path, monkeypatch, fault, first):
    monkeypatch.setenv("KVBENCH_FAULT", fault)
    dtype = "q8_0" if fault.startswith("skip") else "bf16"
    suite = _suite(tmp_path, (dtype,), layers=[0, 1], parts=["kv"])
    summary = Runner(suite, tmp_path / "run", progress=False).run()
    c = {c["kv_dtype"]: c for c in summary.cases}[dtype]
    assert summary.exit_code == 1 and c["status"] == "fail"
    assert c["failures"][0].startswith("KV dtype mismatches = "), c["failures"]
    info = load_results(tmp_path / "run").info(MODEL, dtype, "layer_sensitivity")
    assert info["mismatches"][0] == first or info["mismatches"][1] == first, info["mismatches"]


def test_the_largest_layer_gate_can_fail_naming_the_layer(tmp_path):
    suite = _suite(tmp_path, layers=[2], parts=["kv"], max_layer_kld=1e-12)
    summary = Runner(suite, tmp_path / "run", progress=False).run()
    c = {c["kv_dtype"]: c for c in summary.cases}
    assert c["fp32"]["status"] == "pass"                      # the gate is n/a on the baseline row
    assert c["q8_0"]["status"] == "fail" and summary.exit_code == 1
    assert c["q8_0"]["failures"] == [f for f in c["q8_0"]["failures"] if f.startswith("Largest layer KLD = ")]
    assert "(required <= 1e-12): layer 2 K+V (fp32.q8_0@2)" in c["q8_0"]["failures"][0]


def test_config_is_validated_when_the_suite_loads(tmp_path):
    for check, msg in (({"parts": ["kv", "q"]}, "parts[1]: unknown part 'q'"),
                       ({"parts": []}, "needs at least one part"),
                       ({"layers": [1, 1]}, "repeated layer"),
                       ({"max_layer_kld": {"fp32": 0.1}}, "'Largest layer KLD' for the baseline can never")):
        with pytest.raises(SuiteError) as e:
            _suite(tmp_path, **check)
        assert msg in str(e.value), str(e.value)
    s = _suite(tmp_path, max_layer_kld=0.1)          # a number: gates the narrowed rows, n/a on fp32
    assert s.checks[0].threshold_for("max_layer_kld", MODEL, "q8_0") == 0.1


def test_the_long_and_nightly_suites_carry_it():
    for name in ("long.toml", "nightly.toml"):
        suite = load_suite(ROOT / "suites" / name)
        cfg = next(c for c in suite.checks if c.KIND == "layer_sensitivity")
        # long.toml takes K and V apart; the nightly keeps K+V only (1 + trunk-layer passes per
        # dtype instead of 3x that, inside the coder30b shard's time)
        assert cfg.tokens >= 256 and cfg.parts == (["kv", "k", "v"] if name == "long.toml" else ["kv"])
