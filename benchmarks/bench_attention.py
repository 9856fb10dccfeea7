"""Attention benchmark on the GPU: decode per KV dtype vs copy bandwidth, and wave prefill.

Contract: on CUDA, times (CUDA events around CUDA-graph replays, so host launch overhead is
out of the kernel numbers and reported apart; L2 flushed before each repeat; median after warm-up)
(1) a device-to-device copy (bandwidth counting bytes read + written), (2) decode attention
at ctx 16384, 8 KV heads x 128, 32 query heads, for fp32 / bf16 / q8_0 with the Triton
kernels and with the torch reference, reporting time, cache bytes read and GB/s, and
(3) a wave prefill of 16384 tokens on SmolLM2 geometry (9 q heads, 3 KV heads x 64) per dtype:
tok/s, waves, peak scratch. Each Triton result is checked against the torch reference first.
(4) The decode grid (issue 14 item 1's targets): fp32 / bf16 / q8_0 decode at ctx 4096, 16384
and 32768 on the issue's geometry (8 KV heads x 128, 32 q heads) and on Coder-30B's (4 KV heads
x 128, 32 q heads), each timed two ways, CUDA-graph replays with L2 flushed (``graph_us``, the
figure of merit) and ``triton.testing.do_bench`` (eager launches, L2 flushed: ``do_bench_us``,
host-launch bound where the kernel is shorter than its launches), with GB/s and % of copy, the
error against the torch reference, and per (geometry, ctx) the targets: q8_0 >= 2.5x fp32 and
>= 60% of copy, bf16 >= 1.8x fp32, fp32 >= 70% of copy. A third timing, ``layered_us``, is what a
decode step pays a layer: one graph of back-to-back launches over distinct copies of the cache
(together >= 4x the L2), median replay / copies; the targets are judged on both timings. Each row
also carries ``floor_us``: the same bytes streamed on the same grid and then the combine
(``benchmarks/attn_floor.py``), layered, and each layered verdict the best a split + combine launch
could show (``floor_bound``: each dtype at its floor, or at its measured time where that is lower,
against the fp32 kernel as measured or the copy) and whether that reaches each target
(``within_floor``). The last stdout line is one compact
JSON document (``--out FILE`` writes it too). ``--sweep`` also times decode variants (q8_0:
tile sizes, warps, splits, its own kernel vs the generic one, one-term float16 splits).

    python benchmarks/bench_attention.py --out attention.json   # ~2 minutes on an H200
    python benchmarks/bench_attention.py --sweep                # plus the decode kernel variants

Measured (H100 80GB HBM3, torch 2.11, triton 3.6; copy 3003 GB/s): decode fp32 66.6 us
(2016 GB/s), bf16 40.1 us (1.66x), q8_0 57.5 us (1.16x, 620 GB/s = 21% of copy); fixed cost
~11-13 us per call (two launches, prologue), marginal 2.4 / 2.2 / 0.8 TB/s. Wave prefill of
16384 tokens: 1.80M / 1.91M / 1.46M tok/s, 4 waves, no scratch. The issue's decode targets
(q8_0 >= 2.5x fp32 and >= 60% of copy, bf16 >= 1.7x) are not met yet. Those q8_0 numbers are
the interleaved-block layout's; the split layout (issue 14 item 1) has its prediction in
docs/perf-notes.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attn_floor import read_floor  # noqa: E402
from engine import kernels  # noqa: E402
from engine.kv import KV_DTYPES, LayerKV  # noqa: E402
from engine.kernels import decode_attention as dmod  # noqa: E402
from engine.kernels.decode_attention import decode_attention, decode_bytes_read  # noqa: E402
from engine.kernels.prefill_attention import plan_waves, prefill_attention_ref  # noqa: E402

_flush_buf = None


def bench_us(fn, reps: int, warmup: int = 3, flush: bool = True, graph: bool = True) -> tuple[float, list[float]]:
    """Median device time of ``fn`` in microseconds: CUDA events around a CUDA-graph replay of
    ``fn`` (so Python and launch overhead stay out), L2 flushed before each repeat."""
    global _flush_buf
    if _flush_buf is None:
        _flush_buf = torch.empty(512 << 20, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
        run()
        torch.cuda.synchronize()
    pairs = []
    for _ in range(reps):
        if flush:
            _flush_buf.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        run()
        e.record()
        pairs.append((s, e))
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) * 1e3 for s, e in pairs]
    return statistics.median(samples), samples


def host_us(fn, reps: int = 20) -> float:
    """Median host time of one call including its launches (what an eager decode step pays)."""
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e6)
    return statistics.median(ts)


def copy_bandwidth(reps: int) -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(256 << 20, device="cuda")
    dst = torch.empty_like(src)
    us, _ = bench_us(lambda: dst.copy_(src), reps, flush=False, graph=False)
    return 2 * src.nbytes / (us * 1e-6) / 1e9


def fill_cache(cache: LayerKV, n: int, gen: torch.Generator, chunk: int = 4096) -> None:
    for s in range(0, n, chunk):
        t = min(chunk, n - s)
        shape = (t, cache.n_kv_heads, cache.head_dim)
        cache.write(s, torch.randn(shape, device=gen.device, generator=gen),
                    torch.randn(shape, device=gen.device, generator=gen))


def layered_copies(cache: LayerKV, per_launch_bytes: int, l2_bytes: int,
                   cap_bytes: int = 6 << 30) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of the cache's K and V (distinct memory) enough that one pass over them reads at
    least 4x the L2 (at least 8 copies, at most ``cap_bytes`` of them)."""
    n = layered_count(per_launch_bytes, l2_bytes, cache.k.nbytes + cache.v.nbytes, cap_bytes)
    return [(cache.k.clone(), cache.v.clone()) for _ in range(n)]


def layered_count(per_launch_bytes: int, l2_bytes: int, copy_bytes: int, cap_bytes: int = 6 << 30) -> int:
    """How many distinct copies ``layered_copies`` makes: enough that one pass reads >= 4x the L2,
    at least 8, at most ``cap_bytes`` of copies of ``copy_bytes`` each (and never fewer than 2)."""
    n = max(8, -(-4 * l2_bytes // per_launch_bytes))
    return max(2, min(n, cap_bytes // max(1, copy_bytes)))


def layered_time(bufs, launch, reps: int) -> tuple[float, list[float]]:
    """Per-launch device time as a decode step pays it: ``bench_us`` of one CUDA graph of
    ``len(bufs)`` back-to-back ``launch(k, v)``, one per copy (as a step's layers follow each
    other), no flush, divided by the copies. No graph launch latency and no L2 flush in each
    launch's time, unlike ``bench_us`` of one launch (whose event and graph-launch latency and
    the flush's write-back sit in every sample)."""
    def all_copies():
        for k, v in bufs:
            launch(k, v)
    _, samples = bench_us(all_copies, reps, warmup=1, flush=False)
    samples = [t / len(bufs) for t in samples]
    return statistics.median(samples), samples


def layered_us(cache: LayerKV, q: torch.Tensor, fmt: str, ctx: int, scale: float, hkv: int, reps: int,
               l2_bytes: int) -> tuple[float, int, list[float]]:
    """``layered_time`` of the default launch over ``ctx`` keys: (us per launch, copies, samples)."""
    bufs = layered_copies(cache, decode_bytes_read(ctx, hkv, q.shape[1], fmt), l2_bytes)
    t, samples = layered_time(bufs, lambda k, v: decode_attention(q, k, v, fmt, ctx, scale, hkv), reps)
    n = len(bufs)
    del bufs
    return t, n, samples


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = (out.double() - ref.double())
    return d.abs().max().item(), (d.norm() / ref.double().norm()).item()


def decode_section(args, copy_gbps: float, gen: torch.Generator) -> dict:
    ctx, (hkv, d, hq) = args.ctx, GEOMETRIES[args.geometry]
    scale = d ** -0.5
    res = {}
    print(f"\n== decode attention: ctx {ctx}, {hq} q heads, {hkv} kv heads x {d} ==")
    print(f"{'dtype':6} {'impl':7} {'time_us':>9} {'MB_read':>8} {'GB/s':>8} {'%copy':>6} {'maxabs':>9} {'rel':>9}")
    for fmt in KV_DTYPES:
        cache = LayerKV(0, hkv, d, ctx, fmt, device="cuda")
        fill_cache(cache, ctx, gen)
        q = torch.randn(hq, d, device="cuda", generator=gen)
        plan = plan_waves(1, ctx - 1, hq, hkv, d, 256 << 20)
        ref, _ = prefill_attention_ref(q[None], cache.k, cache.v, fmt, ctx - 1, scale, hkv, plan)
        out = decode_attention(q, cache.k, cache.v, fmt, ctx, scale, hkv)
        mx, rel = rel_err(out, ref[0])
        nbytes = decode_bytes_read(ctx, hkv, d, fmt)
        t_tr, _ = bench_us(lambda: decode_attention(q, cache.k, cache.v, fmt, ctx, scale, hkv), args.reps)
        t_ref, _ = bench_us(lambda: prefill_attention_ref(q[None], cache.k, cache.v, fmt, ctx - 1, scale,
                                                          hkv, plan), max(5, args.reps // 5), graph=False)
        t_host = host_us(lambda: decode_attention(q, cache.k, cache.v, fmt, ctx, scale, hkv))
        gbps = nbytes / (t_tr * 1e-6) / 1e9
        res[fmt] = {"triton_us": round(t_tr, 2), "torch_us": round(t_ref, 2), "eager_host_us": round(t_host, 1),
                    "bytes_read": nbytes,
                    "GBps": round(gbps, 1), "frac_copy": round(gbps / copy_gbps, 3),
                    "max_abs_vs_ref": mx, "rel_vs_ref": rel,
                    "scratch_bytes": dmod.last_scratch_bytes}
        print(f"{fmt:6} {'triton':7} {t_tr:9.2f} {nbytes / 1e6:8.2f} {gbps:8.1f} {100 * gbps / copy_gbps:6.1f} "
              f"{mx:9.2e} {rel:9.2e}")
        print(f"{fmt:6} {'torch':7} {t_ref:9.2f} {nbytes / 1e6:8.2f} {nbytes / (t_ref * 1e-6) / 1e9:8.1f}"
              f"   (triton eager call incl. launches: {t_host:.1f} us host time)")
        if args.scaling:
            pts = []
            for n in (ctx // 16, ctx // 4, ctx // 2, ctx):
                t, _ = bench_us(lambda: decode_attention(q, cache.k, cache.v, fmt, n, scale, hkv), args.reps)
                pts.append((decode_bytes_read(n, hkv, d, fmt), t))
            (x0, y0), (x1, y1) = pts[0], pts[-1]
            slope = (y1 - y0) / (x1 - x0)
            res[fmt]["scaling"] = {"points_bytes_us": pts, "fixed_us": round(y0 - slope * x0, 2),
                                   "marginal_GBps": round(1e-3 / slope, 1)}
            print(f"  scaling {fmt}: " + ", ".join(f"{b / 1e6:.1f}MB {t:.1f}us" for b, t in pts) +
                  f"  -> fixed {y0 - slope * x0:.1f} us + bytes at {1e-3 / slope:.0f} GB/s")
        if args.sweep and fmt in args.sweep_dtypes.split(","):
            depths = [int(x) for x in args.sweep_depths.split(",")] if args.sweep_depths else [None]
            for dp in depths:
                key = "sweep" if dp is None else f"sweep_depth{dp}"
                res[fmt][key] = sweep(cache, q, fmt, ctx, scale, hkv, args.reps, copy_gbps, depth=dp,
                                      impls=args.sweep_impls.split(",") if args.sweep_impls else None,
                                      keys=args.sweep_keys.split(",") if args.sweep_keys else None,
                                      layered=args.sweep_layered)
        del cache
    return res


def sweep(cache, q, fmt, ctx, scale, hkv, reps, copy_gbps, depth: int | None = None, keys=None, layered=False,
          impls: list[str] | None = None) -> list[dict]:
    """Every variant's time over ``ctx`` keys; with ``depth``, launched as the captured decode
    step launches it: position ``depth - 1`` held on the device, splits over the whole buffer."""
    rows = []
    pos = None if depth is None else torch.tensor([depth - 1], device="cuda", dtype=torch.int64)
    n_keys = ctx if depth is None else None
    read_keys = ctx if depth is None else depth
    grid = [{"block_n": bn, "programs_per_sm": pps, "num_warps": warps, "num_stages": stages}
            for bn, pps, warps, stages in itertools.product([16, 32, 64], [1, 2, 4, 8], [2, 4], [2, 3])]
    grid += [{"block_n": bn, "programs_per_sm": pps, "num_warps": w, "num_stages": 3, "fuse_combine": False}
             for bn, pps, w in itertools.product([32, 64], [2, 4], [2, 4])]
    if fmt == "q8_0":   # its own kernel's larger tiles and warps, the generic kernel, one-term splits
        grid += [{"block_n": bn, "programs_per_sm": pps, "num_warps": w, "num_stages": st}
                 for bn, pps, w, st in itertools.product([128], [1, 2, 4], [4, 8], [2, 3, 4])]
        grid += [{"block_n": bn, "programs_per_sm": pps, "num_warps": 4, "num_stages": 3, "q8_kernel": False}
                 for bn, pps in itertools.product([32, 64], [2, 4])]
        grid += [{"block_n": bn, "programs_per_sm": pps, "num_warps": w, "num_stages": st, "q8_impl": "batched"}
                 for bn, pps, w, st in ((64, 4, 2, 2), (32, 4, 2, 2), (64, 2, 4, 3))]   # the form it replaced
        # the batched form at as many programs a SM as its registers and shared memory let an SM hold
        # (offline, the device's Triton: 125-168 registers, 4-7 programs; the rows form's 255 hold 2).
        # benchmarks/oneoff/q8_occupancy_model.py fitted the H100's sweeps to instructions a key /
        # (warps a scheduler)^0.5 and predicts 21-22 us at coder30b ctx 16384 against rows' 28.8
        grid += [{"block_n": bn, "programs_per_sm": pps, "num_warps": w, "num_stages": st, "q8_impl": "batched"}
                 for bn, pps, w, st in ((16, 6, 2, 2), (16, 7, 2, 2), (32, 5, 2, 2), (32, 6, 2, 2), (32, 6, 2, 3),
                                        (32, 4, 4, 2), (32, 4, 4, 3), (64, 3, 4, 2))]
        grid += [{"block_n": 64, "programs_per_sm": pps, "num_warps": 4, "num_stages": 3, "q8_terms": t}
                 for pps in (2, 4) for t in ((1, 1), (1, 2), (2, 1))]
        # the rows kernel's two float16 terms stacked along one operand's rows (q8_stack; offline at G 8:
        # 957 loop instructions a 64-key tile against 1597, the dots as sm_90 warpgroup MMAs)
        grid += [{"block_n": bn, "programs_per_sm": pps, "num_warps": w, "num_stages": st, "q8_stack": True}
                 for bn, pps, w, st in ((64, 2, 4, 3), (64, 2, 4, 2), (64, 1, 4, 3), (64, 3, 4, 3), (32, 2, 4, 3),
                                        (32, 3, 4, 3), (32, 4, 4, 3), (32, 3, 4, 2), (64, 1, 8, 3), (64, 2, 8, 3))]
        # the rows kernel's one-s guards (what each costs), and its ablations: timing only, wrong
        # results (no score dots / no V path): where its compute-bound time goes
        grid += [{"block_n": 64, "programs_per_sm": 2, "num_warps": 4, "num_stages": 3, "q8_guards": g}
                 for g in ((False, False), (True, False), (False, True), (True, True))]
        grid += [{"block_n": 64, "programs_per_sm": 2, "num_warps": 4, "num_stages": 3, "q8_ablate": a}
                 for a in ("qk", "pv", "qk,pv")]
        # K / V read as int16 words, float16 where they land (twenty-third session: 106.6 -> 86.4
        # sm_90 instructions a key offline, 75.4 unpacked by PTX permutes; reports/cpu-2026-12-06c; untimed)
        grid += [{"block_n": bn, "programs_per_sm": pps, "num_warps": w, "num_stages": 3, "q8_words": wd}
                 for bn, pps, w, wd in ((64, 2, 4, "kv"), (64, 2, 4, "k"), (64, 2, 4, "v"), (64, 4, 4, "kv"),
                                        (64, 2, 8, "kv"), (32, 2, 4, "kv"), (128, 2, 8, "kv"), (64, 2, 4, "kv_prmt"),
                                        (64, 4, 4, "kv_prmt"), (128, 2, 8, "kv_prmt"), (128, 1, 4, "kv_prmt"),
                                        (128, 2, 4, "kv_prmt"))]
        # the blocks form (one 2-D dot a 32-value block, no zero rows; nineteenth session, untimed)
        grid += [{"block_n": bn, "programs_per_sm": pps, "num_warps": w, "num_stages": st, "q8_impl": "blocks"}
                 for bn, pps, w, st in itertools.product([32, 64, 128], [2, 4], [2, 4], [2, 3])]
        # the streams form (float32 FMAs, no tensor cores; thirtieth session, untimed): R = block_n
        # streams a program, 8 threads a key (R x 8 = the program's threads), G <= 8
        grid += [{"block_n": bn, "programs_per_sm": pps, "num_warps": w, "num_stages": st, "q8_impl": impl}
                 for impl in ("streams", "streams2")
                 for (bn, w), pps, st in itertools.product(((16, 4), (32, 8), (8, 2)), (2, 4, 8), (2,))]
        grid += [{"block_n": 16, "programs_per_sm": pps, "num_warps": 4, "num_stages": 2, "q8_impl": impl,
                  "q8_unpack": "magic"} for impl in ("streams", "streams2") for pps in (2, 4)]
        # the CUDA C++ form (mma.sync dots; thirty-seventh session): its 64-key, 4-warp tiles at 2-4 stages
        # and 1-4 programs a SM (2 at 3 stages: the default's launch)
        grid += [{"block_n": 64, "programs_per_sm": pps, "num_warps": 4, "num_stages": st, "q8_impl": "cuda_mma",
                  "q8_pack": False} for pps, st in itertools.product([1, 2, 3, 4], [2, 3, 4])]
        from engine.kernels import cuda_q8
        if (q.shape[0] // hkv, q.shape[1]) in cuda_q8.WSM_GEOMETRIES:   # its warp softmax (packed where G <= 4)
            grid += [{"block_n": 64, "programs_per_sm": pps, "num_warps": 4, "num_stages": 3, "q8_impl": "cuda_mma",
                      "q8_softmax": "warp"} for pps in (1, 2, 3, 4)]
        # under programmatic dependent launch (the layered graph's combine ahead of each split), waiting
        # first and with the first tiles' loads before the wait (q8_early; thirty-eighth session)
        grid += [{"block_n": 64, "programs_per_sm": pps, "num_warps": 4, "num_stages": 3, "q8_impl": "cuda_mma",
                  "pdl": True, "q8_early": early} for pps in (2, 3) for early in ("0", "1")]
        if q.shape[0] // hkv <= 4:      # its packed terms (one mma a k-step), at 3 stages
            grid += [{"block_n": 64, "programs_per_sm": pps, "num_warps": 4, "num_stages": 3, "q8_impl": "cuda_mma",
                      "q8_pack": True} for pps in (1, 2, 3, 4)]
        # the variants above without a form are the rows kernel's tiles: name it (the default, "auto",
        # takes cuda_mma where the tiles are its own)
        grid = [c if "q8_impl" in c or c.get("q8_kernel") is False else {**c, "q8_impl": "rows"} for c in grid]
    if impls:   # the q8_0 forms asked for (q8_kernel False: the generic kernel, "generic")
        form = lambda c: "generic" if c.get("q8_kernel") is False else c.get("q8_impl", "rows")
        grid = [c for c in grid if form(c) in impls]
    default = dmod.resolved_config(fmt, fmt, q.shape[1])
    if keys:    # only the variants that set one of these settings, and the rows that launch as the default
        # (q8_impl aside: the default's "auto" resolves per launch)
        same = lambda c: ({**dmod.resolved_config(fmt, fmt, q.shape[1], c), "q8_impl": None}
                          == {**default, "q8_impl": None})
        grid = [c for c in grid if any(k in c for k in keys) or same(c)]
    bufs = (layered_copies(cache, decode_bytes_read(read_keys, hkv, q.shape[1], fmt),
                           torch.cuda.get_device_properties(0).L2_cache_size) if layered else None)
    for cfg in grid:
        try:
            if layered:     # each variant as a decode step pays it (see layered_time)
                t, _ = layered_time(bufs, lambda k, v: decode_attention(q, k, v, fmt, n_keys, scale, hkv, cfg=cfg,
                                                                        pos=pos), max(10, reps // 2))
            else:
                t, _ = bench_us(lambda: decode_attention(q, cache.k, cache.v, fmt, n_keys, scale, hkv, cfg=cfg,
                                                         pos=pos), max(10, reps // 2))
        except Exception as e:   # a variant that does not fit (shared memory) is reported, not fatal
            print(f"  sweep {fmt} {cfg}: {type(e).__name__}: {str(e)[:80]}")
            continue
        gbps = decode_bytes_read(read_keys, hkv, q.shape[1], fmt) / (t * 1e-6) / 1e9
        with dmod.recording() as log:    # what the compiled attention kernel holds (the first launch)
            decode_attention(q, cache.k, cache.v, fmt, n_keys, scale, hkv, cfg=cfg, pos=pos)
        regs = {k: log[0][k] for k in ("n_regs", "n_spills") if log and k in log[0]}
        rows.append({**cfg, "us": round(t, 2), "GBps": round(gbps, 1), "depth": depth,
                     "timing": "layered" if layered else "graph", **regs})
    del bufs
    rows.sort(key=lambda r: r["us"])
    at = "" if depth is None else f" at depth {depth} (device-held position)"
    for r in rows[:5]:
        print(f"  sweep {fmt}{at}: {r}  ({100 * r['GBps'] / copy_gbps:.1f}% of copy)")
    for i, r in enumerate(rows):     # where today's default stands: the first row that launches as it does
        row_cfg = {k: v for k, v in r.items() if k not in ("us", "GBps", "depth", "timing", "n_regs", "n_spills")}
        if dmod.resolved_config(fmt, fmt, q.shape[1], row_cfg) == default:
            print(f"  sweep {fmt}{at}: the default is #{i + 1} of {len(rows)}, {r['us']} us")
            break
    return rows


# (kv heads, head_dim, q heads); "bench" is the reference geometry (its targets)
GEOMETRIES = {"bench": (8, 128, 32), "coder30b": (4, 128, 32), "smollm2": (3, 64, 9)}
TARGETS = {"q8_0_vs_fp32": 2.5, "q8_0_frac_copy": 0.6, "bf16_vs_fp32": 1.8, "fp32_frac_copy": 0.7}


def grid_section(args, copy_gbps: float, gen: torch.Generator) -> dict:
    """Decode at every (geometry, ctx, dtype): CUDA-graph and triton.testing.do_bench timings,
    bytes, % of copy, error vs the torch reference, and the targets per (geometry, ctx)."""
    import triton.testing
    ctxs = [int(c) for c in args.ctxs.split(",")]
    rows, verdicts = [], []
    print(f"\n== decode grid: ctx {ctxs}, geometries {args.geometries} ==")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"{'geometry':9} {'ctx':>6} {'dtype':6} {'graph_us':>9} {'do_bench':>9} {'layered':>9} {'MB_read':>8} "
          f"{'GB/s':>8} {'%copy':>6} {'lay_GB/s':>8} {'lay%cp':>6} {'rel':>9} {'floor':>8}")
    for geo in args.geometries.split(","):
        hkv, d, hq = GEOMETRIES[geo]
        scale = d ** -0.5
        q = torch.randn(hq, d, device="cuda", generator=gen)
        by_fmt: dict[str, dict[int, dict]] = {}
        for fmt in KV_DTYPES:
            cache = LayerKV(0, hkv, d, max(ctxs), fmt, device="cuda")
            fill_cache(cache, max(ctxs), gen)
            for ctx in ctxs:
                fn = lambda: decode_attention(q, cache.k, cache.v, fmt, ctx, scale, hkv)   # noqa: E731
                plan = plan_waves(1, ctx - 1, hq, hkv, d, 256 << 20)
                ref, _ = prefill_attention_ref(q[None], cache.k, cache.v, fmt, ctx - 1, scale, hkv, plan)
                with dmod.recording() as launch_log:     # which kernel / q8_0 form the timed launches run
                    mx, rel = rel_err(fn(), ref[0])
                t_graph, samples = bench_us(fn, args.reps)
                t_do = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
                t_lay, n_lay, lay_samples = layered_us(cache, q, fmt, ctx, scale, hkv, args.reps, l2)
                nbytes = decode_bytes_read(ctx, hkv, d, fmt)
                # the split + combine design's floor: the same bytes streamed on the same grid, then
                # the combine (benchmarks/attn_floor.py), layered the same way
                bufs = layered_copies(cache, nbytes, l2)
                t_floor, _ = layered_time(bufs, read_floor(fmt, hkv, d, hq, ctx, dmod.resolved_config(fmt, fmt, d),
                                                           combine=True, pdl=False), args.reps)
                del bufs
                gbps = nbytes / (t_graph * 1e-6) / 1e9
                lay_gbps = nbytes / (t_lay * 1e-6) / 1e9
                row = {"geometry": geo, "n_kv_heads": hkv, "head_dim": d, "n_heads": hq, "ctx": ctx, "dtype": fmt,
                       "graph_us": round(t_graph, 2), "graph_us_min": round(min(samples), 2),
                       "do_bench_us": round(t_do, 2), "layered_us": round(t_lay, 2),
                       "layered_us_min": round(min(lay_samples), 2), "layered_copies": n_lay,
                       "bytes_read": nbytes, "GBps": round(gbps, 1),
                       "frac_copy": round(gbps / copy_gbps, 3), "layered_GBps": round(lay_gbps, 1),
                       "layered_frac_copy": round(lay_gbps / copy_gbps, 3),
                       "floor_us": round(t_floor, 2), "floor_frac_copy": round(nbytes / (t_floor * 1e-6) / 1e9 / copy_gbps, 3),
                       "max_abs_vs_ref": mx, "rel_vs_ref": rel,
                       "scratch_bytes": dmod.last_scratch_bytes,
                       **{k: launch_log[0][k] for k in ("kernel", "q8_impl", "q8_impl_why") if launch_log and k in launch_log[0]}}
                rows.append(row)
                by_fmt.setdefault(fmt, {})[ctx] = row
                print(f"{geo:9} {ctx:6d} {fmt:6} {t_graph:9.2f} {t_do:9.2f} {t_lay:9.2f} {nbytes / 1e6:8.2f} "
                      f"{gbps:8.1f} {100 * gbps / copy_gbps:6.1f} {lay_gbps:8.1f} {100 * lay_gbps / copy_gbps:6.1f} "
                      f"{rel:9.2e} {t_floor:8.2f}")
            del cache
        for ctx in ctxs:
            f32, b16, q8 = (by_fmt[f][ctx] for f in ("fp32", "bf16", "q8_0"))
            # judged twice: one launch a replay (``graph_us``, as before) and in the layered graph
            # (``layered_us``, the time a decode step pays a layer); both kept, neither hides the other
            for timing, us, frac in (("graph", "graph_us", "frac_copy"), ("layered", "layered_us", "layered_frac_copy")):
                got = {"q8_0_vs_fp32": round(f32[us] / q8[us], 2), "q8_0_frac_copy": q8[frac],
                       "bf16_vs_fp32": round(f32[us] / b16[us], 2), "fp32_frac_copy": f32[frac]}
                met = {k: got[k] >= TARGETS[k] for k in TARGETS}
                extra = {}
                if timing == "layered":     # the best this design could show: each dtype at its floor
                    # against the fp32 kernel as measured (ratios) or against the copy (fractions).
                    # The floor kernel is the plain streaming one, not the fastest possible: where
                    # the production launch beats it (bf16 at 16384+ on the H200), the measured
                    # time stands in, so a bound never sits below what was shown.
                    low = {f: min(r["floor_us"], r[us]) for f, r in (("fp32", f32), ("bf16", b16), ("q8_0", q8))}
                    bound = {"q8_0_vs_fp32": round(f32[us] / low["q8_0"], 2),
                             "q8_0_frac_copy": round(q8["bytes_read"] / (low["q8_0"] * 1e-6) / 1e9 / copy_gbps, 3),
                             "bf16_vs_fp32": round(f32[us] / low["bf16"], 2),
                             "fp32_frac_copy": round(f32["bytes_read"] / (low["fp32"] * 1e-6) / 1e9 / copy_gbps, 3)}
                    extra = {"floor_bound": bound, "within_floor": {k: bound[k] >= TARGETS[k] for k in TARGETS}}
                verdicts.append({"geometry": geo, "ctx": ctx, "timing": timing, **got, "met": met,
                                 "pass": all(met.values()), **extra})
                print(f"  targets {geo} ctx {ctx} ({timing}): " + ", ".join(
                    f"{k} {got[k]} ({'>=' if met[k] else '<'} {TARGETS[k]}"
                    + (f"; floor {extra['floor_bound'][k]}" if extra else "") + ")" for k in TARGETS))
    return {"rows": rows, "targets": TARGETS, "verdicts": verdicts,
            "pass": {t: all(v["pass"] for v in verdicts if v["timing"] == t) for t in ("graph", "layered")}}


def prefill_section(args, gen: torch.Generator) -> dict:
    n, hq, hkv, d = args.prefill_tokens, 9, 3, 64
    scale = d ** -0.5
    res = {}
    print(f"\n== wave prefill: {n} tokens, {hq} q heads, {hkv} kv heads x {d}, budget "
          f"{args.wave_budget >> 20} MiB ==")
    print(f"{'dtype':6} {'ms':>9} {'tok/s':>11} {'waves':>6} {'scratch_MB':>10} {'cuda_peak_MB':>12} "
          f"{'vs_1pass':>9} {'vs_torch':>9}")
    for fmt in KV_DTYPES:
        cache = LayerKV(0, hkv, d, n, fmt, device="cuda", wave_budget_bytes=args.wave_budget)
        fill_cache(cache, n, gen)
        q = torch.randn(n, hq, d, device="cuda", generator=gen)
        out = cache.attend(q, 0, scale)
        waves = cache.last_waves
        one = LayerKV(0, hkv, d, n, fmt, device="cuda", wave_max_rows=1 << 30)
        one.k.copy_(cache.k)
        one.v.copy_(cache.v)
        one_out = one.attend(q, 0, scale)
        del one
        mx_one, _ = rel_err(out, one_out)
        prev = kernels.set_backend("torch")
        try:
            ref = cache.attend(q, 0, scale)
        finally:
            kernels.set_backend(prev)
        mx_ref, rel_ref = rel_err(out, ref)
        del ref, one_out
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = cache.attend(q, 0, scale)
        torch.cuda.synchronize()
        cuda_peak = torch.cuda.max_memory_allocated() - base - out.nbytes
        del out
        t, _ = bench_us(lambda: cache.attend(q, 0, scale), args.prefill_reps, warmup=1, flush=False, graph=False)
        res[fmt] = {"ms": round(t / 1e3, 3), "tok_s": round(n / (t * 1e-6)), "waves": waves,
                    "peak_scratch_bytes": cache.peak_scratch_bytes, "cuda_peak_extra_bytes": cuda_peak,
                    "max_abs_vs_one_pass": mx_one, "max_abs_vs_torch": mx_ref, "rel_vs_torch": rel_ref}
        print(f"{fmt:6} {t / 1e3:9.3f} {n / (t * 1e-6):11.0f} {waves:6d} {cache.peak_scratch_bytes / 1e6:10.2f} "
              f"{cuda_peak / 1e6:12.2f} {mx_one:9.2e} {mx_ref:9.2e}")
        del cache
    return res


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ctx", type=int, default=16384)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--prefill-tokens", type=int, default=16384)
    p.add_argument("--prefill-reps", type=int, default=5)
    p.add_argument("--wave-budget", type=int, default=256 << 20)
    p.add_argument("--sweep", action="store_true", help="also time decode kernel variants")
    p.add_argument("--geometry", default="bench", choices=sorted(GEOMETRIES),
                   help="the decode section's (and sweep's) geometry; the targets are the bench one's")
    p.add_argument("--sweep-dtypes", default="fp32,bf16,q8_0")
    p.add_argument("--sweep-depths", default="",
                   help="sweep as the captured step launches: a device-held position at each of these depths "
                        "over a --ctx-row buffer ('' : n_keys = ctx, the host-known length)")
    p.add_argument("--sweep-impls", default="", help="sweep only these q8_0 forms (rows, batched, "
                   "blocks, generic; '' all)")
    p.add_argument("--sweep-keys", default="", help="sweep only the variants setting one of these cfg keys "
                   "(e.g. q8_words), plus the default's row")
    p.add_argument("--sweep-layered", action="store_true", help="time the sweep's variants as a decode step pays "
                   "them (layered_time: back-to-back launches over distinct cache copies) instead of one launch a replay")
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--scaling", action="store_true", help="decode time vs context: fixed cost + GB/s")
    p.add_argument("--ctxs", default="4096,16384,32768", help="decode grid contexts ('' skips the grid)")
    p.add_argument("--geometries", default="bench,coder30b", help=f"decode grid geometries: {', '.join(GEOMETRIES)}")
    p.add_argument("--out", default=None, help="also write the JSON document to this file")


def main(args) -> int:
    if not torch.cuda.is_available():
        print("bench_attention needs CUDA (run it on the GPU machine)", file=sys.stderr)
        return 2
    import triton
    t0 = time.time()
    gen = torch.Generator(device="cuda").manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
          f"triton {triton.__version__}; decode config {dmod.resolved_config('', '', 0)}")
    copy_gbps = copy_bandwidth(args.reps)
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)")
    dec = decode_section(args, copy_gbps, gen)
    grid = grid_section(args, copy_gbps, gen) if args.ctxs else {}
    pre = {} if args.skip_prefill else prefill_section(args, gen)
    f32 = dec["fp32"]["triton_us"]
    targets = {
        "q8_0_speedup_vs_fp32": round(f32 / dec["q8_0"]["triton_us"], 2),
        "bf16_speedup_vs_fp32": round(f32 / dec["bf16"]["triton_us"], 2),
        "q8_0_frac_copy": dec["q8_0"]["frac_copy"],
    }
    targets["geometry"] = args.geometry
    targets["pass"] = (targets["q8_0_speedup_vs_fp32"] >= TARGETS["q8_0_vs_fp32"]
                       and targets["bf16_speedup_vs_fp32"] >= TARGETS["bf16_vs_fp32"]
                       and targets["q8_0_frac_copy"] >= TARGETS["q8_0_frac_copy"])
    if args.geometry != "bench":     # the targets are set at its own geometry: not judged here
        targets["pass"] = None
    verdict = {True: "PASS", False: "FAIL", None: f"not judged (geometry {args.geometry})"}[targets["pass"]]
    print(f"\ntargets: q8_0 {targets['q8_0_speedup_vs_fp32']}x fp32 (>= 2.5), bf16 "
          f"{targets['bf16_speedup_vs_fp32']}x (>= 1.8), q8_0 at {100 * targets['q8_0_frac_copy']:.0f}% "
          f"of copy bandwidth (>= 60%): {verdict}  ({time.time() - t0:.0f} s)")
    for v in dec.values():
        v.pop("sweep", None) if not args.sweep else None
    doc = {"bench": "attention", "device": props.name, "torch": torch.__version__, "triton": triton.__version__,
           "copy_GBps": round(copy_gbps, 1), "decode": dec, "decode_grid": grid, "prefill": pre, "targets": targets,
           "decode_config": {**dmod.resolved_config("", "", 0),
                             "per_format": dmod.FORMAT_CONFIG,
                             "per_head_dim": {f"{f}/{d}": c for (f, d), c in dmod.HEAD_DIM_CONFIG.items()}}}
    text = json.dumps(doc, separators=(",", ":"))
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(ap)
    raise SystemExit(main(ap.parse_args()))
