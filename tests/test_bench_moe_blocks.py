"""benchmarks/bench_moe_blocks.py end to end on the CPU (interpreted, the small geometry): every
configuration is checked against torch maths over the dequantised experts before it is timed,
both sum forms are swept, and the settings that select each part's fastest configuration are
written for a following run to export (and are settings the engine accepts)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow(seconds=25)
def test_sweep_checks_times_and_names_the_best(tmp_path):
    out = tmp_path / "mb.json"
    r = subprocess.run([sys.executable, "benchmarks/bench_moe_blocks.py", "--device", "cpu", "--quick",
                        "--geometry", "mini", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert not doc["failed"] and not doc["skipped"]
    for part in ("gate_up", "down"):
        rows = doc["parts"][part]["rows"]
        assert {row["SUMS"] for row in rows} == {True, False}          # both forms ran
        assert all(row["rel_err"] <= 1e-4 and row["us"] > 0 for row in rows)
        assert doc["parts"][part]["default"] is not None              # the applied defaults were timed
    env = dict(line.removeprefix("export ").split("=", 1) for line in out.with_suffix(".env").read_text().split("\n") if line)
    assert env == doc["best_env"] and "KVBENCH_MOE_BLOCKS_GU_BLOCK_F" in env
    from engine import settings
    for key, value in env.items():
        settings._parse(settings.SETTINGS[key], value)                  # each one a valid setting value


def test_pinned_placement_without_cuda_is_refused_in_one_line():
    r = subprocess.run([sys.executable, "benchmarks/bench_moe_blocks.py", "--device", "cpu", "--placement", "pinned",
                        "--quick", "--geometry", "mini"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --placement pinned needs a CUDA device")
