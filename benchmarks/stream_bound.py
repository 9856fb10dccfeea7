"""The one-launch bound of decode attention: the fastest a single kernel streams a launch's bytes.

``benchmarks/attn_floor.py`` bounds one design (the context split over the production grid, the
partials combined by a second kernel). This bounds any design that reads the same bytes once
in one launch, however it arranges them: the K and V bytes of a decode launch (values, and
q8_0's scales), laid out in the layout most favourable to streaming (one contiguous buffer, 16-byte
aligned), read by the best of

- ``_stream_kernel`` swept over chunk per program x tile x warps x PDL (every program XOR-sums its
  contiguous chunk of int32 words and writes one word; no arithmetic on them),
- torch's own reduction of the buffer (``sum``; were it ever two kernels and faster, the bound
  would only come out lower, so a target is never called out of reach on its account),

each timed as a decode step pays a launch (``bench_attention.layered_time``: one CUDA graph of
back-to-back launches over distinct copies of the bytes, >= 4x the L2, median / copies). A target
whose time budget (from the copy's rate, or from the fp32 kernel measured in the same run) is
below this bound cannot be met by any kernel that reads these bytes in one launch on this device
and toolchain, whatever its arithmetic; one above it is reachable in principle, not shown
reached. The budgets and verdicts are per (dtype, ctx) at ``bench_attention``'s "bench" geometry
(the issue's reference: 8 KV heads x 128).

Contract of the kernel (tested interpreted against a torch XOR in tests/test_stream_bound.py):
``stream_launch(n_words, chunk, block, num_warps, pdl)`` returns ``launch(buf)``, after which
``launch.out[p]`` is the XOR of ``buf[p*chunk:(p+1)*chunk]`` (the last chunk ragged).

    python benchmarks/stream_bound.py --out stream_bound.json        (CUDA only)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attn_floor import _empty_kernel  # noqa: E402  (an empty launch: the fixed cost alone)
from engine.kernels.common import pdl_enter  # noqa: E402


@triton.jit
def _stream_kernel(X, OUT, n_words, CHUNK: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    pid = tl.program_id(0)
    base = pid * CHUNK
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(0, CHUNK, BLOCK):
        offs = base + i + tl.arange(0, BLOCK)
        acc = acc ^ tl.load(X + offs, mask=offs < n_words, other=0)
    tl.store(OUT + pid, tl.xor_sum(acc, axis=0))


def stream_launch(n_words: int, chunk: int, block: int, num_warps: int, pdl: bool, dev=None):
    """``launch(buf, _=None)``: ``_stream_kernel`` over ``n_words`` int32 words in chunks of
    ``chunk`` words (one program each), tiles of ``block``; ``launch.out`` holds a word a program."""
    if chunk % block:
        raise ValueError(f"chunk {chunk} is not a multiple of block {block}")
    dev = dev or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    programs = -(-n_words // chunk)
    out = torch.empty(programs, device=dev, dtype=torch.int32)
    extra = {"launch_pdl": True} if pdl else {}

    def launch(buf, _=None):
        _stream_kernel[(programs,)](buf, out, n_words, CHUNK=chunk, BLOCK=block, PDL=pdl,
                                    num_warps=num_warps, **extra)
    launch.out, launch.programs = out, programs
    return launch


def empty_launch(programs: int, pdl: bool):
    out = torch.empty(1, device="cuda", dtype=torch.int32)
    extra = {"launch_pdl": True} if pdl else {}

    def launch(buf, _=None):
        _empty_kernel[(programs,)](out, PDL=pdl, num_warps=4, **extra)
    return launch


TARGETS = (("fp32", "frac_copy", 0.7), ("q8_0", "frac_copy", 0.6), ("q8_0", "vs_fp32", 2.5),
           ("bf16", "vs_fp32", 1.8))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctxs", default="4096,16384,32768")
    ap.add_argument("--dtypes", default="fp32,bf16,q8_0")
    ap.add_argument("--chunks", default="1024,2048,4096,8192,16384,32768,65536", help="words a program")
    ap.add_argument("--blocks", default="512,1024,2048,4096", help="words a tile")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: stream_bound needs CUDA (the bound is a device measurement); run it on the GPU machine",
              file=sys.stderr)
        return 2
    from bench_attention import GEOMETRIES, copy_bandwidth, fill_cache, layered_copies, layered_count, layered_time
    from engine.kernels import decode_attention as dmod
    from engine.kv import LayerKV

    t0 = time.time()
    copy = copy_bandwidth(20)
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    hkv, d, hq = GEOMETRIES["bench"]
    doc = {"bench": "stream_bound", "device": props.name, "torch": torch.__version__, "triton": triton.__version__,
           "copy_GBps": round(copy, 1), "sms": props.multi_processor_count, "geometry": [hkv, d, hq],
           "rows": [], "best": [], "targets": []}
    print(f"{props.name}  copy {copy:.0f} GB/s  L2 {l2 >> 20} MiB  bench geometry {hkv}x{d} (hq {hq})")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(hq, d, device="cuda", generator=gen)
    chunks = [int(x) for x in a.chunks.split(",")]
    blocks = [int(x) for x in a.blocks.split(",")]
    warps = [int(x) for x in a.warps.split(",")]
    prod = {}

    def save():
        if a.out:
            Path(a.out).write_text(json.dumps(doc, indent=1))

    for ctx in [int(x) for x in a.ctxs.split(",")]:
        for fmt in a.dtypes.split(","):
            nbytes = dmod.decode_bytes_read(ctx, hkv, d, fmt)
            # the production launch, for the ratio budgets (the same run, the same clocks)
            cache = LayerKV(0, hkv, d, ctx, fmt, device="cuda")
            fill_cache(cache, ctx, gen)
            kv_bufs = layered_copies(cache, nbytes, l2)
            us, _ = layered_time(kv_bufs, lambda k, v: dmod.decode_attention(q, k, v, fmt, ctx, d ** -0.5, hkv), a.reps)
            prod[(fmt, ctx)] = us
            doc["rows"].append({"dtype": fmt, "ctx": ctx, "cell": "prod", "cfg": None, "us": round(us, 3),
                                "bytes": nbytes, "copies": len(kv_bufs),
                                "frac_copy": round(nbytes / (us * 1e-6) / 1e9 / copy, 3)})
            del kv_bufs, cache
            # the bytes as one aligned buffer, as many copies as layered_copies makes
            n_words = nbytes // 4
            n = layered_count(nbytes, l2, nbytes)
            bufs = [(torch.randint(-2 ** 31, 2 ** 31 - 1, (n_words,), device="cuda", dtype=torch.int32,
                                   generator=gen), None) for _ in range(n)]
            cells = []
            for ch in chunks:
                for bl in blocks:
                    if bl > ch or ch % bl:
                        continue
                    for w in warps:
                        if bl < 32 * w * 4:      # fewer than four words a thread: not a streaming tile
                            continue
                        for pdl in (False, True):
                            cells.append(("stream", {"chunk": ch, "block": bl, "warps": w, "pdl": pdl},
                                          stream_launch(n_words, ch, bl, w, pdl)))
            sums = torch.empty((), device="cuda", dtype=torch.int64)
            cells.append(("torch_sum", None, lambda b, _=None: torch.sum(b, dtype=torch.int64, out=sums)))
            for pdl in (False, True):
                cells.append(("empty", {"programs": 1, "pdl": pdl}, empty_launch(1, pdl)))
            best = None
            for name, cfg, fn in cells:
                try:
                    us_, samples = layered_time(bufs, fn, a.reps)
                except Exception as e:      # a cell that cannot run is named, not dropped
                    doc["rows"].append({"dtype": fmt, "ctx": ctx, "cell": name, "cfg": cfg,
                                        "error": f"{type(e).__name__}: {str(e)[:160]}"})
                    continue
                row = {"dtype": fmt, "ctx": ctx, "cell": name, "cfg": cfg, "us": round(us_, 3), "bytes": nbytes,
                       "copies": n, "frac_copy": round(nbytes / (us_ * 1e-6) / 1e9 / copy, 3),
                       "us_min": round(min(samples), 3)}
                doc["rows"].append(row)
                if name in ("stream", "torch_sum") and (best is None or us_ < best["us"]):
                    best = row
            if best is None:        # no streaming cell ran: no bound at this (dtype, ctx), said so
                doc["best"].append({"dtype": fmt, "ctx": ctx, "bytes": nbytes, "best_us": None,
                                                   "error": "no streaming cell ran (see rows)"})
                print(f"{fmt:5} {ctx:6}  no streaming cell ran: no bound", flush=True)
                del bufs
                save()
                continue
            emp = min((r["us"] for r in doc["rows"] if r["dtype"] == fmt and r["ctx"] == ctx and r["cell"] == "empty"),
                      default=None)
            doc["best"].append({"dtype": fmt, "ctx": ctx, "bytes": nbytes, "prod_us": round(prod[(fmt, ctx)], 3),
                                               "best_us": best["us"], "best": {"cell": best["cell"], "cfg": best["cfg"]},
                                               "best_frac_copy": best["frac_copy"], "empty_us": emp})
            print(f"{fmt:5} {ctx:6}  {nbytes / 1e6:7.2f} MB  prod {prod[(fmt, ctx)]:7.2f} us  one-launch best "
                  f"{best['us']:7.2f} us ({100 * best['frac_copy']:.1f}% of copy; {best['cell']} {best['cfg']})  "
                  f"empty {emp} us", flush=True)
            del bufs
            save()
        # the budgets at this ctx
        for fmt, kind, goal in TARGETS:
            if (fmt, ctx) not in prod or ("fp32", ctx) not in prod:
                continue
            b = next(r for r in doc["best"] if r["dtype"] == fmt and r["ctx"] == ctx)
            if b["best_us"] is None:
                doc["targets"].append({"dtype": fmt, "ctx": ctx, "target": f"{kind} >= {goal}",
                                       "reachable_by_one_launch": None, "error": "no bound measured"})
                continue
            if kind == "frac_copy":
                budget = b["bytes"] / (goal * copy * 1e9) * 1e6
                now = round(b["bytes"] / (prod[(fmt, ctx)] * 1e-6) / 1e9 / copy, 3)
            else:
                budget = prod[("fp32", ctx)] / goal
                now = round(prod[("fp32", ctx)] / prod[(fmt, ctx)], 2)
            t = {"dtype": fmt, "ctx": ctx, "target": f"{kind} >= {goal}", "now": now,
                 "budget_us": round(budget, 3), "prod_us": round(prod[(fmt, ctx)], 3), "one_launch_bound_us": b["best_us"],
                 "met": prod[(fmt, ctx)] <= budget, "reachable_by_one_launch": b["best_us"] <= budget}
            doc["targets"].append(t)
            print(f"  target {fmt} {t['target']:17} at {ctx}: now {now}, budget {budget:.2f} us, prod {prod[(fmt, ctx)]:.2f}, "
                  f"one-launch bound {b['best_us']:.2f} -> "
                  f"{'met' if t['met'] else ('reachable in principle' if t['reachable_by_one_launch'] else 'out of reach of one launch')}")
        save()
    doc["seconds"] = round(time.time() - t0, 1)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
