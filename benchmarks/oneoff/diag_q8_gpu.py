"""One-off GPU diagnosis: does q8_0 KV on CUDA (Triton kernels, split q8_0 layout) give the
same logits as the torch reference path, all-GPU and hybrid, at the nightly's 512 positions?

Context: the H200 nightly of 2026-12-03 measured q8_0 argmax max-abs 15.97 on coder30b-synth
(bf16 0.31 the run before), the first GPU accuracy run after the q8_0 split layout (d182d61).
Prints one JSON line per case and writes them to $OUT/diag_q8.jsonl:

    python benchmarks/oneoff/diag_q8_gpu.py [--model coder30b-mini-synth] [--positions 512]

For each (placement, kv dtype): logits with the Triton backend and with the torch backend on
the same tokens, each against the fp32-KV run of the same backend: max-abs, Mean KLD, and the
Triton-vs-torch max-abs of the same dtype (a kernel fault shows there, not in routing).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from engine import kernels, load  # noqa: E402


def kld(a: torch.Tensor, b: torch.Tensor) -> float:
    la, lb = a.double().log_softmax(-1), b.double().log_softmax(-1)
    return float((la.exp() * (la - lb)).sum(-1).mean())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="coder30b-mini-synth")
    ap.add_argument("--positions", type=int, default=512)
    ap.add_argument("--weights", default="bf16")
    ap.add_argument("--placements", default="gpu,hybrid", help="gpu: every layer on the GPU; hybrid: half")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", default="auto,torch", help="auto: Triton on CUDA tensors, torch on the CPU tail")
    args = ap.parse_args()
    backends = args.backends.split(",")
    out = os.environ.get("OUT", "/tmp")
    g = torch.Generator().manual_seed(0)
    rows = []
    kernels.set_backend("torch")
    spec = load(args.model, device="cpu", ctx=2048, weight_format="f32").spec
    toks = torch.randint(5, min(spec.vocab_size, 30000), (args.positions,), generator=g).tolist()
    for placement in args.placements.split(","):
        ngl = spec.n_layers if placement == "gpu" else max(1, spec.n_layers // 2)
        res, info = {}, {}
        for backend in backends:
            kernels.set_backend(backend)
            for kv in ("fp32", "bf16", "q8_0"):
                eng = load(args.model, kv_dtype=kv, device=args.device, ctx=2048, weight_format=args.weights,
                           n_gpu_layers=ngl)
                res[(backend, kv)] = eng.logits(toks).float().cpu()
                res[(backend, kv, "chunked")] = eng.logits(toks, chunk=128).float().cpu()
                info[kv] = {"n_gpu_layers": eng.plan.n_gpu_layers, "kv_dtypes": sorted(set(eng.kv_dtypes))}
                del eng
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        for backend in backends:
            for kv in ("bf16", "q8_0"):
                a, b = res[(backend, "fp32")], res[(backend, kv)]
                d = (a - b).abs().max(-1).values
                row = {"model": args.model, "placement": placement, "backend": backend, "kv": kv, **info[kv],
                       "max_abs_vs_fp32": float(d.max()), "argmax_pos": int(d.argmax()),
                       "n_pos_gt_1": int((d > 1).sum()), "mean_kld_vs_fp32": kld(a, b),
                       "chunked_vs_one_pass": float((res[(backend, kv)] - res[(backend, kv, "chunked")]).abs().max())}
                if backend != "torch" and "torch" in backends:
                    row["triton_vs_torch_same_kv"] = float((res[(backend, kv)] - res[("torch", kv)]).abs().max())
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(os.path.join(out, f"diag_q8-{args.model}.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
