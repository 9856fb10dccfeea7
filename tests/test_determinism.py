"""Determinism: suites/smoke.toml run twice with the same seed on CPU gives identical records.

Only wall-clock fields are set aside (run name, ``seconds``, ``finished``/``started``, tok/s
values and throughput timing samples); every other field of every record (accuracy metrics,
memory numbers, series, token ids, verdicts) must match bit for bit, compared as canonical
JSON (floats written with repr, so one ulp of difference fails).

    .venv/bin/pytest -q tests/test_determinism.py
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from harness.results import read_records
from harness.runner import Runner
from harness.suite import load_suite

ROOT = Path(__file__).resolve().parent.parent
TIMING_KEYS = {"run", "seconds", "finished", "started"}


def _drop_timing(v):
    if isinstance(v, dict):
        return {k: _drop_timing(x) for k, x in v.items() if k not in TIMING_KEYS}
    if isinstance(v, list):
        return [_drop_timing(x) for x in v]
    return v


def timeless(rec: dict) -> dict:
    """A record without the fields that measure wall-clock time (at any depth)."""
    out = _drop_timing(rec)
    if out["type"] == "metric" and out.get("unit") == "tok/s":
        for k in ("value", "passed"):
            out.pop(k, None)
    if out["type"] == "series" and out["kind"] == "throughput":
        out.pop("values")
    return out


def test_smoke_suite_twice_gives_identical_records(tmp_path):
    suite = load_suite(ROOT / "suites" / "smoke.toml")
    runs = []
    for name in ("first", "second"):
        summary = Runner(suite, tmp_path / name, progress=False).run()
        assert summary.exit_code == 0
        runs.append(read_records(tmp_path / name))
    a, b = ([json.dumps(timeless(r), sort_keys=True) for r in recs] for recs in runs)
    assert len(a) == len(b) > 0
    diffs = [(x, y) for x, y in zip(a, b) if x != y]
    assert not diffs, f"{len(diffs)} records differ; first:\n{diffs[0][0][:800]}\n{diffs[0][1][:800]}"

    # the comparison is not vacuous: non-trivial accuracy and memory numbers were compared
    metrics = [r for r in runs[0] if r["type"] == "metric" and r.get("unit") != "tok/s"]
    kld = [r["value"] for r in metrics if r["metric"] == "Mean KLD" and r["kv_dtype"] == "bf16"]
    assert kld and all(math.isfinite(v) and v > 0 for v in kld)
    assert any(r["metric"] == "KV bytes (runtime)" and r["value"] > 0 for r in metrics)
    assert len(metrics) >= 100
