"""Suites on llama.cpp (issue 17 items 3 and 4), through the runner and the real CLI: ``make test-engines``.

- The default suite (suites/kv_dtype.toml, scaled as tests/test_faults.py scales it: the same
  code paths, seconds instead of minutes) with ``--engine llama.cpp``: the fp32 row on
  kvbench's engine, bf16 / q8_0 on llama.cpp. Clean, no row is flagged ``not applied?`` and
  llama.cpp reports the requested KV types; its KV-only cost is recorded. With the seed's bug
  replayed on llama.cpp (``KVBENCH_FAULT=llamacpp_keep_f16``: q8_0 requested, f16 kept) the
  same suite fails, and the q8_0 argmax case is flagged ``not applied?`` by the detector
  (its logits equal llama.cpp's own f16 run bit for bit), with vram naming f16 too.
- Side by side through the CLI: one small suite run with kvbench's engine and with
  ``--engine llama.cpp`` (``--report``), then ``harness compare``: both the report and the
  comparison put the engines side by side.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_engines_support import engines_only  # noqa: F401  (autouse: make test-engines only)

pytestmark = pytest.mark.engines
ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"

SMALL = """
[suite]
name = "engines-small"
models = ["smollm2-135m"]
baseline = "fp32"
kv_dtypes = ["bf16", "q8_0"]
device = "cpu"
ctx = 1024

[[check]]
kind = "argmax"
positions = 64
noise_chunk = 16
messages = [[{ role = "user", content = "Explain how a bicycle stays upright, step by step, for a curious child." }]]
max_mean_kld = { fp32 = 1e-6, bf16 = 0.05, q8_0 = 0.05 }

[[check]]
kind = "topk_argmax"
positions = 64
top_logprobs = 10
noise_chunk = 16
messages = [[{ role = "user", content = "Explain how a bicycle stays upright, step by step, for a curious child." }]]
max_mean_kld = { fp32 = 1e-6, bf16 = 0.05, q8_0 = 0.05 }

[[check]]
kind = "coherence"
max_new_tokens = 16
messages = [[{ role = "user", content = "Write a short sentence about the ocean." }]]

[[check]]
kind = "vram"
exercise_tokens = 16
optional = { max_plan_diff_pct = "only kvbench's engine has a planner" }
"""


def _default_suite_scaled():
    import harness.runner  # noqa: F401
    from harness.suite import load_suite
    suite = load_suite(ROOT / "suites" / "kv_dtype.toml")
    for c in suite.checks:
        if c.KIND == "argmax":
            c.positions, c.noise_chunk = 64, 16
        elif c.KIND == "coherence":
            c.max_new_tokens = 16
        elif c.KIND == "wave_prefill":
            c.tokens, c.compare_from, c.ctx = 300, 200, 1024
        elif c.KIND == "vram":
            c.ctx = 1024
        elif c.KIND == "throughput":
            c.pp, c.tg = 32, 8
    return suite


def _run(tmp_path, name):
    from harness.runner import Runner
    summary = Runner(_default_suite_scaled(), tmp_path / name, models=[MODEL], progress=False,
                     engine="llama.cpp").run()
    return summary, {(c["kv_dtype"], c["check"]): c for c in summary.cases}


def _metric(out: Path, dtype: str, check: str, metric: str):
    for line in (out / "records.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("type") == "metric" and (r["kv_dtype"], r["check"], r["metric"]) == (dtype, check, metric):
            return r["value"]
    return None


def test_default_suite_on_llamacpp_flags_the_replayed_seed_bug(tmp_path, monkeypatch):
    clean, cases = _run(tmp_path, "clean")
    flagged = [f for c in clean.cases for f in c.get("failures") or [] if f.startswith("not applied?")]
    assert not flagged, flagged
    for d in ("bf16", "q8_0"):
        assert cases[(d, "argmax")]["engine"]["engine"] == "llama.cpp"
        assert cases[(d, "argmax")]["status"] == "pass", cases[(d, "argmax")]
        assert cases[(d, "vram")]["engine"]["kv_dtypes"] == [d] * 30
        assert _metric(tmp_path / "clean", d, "vram", "KV dtype mismatches") == 0
        kv_only = _metric(tmp_path / "clean", d, "argmax", "KV-only Mean KLD")
        print(f"clean llama.cpp {d}: KV-only Mean KLD {kv_only:.3g}, vs kvbench fp32 "
              f"{_metric(tmp_path / 'clean', d, 'argmax', 'Mean KLD'):.3g}")
        assert kv_only > 0
    assert cases[("fp32", "argmax")]["engine"]["engine"] == "kvbench"
    assert cases[("q8_0", "wave_prefill")]["status"] == "n/a"
    assert "engine llama.cpp does not provide prefill_stats" in cases[("q8_0", "wave_prefill")]["reason"]

    monkeypatch.setenv("KVBENCH_FAULT", "llamacpp_keep_f16")
    bad, cases = _run(tmp_path, "planted")
    assert bad.exit_code == 1
    c = cases[("q8_0", "argmax")]
    assert c["status"] == "fail"
    assert c["failures"][0].startswith("not applied? q8_0 (q8_0 on llama.cpp): its logits equal llama.cpp's "
                                       "f32 and f16 KV logits bit for bit at all 128 positions"), c["failures"]
    v = cases[("q8_0", "vram")]
    assert v["status"] == "fail" and "layer 0 holds f16, requested q8_0" in v["failures"][0]
    print("planted:", c["failures"][0])


def _cli(*args, env=None, timeout=900):
    p = subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **(env or {})})
    return p


def test_side_by_side_through_the_cli(tmp_path):
    suite = tmp_path / "small.toml"
    suite.write_text(SMALL)
    runs = {}
    for engine in ("kvbench", "llama.cpp"):
        out = tmp_path / engine
        p = _cli("run", str(suite), "--out", str(out), "--engine", engine, "--no-progress",
                 "--report", str(tmp_path / f"report-{engine}"))
        last = json.loads(p.stdout.strip().splitlines()[-1])
        assert last["engine"] == engine and p.returncode in (0, 1), p.stderr[-3000:]
        runs[engine] = (out, last)
    out, last = runs["llama.cpp"]
    assert last["statuses"].get("error") is None, last
    report = (tmp_path / "report-llama.cpp" / "report.md").read_text()
    assert "## Engines side by side" in report and "**llama.cpp**" in report
    assert "Mean KLD top-10+tail vs baseline (lower bound)" in report
    assert "## Engines side by side" not in (tmp_path / "report-kvbench" / "report.md").read_text()
    cmp = _cli("compare", str(runs["kvbench"][0]), str(out), "--out", str(tmp_path / "diff.md"))
    assert cmp.returncode in (0, 1), cmp.stderr
    md = (tmp_path / "diff.md").read_text()
    assert "### Engines side by side: base `kvbench`, head `llama.cpp`" in md
    side = md.split("### Engines side by side")[1]
    assert "| q8_0 | argmax | Mean KLD |" in side and "| q8_0 | topk_argmax | Mean KLD (top-10+tail) |" in side
    print(side[:3000])


def test_a_planted_run_through_the_cli_names_the_case(tmp_path):
    suite = tmp_path / "small.toml"
    suite.write_text(SMALL)
    p = _cli("run", str(suite), "--out", str(tmp_path / "r"), "--engine", "llama.cpp", "--no-progress",
             env={"KVBENCH_FAULT": "llamacpp_keep_f16"})
    assert p.returncode == 1, p.stderr[-3000:]
    assert "fail smollm2-135m q8_0 argmax: not applied? q8_0 (q8_0 on llama.cpp)" in p.stdout.replace("\n", " ")
