"""Why the q8_0 streams forms lost (thirty-first session): Nsight Compute's sections for the rows
default and the streams / streams2 forms at the bench geometry, ctx 16384 (the tiles the layered
sweep timed). Run under ncu by ``run``; ``child`` makes the launches.

    python3 benchmarks/oneoff/streams_ncu.py run --out OUT/streams_ncu.json
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {
    "rows": {},
    "streams": {"q8_impl": "streams", "block_n": 16, "programs_per_sm": 2, "num_warps": 4, "num_stages": 2},
    "streams2": {"q8_impl": "streams2", "block_n": 16, "programs_per_sm": 2, "num_warps": 4, "num_stages": 2},
}
METRICS = [
    "gpu__time_duration.sum", "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed", "sm__warps_active.avg.pct_of_peak_sustained_active",
    "smsp__issue_active.avg.pct_of_peak_sustained_active", "smsp__inst_executed.sum",
    "launch__registers_per_thread", "launch__grid_size", "launch__block_size", "launch__occupancy_limit_registers",
    "smsp__average_warp_latency_issue_stalled_long_scoreboard.ratio",
    "smsp__average_warp_latency_issue_stalled_barrier.ratio",
    "smsp__average_warp_latency_issue_stalled_math_pipe_throttle.ratio",
    "smsp__average_warp_latency_issue_stalled_wait.ratio",
    "smsp__average_warp_latency_issue_stalled_short_scoreboard.ratio",
    "smsp__average_warp_latency_issue_stalled_mio_throttle.ratio",
    "smsp__average_warp_latency_issue_stalled_lg_throttle.ratio",
    "smsp__average_warp_latency_issue_stalled_not_selected.ratio",
    "smsp__average_warp_latency_issue_stalled_selected.ratio",
    "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
    "smsp__inst_executed_pipe_fma.sum", "smsp__inst_executed_pipe_alu.sum", "smsp__inst_executed_pipe_lsu.sum",
    "smsp__inst_executed_pipe_tensor.sum", "smsp__inst_executed_pipe_fp16.sum",
    "l1tex__t_bytes_pipe_lsu_mem_global_op_ld.sum", "dram__bytes_read.sum",
]


def child(ctx: int) -> int:
    import torch
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_attention import fill_cache
    from engine.kernels import decode_attention as dmod
    from engine.kv import LayerKV
    hq, hkv, d = 32, 8, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(hq, d, device="cuda", generator=gen)
    cache = LayerKV(0, hkv, d, ctx, "q8_0", device="cuda")
    fill_cache(cache, ctx, gen)
    ref = dmod.decode_attention(q, cache.k, cache.v, "q8_0", ctx, d ** -0.5, hkv)
    for name, cfg in VARIANTS.items():
        out = dmod.decode_attention(q, cache.k, cache.v, "q8_0", ctx, d ** -0.5, hkv, cfg=dict(cfg))
        torch.cuda.synchronize()
        print(json.dumps({"variant": name, "max_abs_vs_rows": float((out - ref).abs().max())}), flush=True)
    return 0


def run(args) -> int:
    cmd = ["ncu", "--clock-control", "none", "--cache-control", "all", "-k", "regex:_decode_q8",
           "--metrics", ",".join(METRICS), "--csv", "--page", "raw",
           sys.executable, __file__, "child", "--ctx", str(args.ctx)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    lines = p.stdout.splitlines()
    checks = [json.loads(x) for x in lines if x.startswith("{")]
    start = next((i for i, x in enumerate(lines) if x.startswith('"ID"')), None)
    rows = []
    if start is not None:
        rdr = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
        for r in rdr[1:]:                     # [0] is the units row
            rows.append({"kernel": r.get("Kernel Name"), **{m: r.get(m) for m in METRICS}})
    # launch order: the reference (rows) then VARIANTS in order; the combine is not matched
    res = {"ctx": args.ctx, "variants": list(VARIANTS), "cfgs": VARIANTS, "checks": checks, "kernels": rows,
           "rc": p.returncode, "stderr_tail": p.stderr[-2000:]}
    Path(args.out).write_text(json.dumps(res, indent=1))
    for r in rows:
        print(r["kernel"][:40], {k.split("__")[-1][:40]: r[k] for k in METRICS[:6]})
    print(checks, p.returncode, p.stderr[-500:] if p.returncode else "")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("child")
    c.add_argument("--ctx", type=int, default=16384)
    r = sub.add_parser("run")
    r.add_argument("--ctx", type=int, default=16384)
    r.add_argument("--out", required=True)
    r.add_argument("--timeout", type=int, default=240)
    args = ap.parse_args(argv)
    return child(args.ctx) if args.cmd == "child" else run(args)


if __name__ == "__main__":
    sys.exit(main())
