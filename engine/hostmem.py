"""Host memory: what is available, what this process holds, and exact-size pinned buffers.

Contract:
- ``available() -> HostRam``: bytes a load may still take on this machine, read once per call:
  ``MemAvailable`` from ``/proc/meminfo`` (it counts reclaimable page cache as available,
  so a GGUF's cached pages never count against a plan), capped by a cgroup memory limit
  when one is set (v2 ``memory.max - memory.current``, v1 likewise). ``KVBENCH_HOST_RAM``
  (a size such as ``24GiB``) replaces the reading, to simulate a smaller machine or to
  vouch for one whose ``MemAvailable`` grows as it is used; ``source`` says which applied.
- ``rss() -> dict``: this process's resident memory now and at its peak (``/proc/self/status``):
  ``rss`` (VmRSS), ``hwm`` (VmHWM, the kernel's peak), ``anon`` (RssAnon + RssShmem: what
  cannot be dropped: tensors, pinned buffers) and ``file`` (RssFile: mapped file pages such
  as a memory-mapped GGUF, reclaimable).
- ``PeakSampler``: a background thread that samples ``rss()`` every ``interval`` seconds
  and keeps the peak of ``anon`` (VmHWM alone cannot tell a mapped file from tensors).
- ``pinned_empty(shape, dtype)``: a host tensor page-locked for async copies at *exactly*
  its size. torch's pinned allocator (``pin_memory=True``) rounds every block up to a power
  of two and keeps freed blocks cached: a 384 MiB expert stack took 512 MiB, and a
  Qwen3-Coder-30B-A3B load held 77.8 GB of pinned memory for 58 GB of experts (H200,
  2026-12-02). Here the memory is ordinary (freed with the tensor) and registered with
  ``cudaHostRegister``; it is unregistered when the tensor is collected. Without CUDA it is
  a plain tensor. ``is_registered(t)`` says whether a tensor's storage is one of these.
- ``release_cached()``: return cached device and pinned-host blocks to the system (after an
  engine is dropped), so the next load starts from what is really free.

    ram = available(); ram.bytes, ram.source
    buf = pinned_empty((128, 768, 2048), torch.bfloat16)
"""
from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass

import torch


ENV = "KVBENCH_HOST_RAM"


@dataclass(frozen=True)
class HostRam:
    bytes: int          # what a load may still take
    total: int          # MemTotal (or the override)
    source: str         # "MemAvailable", "cgroup memory.max", "KVBENCH_HOST_RAM"


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    out[key] = int(parts[0]) * (1024 if parts[-1] == "kB" else 1)
    except OSError:
        pass
    return out


def _cgroup_left() -> int | None:
    """Bytes left under this process's cgroup memory limit, None when there is no limit."""
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = open(limit_f).read().strip()
            usage = int(open(usage_f).read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - usage)
    return None


def available() -> HostRam:
    """Host memory a new load may take (see the module docstring)."""
    from . import settings
    n = settings.get(ENV)
    if n:
        return HostRam(n, n, ENV)
    info = _meminfo()
    total = info.get("MemTotal", 0)
    avail = info.get("MemAvailable", info.get("MemFree", 0))
    left = _cgroup_left()
    if left is not None and left < avail:
        return HostRam(left, total, "cgroup memory.max")
    return HostRam(avail, total, "MemAvailable")


def rss() -> dict[str, int]:
    """This process's resident memory (bytes): rss, hwm, anon (tensors, pinned), file (mapped)."""
    vals: dict[str, int] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    vals[key] = int(rest.split()[0]) * 1024
    except OSError:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"rss": peak, "hwm": peak, "anon": peak, "file": 0}
    return {"rss": vals.get("VmRSS", 0), "hwm": vals.get("VmHWM", 0),
            "anon": vals.get("RssAnon", 0) + vals.get("RssShmem", 0), "file": vals.get("RssFile", 0)}


class PeakSampler:
    """Peak of ``rss()['anon']`` (and VmHWM) over a block of work, sampled in a thread.

        with PeakSampler() as s: work()
        s.peak_anon, s.peak_hwm
    """

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.peak_anon = self.peak_hwm = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        r = rss()
        self.peak_anon = max(self.peak_anon, r["anon"])
        self.peak_hwm = max(self.peak_hwm, r["hwm"])

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "PeakSampler":
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="kvbench-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        return False


_REGISTERED: dict[int, int] = {}      # data_ptr -> nbytes of storages registered here


def _unregister(ptr: int) -> None:
    if _REGISTERED.pop(ptr, None) is not None:
        try:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        except Exception:     # noqa: BLE001  (interpreter shutdown: nothing left to do)
            pass


def pinned_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised host tensor, page-locked at its exact size when CUDA is available."""
    return register(torch.empty(tuple(shape), dtype=dtype))


def register(t: torch.Tensor) -> torch.Tensor:
    """Page-lock host tensor ``t``'s whole storage in place (``cudaHostRegister``; a no-op without
    CUDA, for an empty tensor, or when already registered here); unregistered when ``t`` is
    collected, so whoever needs the pages locked keeps ``t``. Returns ``t``."""
    if t.device.type != "cpu":
        raise ValueError(f"hostmem.register: a host tensor, not one on {t.device}")
    if not torch.cuda.is_available() or t.numel() == 0 or is_registered(t):
        return t
    ptr, n = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
    rc = torch.cuda.cudart().cudaHostRegister(ptr, n, 0)
    code = int(rc[0] if isinstance(rc, tuple) else rc)
    if code != 0:
        from .errors import OutOfMemoryError
        raise OutOfMemoryError(f"cudaHostRegister of {n / 2**20:.1f} MiB of host memory failed (CUDA error {code})",
                               "free host memory, or lower what the plan keeps on the host")
    _REGISTERED[ptr] = n
    weakref.finalize(t, _unregister, ptr)
    return t


class _CudaAlias:
    """``__cuda_array_interface__`` over the bytes of a registered host tensor (kept alive here)."""

    def __init__(self, t: torch.Tensor):
        self.t = t
        self.__cuda_array_interface__ = {"shape": (t.untyped_storage().nbytes(),), "typestr": "|u1",
                                         "data": (t.untyped_storage().data_ptr(), False), "version": 3,
                                         "strides": None}


def device_view(t: torch.Tensor, device) -> torch.Tensor:
    """A CUDA tensor over registered host tensor ``t``'s memory (contiguous, from its storage's
    start): the same bytes, read in place over PCIe by any kernel, a captured CUDA graph's too
    (unified addressing: a page-locked host address is valid on the device). It keeps ``t``
    alive; writes through either are seen by both."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"hostmem.device_view: a CUDA device, not {dev}")
    if not is_registered(t) or not t.is_contiguous() or t.storage_offset() != 0:
        raise ValueError("hostmem.device_view: a contiguous tensor at the start of a storage that "
                         "hostmem.register page-locked")
    with torch.cuda.device(dev):
        raw = torch.as_tensor(_CudaAlias(t), device=dev)
    return raw[:t.numel() * t.element_size()].view(t.dtype).view(t.shape)


def is_registered(t: torch.Tensor) -> bool:
    """True for a tensor whose storage ``pinned_empty`` page-locked (and has not released)."""
    return t.untyped_storage().data_ptr() in _REGISTERED


def registered_bytes() -> int:
    return sum(_REGISTERED.values())


def release_cached() -> None:
    """Give cached CUDA blocks and cached pinned host blocks back (after dropping an engine)."""
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        empty_host = getattr(torch._C, "_host_emptyCache", None)
        if empty_host is not None:
            empty_host()
