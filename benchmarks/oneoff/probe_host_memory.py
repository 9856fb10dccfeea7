"""One-off probe of the GPU machine's host memory, for the host-RAM planner (issue 13).

What it answers, printed as JSON lines:
- what /proc/meminfo and the cgroup say before and after touching 24 GiB (does MemTotal /
  MemAvailable grow as memory is used, as KINDS.md saw on the multi-GPU kinds?);
- how much host memory torch's pinned (cudaHostAlloc) allocator really takes for an
  expert-sized tensor (it rounds blocks up to a power of two) and whether freeing it gives
  the memory back (the caching host allocator keeps blocks);
- whether cudaHostRegister on ordinary torch memory pins without rounding;
- with --synth: time to write coder30b-synth and to load it (bf16 weights), peak RSS.

    python3 benchmarks/oneoff/probe_host_memory.py [--synth]
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np
import torch


def meminfo() -> dict:
    out = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            k, v = line.split(":", 1)
            if k in ("MemTotal", "MemFree", "MemAvailable", "Cached", "Mlocked", "Unevictable"):
                out[k] = int(v.split()[0]) * 1024
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current",
              "/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"):
        try:
            out[f] = open(f).read().strip()
        except OSError:
            pass
    return out


def rss() -> dict:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS", "VmHWM", "VmLck", "VmPin")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    return out


def emit(tag: str, **kw) -> None:
    print(json.dumps({"probe": tag, **kw}), flush=True)


def main() -> None:
    emit("start", meminfo=meminfo(), rss=rss(), nproc=os.cpu_count(),
         statvfs_tmp=os.statvfs("/tmp").f_bavail * os.statvfs("/tmp").f_frsize)
    a = np.ones(24 << 30, dtype=np.uint8)        # touch 24 GiB
    emit("after 24 GiB touched", meminfo=meminfo(), rss=rss())
    del a
    emit("after free", meminfo=meminfo(), rss=rss())

    n = 128 * 768 * 2048 * 2                    # one coder30b layer's gate experts in bf16 (384 MiB)
    t = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    stats = getattr(torch.cuda, "host_memory_stats", None)
    emit("pinned 384 MiB", rss=rss(), host_stats=(stats() if stats else None), meminfo=meminfo())
    del t
    emit("pinned freed", rss=rss(), host_stats=(stats() if stats else None))
    try:
        torch._C._host_emptyCache()
        emit("host emptyCache", rss=rss(), host_stats=(stats() if stats else None))
    except Exception as e:        # noqa: BLE001
        emit("host emptyCache failed", error=repr(e))
    u = torch.ones(n, dtype=torch.uint8)
    cudart = torch.cuda.cudart()
    r = cudart.cudaHostRegister(u.data_ptr(), n, 0)
    emit("cudaHostRegister", rc=int(r) if not isinstance(r, tuple) else [int(x) for x in r], rss=rss())
    d = torch.empty(n, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    for src, name in ((u, "registered"),):
        t0 = time.perf_counter()
        for _ in range(10):
            d.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        emit("H2D", src=name, GBps=10 * n / (time.perf_counter() - t0) / 1e9)
    cudart.cudaHostUnregister(u.data_ptr())
    del u, d

    if "--synth" in sys.argv:
        sys.path.insert(0, os.getcwd())
        import engine
        from engine import synth
        t0 = time.perf_counter()
        p = synth.ensure("coder30b-synth")
        emit("synth", seconds=time.perf_counter() - t0, bytes=p.stat().st_size, meminfo=meminfo(), rss=rss())
        t0 = time.perf_counter()
        eng = engine.load("coder30b-synth", device="cuda", weight_format="bf16", ctx=4096)
        emit("load bf16", seconds=time.perf_counter() - t0, rss=rss(), meminfo=meminfo(),
             maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
             host_stats=(stats() if stats else None), plan_host=eng.plan.host.total,
             plan_trunk=eng.plan.trunk.total, gpu_alloc=torch.cuda.memory_allocated(),
             gpu_peak=torch.cuda.max_memory_allocated())
        ids = list(range(10, 40))
        t0 = time.perf_counter()
        eng.generate(ids, 16, stop_at_eos=False)
        emit("generate 16", seconds=time.perf_counter() - t0, decode_path=eng.decode_path, rss=rss())
        del eng
        import gc
        gc.collect()
        emit("engine freed", rss=rss(), host_stats=(stats() if stats else None), meminfo=meminfo())


if __name__ == "__main__":
    main()
