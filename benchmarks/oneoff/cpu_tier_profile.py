"""Where a `cpu`-tier hybrid step spends its time, per host layer, at each CPU thread count and GPU share.

Contract: on CUDA, loads ``--model`` (default coder30b-synth) at ``--budget`` with Q4_0 experts in
blocks, ``--cpu-moe`` host layers (default auto) computed by the host CPU (``host_experts="cpu"``)
and a captured decode, then for each ``--threads`` x ``--shares`` (``torch.set_num_threads``,
``KVBENCH_CPU_MOE_GPU_SHARE``): greedy decode tok/s after a prefill of ``--depth`` tokens (median of
``--reps`` runs of ``--tokens`` steps, nothing synced in between, unlike ``bench_cpu_moe``'s
timer) and the host round trip's phases from ``CpuExperts.clock`` (us a host layer, median over
the timed steps): ``launch`` (start to the routing sync: staging copies and, with a share, the GPU
side's launch), ``wait`` (the sync: the GPU's stretch since the last host layer), ``cpu`` (the int4
experts), ``back`` (the result's copies), ``between`` (a layer's end to the next one's start: the
next graph's replay launch), and what the step's wall leaves outside them. Then, for the first
thread count, a ``torch.profiler`` pass over a few steps per share: the top host ops and device
kernels. Prints one line a variant and writes JSON to ``--out``.

The eighteenth session's question (docs/perf-notes.md): the split of a layer's experts between the
CPU and the GPU gained nothing on a slow host although the CPU's own time should have fallen with
its share; ``host_contention.py`` showed the two sides do not contend on a fast host. Run it under
``OMP_WAIT_POLICY=PASSIVE`` too (``--tag passive``): spinning OpenMP workers may starve the thread
that launches the graphs and waits on the device.

    python benchmarks/oneoff/cpu_tier_profile.py --budget 11468MiB --threads 16,8 --shares 0,4 --out p.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import engine  # noqa: E402
from engine import settings  # noqa: E402
from engine.errors import EngineError  # noqa: E402
from engine.model import CpuExperts  # noqa: E402

PHASES = ("launch", "wait", "cpu", "back", "between")


def phases(clock: list, per_step: int) -> dict:
    """Median us a host layer of each phase over ``clock``'s tuples, ``per_step`` of them a step."""
    out = {p: [] for p in PHASES}
    for j, (t0, _t1, t2, t3, t4, t5) in enumerate(clock):
        out["launch"].append(t2 - t0)
        out["wait"].append(t3 - t2)
        out["cpu"].append(t4 - t3)
        out["back"].append(t5 - t4)
        if (j + 1) % per_step and j + 1 < len(clock):
            out["between"].append(clock[j + 1][0] - t5)
    return {p: round(1e6 * statistics.median(v), 1) if v else None for p, v in out.items()}


def timed_decode(eng, prompt: list[int], tokens: int, reps: int) -> dict:
    eng.prefill(prompt)
    tok = prompt[-1]
    for _ in range(2):                                   # capture, warm
        eng.decode(tok)
    walls, clocks = [], []
    n_host = len(eng.model.host_expert_layers())
    for _ in range(reps):
        eng.prefill(prompt)
        torch.cuda.synchronize()
        CpuExperts.clock = []
        t = time.perf_counter()
        for _ in range(tokens):
            eng.decode(tok)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
        clocks.append(CpuExperts.clock)
        CpuExperts.clock = None
    i = sorted(range(reps), key=lambda r: walls[r])[reps // 2]       # the median run's phases
    step_us = 1e6 * walls[i] / tokens
    ph = phases(clocks[i], n_host) if clocks[i] else {p: None for p in PHASES}
    inside = sum(v for v in ph.values() if v is not None) * n_host
    return {"tok_s": round(tokens / statistics.median(walls), 2), "tok_s_all": [round(tokens / w, 2) for w in walls],
            "step_us": round(step_us, 1), "host_layers": n_host, "records": len(clocks[i]),
            "phases_us": ph, "outside_host_layers_us": round(step_us - inside, 1)}


def profile(eng, prompt: list[int], steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile as prof
    eng.prefill(prompt)
    tok = prompt[-1]
    eng.decode(tok)
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(steps):
            eng.decode(tok)
        torch.cuda.synchronize()
    ka = p.key_averages()

    def top(attr, n=12):
        rows = sorted(ka, key=lambda e: getattr(e, attr), reverse=True)[:n]
        return [{"name": e.key[:90], "calls": e.count, "us_per_step": round(getattr(e, attr) / steps, 1)}
                for e in rows if getattr(e, attr) > 0]
    return {"steps": steps, "host_self": top("self_cpu_time_total"), "device_self": top("self_device_time_total")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="coder30b-synth")
    ap.add_argument("--budget", default="11468MiB")
    ap.add_argument("--cpu-moe", default="auto")
    ap.add_argument("--weight-format", default="q8_0")
    ap.add_argument("--threads", default="", help="comma list (default: torch's)")
    ap.add_argument("--shares", default="0,4")
    ap.add_argument("--native", default="0", help="comma list of KVBENCH_CPU_MOE_NATIVE values (0: torch's int4 "
                                                  "path, 1: engine.native), each timed")
    ap.add_argument("--host-nodes", default="0", help="comma list of KVBENCH_HOST_NODES values (1: the native "
                                                      "layers as host nodes inside one graph; no phase clock there)")
    ap.add_argument("--node-waits", default="sleep", help="comma list of KVBENCH_HOST_NODES_WAIT values for the "
                                                          "host-node rows (sleep, spin)")
    ap.add_argument("--node-runs", default="callback", help="comma list of KVBENCH_HOST_NODES_RUN values for the "
                                                            "host-node rows (callback, doorbell)")
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=6, help="0: no profiler pass")
    ap.add_argument("--tag", default="", help="a label for this process's variant (e.g. passive)")
    ap.add_argument("--out", type=Path, default=Path("cpu_tier_profile.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: cpu_tier_profile needs a CUDA device (the cpu tier's round trip is device <-> host)",
              file=sys.stderr)
        return 2
    try:
        threads = [int(x) for x in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
        shares = [int(x) for x in args.shares.split(",")]
        natives = [int(x) for x in args.native.split(",")]
        nodes = [int(x) for x in args.host_nodes.split(",")]
        cpu_moe = args.cpu_moe if args.cpu_moe == "auto" else int(args.cpu_moe)
    except ValueError as exc:
        print(f"error: {exc}: --threads, --shares and --cpu-moe take integers", file=sys.stderr)
        return 2
    try:
        eng = engine.load(args.model, kv_dtype="bf16", device="cuda", ctx=args.depth + args.tokens + 64,
                          vram_budget=settings.parse_size(args.budget), weight_format=args.weight_format,
                          expert_format="blocks", cpu_moe=cpu_moe, host_experts="cpu")
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(args.depth)
    prompt = torch.randint(100, eng.spec.vocab_size - 100, (max(args.depth, 2),), generator=g).tolist()
    res = {"model": args.model, "device": torch.cuda.get_device_name(), "tag": args.tag,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "budget": args.budget,
           "cpu_moe": eng.plan.cpu_moe, "host_experts": eng.plan.host_experts, "decode_path": eng.decode_path,
           "cpu_expert_math": eng.cpu_expert_math, "default_threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "rows": [], "profiles": []}
    prior = {k: os.environ.get(k) for k in ("KVBENCH_CPU_MOE_GPU_SHARE", "KVBENCH_CPU_MOE_NATIVE", "KVBENCH_HOST_NODES",
                                            "KVBENCH_HOST_NODES_WAIT", "KVBENCH_HOST_NODES_RUN")}
    waits, runs = args.node_waits.split(","), args.node_runs.split(",")
    try:
        for hn, rn, wt, nat, th, share in ((a, r, w, b, c, d) for a in nodes for r in (runs if a else runs[:1])
                                           for w in (waits if a else waits[:1])
                                           for b in natives for c in threads for d in shares):
            os.environ["KVBENCH_HOST_NODES"] = str(hn)
            os.environ["KVBENCH_HOST_NODES_WAIT"] = wt
            os.environ["KVBENCH_HOST_NODES_RUN"] = rn
            os.environ["KVBENCH_CPU_MOE_NATIVE"] = str(nat)
            torch.set_num_threads(th)
            os.environ["KVBENCH_CPU_MOE_GPU_SHARE"] = str(share)
            if hn or (eng._static is not None and eng._static.node_layers):
                eng.set_decode_mode("auto")   # rebuilt: a host node bakes these settings (and the threads) in
            for i in eng.model.host_expert_layers():      # set by CpuExperts.run, which a host node skips
                eng.model.layers[i].experts.last_gpu_share = 0
            row = {"threads": th, "gpu_share": share, "native": nat, "host_nodes": hn,
                   **timed_decode(eng, prompt, args.tokens, args.reps)}
            row["host_node_layers"] = len(eng._static.node_layers) if eng._static is not None else 0
            row["host_wait"] = eng._static.host_wait if eng._static is not None else None   # applied (None: no nodes)
            row["node_run"] = eng._static.node_run if eng._static is not None else None
            row["decode_path_reason"] = eng.decode_path_reason
            row["gpu_share_applied"] = max(getattr(eng.model.layers[i].experts, "last_gpu_share", 0)
                                           for i in eng.model.host_expert_layers())
            row["cpu_expert_math"] = eng.cpu_expert_math
            res["rows"].append(row)
            print(f"{args.tag or 'default'} nodes {row['host_node_layers']} run {row['node_run']} wait {row['host_wait']} native {nat} threads {th} share {share} (applied "
                  f"{row['gpu_share_applied']}): {row['tok_s']} tok/s, step {row['step_us']} us, per host "
                  f"layer {row['phases_us']}, outside host layers {row['outside_host_layers_us']} us", flush=True)
        if args.profile_steps:
            torch.set_num_threads(threads[0])
            os.environ["KVBENCH_HOST_NODES"] = str(nodes[0])
            os.environ["KVBENCH_CPU_MOE_NATIVE"] = str(natives[0])
            for share in shares:
                os.environ["KVBENCH_CPU_MOE_GPU_SHARE"] = str(share)
                if nodes[0] or (eng._static is not None and eng._static.node_layers):
                    eng.set_decode_mode("auto")
                res["profiles"].append({"threads": threads[0], "gpu_share": share,
                                        **profile(eng, prompt, args.profile_steps)})
                for e in res["profiles"][-1]["host_self"][:6]:
                    print(f"  share {share} host  {e['us_per_step']:9.1f} us/step {e['calls']:5d}x {e['name']}")
                for e in res["profiles"][-1]["device_self"][:6]:
                    print(f"  share {share} device{e['us_per_step']:9.1f} us/step {e['calls']:5d}x {e['name']}")
    finally:
        for k, v in prior.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
