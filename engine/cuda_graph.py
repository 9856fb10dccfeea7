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

``eligibility(eng)`` says why an engine cannot take this path (None if it can): it needs the
Triton attention backend, every layer and the head on one device, no sliding-window layer,
and MoE layers whose experts can all be resident on that device (plain stacks there, or an
expert cache with a slot for every trunk expert: ``plan.expert_slots >= plan.trunk_experts``);
a partial cache needs the host's SLRU policy on a miss, so such a model decodes eagerly.
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
    if spec.swa_layers:
        return "sliding-window layers use the torch attention path"
    return None


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
        self.x = torch.zeros(1, spec.d_model, dtype=torch.float32, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        pin = dev.type == "cuda"
        self._stage = torch.zeros(1, spec.d_model, dtype=torch.float32, pin_memory=pin)
        self._staged = torch.cuda.Event() if pin else None
        self.graph = None
        self.logits = self.next = None
        self.pool_bytes = 0           # bytes the captured graph keeps allocated (its outputs)

    def _body(self):
        h = self.model.decode_at(self.x, self.pos, self.caches, compiled=self.compiled)
        return self.model.decode_head(h)

    def _load(self, token: int, pos: int) -> None:
        if not 0 <= pos < self.eng.ctx:
            raise IndexError(f"position {pos} outside the cache of {self.eng.ctx}")
        if self._staged is not None:
            self._staged.synchronize()           # the previous copy out of the stage is done
        self._stage.copy_(self.model.embed_tokens(torch.tensor([int(token)])))
        self.x.copy_(self._stage, non_blocking=True)
        if self._staged is not None:
            self._staged.record()
        self.pos.fill_(pos)

    def step(self, token: int, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._load(token, pos)
        if not self.capture:
            out = self._body()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            out = self.logits, self.next
        for c in self.resident_caches:            # each MoE layer used k resident experts
            c.note_resident(1, self.eng.spec.n_experts_used)
        return out

    def _capture(self) -> None:
        # Warm-up (Triton compiles, cuBLAS picks kernels) on a side stream, as torch's docs ask;
        # it runs the very step about to be replayed, so the KV row it writes is the right one.
        side = capture_stream(self.eng.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                try:
                    self._body()
                except Exception as exc:   # noqa: BLE001 - inductor/compiler failures of all kinds
                    if not self.compiled or isinstance(exc, torch.OutOfMemoryError):
                        raise
                    raise ConfigError(f"torch.compile of the decode step failed "
                                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})",
                                      "set KVBENCH_DECODE_COMPILE=0 to capture the step uncompiled") from None
        torch.cuda.current_stream().wait_stream(side)
        before = torch.cuda.memory_allocated(self.eng.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=side):
            self.logits, self.next = self._body()
        self.pool_bytes = torch.cuda.memory_allocated(self.eng.device) - before
        self.graph = g
