"""Settings: every KVBENCH_* variable the code reads is declared in engine/settings.py, each
malformed value is one line and exit 2 from either CLI (even for --help), unknown variables
are refused with the closest name, and a run's manifest records them (the report prints the
non-default ones)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine import settings
from engine.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_every_variable_the_code_reads_is_declared():
    used = set()
    for path in list((ROOT / "engine").rglob("*.py")) + list((ROOT / "harness").rglob("*.py")):
        used |= set(re.findall(r"KVBENCH_[A-Z0-9_]+", path.read_text()))
    used -= {"KVBENCH_"}
    undeclared = used - set(settings.SETTINGS) - settings.WORKFLOW_VARIABLES
    assert not undeclared, f"read but not declared in engine/settings.py: {sorted(undeclared)}"
    assert len(settings.SETTINGS) >= 17


@pytest.mark.parametrize("var,value,want", [
    ("KVBENCH_DECODE_WARPS", "four", "KVBENCH_DECODE_WARPS='four' is not an integer"),
    ("KVBENCH_DECODE_BLOCK_N", "3", "is not an integer in [16, 1024]"),
    ("KVBENCH_PREFILL_BF16_FLASH", "maybe", "is not 0 or 1"),
    ("KVBENCH_ATTN_BACKEND", "cuda", "is not one of auto, torch, triton"),
    ("KVBENCH_HOST_RAM", "lots", "is not a size such as 24GiB"),
    ("KVBENCH_FAULT", "flip_bits", "is not a known fault"),
    ("KVBENCH_DECODE_MODEE", "eager", "KVBENCH_DECODE_MODEE is not a kvbench setting; did you mean KVBENCH_DECODE_MODE?"),
])
def test_a_malformed_setting_is_one_line_and_exit_2(var, value, want):
    import os
    env = {**os.environ, var: value}
    for cmd in (["-m", "engine", "--help"], ["-m", "harness", "--help"], ["-m", "harness", "run", "suites/smoke.toml"]):
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (cmd, proc.stderr)
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and want in proc.stderr, proc.stderr


def test_values_parse_and_snapshot_marks_what_is_set(monkeypatch):
    monkeypatch.setenv("KVBENCH_HOST_RAM", "1.5GiB")
    monkeypatch.setenv("KVBENCH_DECODE_COMPILE", "0")
    monkeypatch.setenv("KVBENCH_FAULT", "skip_narrow_layer:3")
    assert settings.get("KVBENCH_HOST_RAM") == 3 << 29
    assert settings.get("KVBENCH_DECODE_COMPILE") is False
    assert settings.get("KVBENCH_FAULT") == ("skip_narrow_layer", 3)
    assert settings.get("KVBENCH_ATTN_BACKEND") == "auto"
    snap = settings.snapshot()
    assert snap["KVBENCH_FAULT"] == {"value": "skip_narrow_layer:3", "set": True, "numerics": True}
    assert snap["KVBENCH_ATTN_BACKEND"]["set"] is False
    assert settings.non_default(snap) == {"KVBENCH_HOST_RAM": 3 << 29, "KVBENCH_DECODE_COMPILE": False,
                                          "KVBENCH_FAULT": "skip_narrow_layer:3"}
    monkeypatch.delenv("KVBENCH_DECODE_COMPILE")
    other = settings.snapshot()
    # the host RAM setting does not change numerics; the compile switch and the fault do
    monkeypatch.delenv("KVBENCH_FAULT")
    assert settings.numerics_changes(snap, other) == ["KVBENCH_DECODE_COMPILE: False vs True"]
    assert settings.numerics_changes(snap, settings.snapshot()) == [
        "KVBENCH_DECODE_COMPILE: False vs True", "KVBENCH_FAULT: 'skip_narrow_layer:3' vs None"]
    with pytest.raises(KeyError):
        settings.get("KVBENCH_NOT_DECLARED")


def test_the_manifest_records_settings_and_the_report_prints_non_default(tmp_path):
    import os
    env = {**os.environ, "KVBENCH_DECODE_FUSE": "0"}
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "suites/smoke.toml", "--out", str(tmp_path / "r"),
                           "--report", str(tmp_path / "rep"), "--max-cases", "1", "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr          # stopped after one case: incomplete
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert man["settings"]["KVBENCH_DECODE_FUSE"] == {"value": False, "set": True, "numerics": True}
    assert set(man["settings"]) == set(settings.SETTINGS)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "settings (non-default): `KVBENCH_DECODE_FUSE=False` (changes numerics)" in md
