"""Hybrid on the GPU: plan vs runtime per category, unaccounted bytes, decode speed, experts.

Contract: for each model x KV dtype x budget (all layers resident, then budgets that split
the model), loads the engine on CUDA, runs a prefill and ``--decode`` greedy steps, and
records: n_gpu_layers, every ledger-vs-plan row, ``unaccounted`` against
``torch.cuda.memory_allocated``, decode tok/s (median step after warm-up), and for MoE the
SLRU hit rate, bytes moved host->device and achieved H2D GB/s. Prints a table, writes the
raw rows to ``--out`` (JSON) and ends with one compact JSON line.

    python benchmarks/bench_hybrid.py --models smollm2-135m,smollm2-moe --out hybrid.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
from engine.planner import plan as make_plan  # noqa: E402


def split_budget(spec, k: int, kv: str, ctx: int, extra_slots: int) -> int:
    p = make_plan(spec, kv_dtype=kv, ctx=ctx, n_gpu_layers=k, device="cuda", vram_budget=1 << 50)
    slots = min(spec.n_experts_used, p.trunk_experts) + extra_slots
    return p.trunk.total - p.trunk.expert_cache + slots * p.expert_slot_bytes


def run_case(model, kv, budget, ctx, prompt, n_decode, weight_format):
    torch.cuda.empty_cache()
    eng = engine.load(model, device="cuda", kv_dtype=kv, ctx=ctx, vram_budget=budget,
                      weight_format=weight_format)
    eng.prefill(prompt)
    tok = prompt[-1]
    times = []
    for _ in range(n_decode):
        torch.cuda.synchronize()
        t = time.perf_counter()
        tok = int(eng.decode(tok).argmax())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    rows = [r._asdict() for r in eng.ledger.compare(eng.plan)]
    alloc = torch.cuda.memory_allocated()
    st = eng.expert_cache.stats() if eng.expert_cache is not None else None
    step = statistics.median(times[2:]) if len(times) > 3 else statistics.median(times)
    out = {
        "model": model, "kv": kv, "budget": budget, "n_gpu_layers": eng.plan.n_gpu_layers,
        "n_layers": eng.spec.n_layers, "kv_dtypes": sorted(set(eng.kv_dtypes)),
        "kv_applied_ok": eng.kv_dtypes == eng.plan.layer_kv_dtypes,
        "rows": rows, "max_abs_diff": max(abs(r["diff"]) for r in rows),
        "unaccounted": eng.ledger.unaccounted, "memory_allocated": alloc,
        "decode_tok_s": 1 / step, "decode_samples_s": times,
        "expert_slots": eng.plan.expert_slots,
    }
    if st:
        moved_s = sum(times)
        out.update(hit_rate=st["hit_rate"], bytes_moved=st["bytes_moved"],
                   h2d_gb_s_over_decode=st["bytes_moved"] / moved_s / 1e9)
    del eng
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,smollm2-moe")
    ap.add_argument("--kv", default="fp32,bf16,q8_0")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=24)
    ap.add_argument("--weight-format", default="f32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = []
    for model in args.models.split(","):
        spec = engine.load(model, ctx=16, n_gpu_layers=0).spec
        prompt = list(range(1000, 1256))
        for kv in args.kv.split(","):
            budgets = [("all", None)]
            half = spec.n_layers // 2
            extra = (spec.n_experts * half // 2) if spec.is_moe else 0
            budgets.append((f"{half} layers", split_budget(spec, half, kv, args.ctx, extra)))
            budgets.append(("1/4 layers", split_budget(spec, max(1, spec.n_layers // 4), kv, args.ctx, 0)))
            for label, b in budgets:
                r = run_case(model, kv, b, args.ctx, prompt, args.decode, args.weight_format)
                r["budget_label"] = label
                results.append(r)
                hr = f" hit {r['hit_rate']:.1%} h2d {r['h2d_gb_s_over_decode']:.2f} GB/s" if "hit_rate" in r else ""
                print(f"{model:14s} {kv:5s} {label:10s} gpu {r['n_gpu_layers']:2d}/{r['n_layers']} "
                      f"plan-vs-runtime max|diff| {r['max_abs_diff']} B, unaccounted {r['unaccounted']} B "
                      f"of {r['memory_allocated'] / 2**20:.1f} MiB, kv applied ok {r['kv_applied_ok']}, "
                      f"decode {r['decode_tok_s']:.1f} tok/s{hr}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "results": results}, indent=1))
    summary = [{k: r[k] for k in ("model", "kv", "budget_label", "n_gpu_layers", "max_abs_diff",
                                   "unaccounted", "decode_tok_s")} for r in results]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
