"""The decode step's matrix-vector products: engine.kernels.gemv against cuBLAS (issue 14.2).

Contract: on CUDA, for each projection shape of a model's decode step (``--geometry``:
SmolLM2's q/k/v 960x576, output 576x576, gate/up 3072x576, down 576x1536; Qwen3-Coder-30B's
q/k/v 5120x2048, output 2048x4096, router 128x2048, head 151936x2048; ``--weights``: bf16 and/or
q8_0, the Q8_0 matrices of ``engine.qweights`` in each ``--q8-forms`` of the kernel's sum), times
(a) what the unfused step runs: ``engine.model.mm`` plus the neighbouring torch op (RMS norm
before, SwiGLU before, residual add after) and (b) ``gemv`` with that op fused, for each
tile setting in ``--variants`` (rows x columns per step); each inside a CUDA graph
(``triton.testing.do_bench_cudagraph``), so launch gaps count as in the captured step, over
enough copies of the weight (~128 MB) that every call reads it from HBM, not from L2.
Prints a table and writes ``--out`` JSON: microseconds per call and effective GB/s (weight
bytes / time: 2 a value in bf16, 34/32 in Q8_0). Not a test: numbers only (correctness is tests/test_gemv.py).

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

SHAPES = {"smollm2": {"qkv": (960, 576, "rms"), "o": (576, 576, "res"), "gate_up": (3072, 576, "rms"),
                      "down": (576, 1536, "silu_res")},
          # Qwen3-Coder-30B-A3B's attention projections (d 2048, 32 x 128 q, 4 x 128 kv) and router
          "coder30b": {"qkv": (5120, 2048, "rms"), "o": (2048, 4096, "res"), "router": (128, 2048, "rms"),
                       "head": (151936, 2048, "rms")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="default,4x128,8x256,4x512,8x512,16x1024",
                    help="BLOCK_NxBLOCK_K settings to time (default: the kernel's own choice)")
    ap.add_argument("--geometry", default="smollm2,coder30b", help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--weights", default="bf16", help="comma list of bf16, q8_0")
    ap.add_argument("--q8-forms", default="blocks,gather", help="KVBENCH_GEMV_Q8_FORM values timed over q8_0")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gemv: needs CUDA (run it on the GPU machine)", file=sys.stderr)
        return 2
    import triton.testing
    from engine import qweights
    from engine.kernels.gemv import gemv
    from engine.model import mm, rms_norm
    dev = torch.device("cuda")
    rows = []
    variants = [tuple(v.split("x")) if "x" in v else (v, "default") for v in args.variants.split(",")]
    shapes = {}
    for geo in args.geometry.split(","):
        if geo not in SHAPES:
            print(f"bench_gemv: unknown geometry {geo!r} (one of {', '.join(SHAPES)})", file=sys.stderr)
            return 2
        shapes.update({f"{geo}.{k}": v for k, v in SHAPES[geo].items()})
    fmts = args.weights.split(",")
    if set(fmts) - {"bf16", "q8_0"}:
        print(f"bench_gemv: --weights {args.weights!r}: expected bf16 and/or q8_0", file=sys.stderr)
        return 2
    for (name, (N, K, kind)), fmt in ((item, f) for item in shapes.items() for f in fmts):
        # enough copies of the weight that one pass over them (~128 MB) leaves the 50-60 MB L2
        # behind: each call reads its weights from HBM, as the decode step does
        wbytes = N * K * 2 if fmt == "bf16" else N * qweights.row_bytes(K)
        copies = max(1, (128 << 20) // wbytes)
        if fmt == "bf16":
            ws = [torch.randn(N, K, device=dev).to(torch.bfloat16) for _ in range(copies)]
        else:
            ws = [qweights.quantize(torch.randn(N, K, device=dev) / K ** 0.5) for _ in range(copies)]
        g = torch.rand(K, device=dev) + 0.5
        xk = 2 * K if kind == "silu_res" else K
        x = torch.randn(1, xk, device=dev)
        r = torch.randn(1, N, device=dev)

        def torch_one(w):
            if kind == "rms":
                return mm(rms_norm(x, g, 1e-5), w)
            if kind == "res":
                return r + mm(x, w)
            return r + mm(F.silu(x[:, :K]) * x[:, K:], w)

        def gemv_one(w):
            if kind == "rms":
                return gemv(x, w, "rms", g=g, eps=1e-5)
            if kind == "res":
                return gemv(x, w, residual=r)
            return gemv(x, w, "silu", residual=r)
        fns = {"torch (mm + op)": (None, None, None, torch_one)}
        for form in (args.q8_forms.split(",") if fmt == "q8_0" else [None]):
            for bn, bk in variants:
                fns[f"gemv bn={bn} bk={bk}" + (f" {form}" if form else "")] = (bn, bk, form, gemv_one)
        for label, (bn, bk, form, one) in fns.items():
            for key, val in (("KVBENCH_GEMV_BLOCK_N", bn), ("KVBENCH_GEMV_BLOCK_K", bk),
                             ("KVBENCH_GEMV_Q8_FORM", form)):
                if val in (None, "default"):
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = val

            def run(one=one):
                for w in ws:
                    one(w)
            run()
            torch.cuda.synchronize()
            # the settings are read at launch time: the graph replays what was captured with them
            us = triton.testing.do_bench_cudagraph(run, rep=args.reps) * 1e3 / copies
            gbs = wbytes / (us * 1e-6) / 1e9
            rows.append({"shape": name, "N": N, "K": K, "weights": fmt, "impl": label, "us": round(us, 2),
                         "gb_s": round(gbs, 1), "copies": copies})
            print(f"{name:16s} {N:6d}x{K:<5d} {fmt:5s} {label:33s} {us:8.2f} us  {gbs:7.1f} GB/s "
                  f"(HBM: {copies} copies)", flush=True)
        for key in ("KVBENCH_GEMV_BLOCK_N", "KVBENCH_GEMV_BLOCK_K", "KVBENCH_GEMV_Q8_FORM"):
            os.environ.pop(key, None)
    doc = {"bench": "gemv", "device": torch.cuda.get_device_name(), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps({"bench": "gemv", "rows": len(rows)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
