"""The metric registry (harness/metric_registry.py, issue 16 item 6): every metric each check
emits on a tiny model is declared, with the unit and direction the check emits it with; the
gates the configs declare point the way the metrics' directions do; the runner records the
declarations in the manifest."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import checks, metric_registry
from harness.metric_registry import metric
from harness.runner import Runner
from harness.schema import CheckConfig, threshold
from harness.suite import load_suite

ROOT = Path(__file__).resolve().parent.parent
# kinds whose modules have not declared their metrics yet (each an open item); empty is the goal
PENDING: set[str] = set()


def test_every_check_declares_its_metrics():
    undeclared = {k for k in checks.kinds() if not metric_registry.declared(k)}
    assert undeclared <= PENDING, f"checks without metric declarations: {sorted(undeclared - PENDING)}"
    for k in metric_registry.kinds():
        for d in metric_registry.declared(k):
            assert d.better in ("lower", "higher", None) and isinstance(d.unit, str)


def test_what_the_default_suite_emits_on_a_tiny_model_is_declared(tmp_path, monkeypatch):
    """The five base checks of suites/kv_dtype.toml, scaled to tiny-qwen3 (coherence made
    applicable on its random weights: its metrics are emitted all the same); every metric
    of every outcome is declared with the unit and direction it was emitted with."""
    suite = load_suite(ROOT / "suites" / "kv_dtype.toml")
    for c in suite.checks:
        if c.KIND == "argmax":
            c.positions, c.noise_chunk = 32, 16
        elif c.KIND == "coherence":
            c.messages, c.max_new_tokens, c.collapse_run = c.messages[:3], 6, 4
        elif c.KIND == "wave_prefill":
            c.tokens, c.compare_from, c.ctx = 300, 200, 1024
        elif c.KIND == "vram":
            c.ctx = 1024
        elif c.KIND == "throughput":
            c.pp, c.tg = 16, 4
    emitted: list[tuple[str, object]] = []
    for kind in {c.KIND for c in suite.checks}:
        chk = checks.get(kind)
        real = chk.measure

        def spy(eng, cfg, state, ctx, _real=real, _kind=kind):
            out = _real(eng, cfg, state, ctx)
            emitted.extend((_kind, m) for m in out.metrics)
            return out

        monkeypatch.setattr(chk, "measure", spy)
    monkeypatch.setattr(checks.get("coherence"), "not_applicable", lambda cfg, model: None)
    summary = Runner(suite, tmp_path / "run", models=["tiny-qwen3"], progress=False).run()
    assert {k for k, _ in emitted} == {c.KIND for c in suite.checks}
    problems = []
    for kind, m in emitted:
        d = metric_registry.lookup(kind, m.name)
        if d is None:
            problems.append(f"{kind}: {m.name!r} is not declared")
        elif m.unit and m.unit != d.unit:
            problems.append(f"{kind}: {m.name!r} emitted in {m.unit!r}, declared {d.unit!r}")
        elif m.skipped is None and m.better != d.better:
            problems.append(f"{kind}: {m.name!r} emitted {m.better} is better, declared {d.better}")
    assert not problems, problems
    # the manifest carries the declarations the report and compare read
    from harness.results import load_results
    man = load_results(tmp_path / "run").manifest
    table = metric_registry.from_json(man["metrics"])
    assert set(table) == {c.KIND for c in suite.checks}
    assert metric_registry.lookup("argmax", "Mean KLD", table).better == "lower"
    assert summary.cases


def test_a_gate_must_point_the_way_of_its_metric():
    @dataclass
    class Cfg(CheckConfig):
        max_x: float | None = threshold("X", "<=")

    assert metric_registry.declare("t-ok", [metric("X", "", "lower")], Cfg)[0].gate == "max_x"
    with pytest.raises(ValueError, match="declared higher is better"):
        metric_registry.declare("t-bad", [metric("X", "", "higher")], Cfg)
    with pytest.raises(ValueError, match="does not declare"):
        metric_registry.declare("t-missing", [metric("Y")], Cfg)
    for k in ("t-ok",):
        metric_registry._DECLARED.pop(k, None)


def test_patterns_standard_errors_and_views():
    assert metric_registry.lookup("argmax", "Top-1 in top-7").name == "Top-1 in top-{k}"
    se = metric_registry.lookup("argmax", "Same top p SE")
    assert (se.unit, se.better) == ("%", None)
    assert metric_registry.direction("throughput", "tg128") == "higher"
    assert metric_registry.unit("throughput", "pp512 CV") == "%"
    assert metric_registry.shown("argmax", "table", ["Mean KLD SE", "Positions", "Mean KLD", "Minimum KLD"]) \
        == ["Positions", "Mean KLD"]
    assert metric_registry.lookup("argmax", "Not a metric") is None
