"""Native host kernels, built on this machine at first use: one MoE layer's experts for one token
straight from their GGUF Q4_0 blocks, as integer dot products against 8-bit activation blocks.

Contract: ``moe_q4_decode(x, ids, weights, gate, up, down, threads=None)`` takes ``x`` float32 [d]
(or [1, d]), host expert ids and weights (k of each), and one layer's host ``BlockStack``s in
Q4_0 (gate/up [E, ff, d], down [E, d, ff], ``engine.kernels.moe_blocks``, read in place: no
repacking, no copy) and returns float32 [d]: ``sum_j w_j down[e_j] @ (silu(gate[e_j] @ x') *
(up[e_j] @ x'))'`` where ``x'`` is ``x`` and ``(...)'`` the SiLU product each rounded to 8-bit
blocks of 32 (scale ``max|v| / 127``, values ``round-half-even(v * (1 / scale))``): llama.cpp's
CPU arithmetic class (Q4_0 x Q8_0), not its code. Sums of products are exact integers a block;
the block scales multiply them in float32. ``moe_q4_decode_ref`` is the same maths in torch
(float64 over the same integers), the tests' reference. ``MATH`` names the arithmetic.

Building: ``gcc`` (``$CC``) compiles ``q4q8.c`` with ``-O3 -march=native -fopenmp`` (``-march``:
``KVBENCH_NATIVE_MARCH``) into the
cache (``$KVBENCH_CACHE/native`` or ``~/.cache/kvbench/native``), keyed by the source, the flags
and this CPU's model and flags (a library built for another CPU is never loaded). Without a
compiler ``available()`` says why and ``moe_q4_decode`` raises ``ConfigError``; nothing falls
back silently. ``simd()`` says which path was compiled (3: AVX-512 with VNNI, two blocks a step;
2: AVX2; 0: portable C); ``default_on()`` whether the cpu tier takes it when not told (a vector
build: 2 or 3).

``read_rate(nbytes, threads)`` times the host's read bandwidth through the same compiler and
OpenMP runtime (``read_xor`` over resident memory): the roof the experts' rate is read against.

    y = native.moe_q4_decode(h[0], [3, 17, 40, 99, 5, 6, 7, 8], [0.125] * 8, gate, up, down)
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch

from ..errors import ConfigError

MATH = "Q4_0 blocks x 8-bit activation blocks (integer dots, float32 block scales; native, OpenMP)"
SOURCE = Path(__file__).with_name("q4q8.c")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def _march() -> str:
    """``-march``: ``KVBENCH_NATIVE_MARCH`` (default native: this CPU's vector units; x86-64
    builds the portable C path, which the tests check too)."""
    from .. import settings
    return str(settings.get("KVBENCH_NATIVE_MARCH") or "native")


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(keep)
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("KVBENCH_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "kvbench") / "native"


@functools.lru_cache(maxsize=4)
def _build(march: str = "native") -> tuple[ctypes.CDLL | None, str]:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        return None, "no C compiler (gcc or $CC) on this machine"
    flags = [f"-march={march}", *FLAGS]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *flags]).encode() + _cpu_id().encode()).hexdigest()[:16]
    lib = _cache_dir() / f"q4q8-{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        run = subprocess.run([cc, *flags, "-o", str(tmp), str(SOURCE), "-lm"], capture_output=True, text=True)
        if run.returncode:
            return None, f"{cc} could not build {SOURCE.name}: {run.stderr.strip().splitlines()[-1:] or run.returncode}"
        os.replace(tmp, lib)
    dll = ctypes.CDLL(str(lib))
    p = ctypes.c_void_p
    dll.kvb_moe_q4_decode.argtypes = [p, ctypes.c_int, ctypes.c_int, ctypes.c_int, p, p, p, p, p, p, p, p, p,
                                      ctypes.c_int]
    dll.kvb_moe_q4_decode.restype = ctypes.c_int
    dll.kvb_simd.restype = ctypes.c_int
    dll.kvb_run_job.argtypes = [p]
    dll.kvb_run_job.restype = None
    dll.kvb_read_xor.argtypes = [p, ctypes.c_long, ctypes.c_int]
    dll.kvb_read_xor.restype = ctypes.c_uint64
    return dll, ""


def available() -> tuple[bool, str]:
    """(whether the native kernels could be built and loaded here, why not)."""
    dll, why = _build(_march())
    return dll is not None, why


def simd() -> int:
    """The vector path compiled: 3 (AVX-512 VNNI), 2 (AVX2) or 0 (portable C)."""
    return _lib().kvb_simd()


def default_on() -> tuple[bool, str]:
    """Whether the cpu tier takes this path when ``KVBENCH_CPU_MOE_NATIVE`` is not set, and why:
    where it builds here with its AVX2 path (measured 2.12x torch's int4 path on a 16-core H100
    host, 1.15-1.26x on a 2-core box: ``reports/h100-2026-12-06``); the portable C path was never
    measured faster, so without AVX2 (or a compiler) the default is torch's int4 path. Known once
    per ``-march`` (a cpu-tier step asks at every host layer)."""
    return _default_on(_march())


@functools.lru_cache(maxsize=4)
def _default_on(march: str) -> tuple[bool, str]:
    dll, why = _build(march)
    if dll is None:
        return False, why
    if dll.kvb_simd() < 2:
        return False, f"built without AVX2 (-march={march}): the portable C path is not the default"
    return True, "built here with " + ("AVX-512 VNNI" if dll.kvb_simd() == 3 else "AVX2")


def _lib() -> ctypes.CDLL:
    dll, why = _build(_march())
    if dll is None:
        raise ConfigError(f"the native CPU expert kernel is not available: {why}",
                          "install gcc (or set CC), or use the torch int4 path")
    return dll


def read_xor(buf: torch.Tensor, threads: int | None = None) -> int:
    """The XOR of ``buf``'s 64-bit words (a contiguous host int64 tensor), read by ``threads``
    OpenMP threads (default torch's count): ``read_rate``'s kernel, checked by the tests."""
    if buf.dtype != torch.int64 or buf.device.type != "cpu" or not buf.is_contiguous():
        raise ConfigError(f"native.read_xor: a contiguous host int64 tensor, not {buf.dtype} on {buf.device}",
                          "pass torch.int64 host memory")
    return int(_lib().kvb_read_xor(buf.data_ptr(), buf.numel(), int(threads or torch.get_num_threads())))


def read_rate(nbytes: int = 512 << 20, threads: int | None = None, reps: int = 5) -> dict:
    """The host's read bandwidth at ``threads`` (default torch's count), through the same compiler
    and OpenMP runtime as the expert kernel: ``nbytes`` of host memory (filled, so resident; larger
    than a last-level cache by default) read ``reps`` times after one untimed pass. Returns
    ``{"bytes", "threads", "gb_s"`` (the median pass), ``"gb_s_all"}``: the roof a host expert
    layer's rate is read against (a layer reads its k experts' blocks once a token)."""
    if nbytes < 8 or reps < 1:
        raise ConfigError(f"native.read_rate: {nbytes} bytes, {reps} repetitions", "read at least one word once")
    th = int(threads or torch.get_num_threads())
    buf = torch.arange(nbytes // 8, dtype=torch.int64)
    read_xor(buf, th)
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        read_xor(buf, th)
        rates.append(buf.numel() * 8 / (time.perf_counter() - t) / 1e9)
    return {"bytes": buf.numel() * 8, "threads": th, "gb_s": statistics.median(rates), "gb_s_all": rates}


def _check(gate, up, down) -> tuple[int, int, int]:
    if {gate.fmt, up.fmt, down.fmt} != {"q4_0"}:
        raise ConfigError(f"native experts: {gate.fmt}/{up.fmt}/{down.fmt} blocks; this kernel reads Q4_0",
                          "keep the experts in Q4_0 blocks")
    E, ff, d = gate.shape
    if up.shape != gate.shape or down.shape != (E, d, ff) or d % 32 or ff % 32:
        raise ConfigError(f"native experts: gate {gate.shape}, up {up.shape}, down {down.shape} do not agree",
                          "pass one layer's gate/up [E, ff, d] and down [E, d, ff]")
    for st in (gate, up, down):
        for t in (st.qs, st.d):
            if t.device.type != "cpu" or not t.is_contiguous():
                raise ConfigError("native experts read host memory in place: contiguous CPU blocks needed",
                                  "pass the layer's host BlockStacks")
    return E, ff, d


def moe_q4_decode(x: torch.Tensor, ids, weights, gate, up, down, threads: int | None = None) -> torch.Tensor:
    """float32 [d]; see the module docstring."""
    E, ff, d = _check(gate, up, down)
    xs = x.detach().reshape(-1).to(torch.float32).contiguous()
    ids_t = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).contiguous()
    w_t = torch.as_tensor(weights, dtype=torch.float32).reshape(-1).contiguous()
    if xs.numel() != d or ids_t.numel() != w_t.numel() or not ids_t.numel():
        raise ConfigError(f"native experts: x of {xs.numel()} values for d {d}, {ids_t.numel()} ids and "
                          f"{w_t.numel()} weights", "one token's row and k ids with k weights")
    if int(ids_t.min()) < 0 or int(ids_t.max()) >= E:
        raise ConfigError(f"native experts: ids {ids_t.tolist()} outside 0..{E - 1}", "route within the layer")
    y = torch.empty(d, dtype=torch.float32)
    rc = _lib().kvb_moe_q4_decode(
        xs.data_ptr(), d, ff, ids_t.numel(), ids_t.data_ptr(), w_t.data_ptr(),
        gate.qs.data_ptr(), gate.d.data_ptr(), up.qs.data_ptr(), up.d.data_ptr(),
        down.qs.data_ptr(), down.d.data_ptr(), y.data_ptr(), int(threads or torch.get_num_threads()))
    if rc:
        raise RuntimeError(f"kvb_moe_q4_decode returned {rc}")
    return y


def quantize_blocks_ref(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [..., K] -> (int values [..., K] as float64, scales [..., K/32] float32), as the
    kernel rounds: scale = max|v| / 127 and values round-half-even(v * (1 / scale)) in float32."""
    b = v.to(torch.float32).reshape(*v.shape[:-1], -1, 32)
    d = b.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(b * inv[..., None])
    return q.reshape(v.shape).double(), d


def _q4_values(st, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``e``'s Q4_0 values minus 8 (float64 [N, K]) and block scales (float64 [N, K/32])."""
    qs = st.qs[e]
    lo, hi = (qs & 0x0F).to(torch.int16), (qs >> 4).to(torch.int16)
    N = qs.shape[0]
    vals = torch.cat([lo.reshape(N, -1, 16), hi.reshape(N, -1, 16)], dim=-1).reshape(N, -1)
    return (vals - 8).double(), st.d[e].double()


def _mm_ref(st, e: int, q: torch.Tensor, dq: torch.Tensor) -> torch.Tensor:
    w, dw = _q4_values(st, e)
    N, K = w.shape
    isum = (w.reshape(N, K // 32, 32) * q.reshape(1, K // 32, 32)).sum(-1)            # exact integers
    return (isum * dw * dq.double()[None, :]).sum(-1)


def moe_q4_decode_ref(x: torch.Tensor, ids, weights, gate, up, down) -> torch.Tensor:
    """``moe_q4_decode``'s maths in torch: the same 8-bit roundings (float32, as the kernel), the
    block sums exact, everything after them in float64; float64 [d]."""
    _, ff, d = _check(gate, up, down)
    qx, dx = quantize_blocks_ref(x.reshape(-1))
    y = torch.zeros(d, dtype=torch.float64)
    for e, w in zip(torch.as_tensor(ids).reshape(-1).tolist(), torch.as_tensor(weights).reshape(-1).tolist()):
        g, u = _mm_ref(gate, e, qx, dx).float(), _mm_ref(up, e, qx, dx).float()   # the kernel keeps float32
        a = g / (1.0 + torch.exp(-g)) * u
        qa, da = quantize_blocks_ref(a)
        y += w * _mm_ref(down, e, qa, da)
    return y


class _Job(ctypes.Structure):
    """``kvb_job`` in q4q8.c, field for field."""
    _fields_ = [("stage", ctypes.c_void_p), ("out", ctypes.c_void_p),
                ("d", ctypes.c_int), ("ff", ctypes.c_int), ("k", ctypes.c_int), ("E", ctypes.c_int),
                ("nthreads", ctypes.c_int), ("rc", ctypes.c_int),
                ("gate_qs", ctypes.c_void_p), ("up_qs", ctypes.c_void_p), ("down_qs", ctypes.c_void_p),
                ("gate_d", ctypes.c_void_p), ("up_d", ctypes.c_void_p), ("down_d", ctypes.c_void_p),
                ("runs", ctypes.c_longlong)]


@functools.lru_cache(maxsize=1)
def _driver() -> ctypes.CDLL:
    """The CUDA driver (``libcuda.so.1``, one per process, whichever runtime torch loaded) with
    ``cuLaunchHostFunc``: a host function queued on a stream, captured as a graph's host node."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise ConfigError(f"host nodes need the CUDA driver library: {exc}", "run on a machine with CUDA") from None
    lib.cuLaunchHostFunc.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.cuLaunchHostFunc.restype = ctypes.c_int
    for name in ("cuStreamWriteValue32_v2", "cuStreamWaitValue32_v2"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        getattr(lib, name).restype = ctypes.c_int
    return lib


class Doorbell:
    """Page-locked int32 flags by which a captured step hands its host-node layers to the host
    thread (``KVBENCH_HOST_NODES_RUN=doorbell``) instead of to CUDA's callback thread. At node
    ``i`` the graph writes ``ring[i] = 1`` (``cuStreamWriteValue32``, ordered after the copy of the
    layer's row into its job's stage) and waits until ``done[i] >= 1`` (``cuStreamWaitValue32``)
    before it copies the job's output back. The host, after launching the graph, ``serve``s each
    node in order: polls ``ring[i]``, runs the job on its own thread (its own OpenMP team: no
    second team, no launch and no driver wait between layers) and sets ``done[i]``. The values are
    fixed at capture, so ``reset()`` zeroes the flags before each replay. The device reads and
    writes the flags at their host address (unified addressing, as ``hostmem.device_view``)."""

    def __init__(self, n: int):
        from ..hostmem import pinned_empty
        self.n = int(n)
        self.flags = pinned_empty((2 * self.n,), torch.int32).zero_()
        self.view = self.flags.numpy()
        self.addr = self.flags.data_ptr()

    def ring_and_wait(self, i: int, stream) -> None:
        """Queue node ``i``'s ring and its wait for the host on ``stream`` (captured in a graph)."""
        lib, s = _driver(), ctypes.c_void_p(stream.cuda_stream)
        for name, addr in (("cuStreamWriteValue32_v2", self.addr + 4 * i),
                           ("cuStreamWaitValue32_v2", self.addr + 4 * (self.n + i))):
            rc = getattr(lib, name)(s, addr, 1, 0)      # write 1 / wait until >= 1 (GEQ)
            if rc:
                raise ConfigError(f"KVBENCH_HOST_NODES_RUN=doorbell: {name[:-3]} returned CUDA error {rc}",
                                  "set KVBENCH_HOST_NODES_RUN=callback")

    def reset(self) -> None:
        self.view[:] = 0

    def release(self) -> None:
        """Satisfy every wait (a step given up must not leave the stream blocked)."""
        self.view[self.n:] = 1

    def serve(self, i: int, job: "HostJob", timeout_s: float = 10.0) -> None:
        """Wait for node ``i``'s ring, run its job here, answer. A ring that never comes (the
        graph's write never reached the host) releases the stream and raises."""
        v, spins, deadline = self.view, 0, None
        while v[i] == 0:
            spins += 1
            if spins & 0xFFFF == 0:
                now = time.perf_counter()
                deadline = deadline or now + timeout_s
                if now > deadline:
                    self.release()
                    raise ConfigError(f"KVBENCH_HOST_NODES_RUN=doorbell: host node {i} never rang in "
                                      f"{timeout_s:.0f} s", "set KVBENCH_HOST_NODES_RUN=callback")
        job.run()
        v[self.n + i] = 1


class HostJob:
    """One cpu-tier MoE layer's one-token step as a host function a CUDA stream (or a captured
    graph, as a host node) runs in order with its kernels: ``stage`` (page-locked float32, [d]
    row, [k] weights, [k] ids as floats) in, ``out`` (page-locked float32 [d]) out, the layer's
    Q4_0 ``gate``/``up``/``down`` host blocks read in place, ``threads`` OpenMP threads.
    ``run()`` computes now on this thread (what the host node does; the CPU tests' entry);
    ``launch(stream)`` queues it on a CUDA stream: no Python runs when it executes, and the
    caller's copies into ``stage`` and out of ``out`` on the same stream order it. ``rc`` is
    non-zero after a run that met an id outside the layer (its ``out`` then NaN); ``runs`` counts
    runs. The job keeps every tensor it points at alive."""

    def __init__(self, gate, up, down, k: int, threads: int | None = None):
        E, ff, d = _check(gate, up, down)
        if not 1 <= k <= 64:
            raise ConfigError(f"native host job: k = {k} experts a token", "route 1..64 experts")
        from ..hostmem import pinned_empty     # registered pages, outside torch's caching host
        self.stage = pinned_empty((d + 2 * k,), torch.float32).zero_()   # allocator (no events
        self.out = pinned_empty((d,), torch.float32).zero_()             # recorded in a capture)
        self.blocks, self.d, self.k = (gate, up, down), d, k
        self.threads = int(threads or torch.get_num_threads())
        self._fn = _lib().kvb_run_job
        self._job = _Job(self.stage.data_ptr(), self.out.data_ptr(), d, ff, k, E, self.threads, 0,
                         gate.qs.data_ptr(), up.qs.data_ptr(), down.qs.data_ptr(),
                         gate.d.data_ptr(), up.d.data_ptr(), down.d.data_ptr(), 0)

    @property
    def rc(self) -> int:
        return int(self._job.rc)

    @property
    def runs(self) -> int:
        return int(self._job.runs)

    def fill(self, x, ids, weights) -> None:
        """Write a token's row, ids and weights into the stage from the host (the tests' way in;
        a captured step copies them from the device instead)."""
        self.stage[:self.d] = torch.as_tensor(x, dtype=torch.float32).reshape(-1)
        self.stage[self.d:self.d + self.k] = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
        self.stage[self.d + self.k:] = torch.as_tensor(ids, dtype=torch.float32).reshape(-1)

    def run(self) -> torch.Tensor:
        self._fn(ctypes.byref(self._job))
        return self.out

    def launch(self, stream) -> None:
        fn = ctypes.cast(self._fn, ctypes.c_void_p).value
        rc = _driver().cuLaunchHostFunc(ctypes.c_void_p(stream.cuda_stream), ctypes.c_void_p(fn),
                                        ctypes.c_void_p(ctypes.addressof(self._job)))
        if rc:
            raise RuntimeError(f"cuLaunchHostFunc returned CUDA error {rc}")
