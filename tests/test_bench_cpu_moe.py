"""benchmarks/bench_cpu_moe.py on the CPU: every case recorded with what was applied, a case
the planner refuses recorded as refused (not dropped), the host experts' time measured only
where layers run there."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_cpu_moe  # noqa: E402


def test_cases_record_what_was_applied(tmp_path):
    out = tmp_path / "cpu_moe.json"
    assert bench_cpu_moe.main(["--model", "coder30b-mini-synth", "--cases", "none:auto,none:2:q8_0,1MiB:auto,none:2:q8_0:pcie,none:1:q8_0:dma",
                               "--kv", "fp32", "--depths", "8", "--tokens", "2", "--reps", "1",
                               "--weight-format", "f32", "--threads", "1", "--host-read-mib", "16",
                               "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    auto, two, refused, pcie, dma = r["cases"]
    from engine import native
    if native.available()[0]:            # the host's read rate, and the host experts' share of it
        assert r["host_read"]["bytes"] == 16 << 20 and r["host_read"]["gb_s"] > 0
        d2 = two["decode"][0]
        assert abs(d2["host_experts_of_read"] - d2["host_experts_gb_s"] / r["host_read"]["gb_s"]) < 1e-12
        assert r["layer"]["native_us"]["1"] > 0
    else:
        assert "skipped" in r["host_read"] and "host_experts_of_read" not in two["decode"][0]
    assert dma["host_experts"] == "dma" and dma["plan_max_abs_diff"] == 0
    dd = dma["decode"][0]                # a routing sync and copies a layer: timed as host experts
    assert dd["host_experts_ms_per_step"] > 0 and dd["host_experts_gb_s"] > 0
    assert (pcie["host_experts"], pcie["cpu_moe"], pcie["cpu_expert_math"].split(":")[0]) == \
        ("pcie", 2, "the device reads the host's blocks in place over PCIe")
    pd = pcie["decode"][0]               # nothing computed on the host: no host time, the read rate instead
    assert "host_experts_ms_per_step" not in pd and pd["pcie_read_gb_s"] > 0 and pcie["plan_max_abs_diff"] == 0
    assert auto["cpu_moe"] == 0 and auto["expert_format"] == "q4_0" and auto["cpu_expert_math"] is None
    assert two["cpu_moe"] == 2 and "bf16" in two["cpu_expert_math"]
    assert (auto["weight_format"], two["weight_format"], refused["weight_format"]) == ("f32", "q8_0", "f32")
    assert auto["plan_max_abs_diff"] == two["plan_max_abs_diff"] == 0
    assert "host_experts_ms_per_step" not in auto["decode"][0]
    d = two["decode"][0]
    assert 0 < d["host_experts_ms_per_step"] < d["step_ms"] and d["tok_s"] > 0
    # every timed step's clock kept: 1 repetition of 2 tokens, whose sum is the repetition's time
    assert len(d["step_ms_reps"]) == 1 and len(d["step_ms_reps"][0]) == 2
    assert 2 / (sum(d["step_ms_reps"][0]) / 1e3) >= d["tok_s"]
    assert d["host_read_bytes"] > 0 and d["host_experts_gb_s"] > 0 and d["trunk_read_gb_s"] > 0
    a = auto["decode"][0]              # no host experts: nothing timed there, its reads are the trunk's
    assert "host_experts_gb_s" not in a and d["host_read_bytes"] > a["host_read_bytes"]
    assert d["trunk_read_bytes"] < a["trunk_read_bytes"]
    assert "error" in refused and "budget" in refused["error"]
    layer = r["layer"]
    assert layer["host_us"]["1"] > 0 and layer["pack_layer_s"] > 0
    assert not auto.get("weights_reused")


def test_the_next_kv_dtype_takes_the_weights_over(tmp_path, capsys):
    """The second KV dtype takes the first's weights over; --wave-budget is the plan's wave scratch
    in every case (and a size that is not one is exit 2, nothing written)."""
    out = tmp_path / "cpu_moe.json"
    assert bench_cpu_moe.main(["--model", "coder30b-mini-synth", "--cases", "none:2", "--kv", "fp32,bf16",
                               "--depths", "8", "--tokens", "2", "--reps", "1", "--weight-format", "f32",
                               "--threads", "1", "--prefill-path", "exact", "--wave-budget", "8MiB",
                               "--host-read-mib", "0", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    first, second = r["cases"]
    assert r["host_read"] == {"skipped": "--host-read-mib 0"}      # not measured, and says so
    assert all("host_experts_of_read" not in c["decode"][0] for c in (first, second))
    assert first["decode"][0]["prefill_path"] == "exact"              # the depth filled as asked
    assert (first["weights_reused"], second["weights_reused"]) == (False, True)
    assert first["cpu_moe"] == second["cpu_moe"] == 2 and second["plan_max_abs_diff"] == 0
    assert first["scratch_items"]["wave"] == second["scratch_items"]["wave"] == 8 << 20
    bad = tmp_path / "bad.json"
    assert bench_cpu_moe.main(["--model", "coder30b-mini-synth", "--wave-budget", "lots", "--out", str(bad)]) == 2
    assert "--wave-budget" in capsys.readouterr().err and not bad.exists()


def test_gpu_shares_each_timed_and_recorded_and_bad_ones_refused(tmp_path, capsys, monkeypatch):
    """--gpu-shares: each share of a cpu-tier layer's experts timed on the same engine, the share
    and the layer's recorded maths on every row (on a CPU the share cannot apply and the maths
    says it is CUDA's); a value that is not a share is exit 2 with one line, nothing written."""
    monkeypatch.delenv("KVBENCH_CPU_MOE_GPU_SHARE", raising=False)
    import os
    out = tmp_path / "cpu_moe.json"
    assert bench_cpu_moe.main(["--model", "coder30b-mini-synth", "--cases", "none:2:q8_0", "--kv", "fp32",
                               "--depths", "8", "--tokens", "2", "--reps", "1", "--weight-format", "f32",
                               "--threads", "1", "--gpu-shares", "0,2", "--host-read-mib", "0",
                               "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["cases"][0]["decode"]
    assert [r["gpu_share"] for r in rows] == [0, 2]
    assert [r["gpu_share_applied"] for r in rows] == [0, 0]     # asked on a CPU: not applied, and says so
    assert "KVBENCH_CPU_MOE_GPU_SHARE" not in os.environ        # the bench put the environment back
    assert "GPU_SHARE" not in rows[0]["cpu_expert_math"] and "on CUDA, 2 of each token's experts" in rows[1]["cpu_expert_math"]
    bad = tmp_path / "bad.json"
    assert bench_cpu_moe.main(["--model", "coder30b-mini-synth", "--gpu-shares", "2,x", "--out", str(bad)]) == 2
    assert "--gpu-shares" in capsys.readouterr().err and not bad.exists()


def test_host_counters_see_a_child_that_burns_cpu():
    """``host_counters``: a child process of this one that runs while the counters are read shows
    as a descendant, with the CPU it burnt, and the system's user jiffies rise by at least as
    much; levels (the descendant count) are not differenced. Linux only: /proc."""
    import subprocess
    import time
    import pytest
    if not Path("/proc/self/task").is_dir():
        pytest.skip("host_counters reads Linux's /proc")
    a = bench_cpu_moe.host_counters()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.3: pass\ntime.sleep(30)"])
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            b = bench_cpu_moe.host_counters()
            if b["descendants_cpu"] - a["descendants_cpu"] >= 25:       # ticks of 10 ms: >= 0.25 s
                break
            time.sleep(0.1)
        d = bench_cpu_moe.counter_delta(a, b)
        assert b["descendants"] >= 1 and d["descendants"] == b["descendants"]
        assert d["descendants_cpu"] >= 25 and d["cpu_user"] + d["cpu_system"] >= d["descendants_cpu"] - 5
    finally:
        child.kill()
        child.wait()
