"""coder30b-synth on one GPU: decode / prefill speed, expert streaming and rooflines, one process.

Contract: ensures the synth model file (timed: the GPU machine generates it), then runs the
matrix budgets (``full`` = all experts resident, then e.g. 24 GiB / 12 GiB: experts stream
through the SLRU cache) x KV dtypes x contexts. The first case loads the weights from the
file (timed); every later case reuses them (``engine.load(..., weights_from=eng)``): only KV,
scratch and the expert cache are re-made for its budget / KV dtype / ctx. Each case prefills
a seeded random prompt of the context's length, runs ``--warmup`` then ``--decode`` timed
greedy steps (device-synchronised) and records: decode tok/s (median step), prefill tok/s,
expert-cache hit rate over the timed steps, H2D bytes per token and achieved H2D GB/s, the
estimated share of a step spent moving experts (bytes / measured H2D bandwidth / step time),
device bytes read per token (resident weights + 8 experts per layer + KV at that context),
achieved GB/s and the roofline (device bytes / measured copy bandwidth + H2D bytes / measured
H2D bandwidth), plan-vs-runtime per category and ``unaccounted``. ``--max-seconds`` skips
cases whose estimated time no longer fits (named in the output). Prints a line per case, a
table, writes everything (raw step samples included) to ``--out``; the last line is JSON.

    python benchmarks/bench_coder30b.py --out coder30b.json            # on the H100
    python benchmarks/bench_coder30b.py --model tiny-qwen3moe --device cpu --contexts 32,64 --decode 3

With a ``full`` budget every expert is resident and the engine's auto decode path is the
CUDA graph (device-routed MoE): its steps count as resident hits. Eager vs graph at each KV
dtype and depth, with kernel profiles, is ``benchmarks/bench_moe_decode.py``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
from engine import synth  # noqa: E402
from engine.errors import ConfigError, EngineError, ModelNotFoundError  # noqa: E402
from engine.planner import parse_size  # noqa: E402

GiB = 1 << 30


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bandwidths(dev: torch.device, nbytes: int) -> dict:
    """Measured bytes/s: ``copy`` on the trunk device (read + write counted, as bench_attention
    reports it), ``h2d`` from pinned host memory to the device (the expert cache's path) and
    ``host`` (a host memcpy, read + write). On CPU all three are host copies."""
    def median_copy(dst, src, reps=5):
        ts = []
        for _ in range(reps + 1):
            sync(dev)
            t = time.perf_counter()
            dst.copy_(src)
            sync(dev)
            ts.append(time.perf_counter() - t)
        return statistics.median(ts[1:])
    a = torch.empty(nbytes, dtype=torch.uint8)
    b = torch.empty_like(a)
    host = 2 * nbytes / median_copy(b, a)
    if dev.type != "cuda":
        return {"copy": host, "h2d": host / 2, "host": host}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_peer import copy_bandwidth          # D2D copy, read + write counted, median of 5
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    h2d = nbytes / median_copy(d, pinned)
    del pinned, d
    return {"copy": copy_bandwidth(nbytes), "h2d": h2d, "host": host}


def bytes_per_token(eng, pos: int) -> dict:
    """What one decode step reads at position ``pos``, per tier, from the plan's own numbers:
    resident weights of each layer (attention, norms, router, dense FFN), the experts used per
    MoE layer, the head, and K+V rows up to ``pos``."""
    p, spec = eng.plan, eng.spec
    out = {"trunk": 0, "host": 0}
    for i, tier in enumerate(p.layer_tiers):
        out[tier] += p.layer_weight_bytes[i] + p.layer_kv_bytes[i] * pos // p.ctx
        if i in spec.moe_layers:
            out[tier] += spec.n_experts_used * p.expert_slot_bytes
    head = eng.model.output.nbytes + eng.model.out_norm.nbytes
    out[p.head_tier] += head
    return out


def run_case(eng, prompt: list[int], n_decode: int, n_warm: int, bw: dict, feed: str = "random") -> dict:
    """``feed``: "random" feeds a seeded random token stream (each step still computes its
    argmax, so the work and the sync are a greedy step's): a random-weight model's greedy
    output repeats one token, which routes to the same experts and flatters the cache."""
    dev = eng.device
    stream = torch.randint(0, eng.spec.vocab_size, (n_warm + n_decode + 1,),
                           generator=torch.Generator().manual_seed(7)).tolist()

    def step(tok, j):
        nxt = int(eng.decode(tok).argmax())
        return stream[j] if feed == "random" else nxt
    sync(dev)
    t = time.perf_counter()
    logits = eng.prefill(prompt)
    sync(dev)
    prefill_s = time.perf_counter() - t
    cache = eng.expert_cache
    tok = int(logits.argmax())
    for j in range(n_warm):
        tok = step(tok, j)
    st0 = cache.stats() if cache is not None else None
    steps, moved = [], []
    for j in range(n_decode):
        b0 = cache.bytes_moved if cache is not None else 0
        sync(dev)
        t = time.perf_counter()
        tok = step(tok, n_warm + j)
        sync(dev)
        steps.append(time.perf_counter() - t)
        moved.append((cache.bytes_moved if cache is not None else 0) - b0)
    step = statistics.median(steps)
    per_tok = bytes_per_token(eng, len(prompt) + n_warm + n_decode // 2)
    h2d_tok = sum(moved) / n_decode
    roof_s = per_tok["trunk"] / bw["copy"] + per_tok["host"] / bw["host"] + h2d_tok / bw["h2d"]
    r = {
        "n_gpu_layers": eng.plan.n_gpu_layers, "n_layers": eng.spec.n_layers, "head_tier": eng.plan.head_tier,
        "kv_dtypes_applied": sorted(set(eng.kv_dtypes)), "kv_applied_ok": eng.kv_dtypes == eng.plan.layer_kv_dtypes,
        "decode_path": getattr(eng, "decode_path", "eager"), "decode_feed": feed,
        "prefill_tokens": len(prompt), "prefill_s": prefill_s, "prefill_tok_s": len(prompt) / prefill_s,
        "prefill_waves": eng.last_prefill_stats.get("waves"),
        "decode_tok_s": 1 / step, "decode_step_s": step, "decode_samples_s": steps,
        "bytes_per_token_device": per_tok["trunk"], "bytes_per_token_host": per_tok["host"],
        "device_gb_s": per_tok["trunk"] / step / 1e9,
        "h2d_bytes_per_token": h2d_tok, "h2d_gb_s": sum(moved) / sum(steps) / 1e9,
        "expert_move_share_est": min(1.0, h2d_tok / bw["h2d"] / step),
        "roofline_tok_s": 1 / roof_s, "roofline_frac": roof_s / step,
        "expert_slots": eng.plan.expert_slots, "trunk_experts": eng.plan.trunk_experts,
    }
    if cache is not None:
        st = cache.stats()
        hits, misses = st["hits"] - st0["hits"], st["misses"] - st0["misses"]
        # hits include the CUDA-graph path's resident hits (all experts resident: no miss possible)
        r.update(hit_rate=hits / max(hits + misses, 1), hits=hits, misses=misses,
                 resident_hits=st.get("resident_hits", 0) - st0.get("resident_hits", 0),
                 prefill_and_warmup_hit_rate=st0["hit_rate"], evictions=st["evictions"])
    rows = eng.ledger.compare(eng.plan)
    r.update(plan_vs_runtime_max_abs_diff=max(abs(x.diff) for x in rows), unaccounted=eng.ledger.unaccounted,
             trunk_bytes=eng.ledger.total("trunk"), host_bytes=eng.ledger.total("host"))
    return r


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="coder30b-synth", help="synth name, registry name or .gguf path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--feed", choices=("random", "greedy"), default="random",
                   help="decode inputs: a seeded random stream (varied routing) or the greedy token")
    p.add_argument("--budgets", default="full,24GiB,12GiB", help="'full' (no budget) or sizes, comma separated")
    p.add_argument("--kv", default="fp32,bf16,q8_0")
    p.add_argument("--contexts", default="512,16384", help="prompt lengths filled before decoding")
    p.add_argument("--decode", type=int, default=24, help="timed decode steps per case")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps before them")
    p.add_argument("--weight-format", default="bf16")
    p.add_argument("--max-seconds", type=float, default=None, help="skip cases that would end after this")
    p.add_argument("--bw-bytes", type=parse_size, default=1 << 30, help="buffer for the bandwidth probes")
    p.add_argument("--out", default=None)


def main(args) -> int:
    t_start = time.perf_counter()
    dev = torch.device(args.device)
    budgets = [(b.strip(), None if b.strip() == "full" else parse_size(b, "--budgets")) for b in args.budgets.split(",")]
    kvs = args.kv.split(",")
    ctxs = [int(c) for c in args.contexts.split(",")]
    doc = {"bench": "coder30b", "model": args.model, "device": str(dev),
           "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "weight_format": args.weight_format, "decode_steps": args.decode,
           "warmup_steps": args.warmup, "cases": [], "skipped": [], "failed": []}
    t = time.perf_counter()
    model = args.model
    try:
        synth.config(model)
        model = synth.ensure(model)
    except ModelNotFoundError:
        pass                                       # a registry name or a path
    doc["ensure_s"] = time.perf_counter() - t
    doc["file_bytes"] = Path(engine.models.resolve(model)).stat().st_size
    print(f"model file {model} ({doc['file_bytes'] / 1e9:.2f} GB) ready in {doc['ensure_s']:.1f} s", flush=True)
    bw = bandwidths(dev, args.bw_bytes)
    doc["bandwidth_bytes_s"] = bw
    print(f"measured: device copy {bw['copy'] / 1e9:.0f} GB/s, H2D pinned {bw['h2d'] / 1e9:.1f} GB/s, "
          f"host copy {bw['host'] / 1e9:.1f} GB/s", flush=True)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    # 'full' = what is free now; passed explicitly so later cases (weights held) plan the same card
    full_budget = int(torch.cuda.mem_get_info(dev)[0]) if dev.type == "cuda" else None
    g = torch.Generator().manual_seed(0)
    eng, spent = None, []
    for label, budget in budgets:
        for kv in kvs:
            for n in ctxs:
                case = {"budget": label, "vram_budget": budget if budget is not None else full_budget,
                        "kv": kv, "context": n}
                elapsed = time.perf_counter() - t_start
                est = estimate(spent, n)
                if args.max_seconds is not None and elapsed + est > args.max_seconds:
                    doc["skipped"].append({**case, "reason": f"estimated {est:.0f} s after {elapsed:.0f} s "
                                                             f"exceeds --max-seconds {args.max_seconds:g}"})
                    print(f"skip  {label:>7} {kv:5} ctx {n:6}: {doc['skipped'][-1]['reason']}", flush=True)
                    continue
                t0 = time.perf_counter()
                ctx = n + args.warmup + args.decode + 8
                kw = dict(device=dev, kv_dtype=kv, ctx=ctx, vram_budget=case["vram_budget"],
                          weight_format=args.weight_format)
                fresh = eng is None
                try:
                    try:
                        eng = engine.load(model, **kw, weights_from=eng) if eng is not None else engine.load(model, **kw)
                    except ConfigError as exc:
                        if "weights_from" not in str(exc):
                            raise
                        eng = None                 # a plan that places weights differently: load afresh
                        if dev.type == "cuda":
                            torch.cuda.empty_cache()
                        eng, fresh = engine.load(model, **kw), True
                    case["load_s"], case["fresh_load"] = time.perf_counter() - t0, fresh
                    prompt = torch.randint(0, eng.spec.vocab_size, (n,), generator=g).tolist()
                    case.update(run_case(eng, prompt, args.decode, args.warmup, bw, args.feed))
                except EngineError as exc:         # e.g. out of memory: record it, go on
                    doc["failed"].append({**case, "error": str(exc)})
                    print(f"FAIL  {label:>7} {kv:5} ctx {n:6}: {exc}", flush=True)
                    if eng is not None and eng.model is None:
                        eng = None                 # its weights were taken over by the failed load
                    continue
                case["case_s"] = time.perf_counter() - t0
                spent.append(case)
                doc["cases"].append(case)
                print(progress(case), flush=True)
    doc["total_s"] = time.perf_counter() - t_start
    print(table(doc["cases"]))
    for s in doc["skipped"]:
        print(f"skipped: {s['budget']} {s['kv']} ctx {s['context']} ({s['reason']})")
    for s in doc["failed"]:
        print(f"failed: {s['budget']} {s['kv']} ctx {s['context']} ({s['error']})")
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
    keys = ("budget", "kv", "context", "n_gpu_layers", "expert_slots", "decode_tok_s", "prefill_tok_s",
            "hit_rate", "h2d_gb_s", "expert_move_share_est", "roofline_frac", "load_s")
    print(json.dumps({"total_s": round(doc["total_s"], 1), "ensure_s": round(doc["ensure_s"], 1),
                      "cases": [{k: (round(c[k], 4) if isinstance(c.get(k), float) else c.get(k)) for k in keys}
                                for c in doc["cases"]],
                      "skipped": [(s["budget"], s["kv"], s["context"]) for s in doc["skipped"]],
                      "failed": [(s["budget"], s["kv"], s["context"]) for s in doc["failed"]]},
                     separators=(",", ":")))
    return 0


def estimate(done: list[dict], n: int) -> float:
    """Seconds a case with context ``n`` will take: the slowest finished case at that context
    (loads after the first are cheap), else the slowest finished case with its prefill scaled."""
    same = [c["case_s"] - (c["load_s"] if c["fresh_load"] else 0) for c in done if c["context"] == n]
    if same:
        return max(same)
    other = [c["case_s"] - (c["load_s"] if c["fresh_load"] else 0) + c["prefill_s"] * (n / c["context"] - 1)
             for c in done]
    return max(other, default=0.0)


def progress(c: dict) -> str:
    hr = f" hit {c['hit_rate']:6.1%}" if "hit_rate" in c else ""
    return (f"case {c['budget']:>7} {c['kv']:5} ctx {c['context']:6}: gpu layers {c['n_gpu_layers']}/{c['n_layers']}, "
            f"slots {c['expert_slots']}/{c['trunk_experts']}, load {c['load_s']:.1f} s, prefill "
            f"{c['prefill_tok_s']:.0f} tok/s, decode {c['decode_tok_s']:.2f} tok/s{hr}, H2D "
            f"{c['h2d_bytes_per_token'] / 1e6:.0f} MB/tok at {c['h2d_gb_s']:.1f} GB/s (moving ~"
            f"{c['expert_move_share_est']:.0%}), {c['roofline_frac']:.0%} of roofline, plan-vs-runtime "
            f"max|diff| {c['plan_vs_runtime_max_abs_diff']} B, unaccounted {c['unaccounted']} B "
            f"({c['case_s']:.1f} s)")


def table(cases: list[dict]) -> str:
    head = (f"{'budget':>7} {'kv':5} {'ctx':>6} {'slots':>10} {'pp tok/s':>9} {'tg tok/s':>9} {'hit':>6} "
            f"{'H2D MB/tok':>10} {'H2D GB/s':>8} {'move%':>6} {'dev GB/s':>8} {'roof tok/s':>10} {'%roof':>6}")
    lines = [head, "-" * len(head)]
    for c in cases:
        hit = f"{c['hit_rate']:6.1%}" if "hit_rate" in c else f"{'-':>6}"
        lines.append(f"{c['budget']:>7} {c['kv']:5} {c['context']:6} {c['expert_slots']:>5}/{c['trunk_experts']:<4} "
                     f"{c['prefill_tok_s']:9.0f} {c['decode_tok_s']:9.2f} {hit} "
                     f"{c['h2d_bytes_per_token'] / 1e6:10.1f} {c['h2d_gb_s']:8.2f} {c['expert_move_share_est']:6.0%} "
                     f"{c['device_gb_s']:8.1f} {c['roofline_tok_s']:10.1f} {c['roofline_frac']:6.0%}")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(ap)
    raise SystemExit(main(ap.parse_args()))
