"""Determinism: suites/smoke.toml run twice (``python -m harness run``, same seed, CPU) gives
identical records.

Only wall-clock fields are set aside (run name, ``seconds``, ``finished``/``started``, tok/s
values and throughput timing samples), the case record's ``memory`` (this process's peak
RSS, sampled by a thread) and the free host RAM the planner read (``host_ram`` readings and
the weight-format reason quoting them); every other field of every record (accuracy metrics,
memory numbers, series, token ids, verdicts) must match bit for bit, compared as canonical
JSON (floats written with repr, so one ulp of difference fails).

    .venv/bin/pytest -q tests/test_determinism.py
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from harness.results import read_records
from record_norm import stable

ROOT = Path(__file__).resolve().parent.parent


def timeless(rec: dict) -> dict:
    return stable(rec)


def test_smoke_suite_twice_gives_identical_records(tmp_path):
    # two CLI runs side by side, one torch thread each (the same settings for both runs;
    # on 2 cores this takes about half the wall time of two runs in a row)
    # fetch/generate the suite's model once first: the two runs then only read the cache
    from engine.models import resolve
    resolve("tiny-qwen3")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "harness", "run", "suites/smoke.toml", "--out",
                               str(tmp_path / name), "--no-progress"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in ("first", "second")]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-2000:]
    runs = [read_records(tmp_path / name) for name in ("first", "second")]
    a, b = ([json.dumps(timeless(r), sort_keys=True) for r in recs] for recs in runs)
    assert len(a) == len(b) > 0
    diffs = [(x, y) for x, y in zip(a, b) if x != y]
    assert not diffs, f"{len(diffs)} records differ; first:\n{diffs[0][0][:800]}\n{diffs[0][1][:800]}"

    # the comparison is not vacuous: non-trivial accuracy and memory numbers were compared
    metrics = [r for r in runs[0] if r["type"] == "metric" and r.get("unit") != "tok/s"]
    kld = [r["value"] for r in metrics if r["metric"] == "Mean KLD" and r["kv_dtype"] == "bf16"]
    assert kld and all(math.isfinite(v) and v > 0 for v in kld)
    assert any(r["metric"] == "KV bytes (runtime)" and r["value"] > 0 for r in metrics)
    assert len(metrics) >= 90      # coherence is n/a on a random-weight model (not run)
