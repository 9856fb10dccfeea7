"""Decode attention kernels under Nsight Compute's counters (stall reasons, pipes, occupancy).
Thirty-first session: why the q8_0 streams forms lost (the rows default against streams /
streams2 at the bench geometry, ctx 16384). Next: q8_0 against bf16 at coder30b's geometry
(``--hkv 4 --variants rows,bf16``), where q8_0 reads half the bytes in the same time.
Run under ncu by ``run``; ``child`` makes the launches (the first is a reference, unmeasured
by the table: each variant's max-abs against the ``rows`` output of its dtype is printed).

    python3 benchmarks/oneoff/streams_ncu.py run --out OUT/streams_ncu.json
    python3 benchmarks/oneoff/streams_ncu.py run --hkv 4 --variants rows,bf16,fp32 --out OUT/g8_ncu.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {                      # name: cfg (q8_0 unless the name is another KV dtype)
    "rows": {},
    "bf16": {},
    "fp32": {},
    "streams": {"q8_impl": "streams", "block_n": 16, "programs_per_sm": 2, "num_warps": 4, "num_stages": 2},
    "streams2": {"q8_impl": "streams2", "block_n": 16, "programs_per_sm": 2, "num_warps": 4, "num_stages": 2},
    # the rows kernel with its float16 terms stacked (q8_stack: a 64-row warpgroup MMA at G 8)
    "stack64": {"q8_stack": True},
    "stack32": {"q8_stack": True, "block_n": 32},
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
    "smsp__average_warp_latency_issue_stalled_membar.ratio",
    "smsp__average_warp_latency_issue_stalled_no_instruction.ratio",
    "smsp__average_warp_latency_issue_stalled_dispatch_stall.ratio",
    "smsp__average_warp_latency_issue_stalled_sleeping.ratio",
    "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
    "smsp__inst_executed_pipe_fma.sum", "smsp__inst_executed_pipe_alu.sum", "smsp__inst_executed_pipe_lsu.sum",
    "smsp__inst_executed_pipe_tensor.sum", "smsp__inst_executed_pipe_fp16.sum",
    "l1tex__t_bytes_pipe_lsu_mem_global_op_ld.sum", "dram__bytes_read.sum",
]


def child(ctx: int, hkv: int, names: list[str]) -> int:
    import torch
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_attention import fill_cache
    from engine.kernels import decode_attention as dmod
    from engine.kv import LayerKV
    hq, d = 32, 128
    caches = {}
    for name in names:
        fmt = name if name in ("bf16", "fp32") else "q8_0"
        if fmt not in caches:
            gen = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(hq, d, device="cuda", generator=gen)
            cache = LayerKV(0, hkv, d, ctx, fmt, device="cuda")
            fill_cache(cache, ctx, gen)
            ref = dmod.decode_attention_ref(q, cache.k, cache.v, fmt, ctx, d ** -0.5, hkv)
            caches[fmt] = (q, cache, ref)
        q, cache, ref = caches[fmt]
        out = dmod.decode_attention(q, cache.k, cache.v, fmt, ctx, d ** -0.5, hkv, cfg=dict(VARIANTS[name]))
        torch.cuda.synchronize()
        print(json.dumps({"variant": name, "fmt": fmt,
                          "max_abs_vs_ref": float((out.reshape(ref.shape) - ref).abs().max())}), flush=True)
    return 0


def run(args) -> int:
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"streams_ncu: unknown variants {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    # every decode kernel but the combine (the split kernels of each dtype and form)
    cmd = ["ncu", "--clock-control", "none", "--cache-control", "all", "-k", "regex:_decode_(q8|split|bf16)",
           "--metrics", ",".join(METRICS), "--csv", "--page", "raw", "--print-units", "base",
           sys.executable, __file__, "child", "--ctx", str(args.ctx), "--hkv", str(args.hkv),
           "--variants", args.variants]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    checks = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from peer_attention import ncu_kernels
    rows = [{"kernel": k["name"], **{m: k[m] for m in METRICS}} for k in ncu_kernels(p.stdout, tuple(METRICS))]
    # launch order: --variants in order (one split kernel each; the combine is not matched)
    res = {"ctx": args.ctx, "hkv": args.hkv, "variants": names, "cfgs": {n: VARIANTS[n] for n in names},
           "checks": checks, "kernels": rows,
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
    c.add_argument("--hkv", type=int, default=8)
    c.add_argument("--variants", default="rows,streams,streams2")
    r = sub.add_parser("run")
    r.add_argument("--ctx", type=int, default=16384)
    r.add_argument("--hkv", type=int, default=8, help="KV heads (32 query heads): 8 the bench geometry, 4 coder30b's")
    r.add_argument("--variants", default="rows,streams,streams2")
    r.add_argument("--out", required=True)
    r.add_argument("--timeout", type=int, default=240)
    args = ap.parse_args(argv)
    return child(args.ctx, args.hkv, args.variants.split(",")) if args.cmd == "child" else run(args)


if __name__ == "__main__":
    sys.exit(main())
