"""benchmarks/bench_moe_decode.py on a tiny MoE on CPU: the matrix, the JSON, failure recording.

References: the engine's own observables (decode path applied, expert-cache counts: every
static step is k resident hits per MoE layer, no miss), and the plan (every expert has a slot).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from engine import kernels, synth

ROOT = Path(__file__).resolve().parents[1]


def run_bench(capsys, tmp_path, *argv):
    spec = importlib.util.spec_from_file_location("bench_moe_decode", ROOT / "benchmarks" / "bench_moe_decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ap = argparse.ArgumentParser()
    mod.add_cli_args(ap)
    out = tmp_path / "moe.json"
    prev = kernels.get_backend()
    try:
        assert mod.main(ap.parse_args([*argv, "--out", str(out)])) == 0
    finally:
        kernels.set_backend(prev)
    text = capsys.readouterr().out
    return json.loads(out.read_text()), json.loads(text.strip().splitlines()[-1]), text


@pytest.mark.slow(seconds=40)
def test_bench_runs_both_paths_and_records_a_failing_one(capsys, tmp_path):
    doc, last, text = run_bench(capsys, tmp_path, "--model", "tiny-qwen3moe", "--device", "cpu", "--kv", "fp32,q8_0",
                                "--depths", "8,24", "--paths", "eager,static,cuda_graph", "--steps", "1",
                                "--eager-steps", "1", "--reps", "2", "--warmup", "1", "--profile", "first")
    cfg = synth.config("tiny-qwen3moe")
    n_moe, k = cfg.n_layers, cfg.n_used
    assert [(v["kv"], v["depth"]) for v in doc["variants"]] == [("fp32", 8), ("fp32", 24), ("q8_0", 8), ("q8_0", 24)]
    assert not doc["failed"] and not doc["skipped"]
    for v in doc["variants"]:
        assert v["kv_dtypes_applied"] == [v["kv"]] and v["expert_slots"] == v["trunk_experts"] == cfg.n_experts * n_moe
        assert set(v["paths"]) == {"eager", "static"}
        assert "needs a CUDA device" in v["path_errors"]["cuda_graph"]          # recorded, run went on
        for path, r in v["paths"].items():
            assert r["steps_per_rep"] == 1 and len(r["tok_s_samples"]) == 2 and r["tok_s"]["median"] > 0
            assert r["tok_s"]["min"] <= r["tok_s"]["median"] <= r["tok_s"]["max"]
        c = v["expert_cache"]
        # static: warm-up 1 + 2 reps x 1 step (+ 1 profiled step in the first variant)
        static_steps = 1 + 2 + (1 + 1 if v is doc["variants"][0] else 0)
        assert c["resident"] and c["misses"] <= n_moe * cfg.n_experts and c["evictions"] == 0
        assert c["resident_hits"] == static_steps * k * n_moe
    first = doc["variants"][0]["paths"]
    assert "profile" in first["static"] and first["static"]["profile"]["top"]
    assert "profile" not in doc["variants"][1]["paths"]["static"]                # --profile first
    assert len(last["tok_s"]) == 8 and last["path_errors"] == [["fp32", 8, "cuda_graph"], ["fp32", 24, "cuda_graph"],
                                                               ["q8_0", 8, "cuda_graph"], ["q8_0", 24, "cuda_graph"]]
    assert "tok/s" in text


@pytest.mark.slow(seconds=15)
def test_bench_keeps_experts_in_blocks_when_asked(capsys, tmp_path):
    """--expert-format blocks: every case loads with the experts in the file's Q4_0 blocks (no
    expert cache), recorded in the document; the static step reads them through moe_decode_blocks."""
    doc, _, _ = run_bench(capsys, tmp_path, "--model", "tiny-olmoe-q4_0", "--device", "cpu", "--kv", "fp32",
                          "--depths", "8,16", "--paths", "eager,static", "--steps", "1", "--eager-steps", "1",
                          "--reps", "1", "--warmup", "1", "--profile", "none", "--expert-format", "blocks")
    assert doc["expert_format"] == "blocks" and not doc["failed"]
    for v in doc["variants"]:
        assert v["expert_slots"] == v["trunk_experts"] == 0 and "expert_cache" not in v
        assert set(v["paths"]) == {"eager", "static"}
