"""Where decode attention's per-launch fixed cost goes, and the floor a split + combine design
pays (issue 14's rows at ctx 4096, where every dtype misses its target).

Contract (CUDA only): for each geometry, KV dtype and context, times as a decode step pays it
(``bench_attention.layered_time``: one graph of back-to-back launches over distinct cache
copies, >= 4x the L2, median replay / copies):

- ``prod``: ``decode_attention`` with the defaults (split kernel + combine);
- ``prod_pdl``: the same with programmatic dependent launch (``cfg pdl``, ``KVBENCH_DECODE_PDL``);
- ``read``: ``benchmarks/attn_floor.py``'s floor kernel on the production grid (KV heads x splits of ``split_plan``) that
  only streams the same bytes (K, V and q8_0's scales as int32 words, XOR-summed) and writes
  one word a program: what reading those bytes costs with no arithmetic;
- ``read_combine`` / ``read_combine_pdl``: that floor kernel followed by the production combine
  kernel over partials of the production shape (without / with PDL): the floor of any design
  that splits the context and combines in a second kernel;
- ``empty_pair``: two empty kernels on those grids (launch and drain alone).

Per (geometry, dtype, variant) it fits time = fixed + bytes / rate over the contexts (least
squares), and at ctx 4096 it sweeps programs_per_sm x block_n (with and without PDL) for the
production launch. ``--profile`` adds torch.profiler kernel durations of eager production
launches (split kernel and combine apart) at the given contexts. Prints a table and writes JSON.

    python benchmarks/oneoff/fixed_cost_probe.py --out fixed.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attn_floor import read_floor  # noqa: E402
from bench_attention import GEOMETRIES, copy_bandwidth, fill_cache, layered_copies, layered_time  # noqa: E402
from engine.kernels import decode_attention as dmod  # noqa: E402
from engine.kv import LayerKV  # noqa: E402


def floor_launch(fmt, hkv, d, hq, ctx, cfg, combine: bool, pdl: bool, empty: bool = False):
    f = read_floor(fmt, hkv, d, hq, ctx, cfg, combine, pdl, empty)
    return f, f.splits, f.keys_per_split


def profile_kernels(launch_fn, n: int = 30) -> dict:
    from torch.profiler import ProfilerActivity, profile
    launch_fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            launch_fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time", None)
        if t is None:
            t = getattr(e, "cuda_time", 0.0)
        if e.count and t:
            out[e.key[:60]] = {"count": e.count, "avg_us": round(float(t), 2)}
    return out


def fit(points):
    """Least-squares time = fixed + bytes / rate over (bytes, us) points."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return {"fixed_us": round(my - slope * mx, 2), "GBps": round(1e-3 / slope, 1) if slope > 0 else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometries", default="bench,coder30b")
    ap.add_argument("--dtypes", default="fp32,bf16,q8_0")
    ap.add_argument("--ctxs", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sweep-ctx", type=int, default=4096, help="0 skips the split sweep")
    ap.add_argument("--profile", default="4096,16384", help="contexts profiled ('' none)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: this probe needs CUDA", file=sys.stderr)
        return 2
    t0 = time.time()
    copy = copy_bandwidth(20)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    doc = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "copy_GBps": round(copy, 1), "rows": [], "fits": [], "sweep": [], "profile": []}
    print(f"{doc['device']}  copy {copy:.0f} GB/s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    ctxs = [int(x) for x in a.ctxs.split(",") if x]
    prof_ctxs = {int(x) for x in a.profile.split(",") if x}
    for geom in a.geometries.split(","):
        hkv, d, hq = GEOMETRIES[geom]
        q = torch.randn(hq, d, device="cuda", generator=gen)
        scale = d ** -0.5
        for fmt in a.dtypes.split(","):
            cfg = dmod.resolved_config(fmt, fmt, d)
            for ctx in ctxs:
                cache = LayerKV(0, hkv, d, ctx, fmt, device="cuda")
                fill_cache(cache, ctx, gen)
                nbytes = dmod.decode_bytes_read(ctx, hkv, d, fmt)
                bufs = layered_copies(cache, nbytes, l2)
                variants = {
                    "prod": lambda k, v: dmod.decode_attention(q, k, v, fmt, ctx, scale, hkv),
                    "prod_pdl": lambda k, v: dmod.decode_attention(q, k, v, fmt, ctx, scale, hkv, cfg={"pdl": True}),
                    "read": floor_launch(fmt, hkv, d, hq, ctx, cfg, False, False)[0],
                    "read_combine": floor_launch(fmt, hkv, d, hq, ctx, cfg, True, False)[0],
                    "read_combine_pdl": floor_launch(fmt, hkv, d, hq, ctx, cfg, True, True)[0],
                    "empty_pair": floor_launch(fmt, hkv, d, hq, ctx, cfg, True, False, empty=True)[0],
                    "empty_pair_pdl": floor_launch(fmt, hkv, d, hq, ctx, cfg, True, True, empty=True)[0],
                }
                line = []
                for name, fn in variants.items():
                    try:
                        us, samples = layered_time(bufs, fn, a.reps)
                        row = {"geometry": geom, "dtype": fmt, "ctx": ctx, "variant": name, "us": round(us, 2),
                               "us_min": round(min(samples), 2), "bytes": nbytes, "copies": len(bufs),
                               "frac_copy": round(nbytes / (us * 1e-6) / 1e9 / copy, 3)}
                    except Exception as e:      # a variant that cannot run is named, not dropped
                        row = {"geometry": geom, "dtype": fmt, "ctx": ctx, "variant": name,
                               "error": f"{type(e).__name__}: {str(e)[:160]}"}
                    doc["rows"].append(row)
                    line.append(f"{name} {row.get('us', 'ERR')}")
                print(f"{geom:8} {fmt:5} {ctx:6}  " + "  ".join(line), flush=True)
                if a.out:       # after every cell: a run cut short keeps what it measured
                    Path(a.out).write_text(json.dumps(doc, indent=1))
                if ctx in prof_ctxs:
                    k, v = cache.k, cache.v
                    doc["profile"].append({"geometry": geom, "dtype": fmt, "ctx": ctx,
                                           "kernels": profile_kernels(lambda: dmod.decode_attention(
                                               q, k, v, fmt, ctx, scale, hkv))})
                    print("   profile: " + ", ".join(f"{n} {x['avg_us']}" for n, x in
                                                     doc["profile"][-1]["kernels"].items()), flush=True)
                if ctx == a.sweep_ctx:
                    for pps in (1, 2, 3, 4):
                        for bn in ((32, 64, 128) if fmt == "q8_0" else (32, 64)):
                            for pdl in (False, True):
                                c = {"programs_per_sm": pps, "block_n": bn, "pdl": pdl}
                                if bn == 128:
                                    c["num_warps"] = 8
                                try:
                                    us, _ = layered_time(bufs, lambda k, v, c=c: dmod.decode_attention(
                                        q, k, v, fmt, ctx, scale, hkv, cfg=c), a.reps)
                                    r = {"us": round(us, 2)}
                                except Exception as e:
                                    r = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
                                doc["sweep"].append({"geometry": geom, "dtype": fmt, "ctx": ctx, **c, **r})
                    best = sorted((s for s in doc["sweep"] if s["geometry"] == geom and s["dtype"] == fmt
                                   and "us" in s), key=lambda s: s["us"])[:3]
                    print("   sweep best: " + "; ".join(f"pps {s['programs_per_sm']} bn {s['block_n']} "
                                                        f"pdl {int(s['pdl'])} {s['us']}" for s in best), flush=True)
                del bufs, cache
                torch.cuda.empty_cache()
            for name in ("prod", "prod_pdl", "read", "read_combine", "read_combine_pdl", "empty_pair"):
                pts = [(r["bytes"], r["us"]) for r in doc["rows"] if r["geometry"] == geom and r["dtype"] == fmt
                       and r["variant"] == name and "us" in r]
                f = fit(pts) if len(pts) >= 2 else None
                if f:
                    doc["fits"].append({"geometry": geom, "dtype": fmt, "variant": name, **f})
                    print(f"   fit {geom} {fmt} {name}: fixed {f['fixed_us']} us + bytes at {f['GBps']} GB/s")
    doc["wall_s"] = round(time.time() - t0, 1)
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps({"wall_s": doc["wall_s"], "rows": len(doc["rows"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
