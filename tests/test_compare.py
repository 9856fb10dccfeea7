"""``harness compare`` (harness/compare.py) on hand-made results directories: runs whose
numerics-changing settings differ are refused (issue 16 item 5), and regressions follow the
direction the metric registry declares (issue 16 item 6)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine import settings
from harness import cli
from harness.compare import SettingsChangeError, compare
from harness.results import MANIFEST, RECORDS, write_manifest


def _metric(dtype, check, name, value, unit="", better=None, thr=None, op=None):
    passed = None if thr is None else (value <= thr if op == "<=" else value >= thr)
    return {"run": "hand", "suite": "hand", "model": "m1", "kv_dtype": dtype, "baseline": dtype == "fp32",
            "check": check, "kind": check, "type": "metric", "metric": name, "value": value, "unit": unit,
            "better": better, "threshold": thr, "op": op, "passed": passed, "skipped": None, "detail": None}


def _case(dtype, check):
    return {"run": "hand", "suite": "hand", "model": "m1", "kv_dtype": dtype, "baseline": dtype == "fp32",
            "check": check, "kind": check, "type": "case", "status": "pass", "failures": [], "error": None,
            "seconds": 1.0, "finished": "2025-01-01T00:00:00+00:00", "engine": {}}


def make_run(d: Path, snap: dict | None, kld: float = 0.01, metric_better: str | None = "lower") -> Path:
    d.mkdir(parents=True)
    recs = []
    for dt in ("fp32", "q8_0"):
        recs += [_metric(dt, "argmax", "Mean KLD", kld if dt == "q8_0" else 0.0, "nats", metric_better),
                 _case(dt, "argmax")]
    (d / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in recs))
    manifest = {"schema": 1, "run": d.name, "suite": {"path": "suites/hand.toml", "sha256": "abc",
                                                       "suite": {"name": "hand", "baseline": "fp32"}},
                "matrix": {"models": ["m1"], "dtypes": ["fp32", "q8_0"], "checks": ["argmax"]},
                "git": {"sha": "0" * 40, "dirty": False}, "device": {"requested": "cpu"},
                "versions": {"python": "3.11"}, "command": "hand", "started": "x", "finished": "y"}
    if snap is not None:
        manifest["settings"] = snap
    write_manifest(d, manifest)
    return d


def _snap(monkeypatch, **env) -> dict:
    for k in settings.SETTINGS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    snap = settings.snapshot()
    for k in env:
        monkeypatch.delenv(k)
    return snap


def test_runs_with_different_numerics_settings_are_refused(tmp_path, monkeypatch, capsys):
    base = make_run(tmp_path / "base", _snap(monkeypatch))
    head = make_run(tmp_path / "head", _snap(monkeypatch, KVBENCH_ATTN_PRECISION="ieee"))
    with pytest.raises(SettingsChangeError) as e:
        compare(base, head)
    msg = str(e.value)
    assert "KVBENCH_ATTN_PRECISION: 'tf32x3' vs 'ieee'" in msg and "--allow-settings-change" in msg
    assert "\n" not in msg
    # the CLI: one error line, exit 2, nothing on stdout
    assert cli.main(["compare", str(base), str(head)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and out.err.startswith("error: ")
    assert "KVBENCH_ATTN_PRECISION" in out.err
    # the override compares them and says so at the top
    assert cli.main(["compare", str(base), str(head), "--allow-settings-change"]) == 0
    md = capsys.readouterr().out
    assert "different numerics-changing settings" in md and "KVBENCH_ATTN_PRECISION: 'tf32x3' vs 'ieee'" in md
    assert md.index("numerics-changing") < md.index("regression")


def test_a_planted_fault_is_a_numerics_change(tmp_path, monkeypatch):
    base = make_run(tmp_path / "base", _snap(monkeypatch))
    head = make_run(tmp_path / "head", _snap(monkeypatch, KVBENCH_FAULT="ignore_kv_dtype"))
    with pytest.raises(SettingsChangeError, match="KVBENCH_FAULT: None vs 'ignore_kv_dtype'"):
        compare(base, head)


def test_settings_that_do_not_change_numerics_are_compared(tmp_path, monkeypatch):
    base = make_run(tmp_path / "base", _snap(monkeypatch))
    head = make_run(tmp_path / "head", _snap(monkeypatch, KVBENCH_PREFILL_WARPS="8", KVBENCH_HOST_RAM="8GiB"))
    assert not settings.SETTINGS["KVBENCH_PREFILL_WARPS"].numerics
    cmp = compare(base, head)
    assert cmp.exit_code == 0 and not cmp.settings_changes


def test_an_old_manifest_without_settings_is_a_note(tmp_path, monkeypatch):
    base = make_run(tmp_path / "base", None)
    head = make_run(tmp_path / "head", _snap(monkeypatch, KVBENCH_ATTN_PRECISION="ieee"))
    cmp = compare(base, head)
    assert cmp.exit_code == 0
    assert any("settings not recorded in base" in n for n in cmp.suite_notes)
    assert "settings not recorded in base" in cmp.markdown()


def test_identical_settings_compare_as_before(tmp_path, monkeypatch):
    base = make_run(tmp_path / "base", _snap(monkeypatch, KVBENCH_ATTN_PRECISION="ieee"))
    head = tmp_path / "head"
    shutil.copytree(base, head)
    cmp = compare(base, head)
    assert cmp.exit_code == 0 and not cmp.settings_changes
    assert json.loads((head / MANIFEST).read_text())["settings"]["KVBENCH_ATTN_PRECISION"]["set"]


def _kld_run(d: Path, kind: str, kld: float, better) -> Path:
    d.mkdir(parents=True)
    recs = []
    for dt in ("fp32", "q8_0"):
        m = _metric(dt, kind, "Mean KLD", kld if dt == "q8_0" else 0.0, "nats", better)
        c = _case(dt, kind)
        m["check"] = m["kind"] = c["check"] = c["kind"] = kind
        recs += [m, c]
    (d / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in recs))
    write_manifest(d, {"schema": 1, "run": d.name, "suite": {"path": "s.toml", "sha256": "abc", "suite": {}},
                       "matrix": {}, "git": {}, "device": {}, "versions": {}, "command": "hand",
                       "started": "x", "finished": "y"})
    return d


def test_compare_takes_the_direction_from_the_metric_registry(tmp_path):
    """wave_prefill declares Mean KLD lower-is-better: compare flags a worse head even when the
    records carry no direction, or the wrong one; an undeclared kind keeps the record's."""
    from harness import metric_registry
    assert metric_registry.direction("wave_prefill", "Mean KLD") == "lower"
    for better in (None, "higher"):
        base = _kld_run(tmp_path / f"b-{better}", "wave_prefill", 0.010, better)
        head = _kld_run(tmp_path / f"h-{better}", "wave_prefill", 0.020, better)
        cmp = compare(base, head)
        assert [(r["metric"], r["why"]) for r in cmp.regressions] == [("Mean KLD", "lower is better; tolerance 10%")]
        assert not compare(head, base).regressions and compare(head, base).improvements
    # a kind nobody declares: the record's own direction (results older than the registry)
    base = _kld_run(tmp_path / "b-x", "someone_elses_check", 0.010, "higher")
    head = _kld_run(tmp_path / "h-x", "someone_elses_check", 0.020, "higher")
    assert not compare(base, head).regressions and compare(base, head).improvements
    base = _kld_run(tmp_path / "b-y", "someone_elses_check", 0.010, None)
    head = _kld_run(tmp_path / "h-y", "someone_elses_check", 0.020, None)
    assert not compare(base, head).regressions and not compare(base, head).improvements


def test_a_recorded_declaration_serves_a_check_the_code_no_longer_has(tmp_path):
    from harness import metric_registry
    base = _kld_run(tmp_path / "b", "retired_check", 0.010, None)
    head = _kld_run(tmp_path / "h", "retired_check", 0.020, None)
    table = {"retired_check": [{"name": "Mean KLD", "unit": "nats", "better": "lower", "show": []}]}
    for d in (base, head):
        man = json.loads((d / MANIFEST).read_text())
        write_manifest(d, {**man, "metrics": table})
    assert metric_registry.lookup("retired_check", "Mean KLD") is None
    assert [r["metric"] for r in compare(base, head).regressions] == ["Mean KLD"]


def test_engines_side_by_side_lists_what_the_registry_shows_side_by_side(tmp_path, monkeypatch):
    """Two runs whose narrowed rows ran on different engines: the side-by-side table takes its
    metrics from the registry's 'side' view (Mean KLD, Same top p, KV bytes) plus the engine
    pool's KV-only records, and leaves out descriptive ones (Positions)."""
    snap = _snap(monkeypatch)
    runs = []
    for name, spec, kld in (("a", None, 0.01), ("b", "llama.cpp", 0.03)):
        d = make_run(tmp_path / name, snap, kld=kld)
        with (d / RECORDS).open("a") as f:
            for rec in (_metric("q8_0", "argmax", "Same top p", 97.0, "%", "higher"),
                        _metric("q8_0", "argmax", "Positions", 160, "tokens"),
                        _metric("q8_0", "argmax", "KV-only Mean KLD", 0.02, "nats", "lower")):
                f.write(json.dumps(rec) + "\n")
        if spec:
            m = json.loads((d / MANIFEST).read_text())
            m["engine"] = {"name": spec, "spec": spec}
            write_manifest(d, m)
        runs.append(d)
    out = compare(runs[0], runs[1])
    assert "Engines side by side: base `kvbench`, head `llama.cpp`" in out.engines
    table = out.engines.split("\n")
    assert any("Mean KLD" in line and "0.01" in line and "0.03" in line for line in table)
    assert any("Same top p" in line for line in table) and any("KV-only Mean KLD" in line for line in table)
    assert not any("| Positions |" in line for line in table)
    assert compare(runs[0], runs[0]).engines == ""


def _throughput_run(d: Path, path: str, pp_samples: list[float]) -> Path:
    """One throughput case (bf16 row) whose pp64 was timed on prefill path ``path``."""
    d.mkdir(parents=True)
    med = sorted(pp_samples)[len(pp_samples) // 2]
    key = {"run": "hand", "suite": "hand", "model": "m1", "kv_dtype": "bf16", "baseline": False,
           "check": "throughput", "kind": "throughput"}
    recs = [{**_metric("bf16", "throughput", "pp64", med, "tok/s", "higher"), "kind": "throughput"},
            {**key, "type": "series", "name": "pp64_samples", "values": pp_samples},
            {**key, "type": "info", "info": {"prefill_path": path}},
            _case("bf16", "throughput")]
    (d / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in recs))
    write_manifest(d, {"schema": 1, "run": d.name, "suite": {"path": "suites/hand.toml", "sha256": "abc",
                                                             "suite": {"name": "hand", "baseline": "fp32"}},
                       "matrix": {"models": ["m1"], "dtypes": ["bf16"], "checks": ["throughput"]},
                       "git": {"sha": "0" * 40, "dirty": False}, "device": {"requested": "cpu"},
                       "versions": {"python": "3.11"}, "command": "hand", "started": "x", "finished": "y"})
    return d


def test_prefill_speeds_of_different_prefill_paths_are_not_compared(tmp_path):
    """A fast-path pp (bf16 SDPA) 5x an exact-path one is a path change, not an improvement;
    the same path with the same 5x is one (the rank test over the repetitions)."""
    exact = _throughput_run(tmp_path / "exact", "exact", [100.0, 101.0, 99.0, 100.5, 100.2])
    fast = _throughput_run(tmp_path / "fast", "fast", [500.0, 505.0, 498.0, 502.0, 501.0])
    out = compare(exact, fast)
    row = next(r for r in out.speed if r["metric"] == "pp64")
    assert row["verdict"] == "not comparable" and "prefill path exact in base, fast in head" in row["why"]
    assert not out.improvements and not out.regressions
    exact2 = _throughput_run(tmp_path / "exact2", "exact", [500.0, 505.0, 498.0, 502.0, 501.0])
    out2 = compare(exact, exact2)
    assert [r["metric"] for r in out2.improvements] == ["pp64"]
