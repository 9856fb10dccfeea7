"""The transformer forward pass for every supported architecture, in plain torch.

Contract: ``Transformer(spec, layers, globals_)`` holds float32 weights (per layer: attention,
norms, dense FFN or router + experts) and runs ``forward(tokens, start, caches)`` ->
hidden states [T, d_model] for tokens at positions ``start..start+T-1``, writing K/V into
``caches[i]`` (one ``engine.kv.LayerKV`` per layer) and reading attention from them, so a
narrowed cache affects every later position exactly as in a real engine. Architecture
differences are data in ``ModelSpec`` (rope type, q/k norm kind, MoE top-k normalisation;
Gemma 3's embedding scale, post-attention/post-FFN norms, GELU-tanh FFN, sliding-window
layers with their own RoPE base, attention scale, logit softcap), not separate classes. Norm
weights are used as the GGUF stores them (llama.cpp's converter already folded Gemma's
``1 + w`` into the file).

MoE: ``moe`` routes (softmax, top-k, optional renormalisation: ``moe_route``) and runs the
selected experts; prefill (T > 1) loops over the unique experts, fetching each through the
layer's experts object (``Experts`` stacks, or ``engine.expert_cache.CachedExperts``). One
token goes through ``engine.kernels.moe`` (``moe_experts_torch`` where Triton does not run),
which reads the k selected rows in place from the stacks or the cache's slot buffers: behind
a cache, routing is read on the host so the SLRU policy sees every access; ``decode_at``
(the static / CUDA-graph step) routes on the device through a resident cache's slot table.

Attention projections: a layer loaded with ``KVBENCH_DECODE_FUSED_QKV`` holds ``wqkv``
[q_dim + 2 kv_dim, d] and ``wq``/``wk``/``wv`` as its row views; ``qkv_proj`` then runs one
matmul and splits (same products as three). Dense FFNs likewise: with
``KVBENCH_DECODE_FUSED_GATE_UP`` a layer holds ``w_gu`` [2 d_ff, d] with ``w_gate``/``w_up``
as its row views, and the decode step projects both with one matmul. ``decode_at`` routes MoE tokens with
``engine.kernels.route`` (``KVBENCH_DECODE_ROUTE_KERNEL``) and ``decode_embed`` gathers a
token's row from ``embed_table(device)`` for the static step's device-side token feedback.

    h = model.forward(torch.tensor(ids), 0, caches)     # [T, d_model]
    logits = model.head(h)                              # [T, vocab]
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import attn_math, qweights, settings
from .spec import ModelSpec


def fused_qkv_on() -> bool:
    """``KVBENCH_DECODE_FUSED_QKV``: store q/k/v fused (at load) and project with one matmul."""
    return bool(settings.get("KVBENCH_DECODE_FUSED_QKV"))


def fused_gate_up_on() -> bool:
    """``KVBENCH_DECODE_FUSED_GATE_UP``: store a dense FFN's gate/up fused (at load); the decode
    step projects both with one matmul."""
    return bool(settings.get("KVBENCH_DECODE_FUSED_GATE_UP"))


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor            # [d]
    wq: torch.Tensor                   # [Hq*D, d]
    wk: torch.Tensor                   # [Hkv*D, d]
    wv: torch.Tensor                   # [Hkv*D, d]
    wo: torch.Tensor                   # [d, Hq*D]
    ffn_norm: torch.Tensor             # [d]
    q_norm: torch.Tensor | None = None  # [D] (per head) or [Hq*D] (full)
    k_norm: torch.Tensor | None = None
    w_gate: torch.Tensor | None = None  # dense: [ff, d]
    w_up: torch.Tensor | None = None
    w_down: torch.Tensor | None = None  # [d, ff]
    router: torch.Tensor | None = None  # MoE: [E, d]
    experts: object | None = None       # MoE: object with .gate/.up/.down [E, ff, d]/[E, d, ff] or an expert cache
    post_attn_norm: torch.Tensor | None = None  # Gemma: [d] on the attention output
    post_ffn_norm: torch.Tensor | None = None   # Gemma: [d] on the FFN output
    wqkv: torch.Tensor | None = None    # fused [Hq*D + 2*Hkv*D, d]: wq, wk, wv are its row views
    w_gu: torch.Tensor | None = None    # dense FFN fused [2*ff, d]: w_gate, w_up are its row views

    QKV_VIEWS = ("wq", "wk", "wv")
    GU_VIEWS = ("w_gate", "w_up")

    def _is_view(self, name: str) -> bool:
        return (self.wqkv is not None and name in self.QKV_VIEWS) or (self.w_gu is not None and name in self.GU_VIEWS)

    def to(self, device) -> "LayerWeights":
        out = {}
        for name, value in self.__dict__.items():
            if self._is_view(name):
                continue                     # re-sliced from the moved fused buffer below
            out[name] = value.to(device) if isinstance(value, torch.Tensor) else value
        if self.wqkv is not None:
            out.update(zip(self.QKV_VIEWS, split_qkv_rows(out["wqkv"], self.wq.shape[0], self.wk.shape[0])))
        if self.w_gu is not None:
            out.update(zip(self.GU_VIEWS, split_gate_up_rows(out["w_gu"])))
        return LayerWeights(**out)

    def tensors(self):
        """Every tensor that owns its bytes (a fused buffer's row views are not listed)."""
        return [v for n, v in self.__dict__.items() if isinstance(v, torch.Tensor) and not self._is_view(n)]

    def owned(self):
        """(name, tensor) of ``tensors()``: what a ledger records, each storage once."""
        return [(n, v) for n, v in self.__dict__.items() if isinstance(v, torch.Tensor) and not self._is_view(n)]


def split_qkv_rows(wqkv: torch.Tensor, q_rows: int, kv_rows: int):
    """(wq, wk, wv): row views of a fused [q_rows + 2 kv_rows, d] weight (contiguous, shared storage)."""
    return wqkv[:q_rows], wqkv[q_rows:q_rows + kv_rows], wqkv[q_rows + kv_rows:q_rows + 2 * kv_rows]


def split_gate_up_rows(w_gu: torch.Tensor):
    """(w_gate, w_up): row views of a fused [2 ff, d] weight (contiguous, shared storage)."""
    ff = w_gu.shape[0] // 2
    return w_gu[:ff], w_gu[ff:]


def qkv_proj(s: ModelSpec, h: torch.Tensor, wq, wk, wv, wqkv=None):
    """(q, k, v) = h @ w.T for h [T, d]: one matmul over ``wqkv`` when given (then split along
    the columns: views), else three. Same products either way (each output is one row's dot)."""
    if wqkv is None:
        return mm(h, wq), mm(h, wk), mm(h, wv)
    return mm(h, wqkv).split([s.q_dim, s.kv_dim, s.kv_dim], dim=-1)


@dataclass
class Experts:
    """All routed experts of one layer, resident: gate/up [E, ff, d], down [E, d, ff]."""
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    def get(self, layer: int, e: int):
        return self.gate[e], self.up[e], self.down[e]

    def resident_blocker(self, device) -> str | None:
        dev, here = torch.device(device), self.gate.device
        if here.type != dev.type or None not in (here.index, dev.index) and here.index != dev.index:
            return f"the routed experts are on {here}, the layer runs on {dev}"
        return None

    def resident_view(self):
        """(gate, up, down, no slot table): the stacks are indexed by expert id directly."""
        return self.gate, self.up, self.down, None

    def make_resident(self):
        return None

    def tensors(self):
        return [self.gate, self.up, self.down]


class BlockExperts(Experts):
    """All routed experts of one layer resident in their GGUF blocks: gate/up/down are
    ``engine.kernels.moe_blocks.BlockStack``s ([E, ff, d], [E, ff, d], [E, d, ff]) on the
    layer's device. One-token steps read the blocks in place (``moe_decode_blocks``); a
    prefill's expert is dequantised to float32 rows (``get``)."""

    def get(self, layer: int, e: int):
        return self.gate.rows(e), self.up.rows(e), self.down.rows(e)

    def tensors(self):
        return [*self.gate.tensors(), *self.up.tensors(), *self.down.tensors()]


class PcieExperts(BlockExperts):
    """One layer's routed experts kept on the host as their GGUF blocks (pinned on a CUDA
    machine) and read in place by the device (``host_experts="pcie"``): a one-token step's
    kernel (``moe_decode_blocks``) reads the k chosen experts' rows straight from host memory
    over PCIe (CUDA's unified addressing of pinned memory: no copy, no host sync, so the
    captured step stays one graph). A batch of rows (a prefill) instead copies the chosen
    experts up ``OFFLOAD_CHUNK`` at a time (``on_device``), as ``CpuExperts`` does. On a CPU
    device it is ``BlockExperts`` (host and device are one memory)."""
    OFFLOAD_CHUNK = 16
    math = ("the device reads the host's blocks in place over PCIe: float32 maths on the exact "
            "block values, as resident blocks")

    def resident_blocker(self, device) -> str | None:
        from .hostmem import is_registered     # cudaHostRegister'd: mapped into the device's addresses
        dev = torch.device(device)
        if dev.type == "cuda" and not all(t.is_pinned() or is_registered(t) for t in self.tensors()):
            return "host experts for the device to read in place must be in pinned memory"
        return None

    def over_rows(self, h: torch.Tensor, top_e: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """Rows [T, d] through their experts on ``h``'s device (float32 maths on the block values)."""
        if h.device.type == "cpu":
            return experts_over_rows(h, top_e, top_p, torch.unique(top_e).tolist(), lambda e: self.get(0, e))
        return experts_on_device(h, top_e, top_p, (self.gate, self.up, self.down), self.OFFLOAD_CHUNK)


class DmaExperts(PcieExperts):
    """``PcieExperts`` whose one-token step copies the k chosen experts' blocks into a staging
    stack on the device (``stage``: three ``BlockStack``s of k experts, carved from the plan's
    ``expert_staging`` scratch and shared by every such layer) by DMA, then runs the blocks
    kernel there (``host_experts="dma"``). The copies need the chosen ids on the host: a
    routing sync a layer, so the step yields at these layers like ``CpuExperts`` (a captured
    step is one graph per stretch between them)."""
    host_compute = True
    math = ("the k chosen experts' blocks copied to the device after a routing sync (DMA): float32 maths "
            "on the exact block values, as resident blocks")
    stage = None

    def run(self, h: torch.Tensor, top_e: torch.Tensor, top_p: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor:
        T, k = top_e.shape
        if T > 1 or self.stage is None:
            y = self.over_rows(h, top_e, top_p)
            return y if out is None else out.copy_(y)
        ids = top_e.reshape(-1).tolist()                  # the routing sync: which experts to copy
        for j, e in enumerate(ids):
            for src, dst in zip((self.gate, self.up, self.down), self.stage):
                dst.qs[j].copy_(src.qs[e], non_blocking=True)
                dst.d[j].copy_(src.d[e], non_blocking=True)
        slots = self.__dict__.get("_slots")
        if slots is None or slots.numel() != k or slots.device != h.device:
            slots = self._slots = torch.arange(k, device=h.device)
        y = Transformer._moe_kernel(h.device)(h, *self.stage, slots, top_p.reshape(-1))
        return y if out is None else out.copy_(y)


def carve_staging(buf: torch.Tensor, spec, fmt: str, parts: list[int]):
    """(gate, up, down) ``BlockStack``s of k experts as views of the uint8 ``buf`` (the plan's
    ``expert_staging``), each part at its offset in ``parts`` (``planner.expert_staging_parts``)."""
    from .kernels.moe_blocks import BlockStack
    k, d, ff = spec.n_experts_used, spec.d_model, spec.d_ff_expert
    per = 2 if fmt == "q4_0" else 1
    qdt = torch.uint8 if fmt == "q4_0" else torch.int8
    stacks, off, it = [], 0, iter(parts)
    for n, kk in ((ff, d), (ff, d), (d, ff)):
        q_bytes, d_bytes = next(it), next(it)
        qs = buf[off:off + k * n * kk // per].view(qdt).view(k, n, kk // per)
        off += q_bytes
        sc = buf[off:off + k * n * kk // 32 * 2].view(torch.float16).view(k, n, kk // 32)
        off += d_bytes
        stacks.append(BlockStack(fmt, qs, sc))
    return tuple(stacks)


def experts_on_device(h: torch.Tensor, top_e: torch.Tensor, top_p: torch.Tensor, blocks, chunk: int) -> torch.Tensor:
    """Rows ``h`` through their experts on ``h``'s device from host block stacks ``blocks``
    (gate, up, down): the chosen experts go up ``chunk`` at a time, float32 maths on the exact
    block values, in ascending expert id."""
    used = torch.unique(top_e).tolist()
    out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    E = blocks[0].shape[0]
    for e0 in range(0, E, chunk):
        here = [e for e in used if e0 <= e < e0 + chunk]
        if not here:
            continue
        stage = [st[e0:e0 + chunk].to(h.device, non_blocking=True) for st in blocks]
        experts_over_rows(h, top_e, top_p, here, lambda e: tuple(expert_rows(st, e - e0) for st in stage), out=out)
    return out


class CpuExperts:
    """One layer's routed experts computed on the host CPU (llama.cpp's ``--n-cpu-moe``):
    ``packed`` is an ``engine.cpu_experts.HostQ4Experts``. The layer's router runs where the
    layer does; ``run`` brings the normed hidden rows and the routing to the host, computes
    there and returns float32 rows on the hidden's device (a host round trip: a captured
    step is one graph per stretch between such layers, ``engine.cuda_graph``).
    ``math`` is the CPU path's arithmetic."""
    host_compute = True
    OFFLOAD_ROWS = 32              # a batch of at least this many rows runs on the device (below)
    OFFLOAD_CHUNK = 16             # experts staged on the device at a time
    # where a one-token step's host round trip spends its time: a list set here (by a profiler,
    # ``benchmarks/oneoff/cpu_tier_profile.py``) gets one tuple of ``time.perf_counter()`` stamps a
    # run on CUDA: (start, side kernel launched, sync reached, synced, CPU experts done, end);
    # None (the default): nothing is read or kept
    clock: list | None = None

    def __init__(self, packed, blocks=None):
        self.packed = packed
        self.blocks = blocks           # (gate, up, down) host BlockStacks: what large batches read
        self.last_gpu_share = 0        # of the last one-token step's k experts, those the GPU computed

    def _requested_share(self) -> int:
        """``KVBENCH_CPU_MOE_GPU_SHARE`` as set now, where this layer could apply it (blocks kept)."""
        from . import settings
        return int(settings.get("KVBENCH_CPU_MOE_GPU_SHARE")) if self.blocks is not None else 0

    def gpu_share(self, device) -> int:
        """How many of a one-token step's experts the GPU takes (``KVBENCH_CPU_MOE_GPU_SHARE``, read
        now): only on CUDA and where the layer keeps its blocks (pinned, readable in place)."""
        return self._requested_share() if torch.device(device).type == "cuda" else 0

    @staticmethod
    def native_requested(blocks_kept: bool = True) -> bool:
        """Whether one-token steps go through ``engine.native``, read now: ``KVBENCH_CPU_MOE_NATIVE``
        when set (1 where the layer keeps no blocks raises at the step), else ``native.default_on()``
        for a layer that keeps its Q4_0 blocks."""
        from . import settings
        v = settings.get("KVBENCH_CPU_MOE_NATIVE")
        if v is not None:
            return bool(v)
        if not blocks_kept:
            return False
        from . import native
        return native.default_on()[0]

    @property
    def uses_native(self) -> bool:
        """This layer's one-token steps through ``engine.native`` (``native_requested``)."""
        return self.native_requested(self.blocks is not None)

    def node_ready(self, device) -> bool:
        """Whether a captured step can run this layer's one-token step as a CUDA host node
        (``node``): on CUDA, through ``engine.native`` over the kept blocks, no GPU share."""
        return (torch.device(device).type == "cuda" and self.blocks is not None and self.uses_native
                and self.gpu_share(device) == 0)

    @staticmethod
    def _stage_src(h: torch.Tensor, top_e: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """One float32 vector on ``h``'s device: the rows, the weights, the expert ids (the host
        stage's layout, which ``kvb_run_job`` reads too)."""
        return torch.cat([h.detach().reshape(-1).float(), top_p.reshape(-1).float(), top_e.reshape(-1).float()])

    def prepare_node(self, k: int):
        """This layer's ``native.HostJob`` for k experts a token at torch's thread count now, made
        before a capture (its page-locked buffers are not allocated while a stream is capturing)
        and kept while k and the thread count stay."""
        from . import native
        job = self.__dict__.get("_job")
        if job is None or job.k != k or job.threads != torch.get_num_threads():
            job = self._job = native.HostJob(*self.blocks, k=k)
        return job

    def node(self, h: torch.Tensor, top_e: torch.Tensor, top_p: torch.Tensor, doorbell=None) -> torch.Tensor:
        """Queue this layer's one-token step on the current CUDA stream, with no host sync and no
        Python when it runs (what a captured step records as three nodes): the row and routing
        copied into the job's page-locked stage, ``engine.native``'s host function
        (``native.HostJob``), its output copied back; returns that output [1, d] float32 on
        ``h``'s device. ``doorbell`` (``(native.Doorbell, i)``): instead of the host function, ring
        flag ``i`` and wait for the host thread's answer (it runs the job). Call only where
        ``node_ready``."""
        job = self.prepare_node(top_e.numel())
        src = self._stage_src(h, top_e, top_p)
        job.stage.copy_(src, non_blocking=True)
        if doorbell is None:
            job.launch(torch.cuda.current_stream(h.device))
        else:
            doorbell[0].ring_and_wait(doorbell[1], torch.cuda.current_stream(h.device))
        y = torch.empty(1, h.shape[-1], dtype=torch.float32, device=h.device)
        return y.copy_(job.out.view(1, -1), non_blocking=True)

    def _native_row(self, h: torch.Tensor, ids: list[int], weights: list[float]) -> torch.Tensor:
        """One host row [1, d] through ``ids`` with ``engine.native`` over the layer's Q4_0 blocks."""
        from . import native
        from .errors import ConfigError
        if self.blocks is None:
            raise ConfigError("KVBENCH_CPU_MOE_NATIVE: this cpu-tier layer keeps no Q4_0 blocks to read",
                              "unset KVBENCH_CPU_MOE_NATIVE")
        return native.moe_q4_decode(h, ids, weights, *self.blocks).reshape(1, -1)

    @property
    def math(self) -> str:
        m = self.packed.math
        if self.uses_native:
            from . import native
            m = f"one-token steps: {native.MATH}; batches: {m}"
        m += ("; batches of >= %d rows on the device from the blocks (float32)"
              % self.OFFLOAD_ROWS if self.blocks is not None else "")
        n = self._requested_share()
        if n:
            m += (f"; on CUDA, {n} of each token's experts computed by the GPU from the pinned blocks over "
                  "PCIe (float32 block maths) while the CPU computes the rest (KVBENCH_CPU_MOE_GPU_SHARE)")
        return m

    def resident_blocker(self, device) -> str | None:
        return None                  # nothing to fetch: the experts compute where they are

    def resident_view(self):
        return None

    def make_resident(self):
        return None

    def tensors(self):
        blocks = [t for st in self.blocks for t in st.tensors()] if self.blocks is not None else []
        return self.packed.tensors() + blocks

    def run(self, h: torch.Tensor, top_e: torch.Tensor, top_p: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [T, d]: rows ``h`` [T, d] through their experts ``top_e`` [T, k] weighted
        ``top_p`` [T, k]; written into ``out`` (on ``h``'s device) when given. A batch of
        ``OFFLOAD_ROWS`` or more on a GPU (a prefill) runs there instead, as llama.cpp does:
        the chosen experts' blocks go up ``OFFLOAD_CHUNK`` at a time (``on_device``)."""
        T, k = top_e.shape
        if self.blocks is not None and T >= self.OFFLOAD_ROWS and h.device.type != "cpu":
            y = self.on_device(h, top_e, top_p)
            return y if out is None else out.copy_(y)
        if h.device.type == "cpu":
            if T == 1 and self.uses_native:
                y = self._native_row(h.detach().float(), top_e[0].tolist(), top_p[0].float().tolist())
            else:
                y = self.packed.rows(h.detach().float(), top_e.tolist(), top_p.float().tolist())
            return y if out is None else out.copy_(y)
        share = min(self.gpu_share(h.device), k) if T == 1 else 0
        self.last_gpu_share = share
        stamps = None if CpuExperts.clock is None else [time.perf_counter()]
        if share:
            return self._split_run(h, top_e, top_p, share, out, stamps)
        if stamps is not None:
            stamps.append(stamps[0])                     # no side kernel
        return self._on_host(h, top_e, top_p, 0, out, stamps)

    def _on_host(self, h: torch.Tensor, top_e: torch.Tensor, top_p: torch.Tensor, first: int,
                 out: torch.Tensor | None, stamps: list | None = None) -> torch.Tensor:
        """Rows ``h`` through each row's experts ``top_e[:, first:]`` on the host CPU: one device ->
        host transfer of rows and routing through a pinned stage, one sync of the current stream,
        the int4 path, the result back through a pinned stage into ``out`` (on ``h``'s device)."""
        T, k = top_e.shape
        src = self._stage_src(h, top_e, top_p)
        stage = self._pinned("_in", src.numel())
        stage.copy_(src, non_blocking=True)
        if stamps is not None:
            stamps.append(time.perf_counter())
        torch.cuda.current_stream(h.device).synchronize()
        if stamps is not None:
            stamps.append(time.perf_counter())
        n = h.numel()
        ids = stage[n + T * k:].reshape(T, k)[:, first:].long().tolist()
        wts = stage[n:n + T * k].reshape(T, k)[:, first:].tolist()
        if T == 1 and self.uses_native:
            y = self._native_row(stage[:n], ids[0], wts[0])
        else:
            y = self.packed.rows(stage[:n].reshape(T, -1), ids, wts)
        if stamps is not None:
            stamps.append(time.perf_counter())
        # back through a pinned stage too; the next run's sync orders its reuse after this copy
        back = self._pinned("_out", y.numel()).view(y.shape)
        back.copy_(y)
        out = torch.empty(y.shape, dtype=torch.float32, device=h.device) if out is None else out
        out = out.copy_(back, non_blocking=True)
        if stamps is not None and CpuExperts.clock is not None:
            CpuExperts.clock.append(tuple(stamps) + (time.perf_counter(),))
        return out

    def _split_run(self, h: torch.Tensor, top_e: torch.Tensor, top_p: torch.Tensor, share: int,
                   out: torch.Tensor | None, stamps: list | None = None) -> torch.Tensor:
        """One token on CUDA, its experts split: the first ``share`` of ``top_e`` on the GPU (the
        blocks kernel reading the pinned host blocks over PCIe, launched on a side stream before
        the routing sync, so it runs while the CPU computes), the rest on the CPU's int4 path
        (``_on_host``, whose sync waits for the current stream only); the two [1, d] sums added
        on ``h``'s device."""
        from .kernels.moe_blocks import moe_decode_blocks
        main = torch.cuda.current_stream(h.device)
        side = self.__dict__.get("_side")
        if side is None or side.device != h.device:
            side = self._side = torch.cuda.Stream(h.device)
        side.wait_stream(main)                               # h and the routing are ready there
        for t in (h, top_e, top_p):                          # read on the side stream: not reused
            t.record_stream(side)                            # by main before the side is done
        with torch.cuda.stream(side):
            y_gpu = moe_decode_blocks(h.detach().reshape(1, -1).float(), *self.blocks,
                                      top_e[0, :share], top_p[0, :share])
        y_gpu.record_stream(main)
        if stamps is not None:
            stamps.append(time.perf_counter())
        if share < top_e.shape[1]:
            out = self._on_host(h, top_e, top_p, share, out, stamps)
        else:
            out = torch.zeros(1, h.shape[-1], dtype=torch.float32, device=h.device) if out is None else out.zero_()
        main.wait_stream(side)
        return out.add_(y_gpu)

    def _pinned(self, name: str, n: int) -> torch.Tensor:
        """A page-locked float32 staging buffer of at least ``n`` values, kept between runs."""
        buf = self.__dict__.get(name)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=torch.float32, pin_memory=True)
            self.__dict__[name] = buf
        return buf[:n]

    def on_device(self, h: torch.Tensor, top_e: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """The rows through their experts on ``h``'s device, from the host blocks: float32 maths
        on the exact block values (as ``BlockExperts``' prefill), in ascending expert id."""
        return experts_on_device(h, top_e, top_p, self.blocks, self.OFFLOAD_CHUNK)


def experts_over_rows(h: torch.Tensor, top_e: torch.Tensor, top_p: torch.Tensor, experts, get,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``h`` [T, d] through their routed experts, one expert at a time over the rows that
    chose it: ``get(e)`` gives expert ``e``'s (gate, up, down) float rows; ``experts`` the ids to
    visit, in order. Added into ``out`` (default zeros like ``h``)."""
    out = torch.zeros_like(h) if out is None else out
    # each expert's (row, slot) pairs from one stable sort and one read-back, instead of a
    # nonzero() (a host sync on CUDA) per expert; rows stay ascending, as nonzero gave them
    k = top_e.shape[1]
    order = torch.argsort(top_e.reshape(-1), stable=True)
    ids, counts = torch.unique(top_e, return_counts=True)
    ends = torch.cumsum(counts, 0)
    span = {e: (b - c, b) for e, c, b in zip(*torch.stack([ids, counts, ends]).tolist())}
    for e in experts:
        if e not in span:                # chosen by no row (callers pass chosen ids): nothing to add
            continue
        seg = order[span[e][0]:span[e][1]]
        rows, slot = seg // k, seg % k
        gate, up, down = get(e)
        he = h[rows]
        y = mm(F.silu(mm(he, gate)) * mm(he, up), down)
        out.index_add_(0, rows, (y * top_p[rows, slot, None]).to(out.dtype))
    return out


def expert_rows(stack, s: int) -> torch.Tensor:
    """Expert ``s`` of a stack: a view of a float stack, or a block stack's rows dequantised."""
    return stack[s] if torch.is_tensor(stack) else stack.rows(s)


def mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, in] float32 @ w[out, in].T; weights stored narrower (bf16/f16) compute in their
    dtype with fp32 accumulation and come back as float32. Activations already in the weights'
    narrow dtype (the fast prefill path over bf16 weights) stay in it; narrow activations that
    reach float32 weights (a mixed placement) are widened, and float32 goes on from there. A
    Q8_0 matrix (int8, ``engine.qweights``) computes in float32 over its exact values. On a
    CPU without native bf16/f16 (``cpu_has_native``), ``WIDE_MM_MIN_ROWS`` rows or more
    multiply the same narrow values widened to float32 (``_mm_widened``): same products,
    one rounding of the result to the narrow dtype, several times faster there."""
    if w.dtype == torch.int8:
        return qweights.mm(x, w)
    if w.dtype == torch.float32:
        return (x if x.dtype == torch.float32 else x.float()) @ w.T
    if w.device.type == "cpu" and x.numel() >= WIDE_MM_MIN_ROWS * x.shape[-1] and not cpu_has_native(w.dtype):
        y = _mm_widened(x.to(w.dtype), w)
    else:
        y = x.to(w.dtype) @ w.T
    return y if x.dtype == w.dtype else y.float()


# A CPU without bf16/f16 arithmetic (AVX2: no AVX512-BF16/AMX, no AVX512-FP16) multiplies
# narrow matrices in a scalar-ish path that costs per row: on a 2-core EPYC (AVX2), torch 2.13
# took 204 ms for [4224, 256] @ bf16 [1024, 256].T against 27 ms widened to float32 (from 8
# rows up widening wins; below it the narrow product reads half the bytes and is faster).
WIDE_MM_MIN_ROWS = 8


@functools.cache
def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` (bf16 / f16) natively (oneDNN's own test)."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):    # a torch without the probe: keep the narrow product
        return True
    return True


def _mm_widened(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for narrow ``x`` and ``w`` (same dtype) computed over their exact float32
    values and rounded once to the narrow dtype: the narrow product's maths (exact products,
    float32 sums, one rounding) in another summation order. Widens ``qweights.MM_CHUNK_BYTES``
    of weight rows at a time, so an output head of 150k rows never needs its float32 copy."""
    n, k = w.shape
    return qweights.rows_mm(x.float(), n, k, lambda r0, r1: w[r0:r1].float(), w.dtype)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype != torch.float32:    # narrow activations: the statistic in float32, as HF's norms
        from . import kernels
        if x.dtype == torch.bfloat16 and kernels.use_triton(x.device):   # the fast prefill: one launch
            from .kernels import rows
            return rows.rms_norm_rows(x, w, eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w.to(x.dtype)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class Rope:
    """Rotary tables for positions [0, n); ``apply(x [T, H, D], start)``."""

    def __init__(self, head_dim: int, base: float, kind: str, n: int, device="cpu"):
        self.kind, self.head_dim, self.base = kind, head_dim, base
        self.cos = self.sin = None
        self._build(n, device)

    def _build(self, n: int, device):
        inv = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
        ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]   # [n, D/2]
        self.cos = ang.cos().to(torch.float32).to(device)
        self.sin = ang.sin().to(torch.float32).to(device)

    def ensure(self, n: int) -> None:
        """Tables for positions [0, n) (``apply_at`` never grows them: it cannot see the position)."""
        if n > self.cos.shape[0]:
            self._build(max(n, 2 * self.cos.shape[0]), self.cos.device)

    def apply(self, x: torch.Tensor, start: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """RoPE at positions start..: float32 rows (the tables' dtype); ``out_dtype=bfloat16``: those
        rounded to bfloat16 (where the row kernel runs, in its launch)."""
        T = x.shape[0]
        self.ensure(start + T)
        from . import kernels
        if x.dtype == torch.bfloat16 and kernels.use_triton(x.device):   # the fast prefill: one launch
            from .kernels import rows
            return rows.rope_rows(x, self.cos, self.sin, start, self.kind, out_dtype or torch.float32)
        if out_dtype is not None:
            return self._rotate(x, self.cos[start:start + T, None, :], self.sin[start:start + T, None, :]).to(out_dtype)
        return self._rotate(x, self.cos[start:start + T, None, :], self.sin[start:start + T, None, :])

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rotate(x, cos, sin, self.kind)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kind: str) -> torch.Tensor:
    """RoPE on x [T, H, D] with cos, sin [T, 1, D/2]: "neox" halves or "norm" adjacent pairs."""
    if kind == "neox":
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]         # "norm": adjacent pairs
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


def _allow_recompiles(limit: int = 512) -> None:
    """Each model's compiled decode functions are ``functools.partial`` s over its spec, and
    dynamo keys them all on one wrapper frame: a process that compiles several models (a
    nightly suite, the GPU tests) would hit dynamo's default limit of 8 entries, which with
    ``fullgraph=True`` is a hard failure. Raise the limits (never lower them)."""
    import torch._dynamo as dynamo
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(int(getattr(dynamo.config, name)), limit))


def decode_embed(s: ModelSpec, table, token):
    """The token's embedding row gathered on the table's device: ``token`` [1] long -> float32
    [1, d], scaled as ``Transformer.embed_tokens`` does (bit for bit the same row)."""
    x = table.index_select(0, token)
    if x.dtype == torch.int8:                 # Q8_0 rows (engine.qweights)
        x = qweights.dequantize(x)
    if s.embed_scale:
        x = x * torch.tensor(s.d_model ** 0.5, dtype=x.dtype)
    return x.float()


def decode_pre_attention(s: ModelSpec, x, attn_norm, wq, wk, wv, wqkv, q_norm, k_norm, cos, sin, pos):
    """Decode step, before attention: norm, q/k/v (one matmul over ``wqkv`` when given, else
    three), q/k norms, RoPE at the position held by ``pos`` (gathered from the ``cos``/``sin``
    tables). x [1, d] -> q [1, Hq, D], k, v [1, Hkv, D]."""
    h = rms_norm(x, attn_norm, s.rms_eps)
    q, k, v = qkv_proj(s, h, wq, wk, wv, wqkv)
    return decode_qk_rope(s, q, k, v, q_norm, k_norm, cos, sin, pos)


def decode_qkv_rope(s: ModelSpec, qkv, q_norm, k_norm, cos, sin, pos):
    """``decode_pre_attention`` after its projection, from the fused projection qkv [1, q+2kv]
    (``engine.kernels.gemv``'s output): q/k norms and RoPE -> (q, k, v) as
    ``decode_pre_attention`` returns them, except that without q/k norms q and k rotate as one
    tensor and come back as (qk [1, Hq + Hkv, D], None, v): the caller takes q and k as views
    of it (returned apart, inductor wrote each with a kernel of its own). The same element-wise
    maths either way."""
    if s.qk_norm == "none":
        qk = qkv[:, :s.q_dim + s.kv_dim].view(1, s.n_heads + s.n_kv_heads, s.head_dim)
        c, sn = cos.index_select(0, pos)[:, None, :], sin.index_select(0, pos)[:, None, :]
        return rotate(qk, c, sn, s.rope_type), None, qkv[:, s.q_dim + s.kv_dim:].reshape(1, s.n_kv_heads, s.head_dim)
    q, k, v = qkv.split([s.q_dim, s.kv_dim, s.kv_dim], dim=-1)
    return decode_qk_rope(s, q, k, v, q_norm, k_norm, cos, sin, pos)


def decode_qk_rope(s: ModelSpec, q, k, v, q_norm, k_norm, cos, sin, pos):
    """The decode step's q/k norms and RoPE at the position held by ``pos``: q [1, q_dim],
    k, v [1, kv_dim] -> q [1, Hq, D], k, v [1, Hkv, D]."""
    if s.qk_norm == "full":
        q, k = rms_norm(q, q_norm, s.rms_eps), rms_norm(k, k_norm, s.rms_eps)
    q = q.view(1, s.n_heads, s.head_dim)
    k = k.view(1, s.n_kv_heads, s.head_dim)
    v = v.view(1, s.n_kv_heads, s.head_dim)
    if s.qk_norm == "head":
        q, k = rms_norm(q, q_norm, s.rms_eps), rms_norm(k, k_norm, s.rms_eps)
    c, sn = cos.index_select(0, pos)[:, None, :], sin.index_select(0, pos)[:, None, :]
    return rotate(q, c, sn, s.rope_type), rotate(k, c, sn, s.rope_type), v.contiguous()


def decode_post_attention(s: ModelSpec, x, o, wo, post_attn_norm, ffn_norm, w_gate, w_up, w_down, post_ffn_norm,
                          w_gu=None):
    """Decode step, after attention: output projection, residual, dense FFN, residual. With
    ``w_gu`` (fused [2 ff, d]) gate and up come from one matmul, split along the columns (the
    same products: each output is one row's dot)."""
    a = mm(o.reshape(1, s.q_dim), wo)
    if post_attn_norm is not None:
        a = rms_norm(a, post_attn_norm, s.rms_eps)
    x = x + a
    h = rms_norm(x, ffn_norm, s.rms_eps)
    if w_gu is None:
        gate, up = mm(h, w_gate), mm(h, w_up)
    else:
        gate, up = mm(h, w_gu).split([w_gate.shape[0], w_up.shape[0]], dim=-1)
    gate = F.gelu(gate, approximate="tanh") if s.ffn_act == "gelu_tanh" else F.silu(gate)
    y = mm(gate * up, w_down)
    if post_ffn_norm is not None:
        y = rms_norm(y, post_ffn_norm, s.rms_eps)
    return x + y


def moe_route(s: ModelSpec, h, router):
    """Router softmax and top-k for h [T, d]: (top_p [T, k] float32, top_e [T, k] long),
    renormalised over the k when the spec says so."""
    probs = torch.softmax(mm(h, router), dim=-1)           # [T, E]
    top_p, top_e = probs.topk(s.n_experts_used, dim=-1)
    if s.moe_norm_topk:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    return top_p, top_e


def moe_route_forced(s: ModelSpec, h, router, experts):
    """``moe_route`` with the experts given (experts [T, k] long) instead of chosen: the same
    router softmax, gathered at those experts and renormalised the same way. With the experts
    ``moe_route`` would choose, bit for bit: the k are put in descending probability, topk's
    order, so the renormalising sum adds them in the same order."""
    probs = torch.softmax(mm(h, router), dim=-1)           # [T, E]
    top_p, order = probs.gather(-1, experts).sort(dim=-1, descending=True, stable=True)
    experts = experts.gather(-1, order)
    if s.moe_norm_topk:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    return top_p, experts


def decode_post_attention_moe(s: ModelSpec, x, o, wo, post_attn_norm, ffn_norm, router):
    """Decode step, after attention, for a MoE layer: output projection, residual, FFN norm and
    routing. Returns (x [1, d] with the attention residual, h [1, d] normed FFN input,
    top_p [k], top_e [k]); the experts themselves run in ``engine.kernels.moe``."""
    a = mm(o.reshape(1, s.q_dim), wo)
    if post_attn_norm is not None:
        a = rms_norm(a, post_attn_norm, s.rms_eps)
    x = x + a
    h = rms_norm(x, ffn_norm, s.rms_eps)
    top_p, top_e = moe_route(s, h, router)
    return x, h, top_p[0], top_e[0]


def decode_post_attention_moe_logits(s: ModelSpec, x, o, wo, post_attn_norm, ffn_norm, router):
    """``decode_post_attention_moe`` up to the router logits: (x, h, logits [1, E] float32);
    softmax and top-k then run in ``engine.kernels.route`` (outside the compiled function)."""
    a = mm(o.reshape(1, s.q_dim), wo)
    if post_attn_norm is not None:
        a = rms_norm(a, post_attn_norm, s.rms_eps)
    x = x + a
    h = rms_norm(x, ffn_norm, s.rms_eps)
    return x, h, mm(h, router)


def moe_experts_torch(h, gate, up, down, ids, weights, table=None, residual=None):
    """``engine.kernels.moe.moe_decode`` where Triton does not run (the torch backend, the CPU
    tail): one expert at a time as views of the stacks (no gathered copy), matmuls in the
    stored dtype as ``mm`` does. Reads the ids on the host (a sync on CUDA: not for graphs)."""
    rows = (table[ids] if table is not None else ids).tolist()
    y = torch.zeros_like(h) if residual is None else residual
    for s, p in zip(rows, weights.float().tolist()):
        g, u, dn = expert_rows(gate, s), expert_rows(up, s), expert_rows(down, s)
        y = y + p * mm(F.silu(mm(h, g)) * mm(h, u), dn)
    return y


def decode_head(s: ModelSpec, x, out_norm, output):
    """Final norm, output projection (softcap) and the greedy token: (logits [V] f32, argmax)."""
    logits = mm(rms_norm(x, out_norm, s.rms_eps), output)
    if s.final_softcap:
        logits = torch.tanh(logits / s.final_softcap) * s.final_softcap
    logits = logits[0].float()
    return logits, logits.argmax()


GEMV_DTYPES = (torch.float32, torch.bfloat16, torch.int8)   # weights engine.kernels.gemv reads (int8: Q8_0)


class Transformer:
    def __init__(self, spec: ModelSpec, layers: list[LayerWeights], embed: torch.Tensor,
                 out_norm: torch.Tensor, output: torch.Tensor, layer_devices: list[torch.device],
                 head_device: torch.device):
        self.spec = spec
        self.layers = layers
        self.embed = embed                  # [V, d] on host
        self.embed_device = None            # [V, d] on the device: a copy (plan.embed_tier "trunk"), a view
                                            # of the page-locked host table ("mapped"), or None
        self.out_norm = out_norm
        self.output = output                # [V, d] (tied: same storage as embed)
        self.layer_devices = layer_devices
        self.head_device = head_device
        self.ropes: dict[tuple[torch.device, float], Rope] = {}
        self._decode_fns = None
        self.route_log: list | None = None  # (layer, experts [T, k] ascending) per MoE call while a list
        self.route_force: dict | None = None  # layer -> experts [T_all, k] to use instead of the top-k
        self._route_start = 0               # position of the forward's first token (route_force rows)
        # the attention kernel's precision (engine.attn_math): "exact", or "ggml-cpu" (the query
        # converted to the K cache's dot type before K·Q, as llama.cpp's CPU kernels do)
        self.attn_math = attn_math.DEFAULT
        # how prefills (T > 1) attend (engine.Engine.set_prefill_path): "exact" (the cache's own
        # kernels, float32 maths) or "fast" (bfloat16 SDPA: throughput numbers only)
        self.prefill_path = "exact"
        self.scale = spec.scale

    def _rope(self, device, base: float | None = None) -> Rope:
        base = self.spec.rope_base if base is None else base
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:   # "cuda" and "cuda:0" must share one table
            dev = torch.device("cuda", torch.cuda.current_device())
        key = (dev, base)
        if key not in self.ropes:
            self.ropes[key] = Rope(self.spec.head_dim, base, self.spec.rope_type, 4096, device=key[0])
        return self.ropes[key]

    def _qkv(self, i: int, x: torch.Tensor):
        """Layer ``i``'s q [T, Hq, D], k, v [T, Hkv, D] for rows x [T, d]: norm, projections,
        QK norms; before RoPE (each row is its own: rows never mix)."""
        s, w = self.spec, self.layers[i]
        T = x.shape[0]
        h = rms_norm(x, w.attn_norm, s.rms_eps)
        q, k, v = qkv_proj(s, h, w.wq, w.wk, w.wv, w.wqkv if fused_qkv_on() else None)
        if s.qk_norm == "full":
            q, k = rms_norm(q, w.q_norm, s.rms_eps), rms_norm(k, w.k_norm, s.rms_eps)
        q = q.reshape(T, s.n_heads, s.head_dim)
        k = k.reshape(T, s.n_kv_heads, s.head_dim)
        v = v.reshape(T, s.n_kv_heads, s.head_dim).contiguous()
        if s.qk_norm == "head":
            q, k = rms_norm(q, w.q_norm, s.rms_eps), rms_norm(k, w.k_norm, s.rms_eps)
        return q, k, v

    def _attn_out(self, i: int, o: torch.Tensor) -> torch.Tensor:
        """Attention output rows o [T, Hq, D] -> [T, d]: o-projection and post-attention norm."""
        s, w = self.spec, self.layers[i]
        o = mm(o.reshape(o.shape[0], s.q_dim), w.wo)
        return o if w.post_attn_norm is None else rms_norm(o, w.post_attn_norm, s.rms_eps)

    def _attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, cache,
                out_dtype: torch.dtype = torch.float32):
        """Rotated q, k [T, H, D] of one sequence at ``start``: store k, v in ``cache``, attend
        (rows of ``out_dtype`` from the fast path; the cache's own attention is float32)."""
        T = q.shape[0]
        cache.write(start, k, v)
        if self.attn_math != "exact":
            q = attn_math.q_for_k(q, cache.k_format, self.attn_math)
        window = self.spec.window(i)
        if T > 1 and self.prefill_path == "fast":
            return cache.attend_fast(q, start, self.scale, window=window or None, out_dtype=out_dtype)
        return cache.attend(q, start, self.scale, window=window or None)    # [T, Hq, D]

    def attention(self, i: int, x: torch.Tensor, start: int, cache) -> torch.Tensor:
        q, k, v = self._qkv(i, x)
        rope = self._rope(x.device, self.spec.rope_base_of(i))
        # float32 (the tables are); the fast prefill's q goes to bf16 SDPA: rounded in RoPE's launch
        q_dt = x.dtype if x.dtype != torch.float32 and self.attn_math == "exact" else None
        q, k = rope.apply(q, start, q_dt), rope.apply(k, start)
        if x.dtype != torch.float32:        # fast prefill, bf16 activations: the cache takes float32
            k, v = k.float(), v.float()
            return self._attn_out(i, self._attend(i, q, k, v, start, cache, out_dtype=x.dtype).to(x.dtype))
        return self._attn_out(i, self._attend(i, q, k, v, start, cache))

    def attention_rows(self, i: int, x: torch.Tensor, starts: list[int], caches: list, live: list[int]):
        """Layer ``i``'s attention for B sequences, one new token each: x [B, d], row b at
        position ``starts[b]`` of its own cache ``caches[b]``. Norms and projections run over
        all B rows at once; RoPE, the cache write and attention per sequence, through the same
        cache calls as ``attention``. Rows not in ``live`` (finished sequences) attend to
        nothing (zeros) and write nothing, so B, and with it every matmul's shape, stays fixed."""
        s = self.spec
        q, k, v = self._qkv(i, x)
        rope = self._rope(x.device, s.rope_base_of(i))
        rope.ensure(max(starts) + 1)
        at = torch.tensor(starts, device=rope.cos.device)
        cos, sin = rope.cos[at, None, :], rope.sin[at, None, :]
        q, k = rope._rotate(q, cos, sin), rope._rotate(k, cos, sin)
        o = torch.zeros_like(q)
        for b in live:
            o[b] = self._attend(i, q[b:b + 1], k[b:b + 1], v[b:b + 1], starts[b], caches[b])[0]
        return self._attn_out(i, o)

    def ffn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        s, w = self.spec, self.layers[i]
        h = rms_norm(x, w.ffn_norm, s.rms_eps)
        if w.router is not None:
            if h.dtype != torch.float32:    # fast prefill's bf16 activations: routing stays float32
                return self.moe(i, h.float()).to(h.dtype)
            return self.moe(i, h)
        w_gu = getattr(w, "w_gu", None)
        if h.dtype == torch.bfloat16 and w_gu is not None and w_gu.dtype == torch.bfloat16 and s.ffn_act != "gelu_tanh":
            from . import kernels
            if kernels.use_triton(h.device):    # the fast prefill: one projection, one activation launch
                from .kernels import rows
                y = mm(rows.silu_mul_rows(mm(h, w_gu)), w.w_down)
                return y if w.post_ffn_norm is None else rms_norm(y, w.post_ffn_norm, s.rms_eps)
        gate = mm(h, w.w_gate)
        gate = F.gelu(gate, approximate="tanh") if s.ffn_act == "gelu_tanh" else F.silu(gate)
        y = mm(gate * mm(h, w.w_up), w.w_down)
        return y if w.post_ffn_norm is None else rms_norm(y, w.post_ffn_norm, s.rms_eps)

    def moe(self, i: int, h: torch.Tensor) -> torch.Tensor:
        s, w = self.spec, self.layers[i]
        if self.route_force is not None:    # Engine.routed_logits(routes=...): experts given, weights ours
            rows = self.route_force[i][self._route_start:self._route_start + h.shape[0]]
            top_p, top_e = moe_route_forced(s, h, w.router, rows.to(h.device))
        else:
            top_p, top_e = moe_route(s, h, w.router)             # [T, k]
        if self.route_log is not None:      # Engine.routed_logits: which experts each position chose
            self.route_log.append((i, top_e.sort(dim=-1).values))
        if getattr(w.experts, "host_compute", False):          # cpu_moe: the experts run on the host CPU
            return w.experts.run(h, top_e, top_p).to(h.dtype)
        if h.shape[0] == 1:
            return self._moe_one(i, h, top_p[0], top_e[0])
        if hasattr(w.experts, "over_rows"):                     # host blocks the device reads
            return w.experts.over_rows(h, top_e, top_p)
        # Visit experts in ascending id so the cache access order is deterministic.
        return experts_over_rows(h, top_e, top_p, torch.unique(top_e).tolist(), lambda e: w.experts.get(i, e))

    @staticmethod
    def _moe_kernel(device):
        """The one-token expert op for ``device``: the Triton kernels (over float stacks or GGUF
        block stacks, by what the stacks are), or the torch stand-in."""
        from . import kernels
        if kernels.use_triton(device):
            from .kernels.moe import moe_decode
            from .kernels.moe_blocks import moe_decode_blocks

            def run(h, gate, up, down, ids, weights, table=None, residual=None):
                op = moe_decode if torch.is_tensor(gate) else moe_decode_blocks
                return op(h, gate, up, down, ids, weights, table=table, residual=residual)
            return run
        return moe_experts_torch

    def host_expert_layers(self) -> list[int]:
        """MoE layers whose experts compute on the host CPU (``CpuExperts``)."""
        return [i for i in self.spec.moe_layers if getattr(self.layers[i].experts, "host_compute", False)]

    def experts_not_resident(self, device) -> str | None:
        """Why some MoE layer's experts cannot be read on ``device`` without the host (the
        device-routed decode's condition), or None."""
        for i in self.spec.moe_layers:
            why = self.layers[i].experts.resident_blocker(device)
            if why:
                return f"MoE layer {i}: {why}"
        return None

    def make_experts_resident(self) -> list:
        """Every MoE layer's experts readable on the device with no host step (an expert cache
        that can hold them all copies the missing ones in); returns the caches made resident."""
        caches = []
        for i in self.spec.moe_layers:
            c = self.layers[i].experts.make_resident()
            if c is not None and all(c is not d for d in caches):
                caches.append(c)
        return caches

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T] -> float32 [T, d], scaled as the arch says: gathered on the first layer's
        device when a table is there (``embed_table``: the static step's device copy or a tied
        head's; the same values), else on the host table's device (prefill then copies T rows
        up instead of T ids: 3.9 ms of a 75 ms SmolLM2 prefill at 16384 on the H200)."""
        table = self.embed_table(self.layer_devices[0]) if self.layer_devices else None
        table = self.embed if table is None else table
        x = table[tokens.to(table.device)]
        if x.dtype == torch.int8:           # Q8_0 rows (engine.qweights)
            x = qweights.dequantize(x)
        if self.spec.embed_scale:   # HF Gemma: times sqrt(d_model) cast to the embedding dtype
            x = x * torch.tensor(self.spec.d_model ** 0.5, dtype=x.dtype)
        return x.float()

    def _decode_functions(self, compiled: bool):
        """(pre, post, head, post_moe, post_moe_logits, embed, qkv_rope): the step's maths as partials over
        the spec, through ``torch.compile`` when ``compiled`` (built once per mode)."""
        if self._decode_fns is None or self._decode_fns[0] != compiled:
            fns = [functools.partial(f, self.spec) for f in (
                decode_pre_attention, decode_post_attention, decode_head, decode_post_attention_moe,
                decode_post_attention_moe_logits, decode_embed, decode_qkv_rope)]
            if compiled:
                _allow_recompiles()
                fns = [torch.compile(f, dynamic=False, fullgraph=True) for f in fns]
            self._decode_fns = (compiled, *fns)
        return self._decode_fns[1:]

    def embed_table(self, device) -> torch.Tensor | None:
        """The [V, d] embedding table readable on ``device`` with no host step, or None: the host
        table itself on a CPU device, else the device copy (``embed_device``), else a tied head's
        own copy of ``token_embd`` on that device (same dtype, same values)."""
        dev = torch.device(device)

        def on(t):
            return t is not None and t.device.type == dev.type and (
                dev.index is None or t.device.index is None or t.device.index == dev.index)
        for t in (self.embed, self.embed_device):
            if on(t):
                return t
        if self.spec.tied_output and on(self.output) and self.output.dtype == self.embed.dtype \
                and self.output.shape == self.embed.shape:
            return self.output
        return None

    def decode_embed(self, token: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        """``token`` [1] long on a device holding an ``embed_table`` -> float32 [1, d] there."""
        table = self.embed_table(token.device)
        if table is None:
            raise ValueError(f"decode_embed: no embedding table on {token.device}")
        return self._decode_functions(compiled)[5](table, token)

    def fused_gemv_layers(self, device) -> list[bool]:
        """Per layer: does ``decode_at(fused_gemv=True)`` run it through ``engine.kernels.gemv``
        on ``device``? Where Triton runs, weights are float32 or bfloat16 and the layer holds
        ``wqkv`` (its norm and q/k/v in one launch; a dense FFN without post norms, with
        ``w_gu``, also gets its output projection + residual, its FFN norm + gate/up and its
        activation + down + residual in one launch each). Others run the compiled torch maths."""
        from . import kernels
        if not kernels.use_triton(torch.device(device)):
            return [False] * self.spec.n_layers
        return [w.wqkv is not None and w.wqkv.dtype in GEMV_DTYPES
                and w.wqkv.device.type == torch.device(device).type for w in self.layers]

    def rope_append_layers(self, device, caches) -> list[bool]:
        """Per layer: does ``decode_at(rope_append=True)`` rotate q/k and append K/V in one launch
        (``engine.kernels.kv_append.rope_append_at``)? Layers through the gemv kernel (their
        fused q/k/v row), models without q/k norms or with per-head ones (float32 [head_dim]
        weights: the launch norms each head first; a "full" norm spans heads and stays out),
        caches that have ``rope_write_at``, and whole q8_0 blocks per head where a buffer is q8_0."""
        s = self.spec
        gemv_on = self.fused_gemv_layers(device)
        ok = []
        for i, c in enumerate(caches):
            q8_fits = all(f != "q8_0" or s.head_dim % 32 == 0 for f in (getattr(c, "k_format", None),
                                                                      getattr(c, "v_format", None)))
            ok.append(bool(gemv_on[i] and self._rope_append_norm_ok(self.layers[i]) and hasattr(c, "rope_write_at")
                           and s.rope_type in ("neox", "norm") and not s.head_dim & (s.head_dim - 1) and q8_fits))
        return ok

    def _rope_append_norm_ok(self, w) -> bool:
        """The rope+append launch can take this layer's q/k norms: none, or per head in float32."""
        s = self.spec
        if s.qk_norm == "none":
            return True
        return s.qk_norm == "head" and all(t is not None and t.dtype == torch.float32 and tuple(t.shape) == (s.head_dim,)
                                           for t in (w.q_norm, w.k_norm))

    def _dense_gemv(self, w) -> bool:
        """A dense FFN layer whose whole post-attention part runs through the gemv kernel."""
        return (w.router is None and w.w_gu is not None and w.post_attn_norm is None
                and w.post_ffn_norm is None and w.wo.stride(1) == 1 and w.w_down.stride(1) == 1
                and w.wo.dtype == w.w_gu.dtype == w.w_down.dtype == w.wqkv.dtype)

    @staticmethod
    def _moe_gemv(w) -> bool:
        """A MoE layer whose output projection and router run through the gemv kernel."""
        return (w.post_attn_norm is None and w.wo.stride(1) == 1 and w.router.stride(1) == 1
                and w.wo.dtype == w.wqkv.dtype and w.router.dtype in GEMV_DTYPES)

    def decode_at(self, x: torch.Tensor, pos: torch.Tensor, caches, compiled: bool = False,
                  fused_qkv: bool | None = None, route_kernel: bool | None = None,
                  fused_gate_up: bool | None = None, fused_gemv: bool | None = None,
                  rope_append: bool | None = None) -> torch.Tensor:
        """One decode step with the position on the device: ``x`` [1, d] float32 embedded token
        on the trunk device, ``pos`` one-element long tensor there. Every layer on that device
        (sliding-window layers through their caches' ``attend_at(window=)``); no host sync (but
        at layers whose experts run on the host CPU, below), so a CUDA graph can capture it. The maths around
        attention are pure functions of explicit tensors (``decode_pre_attention``,
        ``decode_post_attention`` / ``decode_post_attention_moe``: the same ops as
        ``attention``/``ffn``/``moe``), which ``compiled=True`` runs through ``torch.compile``
        so their element-wise ops fuse into a few kernels. ``fused_qkv`` (default: the
        ``KVBENCH_DECODE_FUSED_QKV`` setting) projects q/k/v with one matmul over a layer's
        ``wqkv`` where it has one. MoE layers route on the device (``route_kernel``, default
        ``KVBENCH_DECODE_ROUTE_KERNEL``: router logits from the compiled function, then
        ``engine.kernels.route``'s softmax/top-k launch; else ``moe_route``'s torch.topk inside
        it) and run ``engine.kernels.moe`` over their resident stacks (``make_experts_resident``
        first: an expert cache's slots through its slot table); the host never sees which
        experts were used (``StaticDecode`` counts them as resident hits). Returns the final
        hidden [1, d]. ``fused_gate_up`` (default ``KVBENCH_DECODE_FUSED_GATE_UP``): a dense FFN's
        gate and up from one matmul over ``w_gu`` where the layer has one. ``fused_gemv`` (default
        ``KVBENCH_DECODE_FUSED_GEMV``): the layers ``fused_gemv_layers`` names run their
        projections through ``engine.kernels.gemv`` with the norms, activation and residual
        adds fused in (the same maths and roundings as ``mm``; only summation order differs).
        ``rope_append`` (default ``KVBENCH_DECODE_ROPE_APPEND``): on the layers
        ``rope_append_layers`` names, RoPE and the K/V append in one launch
        (``rope_write_at``) instead of the compiled rotation and ``write_at``. Layers whose
        experts compute on the host CPU (``CpuExperts``) run there inline; ``decode_steps`` is
        the same step as a generator that hands those layers to its caller instead."""
        return self.with_host_experts(self.decode_steps(
            x, pos, caches, compiled=compiled, fused_qkv=fused_qkv, route_kernel=route_kernel,
            fused_gate_up=fused_gate_up, fused_gemv=fused_gemv, rope_append=rope_append))

    def with_host_experts(self, steps):
        """Run a step generator (``decode_steps``, or one built on it) to its end, answering each
        stop with that layer's host experts; returns what the generator returns."""
        y = None
        while True:
            try:
                i, h, top_e, top_p = steps.send(y)
            except StopIteration as done:
                return done.value
            y = self.layers[i].experts.run(h, top_e, top_p)

    def decode_steps(self, x: torch.Tensor, pos: torch.Tensor, caches, compiled: bool = False,
                     fused_qkv: bool | None = None, route_kernel: bool | None = None,
                     fused_gate_up: bool | None = None, fused_gemv: bool | None = None,
                     rope_append: bool | None = None):
        """``decode_at`` as a generator: at each layer whose experts compute on the host CPU it
        yields ``(i, h, top_e, top_p)`` (device tensors: the normed row [1, d], the routing
        [1, k]) and takes back that layer's expert output [1, d] (float32, on the device) through
        ``send``; it returns the final hidden. Between two yields everything stays on the
        device, so a caller can capture each stretch as its own CUDA graph
        (``engine.cuda_graph.StaticDecode``)."""
        s = self.spec
        fused_qkv = fused_qkv_on() if fused_qkv is None else fused_qkv
        fused_gate_up = fused_gate_up_on() if fused_gate_up is None else fused_gate_up
        if route_kernel is None:
            route_kernel = bool(settings.get("KVBENCH_DECODE_ROUTE_KERNEL"))
        if fused_gemv is None:
            fused_gemv = bool(settings.get("KVBENCH_DECODE_FUSED_GEMV"))
        pre, post, _, post_moe, post_moe_logits, _, qkv_rope = self._decode_functions(compiled)
        run = self._moe_kernel(x.device)
        route = self._route_kernel(x.device) if route_kernel else None
        gemv_on = self.fused_gemv_layers(x.device) if fused_gemv and fused_qkv else [False] * s.n_layers
        if rope_append is None:
            rope_append = bool(settings.get("KVBENCH_DECODE_ROPE_APPEND"))
        # a subset of gemv_on: rope_append_layers asks fused_gemv_layers too
        rope_on = self.rope_append_layers(x.device, caches) if rope_append and any(gemv_on) else [False] * s.n_layers
        if any(gemv_on):
            from .kernels.gemv import gemv
        for i in range(s.n_layers):
            w, rope = self.layers[i], self._rope(x.device, s.rope_base_of(i))
            if rope_on[i]:                               # RoPE + K/V append: one launch
                qkv = gemv(x, w.wqkv, "rms", g=w.attn_norm, eps=s.rms_eps)
                q = caches[i].rope_write_at(pos, qkv, rope.cos, rope.sin, s.n_heads, s.rope_type,
                                            head_norm=None if s.qk_norm == "none" else (w.q_norm, w.k_norm, s.rms_eps))
            else:
                if gemv_on[i]:
                    qkv = gemv(x, w.wqkv, "rms", g=w.attn_norm, eps=s.rms_eps)
                    q, k, v = qkv_rope(qkv, w.q_norm, w.k_norm, rope.cos, rope.sin, pos)
                    if k is None:                        # q and k rotated as one tensor
                        q, k = q[:, :s.n_heads], q[:, s.n_heads:]
                else:
                    q, k, v = pre(x, w.attn_norm, w.wq, w.wk, w.wv, w.wqkv if fused_qkv else None, w.q_norm,
                                  w.k_norm, rope.cos, rope.sin, pos)
                caches[i].write_at(pos, k, v)
            if self.attn_math != "exact":
                q = attn_math.q_for_k(q, caches[i].k_format, self.attn_math)
            o = caches[i].attend_at(q, pos, self.scale, window=s.window(i) or None)
            if gemv_on[i] and fused_gate_up and self._dense_gemv(w):
                x = gemv(o.reshape(1, s.q_dim), w.wo, residual=x)
                gu = gemv(x, w.w_gu, "rms", g=w.ffn_norm, eps=s.rms_eps)
                x = gemv(gu, w.w_down, "gelu_tanh" if s.ffn_act == "gelu_tanh" else "silu", residual=x)
                continue
            if w.router is None:
                x = post(x, o, w.wo, w.post_attn_norm, w.ffn_norm, w.w_gate, w.w_up, w.w_down, w.post_ffn_norm,
                         w.w_gu if fused_gate_up else None)
                continue
            if route is None:
                x, h, top_p, top_e = post_moe(x, o, w.wo, w.post_attn_norm, w.ffn_norm, w.router)
            elif gemv_on[i] and self._moe_gemv(w):
                # output projection + residual, then the router over the normed x with the same
                # norm fused in; the router's launch also writes h, the normed x (the experts' input)
                x = gemv(o.reshape(1, s.q_dim), w.wo, residual=x)
                h = torch.empty_like(x)
                logits = gemv(x, w.router, "rms", g=w.ffn_norm, eps=s.rms_eps, norm_out=h)
                top_p, top_e = route(logits[0], s.n_experts_used, s.moe_norm_topk)
            else:
                x, h, logits = post_moe_logits(x, o, w.wo, w.post_attn_norm, w.ffn_norm, w.router)
                top_p, top_e = route(logits[0], s.n_experts_used, s.moe_norm_topk)
            if getattr(w.experts, "host_compute", False):     # cpu_moe: the caller runs the host experts
                y = yield i, h, top_e.reshape(1, -1), top_p.reshape(1, -1)
                x = x + (y if w.post_ffn_norm is None else rms_norm(y, w.post_ffn_norm, s.rms_eps))
                continue
            view = w.experts.resident_view()
            if view is None:
                raise ValueError(f"decode_at: MoE layer {i}'s experts are not resident "
                                 f"(call make_experts_resident first)")
            gate, up, down, table = view
            if w.post_ffn_norm is None:
                x = run(h, gate, up, down, top_e, top_p, table=table, residual=x)
            else:
                x = x + rms_norm(run(h, gate, up, down, top_e, top_p, table=table), w.post_ffn_norm, s.rms_eps)
        return x

    @staticmethod
    def _route_kernel(device):
        """The device routing op: ``engine.kernels.route``'s Triton launch, or its torch reference."""
        from . import kernels
        from .kernels import route
        return route.route_topk if kernels.use_triton(device) else route.route_topk_ref

    def decode_head(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``head`` for the static decode step (compiled with it): (logits [V] f32, argmax). A
        Q8_0 head goes through ``engine.kernels.gemv`` where Triton runs (its norm fused in),
        so no float32 copy of it is ever made."""
        from . import kernels
        if self.output.dtype == torch.int8 and kernels.use_triton(x.device):
            from .kernels.gemv import gemv
            s = self.spec
            logits = gemv(x, self.output, "rms", g=self.out_norm, eps=s.rms_eps)
            if s.final_softcap:
                logits = torch.tanh(logits / s.final_softcap) * s.final_softcap
            return logits[0], logits[0].argmax()
        return self._decode_functions(self._decode_fns[0])[2](x, self.out_norm, self.output)

    def _moe_one(self, i: int, h: torch.Tensor, top_p: torch.Tensor, top_e: torch.Tensor) -> torch.Tensor:
        """One token's MoE FFN (eager decode): the k experts' rows read in place from their
        stacks by ``engine.kernels.moe`` (no gathered copy). Experts resident in a stack: the
        device picks the rows (no host sync). Behind an expert cache: routing is read on the
        host (the one sync: the SLRU policy decides what to fetch), experts are fetched in
        ascending id as in ``moe`` (same cache accesses, same statistics) and the kernel reads
        their slots; a token whose fetches would evict one of its own experts runs in groups."""
        ex, run = self.layers[i].experts, self._moe_kernel(h.device)
        if not hasattr(ex, "slot_groups"):
            return run(h, ex.gate, ex.up, ex.down, top_e, top_p)
        order = torch.argsort(top_e)
        ids = top_e[order].tolist()                       # the one host sync: routing decides fetches
        p = top_p[order]
        y = None
        for pos, slots in ex.slot_groups(i, ids):
            idx = torch.tensor(slots, dtype=torch.long, device=h.device)
            pj = p if len(pos) == len(ids) else p[torch.tensor(pos, device=p.device)]
            y = run(h, *ex.cache.slots, idx, pj, residual=y)
        return y

    def prefill_act_dtype(self, T: int) -> torch.dtype:
        """The activations' dtype of a T-row ``forward``: bfloat16 on the fast prefill path over
        bf16 or Q8_0 weights (HF's bf16 model: the residual stream, projections and FFN in bf16, norm
        statistics in float32; attention through ``attend_fast``), float32 everywhere else,
        which is every accuracy path."""
        if T > 1 and self.prefill_path == "fast" and self.layers and self.layers[0].wo.dtype in (torch.bfloat16, torch.int8):
            return torch.bfloat16
        return torch.float32

    def forward(self, tokens: torch.Tensor, start: int, caches) -> torch.Tensor:
        """tokens [T] (host) -> final hidden [T, d] on the head device (float32, or bfloat16 on
        the fast prefill path over bf16 weights: ``prefill_act_dtype``)."""
        self._route_start = start
        x = self.embed_tokens(tokens)
        x = x.to(self.prefill_act_dtype(x.shape[0]))
        return self._layers(x, lambda i, x: self.attention(i, x, start, caches[i]))

    def forward_rows(self, tokens: torch.Tensor, starts: list[int], caches: list, live: list[int]) -> torch.Tensor:
        """B sequences, one token each: tokens [B] (host), ``starts[b]`` the position of row b in
        its own caches ``caches[b]`` (one per layer) -> final hidden [B, d] on the head device.
        Each row equals ``forward`` of that one token on that sequence's caches up to the
        matmuls' accumulation order at B rows (``attention_rows``); rows outside ``live`` are
        carried and ignored."""
        return self._layers(self.embed_tokens(tokens),
                            lambda i, x: self.attention_rows(i, x, starts, [c[i] for c in caches], live))

    def _layers(self, x: torch.Tensor, attend) -> torch.Tensor:
        """Every layer over hidden rows x: ``x + attend(i, x)``, then ``x + ffn``, each on the
        layer's device; the result on the head device."""
        for i in range(self.spec.n_layers):
            dev = self.layer_devices[i]
            if x.device != dev:
                x = x.to(dev, non_blocking=True)
            x = x + attend(i, x)
            x = x + self.ffn(i, x)
        if x.device != self.head_device:
            x = x.to(self.head_device)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        logits = mm(rms_norm(x, self.out_norm, self.spec.rms_eps), self.output).float()
        cap = self.spec.final_softcap
        return logits if not cap else torch.tanh(logits / cap) * cap
