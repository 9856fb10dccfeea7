"""Tile sweep of the one-token MoE kernels over routed experts in GGUF blocks (engine.kernels.moe_blocks).

Each of the two launches (gate/up + SwiGLU, then down + weighted sum + residual) is timed alone
at the coder30b geometry (128 experts, d 2048, ff 768, top-8; Q4_0 as the file stores them) for
each tile configuration and sum form ("blocks": a block's products summed, then times its
scale; "gather": every value times its scale). A CUDA graph replays ``--sets`` launches, each
over a different, disjoint set of k experts (16 x 8 = all 128: 226 MB of gate/up blocks, more
than the H200's 50 MB L2), so every launch reads its experts from HBM as a decode step does;
time a launch = replay time / sets, median of ``--reps`` replays. Each configuration's output
is checked against torch maths over the dequantised experts before it is timed; one that
fails to compile or to match is listed, never timed.

    python benchmarks/bench_moe_blocks.py --out moe_blocks.json            # the sweep (CUDA)
    python benchmarks/bench_moe_blocks.py --device cpu --quick             # a smoke run (interpreter)

``--placement pinned`` leaves the stacks in page-locked host memory, so each launch reads its
experts over PCIe as the hybrid's ``host_experts="pcie"`` layers do (CUDA only): which tiles
keep the link busiest.

Prints one line per configuration and the best of each part, and writes JSON (``best_env``:
the settings that select each part's fastest configuration, for a following run to export).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.kernels import moe_blocks as mb  # noqa: E402

ENV = {"gate_up": {"BLOCK_F": "KVBENCH_MOE_BLOCKS_GU_BLOCK_F", "BLOCK_K": "KVBENCH_MOE_BLOCKS_GU_BLOCK_K",
                   "num_warps": "KVBENCH_MOE_BLOCKS_GU_WARPS", "SUMS": "KVBENCH_MOE_BLOCKS_GU_SUMS"},
       "down": {"BLOCK_D": "KVBENCH_MOE_BLOCKS_DOWN_BLOCK_D", "BLOCK_K": "KVBENCH_MOE_BLOCKS_DOWN_BLOCK_K",
                "num_warps": "KVBENCH_MOE_BLOCKS_DOWN_WARPS", "SUMS": "KVBENCH_MOE_BLOCKS_DOWN_SUMS"}}
assert ENV == mb._TUNABLES, "the sweep's settings drifted from engine.kernels.moe_blocks"


def random_stack(fmt: str, shape, dev, gen, pinned: bool = False) -> mb.BlockStack:
    """Valid random blocks: uniform quants, scales ~ 1/(8 sqrt(K)) (values of a unit-variance row).
    ``pinned``: left in page-locked host memory, which a CUDA kernel reads in place over PCIe
    (as ``host_experts="pcie"`` layers are read)."""
    S, N, K = shape
    st = mb.BlockStack.empty(fmt, shape, device="cpu", pinned=pinned)
    st.qs.copy_(torch.randint(0, 256, st.qs.shape, generator=gen, dtype=torch.int32).to(st.qs.dtype))
    st.d.copy_((torch.rand(st.d.shape, generator=gen) + 0.5) / (8 * K ** 0.5))
    return st if pinned else st.to(dev)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def configs(part: str, args) -> list[dict]:
    rows = ("BLOCK_F" if part == "gate_up" else "BLOCK_D")
    forms = [f == "blocks" for f in args.forms.split(",")]
    if args.quick:
        grid = {"SUMS": forms, rows: [16], "BLOCK_K": [256], "num_warps": [2]}   # the interpreter: few programs
    else:
        grid = {"SUMS": forms, rows: ints(args.rows), "BLOCK_K": ints(args.ks), "num_warps": ints(args.warps)}
    out = [dict(zip(grid, v)) for v in itertools.product(*grid.values())]
    where = "host" if args.placement == "pinned" else "device"
    default = {k: v for k, v in mb.launch_config(part, where).items() if k != "UNROLL"}   # what a launch applies now
    if default not in out:
        out.insert(0, default)
    return [{**c, "UNROLL": True} for c in out]


def time_graph(fn, reps: int, dev) -> float:
    """Median seconds of one replay of a CUDA graph of ``fn`` (``fn`` run plainly on CPU)."""
    if dev.type != "cuda":
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(10):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / 10)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fmt", default="q4_0", choices=("q4_0", "q8_0"))
    ap.add_argument("--geometry", default="coder30b", choices=("coder30b", "mini"),
                    help="coder30b: E 128, d 2048, ff 768, k 8; mini: E 16, d 256, ff 96, k 4")
    ap.add_argument("--sets", type=int, default=16, help="disjoint expert sets a replay (defeats L2)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="two configurations a part (a smoke run)")
    ap.add_argument("--parts", default="gate_up,down")
    ap.add_argument("--forms", default="blocks,gather", help="sum forms swept (blocks, gather)")
    ap.add_argument("--rows", default="2,4,8,16", help="rows a program (BLOCK_F / BLOCK_D)")
    ap.add_argument("--ks", default="256,512,1024", help="values a step (BLOCK_K)")
    ap.add_argument("--warps", default="2,4")
    ap.add_argument("--max-seconds", type=float, default=400.0, help="stop sweeping after this (listed)")
    ap.add_argument("--placement", default="device", choices=("device", "pinned"),
                    help="where the expert stacks live: device memory (HBM), or pinned host memory read "
                         "in place over PCIe (the hybrid's host_experts='pcie' layers; CUDA only)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    E, d, ff, k = (128, 2048, 768, 8) if args.geometry == "coder30b" else (16, 256, 96, 4)
    sets = min(args.sets, E // k)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    pinned = args.placement == "pinned"
    if pinned and dev.type != "cuda":
        print("error: --placement pinned needs a CUDA device (a kernel reading host memory over PCIe); "
              "use --placement device", file=sys.stderr)
        return 2
    gate = random_stack(args.fmt, (E, ff, d), dev, gen, pinned)
    up = random_stack(args.fmt, (E, ff, d), dev, gen, pinned)
    down = random_stack(args.fmt, (E, d, ff), dev, gen, pinned)
    perm = torch.randperm(E, generator=gen)
    idsets = [perm[i * k:(i + 1) * k].to(torch.int32).to(dev) for i in range(sets)]
    x1 = torch.randn(d, generator=gen).to(dev)
    p = torch.rand(k, generator=gen).to(dev)
    res = torch.randn(d, generator=gen).to(dev)
    hs = [torch.randn(k, ff, generator=gen).to(dev) for _ in range(sets)]
    # references over the first set (torch maths on the dequantised experts)
    sel = lambda st, ids: mb.BlockStack(st.fmt, st.qs[ids.long().to(st.qs.device)],  # noqa: E731
                                        st.d[ids.long().to(st.d.device)]).dequantize().to(dev)
    ids0 = idsets[0]
    g0, u0, w0 = sel(gate, ids0), sel(up, ids0), sel(down, ids0)
    a, b = g0 @ x1, u0 @ x1
    h_ref = a * torch.sigmoid(a) * b                                           # [k, ff]
    out_ref = res + (p[:, None] * torch.einsum("kdf,kf->kd", w0, hs[0])).sum(0)
    per_expert = {"gate_up": 2 * ff * (d // 2 if args.fmt == "q4_0" else d) + 2 * ff * (d // 32) * 2,
                  "down": d * (ff // 2 if args.fmt == "q4_0" else ff) + d * (ff // 32) * 2}
    doc = {"bench": "moe_blocks", "device": str(dev), "placement": args.placement, "device_name": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "fmt": args.fmt, "geometry": {"E": E, "d": d, "ff": ff, "k": k},
           "sets": sets, "reps": args.reps, "parts": {}, "skipped": [], "failed": []}
    import triton
    doc["triton"] = triton.__version__
    for part in args.parts.split(","):
        rows = []
        for cfg in configs(part, args):
            label = f"{part} {'blocks' if cfg['SUMS'] else 'gather'} " + "x".join(
                str(cfg[key]) for key in ("BLOCK_F" if part == "gate_up" else "BLOCK_D", "BLOCK_K")) + f" w{cfg['num_warps']}"
            if time.perf_counter() - t0 > args.max_seconds:
                doc["skipped"].append(label)
                continue
            try:
                if part == "gate_up":
                    got = mb.gate_up_launch(x1, gate, up, ids0, None, cfg)
                    err = ((got - h_ref).abs().max() / h_ref.abs().max()).item()
                    fn = lambda cfg=cfg: [mb.gate_up_launch(x1, gate, up, ids, None, cfg) for ids in idsets]  # noqa: E731
                else:
                    got = mb.down_launch(hs[0], down, ids0, None, p, res, x1, cfg)[0]
                    err = ((got - out_ref).abs().max() / out_ref.abs().max()).item()
                    fn = lambda cfg=cfg: [mb.down_launch(h, down, ids, None, p, res, x1, cfg)  # noqa: E731
                                          for h, ids in zip(hs, idsets)]
                if not err <= 1e-4:
                    doc["failed"].append({"config": label, "rel_err": err})
                    print(f"{label}: FAILED, rel error {err:.2e}", flush=True)
                    continue
                sec = time_graph(fn, args.reps, dev) / sets
            except Exception as e:                                     # noqa: BLE001 (listed, not timed)
                doc["failed"].append({"config": label, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
                print(f"{label}: FAILED, {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                continue
            gbs = k * per_expert[part] / sec / 1e9
            rows.append({"config": label, **{kk: vv for kk, vv in cfg.items()}, "us": sec * 1e6, "gb_s": gbs, "rel_err": err})
            print(f"{label:34s} {sec * 1e6:9.2f} us {gbs:8.1f} GB/s  rel err {err:.1e}", flush=True)
        best = min(rows, key=lambda r: r["us"], default=None)
        applied = {kk: vv for kk, vv in mb.launch_config(part, "host" if pinned else "device").items()
                   if kk != "UNROLL"}
        default = next((r for r in rows if all(r[kk] == vv for kk, vv in applied.items())), None)
        doc["parts"][part] = {"rows": rows, "best": best, "default": default,
                              "bytes_per_launch": k * per_expert[part]}
        if best:
            print(f"best {part}: {best['config']} {best['us']:.2f} us ({best['gb_s']:.0f} GB/s); default "
                  f"{default['us']:.2f} us" if default else f"best {part}: {best['config']}", flush=True)
    env = {}
    for part, r in doc["parts"].items():
        if r["best"]:
            for key, var in ENV[part].items():
                env[var] = str(int(r["best"][key]))     # SUMS as 0/1, the settings' bool
    doc["best_env"] = env
    doc["total_s"] = time.perf_counter() - t0
    if doc["skipped"]:
        print(f"skipped (past --max-seconds): {len(doc['skipped'])} configurations", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
        Path(args.out).with_suffix(".env").write_text("".join(f"export {kk}={vv}\n" for kk, vv in env.items()))
    return 0 if not doc["failed"] or any(r["rows"] for r in doc["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
