"""The host CPU's expert paths for one decode token, side by side: torch's int4 kernel over the
repacked experts (``engine.cpu_experts.HostQ4Experts``, the `cpu` tier today) against the native
Q4_0 x 8-bit kernel reading the GGUF blocks in place (``engine.native.moe_q4_decode``).

Contract: builds ``--layers`` layers of random Q4_0 experts in coder30b's geometry (128 experts,
d 2048, ff 768, k 8; ~340 MB of blocks a layer, so the bytes read exceed the last-level cache),
then, per ``--threads``, times k fresh random experts a step on each path (median us a step over
``--steps``, after a warm-up step), with the bytes each reads and the rate that implies, and the
two paths' distance from the exact float64 maths on one token, and the host's read rate at each
thread count (``engine.native.read_rate``: the roof); ``--also-march`` times other builds of the
native kernel on the same steps (e.g. ``haswell``: the AVX2 path). Prints a line a thread count and
writes JSON to ``--out``. Runs on any host with a C compiler.

    python benchmarks/oneoff/native_experts_bench.py --layers 3 --threads 1,2 --out native.json
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

from engine import native  # noqa: E402
from engine.cpu_experts import HostQ4Experts  # noqa: E402
from engine.kernels.moe_blocks import BlockStack  # noqa: E402

E, D, FF, K = 128, 2048, 768, 8


def stack(shape, gen) -> BlockStack:
    st = BlockStack.empty("q4_0", shape)
    st.qs.copy_(torch.randint(0, 256, st.qs.shape, generator=gen, dtype=torch.int32).to(torch.uint8))
    st.d.copy_(((torch.rand(st.d.shape, generator=gen) + 0.5) / (8 * shape[2] ** 0.5)).half())
    return st


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--threads", default="", help="comma list (default: torch's)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--also-march", default="", help="comma list of other -march builds of the native kernel "
                                                      "to time beside this CPU's (e.g. haswell: the AVX2 path "
                                                      "where this CPU has AVX-512)")
    ap.add_argument("--out", type=Path, default=Path("native_experts.json"))
    args = ap.parse_args(argv)
    ok, why = native.available()
    if not ok:
        print(f"error: {why}", file=sys.stderr)
        return 2
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    layers = []
    for _ in range(args.layers):
        blocks = (stack((E, FF, D), gen), stack((E, FF, D), gen), stack((E, D, FF), gen))
        layers.append((blocks, HostQ4Experts.from_blocks(*blocks)))
    print(f"{args.layers} layers built in {time.perf_counter() - t0:.1f} s; native SIMD path {native.simd()}",
          flush=True)
    x = torch.randn(1, D, generator=gen)
    picks = [torch.randperm(E, generator=gen)[:K].tolist() for _ in range(args.steps + 1)]
    w = [1.0 / K] * K
    blocks_bytes = K * 3 * FF * D * 18 // 32
    int4_bytes = K * layers[0][1].nbytes // E
    # the distance of each path from the exact maths on one token (float64 over the block values)
    (g, u, dn), host = layers[0]
    ids = picks[0]

    def deq(st, e):
        v, dd = native._q4_values(st, e)
        return (v.reshape(v.shape[0], -1, 32) * dd[..., None]).reshape(v.shape)
    exact = torch.zeros(D, dtype=torch.float64)
    for e in ids:
        a, b = deq(g, e) @ x[0].double(), deq(u, e) @ x[0].double()
        exact += (1.0 / K) * (deq(dn, e) @ (a / (1 + torch.exp(-a)) * b))
    rel = lambda y: ((y.double().reshape(-1) - exact).abs().max() / exact.abs().max()).item()
    res = {"geometry": {"experts": E, "d": D, "ff": FF, "k": K}, "simd": native.simd(), "layers": args.layers,
           "steps": args.steps, "err_vs_exact": {"torch_int4": rel(host(x, ids, w)),
                                                 "native_q4q8": rel(native.moe_q4_decode(x, ids, w, g, u, dn))},
           "rows": []}
    prev = torch.get_num_threads()
    for n in threads:
        torch.set_num_threads(n)
        row = {"threads": n}
        for name, run in (("torch_int4", lambda L, s: L[1](x, s, w)),
                          ("native_q4q8", lambda L, s: native.moe_q4_decode(x, s, w, *L[0], threads=n))):
            run(layers[0], picks[0])
            ts = []
            for i, sel in enumerate(picks[1:]):
                t = time.perf_counter()
                run(layers[i % len(layers)], sel)
                ts.append(time.perf_counter() - t)
            us = 1e6 * statistics.median(ts)
            row[f"{name}_us"] = round(us, 1)
            row[f"{name}_gb_s"] = round((int4_bytes if name == "torch_int4" else blocks_bytes) / us / 1e3, 2)
        row["speedup"] = round(row["torch_int4_us"] / row["native_q4q8_us"], 2)
        for march in [m for m in args.also_march.split(",") if m]:     # the same steps on another build
            prior = os.environ.get("KVBENCH_NATIVE_MARCH")
            os.environ["KVBENCH_NATIVE_MARCH"] = march
            try:
                native.moe_q4_decode(x, picks[0], w, *layers[0][0], threads=n)
                ts = []
                for i, sel in enumerate(picks[1:]):
                    t = time.perf_counter()
                    native.moe_q4_decode(x, sel, w, *layers[i % len(layers)][0], threads=n)
                    ts.append(time.perf_counter() - t)
                row[f"native_{march}_simd"] = native.simd()
            finally:
                if prior is None:
                    os.environ.pop("KVBENCH_NATIVE_MARCH", None)
                else:
                    os.environ["KVBENCH_NATIVE_MARCH"] = prior
            row[f"native_{march}_us"] = round(1e6 * statistics.median(ts), 1)
            row[f"native_{march}_gb_s"] = round(blocks_bytes / row[f"native_{march}_us"] / 1e3, 2)
        # the host's read roof at this thread count (engine.native.read_rate, 512 MiB): how far the
        # native path's rate is from the memory it reads
        row["read_gb_s"] = round(native.read_rate(threads=n)["gb_s"], 2)
        row["native_of_read"] = round(row["native_q4q8_gb_s"] / row["read_gb_s"], 3)
        res["rows"].append(row)
        print(" ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    torch.set_num_threads(prev)
    print(f"error vs exact float64: {res['err_vs_exact']}")
    args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
