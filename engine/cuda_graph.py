"""Decode step with the position on the device, replayed from a CUDA graph.

Contract: ``StaticDecode(eng)`` owns a static input row ``x`` [1, d] (the embedded token, on
the trunk device), a static position ``pos`` (one-element long tensor) and runs
``Transformer.decode_at`` + the head + argmax with those, so every launch of a step is the
same at every position: KV append and decode attention read the position from ``pos``
(``engine.kernels``' ``pos=`` launches), RoPE gathers its row. On CUDA the step is captured
once in a ``torch.cuda.CUDAGraph`` (first call, after a warm-up on a side stream that runs
the same step, so it writes the same KV row) and replayed; on CPU (Triton interpreter) the
same static step runs eagerly, which is how CI checks it against the ordinary decode.
On CUDA the maths around attention also go through ``torch.compile`` (fused element-wise
kernels; ``KVBENCH_DECODE_COMPILE=0`` captures them unfused); ``compiled`` says which.
``step(token, pos)`` returns (logits [vocab] float32, argmax as a 0-d device tensor); the
returned tensors are overwritten by the next step.

Settings read when a ``StaticDecode`` is built (so a benchmark can A/B them by rebuilding it):
``KVBENCH_DECODE_FUSED_QKV`` and ``KVBENCH_DECODE_ROUTE_KERNEL`` (``Transformer.decode_at``),
and ``KVBENCH_DECODE_DEVICE_EMBED`` (``device_embed``): the step gathers the token's row from
an embedding table on the device (``Transformer.embed_table``) instead of staging a row
embedded on the host, and ends by writing its argmax into its token input and advancing its
position input by one, so ``step(None, pos)`` runs the next greedy step with nothing from the
host (no fill, no copy, no sync: the host may queue steps back to back and read tokens back
in batches, ``Engine.generate``). ``step(token, pos)`` still accepts any token and position;
each is written to the device only when it differs from what the last step left there.
Without ``device_embed`` (the setting off, or no table on the device) ``step`` needs a token
and embeds it on the host through a pinned stage (an event sync per step).

``eligibility(eng)`` says why an engine cannot take this path (None if it can): it needs the
Triton attention backend, every layer and the head on one device (sliding-window layers read
their ring caches through the same kernels: ``RingKV.write_at`` / ``attend_at``),
and MoE layers whose experts can all be resident on that device (plain stacks there, or an
expert cache with a slot for every trunk expert: ``plan.expert_slots >= plan.trunk_experts``);
a partial cache needs the host's SLRU policy on a miss, so such a model decodes eagerly.
Experts computed on the host CPU (``cpu_moe``, ``host_layers``) are a host round trip inside
the step: the step is captured as one graph per stretch between those layers (the step's
generator, ``Transformer.decode_steps``, yields at each), and a replay runs the graphs in
order with the host experts in between, writing each output into the buffer the next graph
reads (``graphs``; ``graph`` is the first). With ``KVBENCH_HOST_NODES`` the layers that compute
through ``engine.native`` (``node_layers``) are not boundaries: the graph records their copy in,
``native.HostJob``'s host function (``cuLaunchHostFunc``: a host node) and the copy back, so no
Python runs between them and the step can be one graph.
MoE layers route on the device (softmax, top-k, ``engine.kernels.moe`` through the cache's
slot table); ``StaticDecode`` first makes the cache resident (copies the experts not cached
yet: counted as ``preloaded``, not as misses) and counts each step's k experts per layer as
resident hits (``ExpertCache.note_resident``): the host does not see which experts a
captured step used, and no miss is possible.

    sd = StaticDecode(eng)
    logits, nxt = sd.step(token, eng.pos)
"""
from __future__ import annotations

import os

import torch

from . import kernels
from .errors import ConfigError


_STREAMS: dict[int, "torch.cuda.Stream"] = {}


def capture_stream(device) -> "torch.cuda.Stream":
    """The one side stream this process warms up and captures decode graphs on, per GPU.

    cuBLAS keeps a workspace per (handle, stream) for the life of the process: a new stream per
    capture left ~64 MiB behind at every engine switch (H200, 2026-12-02: `Unaccounted` 116 ->
    182 -> 250 MiB over three takeovers). ``engine.load`` warms the libraries on this stream
    too, before its ledger starts counting."""
    dev = torch.device(device)
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _STREAMS:
        _STREAMS[idx] = torch.cuda.Stream(device=idx)
    return _STREAMS[idx]


def eligibility(eng) -> str | None:
    """None when ``eng`` can decode through ``StaticDecode``; otherwise the reason, one line."""
    m, spec = eng.model, eng.spec
    if not kernels.use_triton(eng.device):
        return "the attention backend is torch (static decode needs the Triton kernels)"
    if any(d != eng.device for d in m.layer_devices) or m.head_device != eng.device:
        return "the model is split across devices (hybrid); only the eager step crosses tiers"
    if spec.moe_layers:
        why = m.experts_not_resident(eng.device)
        if why:
            return why
    return None


def host_layers(eng) -> list[int]:
    """MoE layers whose experts compute on the host CPU (cpu_moe): a captured step is one CUDA
    graph per stretch between them, replayed with the host experts run in between."""
    return eng.model.host_expert_layers() if eng.model is not None else []


def node_layers(eng) -> list[int]:
    """``host_layers`` a captured step runs as CUDA host nodes inside its graph instead of ending
    a graph at them (``KVBENCH_HOST_NODES``, read now): on CUDA, the cpu-tier layers whose
    one-token steps go through ``engine.native`` with no GPU share (``CpuExperts.node_ready``)."""
    from . import settings
    if not settings.get("KVBENCH_HOST_NODES") or eng.device.type != "cuda":
        return []
    return [i for i in host_layers(eng)
            if getattr(eng.model.layers[i].experts, "node_ready", lambda dev: False)(eng.device)]


def stop_compile_workers() -> bool:
    """Shut down torch.compile's compile worker processes (inductor's pool; a later compile starts
    it again). True when torch offered the call and it returned."""
    try:
        from torch._inductor.async_compile import shutdown_compile_workers
        shutdown_compile_workers()
    except Exception:      # noqa: BLE001 - a torch without it, or a pool already gone: nothing stopped
        return False
    return True


class StaticDecode:
    def __init__(self, eng, capture: bool | None = None):
        why = eligibility(eng)
        if why is not None:
            raise ValueError(f"static decode is not possible: {why}")
        self.eng, self.model, self.caches = eng, eng.model, eng.caches
        dev = eng.device
        self.capture = dev.type == "cuda" if capture is None else capture
        # torch.compile fuses the element-wise ops around attention (a captured step of ~47
        # kernels per layer is bound by kernel count); KVBENCH_DECODE_COMPILE=0 turns it off.
        self.compiled = self.capture and os.environ.get("KVBENCH_DECODE_COMPILE", "1") != "0"
        spec = eng.spec
        # every expert on the device before anything is captured (the slot table is then fixed)
        self.resident_caches = self.model.make_experts_resident()
        for i in range(spec.n_layers):   # RoPE tables for the whole ctx before anything captures them
            self.model._rope(dev, spec.rope_base_of(i)).ensure(eng.ctx)
        from . import settings
        self._rings = [c for c in self.caches if hasattr(c, "flush")]     # sliding-window layers
        self.fused_qkv = bool(settings.get("KVBENCH_DECODE_FUSED_QKV"))
        self.fused_gate_up = bool(settings.get("KVBENCH_DECODE_FUSED_GATE_UP"))
        # applied, not only asked: the layers whose projections run through engine.kernels.gemv
        self.fused_gemv = bool(settings.get("KVBENCH_DECODE_FUSED_GEMV")) and self.fused_qkv and \
            any(self.model.fused_gemv_layers(dev))
        # applied: the layers whose RoPE and K/V append run as one launch (rope_append_layers)
        self.rope_append = bool(settings.get("KVBENCH_DECODE_ROPE_APPEND")) and self.fused_gemv and \
            any(self.model.rope_append_layers(dev, self.caches))
        self.route_kernel = bool(settings.get("KVBENCH_DECODE_ROUTE_KERNEL"))
        # cpu-tier layers run as host nodes inside the graph (applied: captured steps only)
        self.node_layers = node_layers(eng) if self.capture else []
        # the jobs the graph's host nodes point at live as long as this step does
        self._jobs = [self.model.layers[i].experts.prepare_node(spec.n_experts_used) for i in self.node_layers]
        # a host node bakes these settings' values into the graph, where a split step reads them
        # at every run: a change after the build refuses the step instead of being ignored
        self._node_settings = self._node_env() if self.node_layers else None
        # with host nodes the host's wait for the step sleeps on a blocking event (applied:
        # ``host_wait``; None without host nodes): a spinning wait takes a core the nodes' OpenMP
        # team needs (reports/h100-2026-12-06c: 85 us a node layer spinning, 27 asleep)
        self.host_wait = settings.get("KVBENCH_HOST_NODES_WAIT") if self.node_layers else None
        self._wake = torch.cuda.Event(blocking=True) if self.host_wait == "sleep" else None
        # who runs the host-node layers (applied: ``node_run``; None without host nodes): CUDA's
        # callback thread, or this thread at each layer's doorbell (flags made before any capture)
        self.node_run = settings.get("KVBENCH_HOST_NODES_RUN") if self.node_layers else None
        self.compile_workers_stopped = False     # applied at capture (KVBENCH_STOP_COMPILE_WORKERS)
        from . import native
        self._bell = native.Doorbell(len(self.node_layers)) if self.node_run == "doorbell" else None
        self._bells: list[list[int]] = []       # per graph: the doorbell nodes it rings, in order
        self.device_embed = bool(settings.get("KVBENCH_DECODE_DEVICE_EMBED")) and \
            self.model.embed_table(dev) is not None
        self.x = torch.zeros(1, spec.d_model, dtype=torch.float32, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self._pos_held = self._token_held = None     # what pos / token hold after the last step (host view)
        pin = dev.type == "cuda" and not self.device_embed
        self._stage = None if self.device_embed else \
            torch.zeros(1, spec.d_model, dtype=torch.float32, pin_memory=pin)
        self._staged = torch.cuda.Event() if pin else None
        self.graph = None             # the first of ``graphs`` once captured
        self.graphs: list = []        # the step's graphs: one, or one more than cpu_moe layers
        self._host: list = []         # per cpu_moe layer: (experts, h, top_e, top_p, output buffer)
        self.attn_launches: list[dict] = []     # the step's attention launches (``_body``)
        self.moe_launches: list[dict] = []      # its MoE launches over expert blocks (``_body``)
        self.logits = self.next = None
        self.pool_bytes = 0           # bytes the captured graph keeps allocated (its outputs)

    def _body(self):
        """One whole step, the host-expert layers (cpu_moe) run inline."""
        return self.model.with_host_experts(self._body_steps())

    def _body_steps(self):
        """The step as a generator (``Transformer.decode_steps``): yields at each layer whose
        experts compute on the host CPU, returns (logits, argmax)."""
        from .kernels import LaunchLog, decode_attention, moe_blocks
        x = self.model.decode_embed(self.token, compiled=self.compiled) if self.device_embed else self.x
        with decode_attention.recording() as launches, moe_blocks.recording() as moe_launches:
            h = yield from self.model.decode_steps(x, self.pos, self.caches, compiled=self.compiled,
                                                   fused_qkv=self.fused_qkv, route_kernel=self.route_kernel,
                                                   fused_gate_up=self.fused_gate_up, fused_gemv=self.fused_gemv,
                                                   rope_append=self.rope_append)
        # applied: each distinct attention and MoE-blocks launch configuration of the step (what
        # a captured graph replays is its capture's), with how many layers made it
        self.attn_launches = LaunchLog.distinct(launches)
        self.moe_launches = LaunchLog.distinct(moe_launches)
        logits, nxt = self.model.decode_head(h)
        if self.device_embed:                    # the next step's inputs, on the device
            self.token.copy_(nxt.reshape(1))
            self.pos.add_(1)
        return logits, nxt

    def _load(self, token: int | None, pos: int) -> None:
        if not 0 <= pos < self.eng.ctx:
            raise IndexError(f"position {pos} outside the cache of {self.eng.ctx}")
        for c in self._rings:                    # prefill K/V a ring still holds, stored first
            c.flush()
        if self.device_embed:
            if token is None and self._token_held is None:
                raise ValueError("StaticDecode.step(None, ...): no previous step left a token on the device")
            if token is not None:
                self.token.fill_(int(token))
                self._token_held = None
            if pos != self._pos_held:
                self.pos.fill_(pos)
            return
        if token is None:
            raise ValueError("StaticDecode.step(None, ...) needs device_embed (KVBENCH_DECODE_DEVICE_EMBED=1 "
                             "and an embedding table on the device)")
        if self._staged is not None:
            self._staged.synchronize()           # the previous copy out of the stage is done
        self._stage.copy_(self.model.embed_tokens(torch.tensor([int(token)])))
        self.x.copy_(self._stage, non_blocking=True)
        if self._staged is not None:
            self._staged.record()
        self.pos.fill_(pos)

    NODE_SETTINGS = ("KVBENCH_HOST_NODES", "KVBENCH_CPU_MOE_NATIVE", "KVBENCH_CPU_MOE_GPU_SHARE",
                     "KVBENCH_HOST_NODES_WAIT", "KVBENCH_HOST_NODES_RUN")

    @classmethod
    def _node_env(cls) -> tuple:
        return tuple(os.environ.get(k) for k in cls.NODE_SETTINGS) + (torch.get_num_threads(),)

    def step(self, token: int | None, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of ``token`` (None: the previous step's argmax, still on the device) at ``pos``."""
        if self._node_settings is not None and self._node_env() != self._node_settings:
            raise ConfigError(f"{', '.join(self.NODE_SETTINGS)} or torch's thread count changed after this "
                              f"step was captured with "
                              f"{len(self.node_layers)} host-node layers, which cannot apply the change",
                              "call eng.set_decode_mode(...) again to rebuild the step")
        self._load(token, pos)
        self._pos_held = self._token_held = None             # unknown until the step has run
        if not self.capture:
            out = self._body()
        else:
            if self.graph is None:
                self._capture()
            if self._bell is not None:
                self._bell.reset()
            for k, g in enumerate(self.graphs):
                g.replay()
                if self._bell is not None:        # this graph's doorbell layers, run here in order
                    for j in self._bells[k]:
                        self._bell.serve(j, self._jobs[j])
                if k < len(self._host):           # a cpu_moe layer between two graphs
                    experts, h, top_e, top_p, y = self._host[k]
                    experts.run(h, top_e, top_p, out=y)
            if self._wake is not None:            # asleep until the step (and its host nodes) ran
                self._wake.record()
                self._wake.synchronize()
            elif self._bell is not None:          # the next step's reset() must not meet a wait of
                torch.cuda.current_stream().synchronize()   # this one's still unevaluated
            out = self.logits, self.next
        self._pos_held, self._token_held = pos + 1, True     # what the step left (device_embed)
        for c in self.resident_caches:            # each MoE layer used k resident experts
            c.note_resident(1, self.eng.spec.n_experts_used)
        return out

    def _capture(self) -> None:
        # Warm-up (Triton compiles, cuBLAS picks kernels) on a side stream, as torch's docs ask;
        # it runs the very step about to be replayed, so the KV row it writes is the right one.
        side = capture_stream(self.eng.device)
        side.wait_stream(torch.cuda.current_stream())
        inputs = (self.token.clone(), self.pos.clone())    # the warm-ups advance token and pos
        with torch.cuda.stream(side):
            for _ in range(2):
                try:
                    self._body()
                    self.token.copy_(inputs[0])
                    self.pos.copy_(inputs[1])
                except Exception as exc:   # noqa: BLE001 - inductor/compiler failures of all kinds
                    if not self.compiled or isinstance(exc, torch.OutOfMemoryError):
                        raise
                    raise ConfigError(f"torch.compile of the decode step failed "
                                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})",
                                      "set KVBENCH_DECODE_COMPILE=0 to capture the step uncompiled") from None
        torch.cuda.current_stream().wait_stream(side)
        before = torch.cuda.memory_allocated(self.eng.device)
        # one graph per stretch between host-expert layers (one graph when there are none): each
        # stretch ends at a yield of the step's generator; the host output's buffer ``y`` is
        # made between two captures and read by the next graph; a host-node layer
        # (``node_layers``) is recorded inside the graph instead: copy in, host function, copy back
        graphs, host, steps, y, pool = [], [], self._body_steps(), None, None
        self._bells = []
        try:
            while True:
                g, result, rings = torch.cuda.CUDAGraph(), None, []
                with torch.cuda.graph(g, stream=side, pool=pool):
                    while True:
                        try:
                            request = steps.send(y)
                        except StopIteration as done:
                            result = done.value
                            break
                        if request[0] not in self.node_layers:
                            break
                        i, h, top_e, top_p = request
                        bell = None
                        if self._bell is not None:
                            rings.append(self.node_layers.index(i))
                            bell = (self._bell, rings[-1])
                        y = self.model.layers[i].experts.node(h, top_e, top_p, doorbell=bell)
                pool = pool if pool is not None else g.pool()
                graphs.append(g)
                self._bells.append(rings)
                if result is not None:
                    self.logits, self.next = result
                    break
                i, h, top_e, top_p = request
                y = torch.zeros(1, self.eng.spec.d_model, dtype=torch.float32, device=self.eng.device)
                host.append((self.model.layers[i].experts, h, top_e, top_p, y))
        except RuntimeError as exc:   # a doorbell's memory operations this CUDA cannot capture
            if self._bell is None or isinstance(exc, torch.OutOfMemoryError):
                raise
            raise ConfigError(f"KVBENCH_HOST_NODES_RUN=doorbell: the step's capture failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160]})", "set KVBENCH_HOST_NODES_RUN=callback") from None
        self.pool_bytes = torch.cuda.memory_allocated(self.eng.device) - before
        self.graphs, self._host, self.graph = graphs, host, graphs[0]
        # the hybrid's host cores are the cpu tier's: torch.compile's worker pool, booting now
        # beside its OpenMP team, stalled the first steps (reports/h100-2026-12-06d)
        from . import settings
        if self.compiled and host_layers(self.eng) and settings.get("KVBENCH_STOP_COMPILE_WORKERS"):
            self.compile_workers_stopped = stop_compile_workers()
