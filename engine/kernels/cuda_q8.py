"""q8_0 decode attention's split part in CUDA C++ (``q8_impl="cuda_mma"``): build, load, launch.

Contract: ``launch(q, kr, vr, m, l, acc, pos, n_keys, per, n_splits, qk_scale, n_kv_heads, stages)``
runs ``kvbench_q8_mma_g<G>_d<D>_s<stages>`` (mma.sync tensor-core dots over exact float16 quants
and two-term float16 q and p * scale; ``stages`` tiles in flight, one of ``STAGE_CHOICES``), or with
``pack`` (G <= 4, 3 stages) ``kvbench_q8_mmap_g<G>_d<D>_s3``, whose mma columns hold both terms
(one mma a k-step instead of two), or with ``wsm`` (``WSM_GEOMETRIES``, 3 stages) the warp-softmax
form ``kvbench_q8_mma[p]w_...`` (each warp's 16 keys of a tile their own softmax stream), of
``engine/kernels/cuda/q8_decode.cu`` on the current CUDA stream with grid (n_kv_heads, n_splits), writing the same partials as the Triton split
kernels (``m``/``l`` [Hq, n_splits] float32 in log2 units, ``acc`` [Hq, n_splits, D]); the
caller launches the combine. ``kr``/``vr`` are ``q8_layout.Q8Rows`` views of the cache.

The source is compiled once per (source, GPU architecture, nvcc) to a cubin with the CUDA
toolkit's ``nvcc`` (``$KVBENCH_NVCC``, else ``nvcc`` on PATH, else ``$CUDA_HOME/bin/nvcc``,
else ``/usr/local/cuda/bin/nvcc``) and cached under the model cache's ``cuda/`` directory; the
cubin is loaded through the CUDA driver API (``libcuda``, ctypes) into the context torch uses,
so no torch C++ extension is built. The launch is a plain kernel launch on torch's current
stream: a CUDA graph captures it like any other. What cannot run raises ``CudaKernelError``
with the fix (no nvcc, an unsupported geometry, a misaligned buffer); nothing falls back.

    from engine.kernels import cuda_q8
    cuda_q8.launch(q, q8_layout.split(k, 8, 128), q8_layout.split(v, 8, 128), m, l, acc, None,
                   16384, per, splits, 128 ** -0.5 * 1.4426950408889634, 8)
"""
from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import shutil
import subprocess
import threading
from pathlib import Path

from ..errors import ConfigError

SRC = Path(__file__).resolve().parent / "cuda" / "q8_decode.cu"
GROUPS = (1, 2, 3, 4, 8)           # query heads a KV head with an entry point
HEAD_DIMS = (64, 128)
THREADS = 128
TILE = 64                          # keys a tile (TILE in the source)
SMEM_DEFAULT_MAX = 48 * 1024       # above this a kernel must opt in to more dynamic shared memory
FALLBACK_NVCC = "/usr/local/cuda/bin/nvcc"
STAGE_CHOICES = (2, 3, 4)          # tiles in flight with an entry point (num_stages)
PACK_GROUPS = (1, 2, 3, 4)         # groups with a packed-terms entry point (q8_pack), at PACK_STAGES
PACK_STAGES = 3
# (group, head_dim) with a warp-softmax entry point (q8_softmax "warp"), at 3 stages, packed where G <= 4
WSM_GEOMETRIES = ((3, 64), (4, 128), (8, 128))
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6     # cuda.h, CUlaunchAttributeID


class _LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute: the id, padding to 8 bytes, a 64-byte value union (an int here)."""
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]


class _LaunchConfig(ctypes.Structure):
    """CUlaunchConfig (cuda.h): grid, block, dynamic shared bytes, stream, attributes."""
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


class CudaKernelError(ConfigError):
    """The CUDA C++ kernel cannot be built, loaded or launched here (with the fix)."""


def nvcc_path() -> str | None:
    from .. import settings
    for cand in (settings.get("KVBENCH_NVCC"), shutil.which("nvcc"),
                 os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None,
                 FALLBACK_NVCC):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _cache_dir() -> Path:
    from ..registry import cache_dir
    d = cache_dir() / "cuda"
    d.mkdir(parents=True, exist_ok=True)
    return d


def build(arch: str, nvcc: str | None = None, out_dir: Path | None = None) -> Path:
    """The cubin of ``q8_decode.cu`` for ``arch`` (e.g. ``sm_90``), compiled unless cached."""
    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        raise CudaKernelError("q8_impl 'cuda_mma' needs the CUDA toolkit's nvcc to build its kernel, and none was found "
                              "(KVBENCH_NVCC, PATH, CUDA_HOME, /usr/local/cuda)",
                              "install the CUDA toolkit or set KVBENCH_NVCC, or use q8_impl 'rows'")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(SRC.read_bytes() + arch.encode() + version.encode()).hexdigest()[:16]
    out = (out_dir or _cache_dir()) / f"q8_decode-{arch}-{key}.cubin"
    if out.is_file():
        return out
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    proc = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-O3", "-std=c++17", "-o", str(tmp), str(SRC)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = next((x for x in proc.stderr.splitlines() if "error" in x), proc.stderr.strip()[:300])
        raise CudaKernelError(f"nvcc could not build {SRC.name} for {arch}: {first}",
                              "check the CUDA toolkit (nvcc --version), or use q8_impl 'rows'")
    os.replace(tmp, out)
    return out


class _Driver:
    """The few CUDA driver calls the launch needs, on libcuda through ctypes."""

    def __init__(self):
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise CudaKernelError(f"q8_impl 'cuda_mma' cannot load the CUDA driver (libcuda.so.1): {e}",
                                  "run on a machine with an NVIDIA driver, or use q8_impl 'rows'") from None
        L = self.lib
        L.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p,
                                                                              ctypes.POINTER(ctypes.c_void_p),
                                                                              ctypes.c_void_p]

    def check(self, rc: int, what: str) -> None:
        if rc:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(rc, ctypes.byref(name))
            raise CudaKernelError(f"q8_impl 'cuda_mma': {what} failed: {(name.value or b'?').decode()} ({rc})",
                                  "use q8_impl 'rows'")


class _Module:
    """One device's loaded cubin: its functions and their shared-memory sizes."""

    def __init__(self, drv: _Driver, path: Path, device_index: int):
        L = drv.lib
        ctx = ctypes.c_void_p()
        drv.check(L.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:           # torch has not made its (primary) context current on this thread
            dev = ctypes.c_int()
            drv.check(L.cuDeviceGet(ctypes.byref(dev), device_index), "cuDeviceGet")
            drv.check(L.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
            drv.check(L.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        self.image = path.read_bytes()
        self.mod = ctypes.c_void_p()
        drv.check(L.cuModuleLoadData(ctypes.byref(self.mod), self.image), f"loading {path.name}")
        self.funcs: dict[tuple[int, int, int, bool], tuple[ctypes.c_void_p, int]] = {}
        entries = [(g, d, st, False) for g, d, st in itertools.product(GROUPS, HEAD_DIMS, STAGE_CHOICES)]
        entries += [(g, d, PACK_STAGES, True) for g, d in itertools.product(PACK_GROUPS, HEAD_DIMS)]
        entries = [(*e, False) for e in entries]
        entries += [(g, d, 3, pk, True) for g, d in WSM_GEOMETRIES for pk in (False, True)
                    if not pk or g in PACK_GROUPS]
        for g, d, st, pack, wsm in entries:
            f = ctypes.c_void_p()
            name = kernel_name(g, d, st, pack, wsm)
            drv.check(L.cuModuleGetFunction(ctypes.byref(f), self.mod, name.encode()), f"finding {name}")
            ptr, size = ctypes.c_uint64(), ctypes.c_size_t()
            drv.check(L.cuModuleGetGlobal_v2(ctypes.byref(ptr), ctypes.byref(size), self.mod,
                                             f"kvbench_q8_mma_smem_g{g}_d{d}_s{st}".encode()), "reading the shared size")
            # (every form of a (G, D, stages) has the two-mma form's shared layout and bytes)
            smem = ctypes.c_int()
            drv.check(L.cuMemcpyDtoH_v2(ctypes.byref(smem), ptr, ctypes.c_size_t(4)), "reading the shared size")
            if smem.value > SMEM_DEFAULT_MAX:
                drv.check(L.cuFuncSetAttribute(f, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem.value),
                          "raising the dynamic shared memory")
            self.funcs[(g, d, st, pack, wsm)] = (f, smem.value)


_lock = threading.Lock()
_driver: _Driver | None = None
_modules: dict[int, _Module] = {}


def _module(device) -> _Module:
    global _driver
    import torch
    idx = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        mod = _modules.get(idx)
        if mod is None:
            major, minor = torch.cuda.get_device_capability(idx)
            path = build(f"sm_{major}{minor}")
            if _driver is None:
                _driver = _Driver()
            mod = _modules[idx] = _Module(_driver, path, idx)
    return mod


def kernel_name(group: int, head_dim: int, stages: int, pack: bool = False, wsm: bool = False) -> str:
    return f"kvbench_q8_{'mmap' if pack else 'mma'}{'w' if wsm else ''}_g{group}_d{head_dim}_s{stages}"


def supports(group: int, head_dim: int) -> bool:
    return group in GROUPS and head_dim in HEAD_DIMS


def launch(q, kr, vr, m, l, acc, pos, n_keys: int, per: int, n_splits: int, qk_scale: float,
           n_kv_heads: int, stages: int = 3, pack: bool = False, pdl: bool = False, wsm: bool = False,
           early: bool = False) -> None:
    """One launch on torch's current stream. ``pdl``: programmatic dependent launch (sm_90+): launched
    with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, the kernel first waits for the grid before
    it (griddepcontrol.wait) and then lets the next one be scheduled, as the Triton kernels' ``pdl_enter``.
    ``early`` (with ``pdl`` only): the loads of the first tiles in flight that end before the newest key
    (row n_keys - 1) go out before that wait, so they overlap the grid before; the caller guarantees that
    grid writes neither the position nor any cache row before the newest key (the decode step's append
    writes that key only). Nothing is stored before the wait either way."""
    import torch
    impl = "cuda_mma"
    if early and not pdl:
        raise CudaKernelError("q8_impl 'cuda_mma': early loads (q8_early) are a programmatic dependent launch's, and "
                              "this launch has none", "set KVBENCH_DECODE_PDL=1 too, or unset KVBENCH_DECODE_Q8_EARLY")
    if stages not in STAGE_CHOICES:
        raise CudaKernelError(f"q8_impl 'cuda_mma' has entry points for {STAGE_CHOICES} stages, not {stages}",
                              "set num_stages (KVBENCH_DECODE_STAGES / KVBENCH_DECODE_Q8_TILES) to 2, 3 or 4")
    G0 = q.shape[0] // n_kv_heads
    if pack and (G0 not in PACK_GROUPS or stages != PACK_STAGES):
        raise CudaKernelError(f"q8_pack (cuda_mma's packed terms) serves {PACK_GROUPS} query heads a KV head at "
                              f"{PACK_STAGES} stages, not {G0} at {stages}", "unset q8_pack (KVBENCH_DECODE_Q8_PACK)")
    Hq, D = q.shape
    G = Hq // n_kv_heads
    if not supports(G, D):
        raise CudaKernelError(f"q8_impl {impl!r} serves {', '.join(map(str, GROUPS))} query heads a KV head at head_dim "
                              f"{' or '.join(map(str, HEAD_DIMS))}, not {G} at {D}", "use q8_impl 'rows'")
    nb = D // 32
    for name, t, align in (("K quants", kr.quants, 16), ("V quants", vr.quants, 16),
                           ("K scales", kr.scales, 2 * nb), ("V scales", vr.scales, 2 * nb)):
        if t.data_ptr() % align:
            raise CudaKernelError(f"q8_impl {impl!r}: the cache's {name} start at an address not a multiple of {align} "
                                  "bytes", "allocate the KV buffer whole (q8_layout.alloc), or use q8_impl 'rows'")
    if q.dtype != torch.float32 or not q.is_contiguous():
        raise CudaKernelError(f"q8_impl {impl!r} takes q as contiguous float32 [Hq, D]", "pass q.float().contiguous()")
    mod = _module(q.device)
    if wsm and ((G, D) not in WSM_GEOMETRIES or stages != 3):
        raise CudaKernelError(f"q8_softmax 'warp' (cuda_mma's warp-softmax form) serves (query heads a KV head, "
                              f"head_dim) {WSM_GEOMETRIES} at 3 stages, not ({G}, {D}) at {stages}",
                              "unset KVBENCH_DECODE_Q8_SOFTMAX")
    f, smem = mod.funcs[(G, D, stages, bool(pack), bool(wsm))]
    args = [ctypes.c_void_p(t.data_ptr()) for t in (q, kr.quants, kr.scales, vr.quants, vr.scales, m, l, acc)]
    if pos is not None and pos.dtype not in (torch.int64, torch.int32):
        raise CudaKernelError(f"q8_impl {impl!r} reads the device position as int64 or int32, not {pos.dtype}",
                              "hold the position in a torch.long tensor")
    args += [ctypes.c_void_p(pos.data_ptr() if pos is not None else 0),
             ctypes.c_int(int(pos is not None and pos.dtype == torch.int64)), ctypes.c_int(n_keys), ctypes.c_int(per),
             ctypes.c_int(n_splits), ctypes.c_float(qk_scale), ctypes.c_int(n_kv_heads),
             ctypes.c_int(2 if early else int(bool(pdl)))]
    params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
    stream = torch.cuda.current_stream(q.device).cuda_stream
    if not pdl:
        _driver.check(_driver.lib.cuLaunchKernel(f, n_kv_heads, n_splits, 1, THREADS, 1, 1, smem,
                                                 ctypes.c_void_p(stream), params, None), "cuLaunchKernel")
        return
    if torch.cuda.get_device_capability(q.device) < (9, 0):
        raise CudaKernelError("q8_impl 'cuda_mma' with pdl: programmatic dependent launch needs compute capability 9.0 "
                              "or newer", "unset KVBENCH_DECODE_PDL / set KVBENCH_STEP_PDL=auto")
    attr = _LaunchAttribute(id=_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION)
    ctypes.memmove(attr.value, ctypes.byref(ctypes.c_int(1)), 4)
    cfg = _LaunchConfig(n_kv_heads, n_splits, 1, THREADS, 1, 1, smem, ctypes.c_void_p(stream),
                        ctypes.pointer(attr), 1)
    _driver.check(_driver.lib.cuLaunchKernelEx(ctypes.byref(cfg), f, params, None), "cuLaunchKernelEx")
