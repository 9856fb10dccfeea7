"""Would q8_0 at coder30b's geometry (32 query heads, 4 KV heads: G 8) be faster as two programs of
G 4 reading the same bytes? Probe without a new kernel: the G 8 call against two calls of 16 query
heads each (query heads 0-3 of every KV head's 8, then 4-7), each a G 4 launch over the whole cache,
so twice the bytes read. If the pair beats the one call, splitting G inside the kernel (one read
shared through L2, or two programs a KV head) is worth building; bf16 is timed the same way beside.

Timing: ``bench_attention.layered_time`` (back-to-back launches over distinct cache copies, as a
step's layers). Every form's output is checked against ``decode_attention_ref`` first.

    python3 benchmarks/oneoff/g8_split_probe.py --out OUT/g8_split.json          (GPU)
    TRITON_INTERPRET=1 python3 benchmarks/oneoff/g8_split_probe.py --check-only   (CPU: the split's maths)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

HQ, HKV, D = 32, 4, 128
G = HQ // HKV


def halves(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [HQ, D] -> the query heads 0..G/2-1 and G/2..G-1 of every KV head, each [HQ/2, D] in KV-head
    order, so each half is a G/2 problem over the same KV heads."""
    v = q.view(HKV, G, D)
    return v[:, :G // 2].reshape(HQ // 2, D).contiguous(), v[:, G // 2:].reshape(HQ // 2, D).contiguous()


def join(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([a.view(HKV, G // 2, D), b.view(HKV, G // 2, D)], dim=1).reshape(HQ, D)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctxs", default="4096,16384")
    ap.add_argument("--fmts", default="bf16,q8_0")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--check-only", action="store_true", help="the split against the reference, no timing")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from engine.kernels.decode_attention import decode_attention, decode_attention_ref, decode_bytes_read
    from engine.kv import LayerKV
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ctxs = [256] if args.check_only else [int(c) for c in args.ctxs.split(",")]
    res = {"geometry": {"n_heads": HQ, "n_kv_heads": HKV, "head_dim": D}, "rows": []}
    if dev == "cuda" and not args.check_only:
        from bench_attention import copy_bandwidth, fill_cache, layered_copies, layered_time
        res["device"] = torch.cuda.get_device_name(0)
        res["copy_GBps"] = round(copy_bandwidth(10), 1)
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
    else:
        from bench_attention import fill_cache
    scale = D ** -0.5
    for fmt in args.fmts.split(","):
        for ctx in ctxs:
            gen = torch.Generator(device=dev).manual_seed(0)
            q = torch.randn(HQ, D, device=dev, generator=gen)
            cache = LayerKV(0, HKV, D, ctx, fmt, device=dev)
            fill_cache(cache, ctx, gen)
            ref = decode_attention_ref(q, cache.k, cache.v, fmt, ctx, scale, HKV).reshape(HQ, D)
            qa, qb = halves(q)
            one = decode_attention(q, cache.k, cache.v, fmt, ctx, scale, HKV).reshape(HQ, D)
            two = join(decode_attention(qa, cache.k, cache.v, fmt, ctx, scale, HKV),
                       decode_attention(qb, cache.k, cache.v, fmt, ctx, scale, HKV))
            row = {"fmt": fmt, "ctx": ctx, "max_abs_one": float((one - ref).abs().max()),
                   "max_abs_two": float((two - ref).abs().max()), "ref_absmax": float(ref.abs().max())}
            if dev == "cuda" and not args.check_only:
                nbytes = decode_bytes_read(ctx, HKV, D, fmt)
                bufs = layered_copies(cache, nbytes, l2)
                t1, _ = layered_time(bufs, lambda k, v: decode_attention(q, k, v, fmt, ctx, scale, HKV), args.reps)
                t2, _ = layered_time(bufs, lambda k, v: (decode_attention(qa, k, v, fmt, ctx, scale, HKV),
                                                         decode_attention(qb, k, v, fmt, ctx, scale, HKV)), args.reps)
                del bufs
                row.update({"bytes": nbytes, "us_one_g8": round(t1, 2), "us_two_g4": round(t2, 2),
                            "pct_copy_one": round(100 * nbytes / (t1 * 1e-6) / 1e9 / res["copy_GBps"], 1)})
            print(json.dumps(row), flush=True)
            res["rows"].append(row)
    bad = [r for r in res["rows"] if max(r["max_abs_one"], r["max_abs_two"]) > 1e-3 * max(1.0, r["ref_absmax"])]
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    if bad:
        print(f"g8_split_probe: outputs off the reference: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
