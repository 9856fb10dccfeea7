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
