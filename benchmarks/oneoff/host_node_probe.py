"""Where a host node's time goes (perf-notes, twenty-first session: a cpu-tier layer run as a CUDA
host node cost ~83 us beyond its CPU work, where ~20 were predicted).

Contract: three timings, printed and written as JSON to ``--out``:

1. ``dispatch`` (CUDA only): a captured graph of ``--nodes`` tiny kernels, with and without a
   no-op host node after each (libc ``free(NULL)`` through ``cuLaunchHostFunc``): the per-node
   cost of a host node's round trip alone, median us per node over ``--reps`` replays.
2. ``threads`` (any host): one layer's native job (coder30b's geometry: 128 Q4_0 experts, d 2048,
   ff 768, k 8, fresh experts each call) run on the main thread; on a second thread alone; and
   alternating main / second thread (a host node's job runs on CUDA's callback thread, whose
   OpenMP team is not the main thread's: two teams on one set of cores). Median us a call.
3. ``nodes`` (CUDA only): the same job as ``--nodes`` host nodes in one graph (no kernels between)
   against ``--nodes`` calls on the main thread: what the graph adds per job, with the main thread
   spinning on the graph or asleep on a blocking event, at torch's thread count and one fewer.

    python benchmarks/oneoff/host_node_probe.py --nodes 20 --out host_nodes.json
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.oneoff.native_experts_bench import D, E, FF, K, stack  # noqa: E402  (coder30b's layer)
from engine import native  # noqa: E402


def median_us(f, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def threads_probe(job: native.HostJob, gen, n: int) -> dict:
    """The job on the main thread, a second thread alone, and the two alternating."""
    def fresh():
        job.fill(torch.randn(D, generator=gen), torch.randperm(E, generator=gen)[:K], torch.rand(K, generator=gen))

    def one():
        fresh()
        t = time.perf_counter()
        job.run()
        return time.perf_counter() - t

    out = {"main_us": statistics.median(one() for _ in range(n)) * 1e6}
    res = {}
    th = threading.Thread(target=lambda: res.__setitem__("alone", [one() for _ in range(n)]))
    th.start()
    th.join()
    out["second_thread_us"] = statistics.median(res["alone"]) * 1e6
    import queue
    q_in, q_out = queue.Queue(), queue.Queue()

    def worker():
        while q_in.get() is not None:
            q_out.put(one())
    th = threading.Thread(target=worker)
    th.start()
    main, second = [], []
    for _ in range(n):
        main.append(one())
        q_in.put(1)
        second.append(q_out.get())
    q_in.put(None)
    th.join()
    out.update(alternating_main_us=statistics.median(main) * 1e6,
               alternating_second_us=statistics.median(second) * 1e6)
    return out


def dispatch_probe(nodes: int, reps: int) -> dict:
    """Per host node: a graph of tiny kernels with a no-op host node after each, against without."""
    drv = native._driver()
    libc = ctypes.CDLL(None)
    free_fn = ctypes.cast(libc.free, ctypes.c_void_p).value
    x = torch.zeros(16, device="cuda")
    s = torch.cuda.Stream()

    def build(with_nodes: bool):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(s):
            x.add_(1)   # warm the kernel outside the capture
            torch.cuda.synchronize()
            with torch.cuda.graph(g, stream=s):
                for _ in range(nodes):
                    x.add_(1)
                    if with_nodes:
                        rc = drv.cuLaunchHostFunc(ctypes.c_void_p(s.cuda_stream), ctypes.c_void_p(free_fn),
                                                  ctypes.c_void_p(0))
                        if rc:
                            raise RuntimeError(f"cuLaunchHostFunc returned CUDA error {rc}")
        return g

    out = {}
    for name, g in (("kernels_only", build(False)), ("with_host_nodes", build(True))):
        def replay(g=g):
            g.replay()
            torch.cuda.synchronize()
        replay()
        out[f"{name}_us_per_graph"] = median_us(replay, reps)
    out["host_node_us"] = (out["with_host_nodes_us_per_graph"] - out["kernels_only_us_per_graph"]) / nodes
    return out


def nodes_probe(job: native.HostJob, nodes: int, reps: int, fewer: native.HostJob | None = None) -> dict:
    """The job as ``nodes`` host nodes in one graph against ``nodes`` calls on the main thread,
    the main thread waiting for the graph by spinning (``torch.cuda.synchronize``, CUDA's default
    here) or asleep on a blocking event (``cudaEventBlockingSync``): a spinning waiter takes a core
    from the callback thread's OpenMP team, whose static schedule waits for its slowest thread.
    ``fewer``: the same job at one thread less, both ways."""
    out = {}
    for tag, jb in (("", job), ("_fewer", fewer)):
        if jb is None:
            continue
        s = torch.cuda.Stream()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(s):
            torch.cuda.synchronize()
            with torch.cuda.graph(g, stream=s):
                for _ in range(nodes):
                    jb.launch(s)
        ev = torch.cuda.Event(blocking=True)

        def spin():
            g.replay()
            torch.cuda.synchronize()

        def asleep():
            g.replay()
            ev.record()
            ev.synchronize()
        spin()
        out[f"graph{tag}_us"] = median_us(spin, reps)
        out[f"graph_blocking{tag}_us"] = median_us(asleep, reps)
        out[f"main_thread{tag}_us"] = main_us = median_us(lambda: [jb.run() for _ in range(nodes)], reps)
        out[f"per_job_added{tag}_us"] = (out[f"graph{tag}_us"] - main_us) / nodes
        out[f"per_job_added_blocking{tag}_us"] = (out[f"graph_blocking{tag}_us"] - main_us) / nodes
        out[f"threads{tag}"] = jb.threads
        out[f"job_rc{tag}"] = jb.rc
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--calls", type=int, default=100, help="calls per timing of the threads probe")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ok, why = native.available()
    if not ok:
        print(f"host_node_probe: engine.native is unavailable here: {why}", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    gate, up, down = stack((E, FF, D), gen), stack((E, FF, D), gen), stack((E, D, FF), gen)
    job = native.HostJob(gate, up, down, K)
    job.fill(torch.randn(D, generator=gen), torch.randperm(E, generator=gen)[:K], torch.rand(K, generator=gen))
    res = {"threads": torch.get_num_threads(), "nodes": args.nodes,
           "threads_probe": threads_probe(job, gen, args.calls)}
    print("threads:", {k: round(v, 1) for k, v in res["threads_probe"].items()})
    if torch.cuda.is_available():
        res["device"] = torch.cuda.get_device_name()
        res["dispatch"] = dispatch_probe(args.nodes, args.reps)
        print("dispatch:", {k: round(v, 1) for k, v in res["dispatch"].items()})
        fewer = None
        if job.threads > 1:
            fewer = native.HostJob(gate, up, down, K, threads=job.threads - 1)
            fewer.fill(torch.randn(D, generator=gen), torch.randperm(E, generator=gen)[:K], torch.rand(K, generator=gen))
        res["nodes_probe"] = nodes_probe(job, args.nodes, args.reps, fewer)
        print("nodes:", {k: round(v, 1) if isinstance(v, float) else v for k, v in res["nodes_probe"].items()})
    else:
        res["device"] = None
        print("dispatch / nodes: no CUDA device here (threads probe only)")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
