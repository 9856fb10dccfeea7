"""The decode step's matrix-vector products: engine.kernels.gemv against cuBLAS (issue 14.2).

Contract: on CUDA, for each projection shape of a model's decode step (SmolLM2 geometry by
default: q/k/v 960x576, output 576x576, gate/up 3072x576, down 576x1536; bf16 weights), times
(a) what the unfused step runs: ``engine.model.mm`` plus the neighbouring torch op (RMS norm
before, SwiGLU before, residual add after) and (b) ``gemv`` with that op fused, for each
rows-per-program setting in ``--block-n``; each inside a CUDA graph of ``--reps`` launches
(``triton.testing.do_bench_cudagraph``), so launch gaps count as in the captured step.
Prints a table and writes ``--out`` JSON: microseconds per call and effective GB/s (weight
bytes / time). Not a test: numbers only (correctness is tests/test_gemv.py).

    python benchmarks/bench_gemv.py --out gemv.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch                                       # noqa: E402
import torch.nn.functional as F                    # noqa: E402

SHAPES = {"qkv": (960, 576, "rms"), "o": (576, 576, "res"), "gate_up": (3072, 576, "rms"),
          "down": (576, 1536, "silu_res")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-n", default="default,2,4,8,16")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gemv: needs CUDA (run it on the GPU machine)", file=sys.stderr)
        return 2
    import triton.testing
    from engine.kernels.gemv import gemv
    from engine.model import mm, rms_norm
    dev = torch.device("cuda")
    rows = []
    for name, (N, K, kind) in SHAPES.items():
        w = torch.randn(N, K, device=dev).to(torch.bfloat16)
        g = torch.rand(K, device=dev) + 0.5
        xk = 2 * K if kind == "silu_res" else K
        x = torch.randn(1, xk, device=dev)
        r = torch.randn(1, N, device=dev)
        if kind == "rms":
            torch_fn = lambda: mm(rms_norm(x, g, 1e-5), w)                          # noqa: E731
        elif kind == "res":
            torch_fn = lambda: r + mm(x, w)                                         # noqa: E731
        else:
            torch_fn = lambda: r + mm(F.silu(x[:, :K]) * x[:, K:], w)               # noqa: E731
        fns = {"torch (mm + op)": torch_fn}
        for bn in args.block_n.split(","):
            def fused(bn=bn):
                if bn != "default":
                    os.environ["KVBENCH_GEMV_BLOCK_N"] = bn
                else:
                    os.environ.pop("KVBENCH_GEMV_BLOCK_N", None)
                if kind == "rms":
                    return gemv(x, w, "rms", g=g, eps=1e-5)
                if kind == "res":
                    return gemv(x, w, residual=r)
                return gemv(x, w, "silu", residual=r)
            fns[f"gemv block_n={bn}"] = fused
        for label, fn in fns.items():
            fn()
            torch.cuda.synchronize()
            # the env var is read at launch time: a graph replays what was captured with it
            us = triton.testing.do_bench_cudagraph(fn, rep=args.reps) * 1e3
            gbs = N * K * 2 / (us * 1e-6) / 1e9
            rows.append({"shape": name, "N": N, "K": K, "impl": label, "us": round(us, 2), "gb_s": round(gbs, 1)})
            print(f"{name:8s} {N:5d}x{K:<5d} {label:22s} {us:8.2f} us  {gbs:7.1f} GB/s", flush=True)
        os.environ.pop("KVBENCH_GEMV_BLOCK_N", None)
    doc = {"bench": "gemv", "device": torch.cuda.get_device_name(), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps({"bench": "gemv", "rows": len(rows)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
