"""Would a doorbell beat the cpu tier's host round trip? (perf-notes, twenty-second session.)

A cpu-tier MoE layer costs ~100 us a token beyond its CPU work on the H100 hosts (launch 41,
wait 16, back 21, between 21 us: reports/h100-2026-12-06c call 2): the host waits for the GPU
through the driver, then launches the next stretch's graph. A doorbell queues the next stretch
ahead of time behind ``cuStreamWaitValue32`` on a page-locked flag that the host writes, and the
GPU tells the host that the row is ready with ``cuStreamWriteValue32`` into another flag that the
host polls: no launch and no driver wait on the critical path. This measures the two round trips
with no work on either side, before building anything on it.

Contract (CUDA only; exit 2 with one line elsewhere): ``--rounds`` round trips a repetition,
median microseconds a round trip over ``--reps`` repetitions, printed and written as JSON:

1. ``sync``: what a cpu-tier layer does now, minus its work: a captured one-kernel graph replayed,
   the host waits for the stream, queues the row's copy back (page-locked -> device), and replays
   the next graph.
2. ``doorbell``: every round queued up front (kernel, write the round's number into flag A, wait
   until flag B holds it); the host polls flag A and writes flag B.
3. ``doorbell_row``: the same with the row's copy (page-locked -> device) queued after each wait,
   as the copy back would be.
4. ``doorbell_graph``: every round captured in one CUDA graph (kernel, the row's copy to the host,
   write flag i of A, wait flag i of B, the copy back), the host resetting the flags before each
   replay: whether stream capture takes the memory operations at all, and what they cost there.

The flags are page-locked int32s (``pinned_flags``), the device reaching them through
``cuMemHostGetDevicePointer``; the host polls them through a numpy view. A CUDA error in any call is
reported with its code, never as a time.

    python benchmarks/oneoff/doorbell_probe.py --rounds 20 --out doorbell.json
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

import torch

GEQ = 0x0            # CU_STREAM_WAIT_VALUE_GEQ
WRITE_DEFAULT = 0x0  # CU_STREAM_WRITE_VALUE_DEFAULT


class CudaError(RuntimeError):
    pass


def driver() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuMemHostGetDevicePointer_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
    for name in ("cuStreamWaitValue32_v2", "cuStreamWriteValue32_v2"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        getattr(lib, name).restype = ctypes.c_int
    lib.cuMemHostGetDevicePointer_v2.restype = ctypes.c_int
    return lib


def check(rc: int, what: str) -> None:
    if rc:
        raise CudaError(f"{what} returned CUDA error {rc}")


def pinned_flags(lib, n: int):
    """n page-locked int32 flags: the tensor, a numpy view the host polls, their device address."""
    flags = torch.zeros(n, dtype=torch.int32, pin_memory=True)
    dptr = ctypes.c_uint64()
    check(lib.cuMemHostGetDevicePointer_v2(ctypes.byref(dptr), ctypes.c_void_p(flags.data_ptr()), 0),
          "cuMemHostGetDevicePointer")
    return flags, flags.numpy(), dptr.value


def one_kernel_graph(s, x):
    """x.add_(1) captured on stream s (warmed up outside the capture first)."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        x.add_(1)
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            x.add_(1)
    return g


def sync_rounds(rounds: int, reps: int, d: int) -> float:
    s = torch.cuda.Stream()
    x = torch.zeros(16, device="cuda")
    row_host = torch.zeros(d, pin_memory=True)
    row_dev = torch.zeros(d, device="cuda")
    g = one_kernel_graph(s, x)
    times = []
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.cuda.stream(s):
            for _ in range(rounds):
                g.replay()
                s.synchronize()
                row_dev.copy_(row_host, non_blocking=True)
        s.synchronize()
        times.append((time.perf_counter() - t) / rounds)
    return statistics.median(times[1:]) * 1e6


def doorbell_rounds(lib, rounds: int, reps: int, d: int, with_row: bool) -> float:
    s = torch.cuda.Stream()
    x = torch.zeros(16, device="cuda")
    flags, view, a = pinned_flags(lib, 2)
    b = a + 4
    row_host = torch.zeros(d, pin_memory=True)
    row_dev = torch.zeros(d, device="cuda")
    stream = ctypes.c_void_p(s.cuda_stream)
    times, seq = [], 0
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        first = seq + 1
        with torch.cuda.stream(s):
            for i in range(rounds):
                seq += 1
                x.add_(1)
                check(lib.cuStreamWriteValue32_v2(stream, a, seq, WRITE_DEFAULT), "cuStreamWriteValue32")
                check(lib.cuStreamWaitValue32_v2(stream, b, seq, GEQ), "cuStreamWaitValue32")
                if with_row:
                    row_dev.copy_(row_host, non_blocking=True)
        t = time.perf_counter()
        for n in range(first, seq + 1):
            deadline = time.perf_counter() + 5.0
            while view[0] < n:
                if time.perf_counter() > deadline:
                    view[1] = 2 ** 31 - 1          # release every queued wait before giving up
                    s.synchronize()
                    raise CudaError(f"flag A never reached {n} (it holds {int(view[0])}): the GPU's write "
                                    "did not reach the host")
            view[1] = n
        s.synchronize()
        times.append((time.perf_counter() - t) / rounds)
    return statistics.median(times[1:]) * 1e6


def doorbell_graph_rounds(lib, rounds: int, reps: int, d: int) -> float:
    """The doorbell captured: one graph of every round (kernel, row's copy in, write flag i of A,
    wait flag i of B, row's copy back), so the flags' values are fixed at capture and the host resets
    them before each replay: whether stream capture takes the memory operations, and their cost
    inside a graph."""
    s = torch.cuda.Stream()
    x = torch.zeros(16, device="cuda")
    flags, view, addr = pinned_flags(lib, 2 * rounds)
    stage = torch.zeros(d, pin_memory=True)
    row_dev = torch.zeros(d, device="cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        x.add_(1)
        torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
            for i in range(rounds):
                x.add_(1)
                stage.copy_(row_dev, non_blocking=True)
                check(lib.cuStreamWriteValue32_v2(stream, addr + 4 * i, 1, WRITE_DEFAULT),
                      "cuStreamWriteValue32 (captured)")
                check(lib.cuStreamWaitValue32_v2(stream, addr + 4 * (rounds + i), 1, GEQ),
                      "cuStreamWaitValue32 (captured)")
                row_dev.copy_(stage, non_blocking=True)
    times = []
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        view[:] = 0
        t = time.perf_counter()
        g.replay()
        for i in range(rounds):
            deadline = time.perf_counter() + 5.0
            while view[i] == 0:
                if time.perf_counter() > deadline:
                    view[rounds:] = 1
                    torch.cuda.synchronize()
                    raise CudaError(f"captured flag {i} never set: the replayed write did not reach the host")
            view[rounds + i] = 1
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / rounds)
    return statistics.median(times[1:]) * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="round trips a repetition (a step's host layers)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--d", type=int, default=2048, help="floats in the row copied back (coder30b's d)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("doorbell_probe: needs a CUDA device", file=sys.stderr)
        return 2
    res = {"device": torch.cuda.get_device_name(), "rounds": args.rounds, "reps": args.reps, "d": args.d}
    try:
        res["sync_us"] = sync_rounds(args.rounds, args.reps, args.d)
        lib = driver()
        res["doorbell_us"] = doorbell_rounds(lib, args.rounds, args.reps, args.d, with_row=False)
        res["doorbell_row_us"] = doorbell_rounds(lib, args.rounds, args.reps, args.d, with_row=True)
        res["doorbell_graph_us"] = doorbell_graph_rounds(lib, args.rounds, args.reps, args.d)
    except (RuntimeError, OSError, AttributeError) as exc:   # CudaError, and a capture torch ends in error
        res["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(res))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return 1 if "error" in res else 0


if __name__ == "__main__":
    sys.exit(main())
