"""A process's GPU memory as the driver sees it, sampled while it runs: "equal VRAM" between
engines is a measurement, not an assumption.

Contract: ``PeakVram(pid, interval=0.2)`` is a context manager that polls ``nvidia-smi
--query-compute-apps=pid,used_memory`` on a thread and keeps the largest ``used_memory`` seen
for ``pid`` (MiB: the CUDA context, the allocator's pools and everything the process holds,
which is what a card must have free for it). ``result()`` is ``{"peak_vram_mib": N,
"samples": n}``, or ``{"peak_vram_mib": None, "why": ...}`` where there is no nvidia-smi or the
process was never seen on a GPU (a CPU run, or one shorter than a poll). ``used_vram_mib(pid)``
is one reading. llama.cpp (a child process) and kvbench (``os.getpid()``) are measured the
same way.

    with PeakVram(proc.pid) as peak:
        proc.wait()
    rec.update(peak.result())
"""
from __future__ import annotations

import shutil
import subprocess
import threading


def used_vram_mib(pid: int) -> int | None:
    """The GPU memory ``pid`` holds now (MiB, summed over GPUs), or None where it cannot be read."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total, seen = 0, False
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            total, seen = total + int(parts[1]), True
    return total if seen else None


class PeakVram:
    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.peak, self.samples = None, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._why = "nvidia-smi not found" if shutil.which("nvidia-smi") is None else \
            "the process was never seen on a GPU"

    def _poll(self):
        while not self._stop.is_set():
            v = used_vram_mib(self.pid)
            if v is not None:
                self.samples += 1
                self.peak = v if self.peak is None else max(self.peak, v)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakVram":
        if shutil.which("nvidia-smi") is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def result(self) -> dict:
        if self.peak is None:
            return {"peak_vram_mib": None, "why": self._why}
        return {"peak_vram_mib": self.peak, "samples": self.samples}
