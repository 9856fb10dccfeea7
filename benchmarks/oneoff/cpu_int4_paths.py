"""One-off: what torch's CPU int4 matmul costs on this machine, the numbers behind the CPU
experts' design (engine/cpu_experts.py; docs/perf-notes.md, "Eleventh session").

Times one token through one Q4_0-shaped [768, 2048] matrix with ``_weight_int4pack_mm_for_cpu``
at float32 / bfloat16 / float16 activations against dense float32 and bfloat16 matmuls; one
coder30b layer of k=8 experts through ``HostQ4Experts`` at 1 and 2 threads (and its packing);
and batches of 64 / 256 rows through that layer (what a prefill would cost on the CPU path).
Random values (quants uniform over 0..15, scales 1e-3..1.1e-2): times, not maths. Writes JSON.

    python benchmarks/oneoff/cpu_int4_paths.py --out reports/cpu-2026-12-04d/cpu_int4_paths.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.cpu_experts import BLOCK, HostQ4Experts, pack_int4  # noqa: E402
from engine.kernels.moe_blocks import BlockStack  # noqa: E402


def timed(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=100)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    out = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__}
    N, K = 768, 2048
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
    packed = pack_int4(q)
    d = torch.rand(K // BLOCK, N, generator=g) * 0.01 + 0.001
    x = torch.randn(1, K, generator=g)
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    op = {}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        sz = torch.stack([d, torch.zeros_like(d)], dim=-1).to(dt).contiguous()
        xd = x.to(dt)
        op[f"int4_{name}_us"] = timed(lambda: mm(xd, packed, BLOCK, sz), args.reps)
    w = torch.randn(N, K, generator=g)
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        wd, xd = w.to(dt), x.to(dt)
        op[f"dense_{name}_us"] = timed(lambda: xd @ wd.T, args.reps)
    out["one_matrix_768x2048"] = op
    print("one [768, 2048] matrix, one token:", {k: round(v, 1) for k, v in op.items()}, flush=True)

    import bench_cpu_moe
    from engine.models import spec_for
    spec = spec_for("coder30b-synth")
    layer = bench_cpu_moe.layer_timings(spec, [1, 2], reps=20)
    out["coder30b_layer"] = {"pack_layer_s": layer["pack_layer_s"], "host_us_by_threads": layer["host_us"]}
    print("coder30b layer, k=8:", out["coder30b_layer"], flush=True)

    E, ff, dm, k = spec.n_experts, spec.d_ff_expert, spec.d_model, spec.n_experts_used

    def stack(shape):
        st = BlockStack.empty("q4_0", shape)
        st.qs.copy_(torch.randint(0, 256, st.qs.shape, generator=g, dtype=torch.int32).to(torch.uint8))
        st.d.copy_((torch.rand(st.d.shape, generator=g) * 0.01 + 0.001).half())
        return st
    host = HostQ4Experts.from_blocks(stack((E, ff, dm)), stack((E, ff, dm)), stack((E, dm, ff)))
    batches = {}
    for T in (64, 256):
        h = torch.randn(T, dm, generator=g)
        ids = [torch.randperm(E, generator=g)[:k].tolist() for _ in range(T)]
        p = [[1.0 / k] * k for _ in range(T)]
        us = timed(lambda: host.rows(h, ids, p), 2)
        batches[T] = {"ms_per_layer": us / 1e3, "tokens_per_s_per_layer": T / (us / 1e6)}
    out["coder30b_layer_batches"] = batches
    print("coder30b layer, batches:", batches, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
