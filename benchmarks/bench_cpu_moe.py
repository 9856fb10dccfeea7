"""llama.cpp's placement on our engine: experts in GGUF blocks, the first N MoE layers' on the CPU.

Contract: for a MoE GGUF with Q4_0 experts (default coder30b-synth) on CUDA, loads the engine
with ``expert_format="blocks"`` at each ``--cases`` (budget:cpu_moe[:weights], weights the
non-expert matrices' format, e.g. q8_0 as llama.cpp keeps them) x ``--kv`` and
records: the applied ``cpu_moe`` and decode path, plan vs ledger (max |diff|), load seconds,
greedy decode tok/s at each ``--depths`` (greedy ``decode`` steps after a fast-path prefill
of that many tokens: median of ``--reps``; each timed step's milliseconds as ``step_ms_reps``, and
any step over ten times their median as ``stalls``), and the time one step spends in the host experts
(``CpuExperts.run`` timed with the device synced around it, in a pass of its own after each
timed one, so the tok/s pays no such syncs), and the bytes a token reads on
each side (``planner.decode_read_bytes``) with the rates they imply (trunk GB/s at the measured
tok/s; host experts' GB/s over the time spent in them, and that rate's share of the host's
read rate at the cases' thread count, timed once at the start: ``engine.native.read_rate`` over
``--host-read-mib``, ``host_read`` in the JSON). Then two isolated timings for
one layer of k experts: the host CPU paths (torch int4 ``HostQ4Experts`` as ``host_us``, and
``engine.native`` as ``native_us`` where it builds, at each ``--threads``) and
the device kernels (``moe_decode_blocks`` on Q4_0 blocks against ``moe_decode`` on bf16
stacks, ``triton.testing.do_bench``). Prints one line per case and writes JSON to ``--out``.
The llama.cpp side of the comparison is ``benchmarks/bench_llamacpp.py run --n-cpu-moe N``
on the same file, in the same call.

    python benchmarks/bench_cpu_moe.py --model coder30b-synth --cases 12GiB:auto,none:17 \\
        --kv bf16,q8_0 --depths 16,4096 --out cpu_moe.json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
from engine import settings  # noqa: E402
from engine.engine import WeightsPlacementError  # noqa: E402
from engine.errors import EngineError  # noqa: E402
from harness.results import runtime_env  # noqa: E402


sys.path.insert(0, str(Path(__file__).resolve().parent))
from vram import used_vram_mib  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class HostTimer:
    """Wraps every ``CpuExperts.run`` of a model: seconds spent there, device synced around."""

    def __init__(self, model):
        self.seconds, self.calls, self.wrapped = 0.0, 0, []
        for w in model.layers:
            if getattr(w.experts, "host_compute", False):     # CpuExperts, DmaExperts
                self.wrapped.append((w.experts, w.experts.run))
                w.experts.run = self._timed(w.experts.run)

    def _timed(self, run):
        def timed(*a, **kw):
            _sync()
            t = time.perf_counter()
            y = run(*a, **kw)
            _sync()
            self.seconds += time.perf_counter() - t
            self.calls += 1
            return y
        return timed

    def reset(self):
        self.seconds, self.calls = 0.0, 0

    def restore(self):
        for ex, run in self.wrapped:
            ex.run = run


def decode_case(eng, depth: int, n: int, reps: int, prefill_path: str = "fast") -> dict:
    g = torch.Generator().manual_seed(depth)
    prompt = torch.randint(100, eng.spec.vocab_size - 100, (max(depth, 2),), generator=g).tolist()
    # the host experts' time comes from a pass of its own: the timer syncs the device around each
    # host layer, which the tok/s pass must not pay (until the nineteenth session it did)
    from engine.cuda_graph import node_layers
    # host-node layers (KVBENCH_HOST_NODES) run inside the graph, never through CpuExperts.run:
    # the synced pass cannot time them, and is not run (no zero recorded as their time)
    nodes = node_layers(eng) if eng.decode_path == "cuda_graph" else []
    timed_host = bool(eng.model.host_expert_layers()) and not nodes
    tok_s, host_ms, host_pass_tok_s, prefill_s, step_ms, counters = [], [], [], [], [], []
    # untimed warm-up: the first step at a depth compiles and captures (call 3's first repetition:
    # 1.5 tok/s against 84-85 for the next two)
    eng.set_prefill_path(prefill_path)
    eng.prefill(prompt)
    eng.set_prefill_path("exact")
    _greedy(eng, prompt[-1], 2)
    # the process's card memory once a prefill and a captured step have run (with the reading
    # right after the load: where the memory outside the allocator appears)
    vram_warm = used_vram_mib(os.getpid()) if torch.cuda.is_available() else None
    for _ in range(reps):
        eng.set_prefill_path(prefill_path)
        _sync()
        t = time.perf_counter()
        eng.prefill(prompt)
        _sync()
        prefill_s.append(time.perf_counter() - t)
        eng.set_prefill_path("exact")
        _sync()
        c0 = host_counters()
        t = time.perf_counter()
        step_ms.append(_greedy(eng, prompt[-1], n))
        _sync()
        dt = time.perf_counter() - t
        counters.append(counter_delta(c0, host_counters()))
        tok_s.append(n / dt)
        if timed_host:
            eng.set_prefill_path(prefill_path)
            eng.prefill(prompt)
            eng.set_prefill_path("exact")
            timer = HostTimer(eng.model)
            try:
                _sync()
                t = time.perf_counter()
                _greedy(eng, prompt[-1], n)
                _sync()
                host_pass_tok_s.append(n / (time.perf_counter() - t))
                host_ms.append(1e3 * timer.seconds / n)
            finally:
                timer.restore()
    out = {"depth": depth, "tokens": n, "tok_s": statistics.median(tok_s), "tok_s_all": tok_s,
           "prefill_path": prefill_path,
           "host_node_layers": len(nodes),
           "compile_workers_stopped": getattr(getattr(eng, "_static", None), "compile_workers_stopped", None),
           "captured_graphs": len(eng._static.graphs) if getattr(eng, "_static", None) is not None else None,
           "process_vram_after_warmup_mib": vram_warm,
           "prefill_s": statistics.median(prefill_s),
           # each timed repetition's steps (ms): a slow repetition shows whether every step was slow
           # or one stalled (reports/h100-2026-12-06c: 9 tok/s repetitions beside 85-100)
           "step_ms_reps": [[round(x, 3) for x in r] for r in step_ms],
           # and what the host did meanwhile (host_counters: context switches, faults, CPU jiffies)
           "host_counters_reps": counters}
    med = statistics.median(x for r in step_ms for x in r)
    stalls = [{"rep": i, "step": j, "ms": round(ms, 1)} for i, r in enumerate(step_ms) for j, ms in enumerate(r)
              if ms > 10 * med]                 # a step ten times the median: named, not averaged away
    if stalls:
        out["stalls"] = stalls
    # what a token reads where (planner.decode_read_bytes) and the rate that implies: the
    # step's bytes over its time, against the device's and the host's bandwidth
    from engine.planner import decode_read_bytes
    reads = decode_read_bytes(eng.plan, eng.spec, depth)
    out.update(trunk_read_bytes=reads["trunk"]["total"], host_read_bytes=reads["host"]["total"],
               trunk_read_gb_s=reads["trunk"]["total"] * out["tok_s"] / 1e9)
    if reads["host"]["experts"] and eng.plan.host_experts in ("pcie", "dma") and not host_ms:   # blocks the GPU reads:
        # their bytes at the step's rate, a floor under the PCIe rate while they are read (host-node
        # layers run on the CPU: their rows carry no timing, not a PCIe rate they never had)
        out["pcie_read_gb_s"] = reads["host"]["experts"] * out["tok_s"] / 1e9
    if host_ms:
        # host_experts_ms_per_step: from the synced pass (host_pass_tok_s, slower by those syncs)
        out.update(host_experts_ms_per_step=statistics.median(host_ms),
                   host_pass_tok_s=statistics.median(host_pass_tok_s),
                   step_ms=1e3 / statistics.median(tok_s))
        # the host experts' bytes over the time spent in them: how close the CPU runs to its memory
        out["host_experts_gb_s"] = reads["host"]["experts"] / (out["host_experts_ms_per_step"] * 1e-3) / 1e9
    return out


VMSTAT_KEYS = ("pgmajfault", "pgfault", "thp_fault_alloc", "thp_collapse_alloc", "compact_stall", "numa_hint_faults",
               "pgscan_kswapd", "pgsteal_kswapd", "nr_dirty", "nr_writeback")


def host_counters() -> dict:
    """What the host did around a timed repetition (Linux /proc; {} elsewhere): this process's
    context switches summed over its threads (involuntary ones: a thread taken off its core),
    its page faults, the system's CPU jiffies by kind (another process's or the kernel's work
    shows in them) and a few /proc/vmstat counters (reclaim, compaction, huge pages, writeback)."""
    out: dict = {}
    try:
        vol = inv = 0
        for task in Path("/proc/self/task").iterdir():
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches"):
                    vol += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    inv += int(line.split()[1])
        out.update(ctxt_voluntary=vol, ctxt_involuntary=inv)
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        out.update(minflt=int(stat[7]), majflt=int(stat[9]))
        cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        for name, v in zip(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"), cpu):
            out[f"cpu_{name}"] = int(v)
        kids, cpu_ticks = _descendants()
        out.update(descendants=kids, descendants_cpu=cpu_ticks)
        for line in Path("/proc/vmstat").read_text().splitlines():
            k, _, v = line.partition(" ")
            if k in VMSTAT_KEYS:
                out[k] = int(v)
    except (OSError, ValueError, IndexError):
        pass
    return out


def _descendants() -> tuple[int, int]:
    """This process's descendant processes (e.g. torch.compile's worker pool): how many, and their
    user + system CPU ticks so far."""
    parent, ticks = {}, {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(d.name)], ticks[int(d.name)] = int(f[1]), int(f[11]) + int(f[12])
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier and p not in mine}
        mine |= frontier
    return len(mine), sum(ticks[p] for p in mine)


LEVELS = ("nr_dirty", "nr_writeback", "descendants")    # levels, not counters


def counter_delta(a: dict, b: dict) -> dict:
    """``b - a`` for counters both hold (``LEVELS``: ``b``'s value)."""
    return {k: (b[k] if k in LEVELS else b[k] - a[k]) for k in b if k in a}


def _greedy(eng, tok: int, n: int) -> list[float]:
    """n greedy steps; each step's wall milliseconds (its argmax is read back: the step's own sync,
    so the per-step clock adds none)."""
    ms = []
    for _ in range(n):
        t = time.perf_counter()
        tok = int(eng.decode(tok).argmax())
        ms.append(1e3 * (time.perf_counter() - t))
    return ms


def host_read(mib: int) -> dict:
    """The host's read rate at torch's thread count (``engine.native.read_rate`` over ``mib`` MiB),
    or why it was not measured (``--host-read-mib 0``, no native build): never a silent zero."""
    if mib <= 0:
        return {"skipped": "--host-read-mib 0"}
    from engine import native
    ok, why = native.available()
    if not ok:
        return {"skipped": f"engine.native unavailable: {why}"}
    return native.read_rate(mib << 20, threads=torch.get_num_threads())


def layer_timings(spec, threads: list[int], reps: int = 50) -> dict:
    """One layer of k experts: the host int4 path per thread count, the device kernels."""
    from engine.cpu_experts import HostQ4Experts
    from engine.kernels.moe_blocks import BlockStack
    E, ff, d, k = spec.n_experts, spec.d_ff_expert, spec.d_model, spec.n_experts_used
    g = torch.Generator().manual_seed(0)

    def stack(shape):
        S, N, K = shape
        st = BlockStack.empty("q4_0", shape)
        st.qs.copy_(torch.randint(0, 256, st.qs.shape, generator=g, dtype=torch.int32).to(torch.uint8))
        st.d.copy_((torch.rand(st.d.shape, generator=g) * 0.01 + 0.001).half())
        return st
    stacks = [stack((E, ff, d)), stack((E, ff, d)), stack((E, d, ff))]
    t = time.perf_counter()
    host = HostQ4Experts.from_blocks(*stacks)
    pack_s = time.perf_counter() - t
    out = {"pack_layer_s": pack_s, "host_us": {}}
    x = torch.randn(1, d)
    ids = torch.randperm(E, generator=g)[:k].tolist()
    p = [1.0 / k] * k
    prev = torch.get_num_threads()
    for n in threads:
        torch.set_num_threads(n)
        host(x, ids, p)
        t = time.perf_counter()
        for _ in range(reps):
            host(x, ids, p)
        out["host_us"][n] = 1e6 * (time.perf_counter() - t) / reps
    from engine import native
    if native.available()[0]:           # the cpu tier's default path where it builds
        out["native_us"], out["native_simd"] = {}, native.simd()
        for n in threads:
            native.moe_q4_decode(x, ids, p, *stacks, threads=n)
            t = time.perf_counter()
            for _ in range(reps):
                native.moe_q4_decode(x, ids, p, *stacks, threads=n)
            out["native_us"][n] = 1e6 * (time.perf_counter() - t) / reps
    torch.set_num_threads(prev)
    if torch.cuda.is_available():
        import triton.testing
        from engine.kernels.moe import moe_decode
        from engine.kernels.moe_blocks import moe_decode_blocks
        dev = torch.device("cuda")
        blk = [s.to(dev) for s in stacks]
        flt = [s.dequantize().to(dev, torch.bfloat16) for s in stacks]
        xd = x.to(dev)
        idd = torch.tensor(ids, device=dev)
        pd = torch.tensor(p, device=dev)
        out["device_blocks_us"] = 1e3 * triton.testing.do_bench(lambda: moe_decode_blocks(xd, *blk, idd, pd))
        out["device_bf16_us"] = 1e3 * triton.testing.do_bench(lambda: moe_decode(xd, *flt, idd, pd))
        ref = moe_decode(xd, *[s.dequantize().to(dev) for s in stacks], idd, pd)
        out["device_blocks_err"] = ((moe_decode_blocks(xd, *blk, idd, pd) - ref).abs().max() / ref.abs().max()).item()
        out["bytes_blocks"] = k * 3 * ff * d * 18 // 32
        out["bytes_bf16"] = k * 3 * ff * d * 2
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="coder30b-synth")
    ap.add_argument("--cases", default="12GiB:auto,none:17",
                    help="comma list of BUDGET:CPU_MOE[:WEIGHTS[:HOST]] (budget none: free memory; cpu_moe auto "
                         "or a count; WEIGHTS: the non-expert matrices' format, default --weight-format; HOST: "
                         "cpu (the host computes those experts), pcie (the GPU reads them in place), dma (the GPU "
                         "copies the chosen ones) or auto (cpu, pcie or dma as measured at load), default cpu)")
    ap.add_argument("--kv", default="bf16,q8_0")
    ap.add_argument("--depths", default="16,4096")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", default="", help="comma list of CPU thread counts for the layer timing "
                                                  "(default: this machine's)")
    ap.add_argument("--weight-format", default="bf16")
    ap.add_argument("--prefill-path", default="fast", choices=("fast", "exact"),
                    help="the depth's fill: fast (bf16 SDPA, loads cuDNN/flash modules into the CUDA "
                         "context) or exact (the engine's own kernels): the process VRAM with each")
    ap.add_argument("--gpu-shares", default="0",
                    help="comma list: of a token's k experts on cpu-tier layers, how many the GPU computes "
                         "from the pinned blocks while the CPU computes the rest (KVBENCH_CPU_MOE_GPU_SHARE), "
                         "each timed")
    ap.add_argument("--wave-budget", default=None,
                    help="the plan's attention wave scratch (e.g. 32MiB; default the engine's 256 MiB): "
                         "held on the card, so at one budget a smaller wave leaves room for more experts")
    ap.add_argument("--host-read-mib", type=int, default=512,
                    help="MiB of host memory read to time the host's read rate at the cases' thread count "
                         "(engine.native.read_rate: the roof the host experts' rate is read against); 0 skips it")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        shares = [int(x) for x in args.gpu_shares.split(",")]
    except ValueError:
        shares = []
    if not shares or any(x < 0 or x > 64 for x in shares):
        print(f"bench_cpu_moe: --gpu-shares {args.gpu_shares!r} must be a comma list of integers 0..64",
              file=sys.stderr)
        return 2
    try:
        wave = settings.parse_size(args.wave_budget) if args.wave_budget else None
    except (ValueError, EngineError):
        wave = -1
    if wave is not None and wave <= 0:
        print(f"bench_cpu_moe: --wave-budget {args.wave_budget!r} is not a positive size (e.g. 32MiB)", file=sys.stderr)
        return 2
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    depths = [int(x) for x in args.depths.split(",")]
    ctx = max(depths) + args.tokens + 64
    from engine.models import spec_for
    spec = spec_for(args.model)
    threads = [int(x) for x in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    context_mib = None
    if dev == "cuda":      # what the process holds before any model: CUDA context and torch's own
        torch.empty(1, device=dev)
        context_mib = used_vram_mib(os.getpid())
    cases = []
    # the isolated one-layer timings run after the cases: run first, they left ~0.7 GiB of card
    # memory outside torch's allocator in the process (reports/h100-2026-12-05d: 1.5 GiB outside
    # in this bench against 0.76 GiB in a fresh process after the same load), which every case's
    # process reading then carried
    result = {"model": args.model, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
              "torch": torch.__version__, "cases": cases, "layer": None, "context_vram_mib": context_mib,
              "host_read": host_read(args.host_read_mib)}
    roof = result["host_read"].get("gb_s")
    for spec_case in args.cases.split(","):
        budget, n, *rest = spec_case.split(":")
        wf = rest[0] if rest else args.weight_format
        host = rest[1] if len(rest) > 1 else "cpu"
        vram = None if budget == "none" else settings.parse_size(budget)
        cpu_moe = "auto" if n == "auto" else int(n)
        prev = None                          # the case's engine: the next KV dtype takes its weights over
        for kv in args.kv.split(","):
            if dev == "cuda":
                torch.cuda.empty_cache()
            t = time.perf_counter()
            kw = dict(kv_dtype=kv, device=dev, ctx=ctx, vram_budget=vram, weight_format=wf,
                      expert_format="blocks", cpu_moe=cpu_moe, host_experts=host, wave_budget_bytes=wave)
            eng = None
            try:
                if prev is not None:
                    try:
                        eng = engine.load(args.model, weights_from=prev, **kw)
                    except WeightsPlacementError:   # auto placed differently at this KV: load afresh
                        prev.close()
                eng = eng or engine.load(args.model, **kw)
            except EngineError as exc:       # one case refused: recorded, the rest go on
                cases.append({"budget": budget, "cpu_moe_requested": n, "kv": kv, "weight_format": wf,
                              "host_experts": host, "error": str(exc)})
                print(f"{args.model} budget {budget} cpu_moe {n} KV {kv}: refused: {exc}", flush=True)
                prev = None
                continue
            reused, prev = prev is not None and prev.model is None, eng
            load_s = time.perf_counter() - t
            rows = eng.ledger.compare(eng.plan)
            case = {"budget": budget, "cpu_moe_requested": n, "cpu_moe": eng.plan.cpu_moe, "kv": kv,
                    "weight_format": eng.plan.weight_format, "host_experts": eng.plan.host_experts,
                    "host_experts_reason": eng.plan.host_experts_reason or None,
                    "expert_format": eng.plan.expert_format, "embed_tier": eng.plan.embed_tier,
                    "scratch_lend": eng.scratch_lend, "scratch_items": dict(eng.plan.scratch_items),
                    "runtime_env": runtime_env(),     # e.g. the allocator's expandable segments
                    "decode_path": eng.decode_path,
                    "decode_path_reason": eng.decode_path_reason, "cpu_expert_math": eng.cpu_expert_math,
                    "load_s": load_s, "weights_reused": reused,
                    "trunk_bytes": eng.plan.trunk.total, "host_bytes": eng.plan.host.total,
                    "plan_max_abs_diff": max(abs(r.diff) for r in rows),
                    "threads": torch.get_num_threads(),
                    # the process's card memory right after the load, before any prefill or
                    # capture (what the load itself holds beyond the CUDA context)
                    "process_vram_after_load_mib": used_vram_mib(os.getpid()) if dev == "cuda" else None,
                    "decode": []}
            try:
                case["decode"] = []
                prior = os.environ.get("KVBENCH_CPU_MOE_GPU_SHARE")
                try:
                    for share in shares:     # KVBENCH_CPU_MOE_GPU_SHARE is read at each step
                        os.environ["KVBENCH_CPU_MOE_GPU_SHARE"] = str(share)
                        for dpt in depths:
                            row = decode_case(eng, dpt, args.tokens, args.reps, args.prefill_path)
                            row["gpu_share"] = share
                            # what the steps applied (0 where it cannot: no CUDA, no blocks kept)
                            row["gpu_share_applied"] = max([getattr(eng.model.layers[i].experts, "last_gpu_share", 0)
                                                            for i in eng.model.host_expert_layers()] or [0])
                            row["cpu_expert_math"] = eng.cpu_expert_math
                            case["decode"].append(row)
                finally:
                    if prior is None:
                        os.environ.pop("KVBENCH_CPU_MOE_GPU_SHARE", None)
                    else:
                        os.environ["KVBENCH_CPU_MOE_GPU_SHARE"] = prior
            except Exception as exc:   # noqa: BLE001 - a path failing on this machine: recorded, the rest go on
                case["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                print(f"{args.model} budget {budget} cpu_moe {n} ({host}) KV {kv}: failed: {case['error']}", flush=True)
                cases.append(case)
                eng.close()
                prev = None
                if args.out:
                    args.out.write_text(json.dumps(result, indent=1))
                continue
            # what this process holds on the card after the case, as nvidia-smi sees it (the same
            # reading as llama.cpp's peak in bench_llamacpp.py), and the allocator's own peak
            case["process_vram_mib"] = used_vram_mib(os.getpid())
            if dev == "cuda":
                case["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2 ** 20
                case["cuda_reserved_mib"] = torch.cuda.memory_reserved() / 2 ** 20   # now, beside the process reading
                if case["process_vram_mib"] is not None:  # CUDA context, cuBLAS, graphs: beyond the allocator
                    case["process_vram_outside_allocator_mib"] = case["process_vram_mib"] - case["cuda_reserved_mib"]
                torch.cuda.reset_peak_memory_stats()
            for c in case["decode"]:
                if roof and "host_experts_gb_s" in c:     # how close the host experts run to the host's memory
                    c["host_experts_of_read"] = c["host_experts_gb_s"] / roof
            cases.append(case)
            speeds = ", ".join((f"GPU share {c['gpu_share']} (applied {c['gpu_share_applied']}): "
                                if len(shares) > 1 else "")
                               + f"d{c['depth']} {c['tok_s']:.1f} tok/s"
                               + f", trunk reads {c['trunk_read_gb_s']:.0f} GB/s"
                               + (f" (host experts {c['host_experts_ms_per_step']:.2f} of {c['step_ms']:.2f} ms, "
                                  f"{c['host_experts_gb_s']:.1f} GB/s"
                                  + (f" = {100 * c['host_experts_of_read']:.0f}% of the host's read rate "
                                     f"{roof:.1f}" if "host_experts_of_read" in c else "") + ")"
                                  if "step_ms" in c else "")
                               + (f" (host blocks over PCIe >= {c['pcie_read_gb_s']:.1f} GB/s)"
                                  if "pcie_read_gb_s" in c else "")
                               + (f" [{len(c['stalls'])} stalled step(s), the longest {max(s['ms'] for s in c['stalls'])} ms]"
                                  if c.get("stalls") else "")
                               + (f" ({c['host_node_layers']} layers' host experts as host nodes in "
                                  f"{c['captured_graphs']} graph(s), untimed)" if c["host_node_layers"] else "")
                               for c in case["decode"])
            print(f"{args.model} budget {budget} cpu_moe {n}->{case['cpu_moe']} ({host}) KV {kv} weights {wf}: "
                  f"{case['decode_path']}, "
                  f"load {load_s:.1f} s, plan diff {case['plan_max_abs_diff']} B, trunk planned "
                  f"{case['trunk_bytes'] / 2 ** 20:.0f} MiB, process VRAM {case['process_vram_mib']} MiB"
                  + (f" (context {context_mib}, allocator {case['cuda_reserved_mib']:.0f})" if context_mib else "")
                  + f"; {speeds}",
                  flush=True)
            del eng
            if args.out:                 # after every case: a timeout keeps what was measured
                args.out.write_text(json.dumps(result, indent=1))
        if prev is not None:
            prev.close()
    if dev == "cuda":
        torch.cuda.empty_cache()
    layer = result["layer"] = layer_timings(spec, threads)
    print(f"one layer, k={spec.n_experts_used}: host torch int4 {layer['host_us']} us"
          + (f", native (simd {layer['native_simd']}) {layer['native_us']} us" if "native_us" in layer else "")
          + f", pack {layer['pack_layer_s']:.2f} s"
          + (f"; device blocks {layer['device_blocks_us']:.1f} us vs bf16 {layer['device_bf16_us']:.1f} us"
             if "device_blocks_us" in layer else ""), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
