"""Where a process's card memory beyond torch's allocator comes from (the hybrid's ~1.5 GiB,
reports/h100-2026-12-05c): nvidia-smi's reading of this process and the allocator's reserve after
each CUDA feature the engine uses is first touched, in order. A one-off for one GPU call:

    python benchmarks/oneoff/vram_outside.py [--engine coder30b-synth:10GiB:pcie]

Each line: stage, process MiB, allocator reserved MiB, outside (process - reserved) MiB and its
change from the stage before. ``--engine`` then loads that model the way bench_cpu_moe does
(Q8_0 weights, expert blocks, the host tier given) and reads the same after the load, after a
prefill and after the captured decode step.
"""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vram import used_vram_mib  # noqa: E402

prev = [0]


def read(stage: str) -> None:
    torch.cuda.synchronize()
    proc = used_vram_mib(os.getpid())
    res = torch.cuda.memory_reserved() / 2 ** 20
    out = proc - res
    print(f"{stage:48s} process {proc:6d} MiB  reserved {res:8.0f}  outside {out:7.0f}  (+{out - prev[0]:.0f})", flush=True)
    prev[0] = out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="")
    args = ap.parse_args()
    dev = "cuda"
    torch.empty(1, device=dev)
    read("context (torch.empty(1))")
    a = torch.randn(2048, 2048, device=dev, dtype=torch.bfloat16)
    (a @ a).sum().item()
    read("cuBLAS bf16 matmul")
    f = a.float()
    (f @ f).sum().item()
    read("cuBLAS float32 matmul")
    (a[:1] @ a).sum().item()
    read("cuBLAS bf16 GEMV shape")
    from engine.kernels.moe_blocks import BlockStack, moe_decode_blocks
    E, ff, d, k = 16, 768, 2048, 8
    st = BlockStack.empty("q4_0", (E, ff, d), device=dev)
    st.qs.random_(0, 255)
    st.d.fill_(0.01)
    dn = BlockStack.empty("q4_0", (E, d, ff), device=dev)
    dn.qs.random_(0, 255)
    dn.d.fill_(0.01)
    ids = torch.arange(k, device=dev)
    w = torch.full((k,), 0.125, device=dev)
    x = torch.randn(1, d, device=dev)
    moe_decode_blocks(x, st, st, dn, ids, w).sum().item()
    read("Triton: moe_blocks kernels (device stacks)")
    from engine.hostmem import pinned_empty
    big = pinned_empty((8 * 2 ** 30,), torch.uint8)
    read("cudaHostRegister 8 GiB")
    hst = BlockStack.empty("q4_0", (E, ff, d), pinned=True)
    hdn = BlockStack.empty("q4_0", (E, d, ff), pinned=True)
    hst.qs.copy_(st.qs.cpu())
    hst.d.copy_(st.d.cpu())
    hdn.qs.copy_(dn.qs.cpu())
    hdn.d.copy_(dn.d.cpu())
    moe_decode_blocks(x, hst, hst, hdn, ids, w).sum().item()
    read("Triton: moe_blocks kernels (pinned host stacks)")
    q = torch.randn(1, 32, 4096, 128, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(1, 4, 4096, 128, device=dev, dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True).sum().item()
    read("SDPA bf16 (flash / cuDNN)")
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = a @ a
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        y = a @ a
    g.replay()
    read("CUDA graph of a matmul")
    del big, y, g
    torch.cuda.empty_cache()
    read("after empty_cache (8 GiB unregistered)")
    if args.engine:
        import engine
        from engine import settings
        name, budget, host = args.engine.split(":")
        eng = engine.load(name, kv_dtype="bf16", device=dev, ctx=1024 + 96, vram_budget=settings.parse_size(budget),
                          weight_format="q8_0", expert_format="blocks", cpu_moe="auto", host_experts=host)
        read(f"engine.load {args.engine}")
        toks = list(range(100, 1124))
        eng.generate(toks, max_new_tokens=1, stop_at_eos=False)
        read("prefill 1024 + one token")
        eng.generate(toks[:1], max_new_tokens=8, stop_at_eos=False)
        read("decode 8 (captured step)")
        print(f"decode path {eng.decode_path}; torch max reserved {torch.cuda.max_memory_reserved() / 2 ** 20:.0f} MiB")


if __name__ == "__main__":
    main()
