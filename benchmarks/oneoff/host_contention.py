"""Do the CPU's int4 experts and the GPU's PCIe reads of pinned experts share one limit?

Contract: on CUDA, for coder30b's expert geometry (128 experts, d 2048, ff 768, k 8), builds
``--layers`` layers of random Q4_0 expert stacks in pinned host memory (as ``host_experts="pcie"``
keeps them) and their ``HostQ4Experts`` int4 packing (as the ``cpu`` tier keeps them), so the
bytes read exceed the host's last-level cache, and times, each with fresh random expert ids per
layer step:

- ``cpu``: the CPU's int4 path alone, ``k_cpu`` experts a layer (us a layer, GB/s);
- ``gpu``: the blocks kernel reading ``k_gpu`` experts a layer over PCIe alone (CUDA events);
- ``both``: the two at once, the GPU's launches queued first, the CPU's loop meanwhile.

For each split (k_gpu, k_cpu) of the k experts in ``--splits``, prints the three and writes JSON
to ``--out``. If ``both`` is about max(cpu, gpu) the two run in parallel and a split of a layer's
experts between them pays (``KVBENCH_CPU_MOE_GPU_SHARE``); if it is about their sum, host memory
is the shared limit and no split can beat the faster side alone. Eighteenth session's
question (docs/perf-notes.md): the split measured no gain on a slow host.

    python benchmarks/oneoff/host_contention.py --layers 6 --splits 8:0,0:8,4:4,6:2 --out c.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.cpu_experts import HostQ4Experts  # noqa: E402
from engine.kernels import moe_blocks as mb  # noqa: E402

E, D, FF, K = 128, 2048, 768, 8


def stack(shape, gen) -> mb.BlockStack:
    st = mb.BlockStack.empty("q4_0", shape, device="cpu", pinned=torch.cuda.is_available())
    st.qs.copy_(torch.randint(0, 256, st.qs.shape, generator=gen, dtype=torch.int32).to(st.qs.dtype))
    st.d.copy_((torch.rand(st.d.shape, generator=gen) + 0.5) / (8 * shape[2] ** 0.5))
    return st


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=6, help="layers of experts (each ~340 MB of Q4_0 + ~300 MB int4)")
    ap.add_argument("--splits", default="8:0,0:8,2:6,4:4,6:2", help="comma list of K_GPU:K_CPU")
    ap.add_argument("--steps", type=int, default=60, help="layer steps timed per measurement")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--cpu-only", action="store_true", help="the CPU side alone (any host; splits' K_GPU must be 0)")
    ap.add_argument("--out", default="host_contention.json")
    args = ap.parse_args(argv)
    if not args.cpu_only and not torch.cuda.is_available():
        print("error: host_contention needs a CUDA device (the GPU side reads pinned host memory over PCIe)",
              file=sys.stderr)
        return 2
    splits = []
    for part in args.splits.split(","):
        g, c = (int(x) for x in part.split(":"))
        if g < 0 or c < 0 or g + c > K or g + c == 0:
            print(f"error: --splits {part!r}: K_GPU + K_CPU must be 1..{K}", file=sys.stderr)
            return 2
        if args.cpu_only and g:
            print(f"error: --splits {part!r}: --cpu-only times the CPU side alone, K_GPU must be 0", file=sys.stderr)
            return 2
        splits.append((g, c))
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cpu" if args.cpu_only else "cuda")
    gen = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    layers = []
    for _ in range(args.layers):
        gate, up, down = stack((E, FF, D), gen), stack((E, FF, D), gen), stack((E, D, FF), gen)
        layers.append(((gate, up, down), HostQ4Experts.from_blocks(gate, up, down)))
    print(f"{args.layers} layers built in {time.perf_counter() - t:.1f} s; {torch.get_num_threads()} CPU threads",
          flush=True)
    x = torch.randn(1, D)
    xd = x.to(dev)
    ids_of = lambda n: torch.randperm(E, generator=gen)[:n].tolist()
    q4_bytes = 3 * FF * D * 18 // 32            # one expert's gate + up + down Q4_0 blocks
    int4_bytes = layers[0][1].nbytes // E       # one expert's int4 quants + scales as packed

    def cpu_loop(n: int, steps: int) -> float:
        t = time.perf_counter()
        for i in range(steps):
            _, host = layers[i % len(layers)]
            host(x, ids_of(n), [1.0 / n] * n)
        return 1e6 * (time.perf_counter() - t) / steps

    def gpu_queue(n: int, steps: int):
        launches = []
        for i in range(steps):
            ids = torch.tensor(ids_of(n)).pin_memory().to(dev, non_blocking=True)
            launches.append(ids)
        p = torch.full((n,), 1.0 / n, device=dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i, ids in enumerate(launches):
            mb.moe_decode_blocks(xd, *layers[i % len(layers)][0], ids, p)
        end.record()
        return start, end

    rows = []
    for k_gpu, k_cpu in splits:
        if k_cpu:
            cpu_loop(k_cpu, 3)
        if k_gpu:
            s, e = gpu_queue(k_gpu, 3)
            torch.cuda.synchronize()
        row: dict = {"k_gpu": k_gpu, "k_cpu": k_cpu}
        reps = {"cpu_us": [], "gpu_us": [], "both_cpu_us": [], "both_gpu_us": []}
        for _ in range(3):
            if k_cpu:
                reps["cpu_us"].append(cpu_loop(k_cpu, args.steps))
            if k_gpu:
                s, e = gpu_queue(k_gpu, args.steps)
                torch.cuda.synchronize()
                reps["gpu_us"].append(1e3 * s.elapsed_time(e) / args.steps)
            if k_cpu and k_gpu:
                s, e = gpu_queue(k_gpu, args.steps)       # queued, running while the CPU loop runs
                reps["both_cpu_us"].append(cpu_loop(k_cpu, args.steps))
                torch.cuda.synchronize()
                reps["both_gpu_us"].append(1e3 * s.elapsed_time(e) / args.steps)
        for name, xs in reps.items():
            if xs:
                row[name] = statistics.median(xs)
        if k_cpu:
            row["cpu_gb_s"] = k_cpu * int4_bytes / row["cpu_us"] / 1e3
        if k_gpu:
            row["gpu_gb_s"] = k_gpu * q4_bytes / row["gpu_us"] / 1e3
        if k_cpu and k_gpu:
            row["parallel_if"] = max(row["cpu_us"], row["gpu_us"])
            row["serial_if"] = row["cpu_us"] + row["gpu_us"]
        rows.append(row)
        print(" ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    name = "cpu" if args.cpu_only else torch.cuda.get_device_name()
    Path(args.out).write_text(json.dumps({"device": name, "threads": torch.get_num_threads(),
                                          "layers": args.layers, "steps": args.steps, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
