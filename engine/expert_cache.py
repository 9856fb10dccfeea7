"""SLRU expert cache: routed MoE experts stream from host memory into fixed trunk slots.

Contract: ``SLRUPolicy(capacity, protected_fraction=0.75)`` decides slots only (no tensors).
``access(key) -> (hit, slot, evicted_key)``: a new key enters the probationary segment at
its MRU end; a hit in probationary promotes the key to the protected MRU end; when protected
holds more than ``floor(capacity * protected_fraction)`` keys its LRU key is demoted to the
probationary MRU end; a miss with every slot taken evicts the probationary LRU key (the
protected LRU key if probationary is empty) and reuses its slot. Free slots are handed out
in order 0, 1, 2, ... so a cache as large as the key set never evicts. Keys are
``(layer, expert)``; stats count hits, misses, evictions, overall and per layer.

``ExpertCache(policy, ledger, shapes, dtype)`` owns three stacked slot buffers on the ledger's
trunk device (gate/up [S, ff, d], down [S, d, ff], category ``expert_cache``: exactly what
``engine.planner`` prices). ``fetch(layer, expert, (gate, up, down))`` returns views of the
expert's slot, copying the three host tensors in on a miss (non_blocking when they are
pinned; ``bytes_moved`` counts what was copied). A view stays valid until a later fetch
evicts its slot: compute with an expert before fetching the next one (on CUDA the copy and
the compute are ordered on the current stream). ``cache.layer(i, gate, up, down)`` wraps a
layer's stacked host experts in an object with ``get(layer, e)`` as ``engine.model`` uses.

    cache = ExpertCache.for_spec(spec, ledger, capacity=plan.expert_slots)
    gate, up, down = cache.fetch(3, 17, (host_gate[17], host_up[17], host_down[17]))
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from typing import Hashable

import torch

from .errors import ConfigError


class SLRUPolicy:
    def __init__(self, capacity: int, protected_fraction: float = 0.75):
        if not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"expert cache capacity {capacity!r} must be a positive integer",
                              "give the cache at least one slot (raise the budget or put fewer layers on the trunk)")
        if not 0.0 <= protected_fraction <= 1.0:
            raise ConfigError(f"protected_fraction {protected_fraction!r} must be in [0, 1]")
        self.capacity = capacity
        self.protected_capacity = int(capacity * protected_fraction)
        self.probation: OrderedDict[Hashable, int] = OrderedDict()   # LRU first, key -> slot
        self.protected: OrderedDict[Hashable, int] = OrderedDict()
        self._free = list(range(capacity - 1, -1, -1))               # pop() gives 0, 1, ...
        self.hits = self.misses = self.evictions = 0
        self._layer = defaultdict(lambda: [0, 0])                    # layer -> [hits, misses]

    def __len__(self) -> int:
        return len(self.probation) + len(self.protected)

    def __contains__(self, key) -> bool:
        return key in self.probation or key in self.protected

    def slot_of(self, key) -> int | None:
        return self.protected.get(key, self.probation.get(key))

    def access(self, key: Hashable) -> tuple[bool, int, Hashable | None]:
        layer = key[0] if isinstance(key, tuple) else key
        if key in self.protected:
            self.protected.move_to_end(key)
            return self._count(layer, True), self.protected[key], None
        if key in self.probation:
            slot = self.probation.pop(key)
            self.protected[key] = slot
            if len(self.protected) > self.protected_capacity:
                old, old_slot = self.protected.popitem(last=False)
                self.probation[old] = old_slot
            return self._count(layer, True), slot, None
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            seg = self.probation if self.probation else self.protected
            evicted, slot = seg.popitem(last=False)
            self.evictions += 1
        self.probation[key] = slot
        return self._count(layer, False), slot, evicted

    def _count(self, layer, hit: bool) -> bool:
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        self._layer[layer][0 if hit else 1] += 1
        return hit

    def hit_rate(self, layer=None) -> float:
        h, m = (self.hits, self.misses) if layer is None else self._layer.get(layer, (0, 0))
        return h / (h + m) if h + m else 0.0

    def stats(self) -> dict:
        return {"capacity": self.capacity, "protected_capacity": self.protected_capacity,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "hit_rate": self.hit_rate(),
                "per_layer": {layer: {"hits": h, "misses": m, "hit_rate": h / (h + m)}
                              for layer, (h, m) in sorted(self._layer.items())}}


class ExpertCache:
    NAMES = ("gate", "up", "down")

    def __init__(self, policy: SLRUPolicy, ledger, shapes, dtype: torch.dtype = torch.float32):
        if len(shapes) != 3:
            raise ConfigError(f"expert cache needs three matrix shapes (gate, up, down), got {len(shapes)}")
        self.policy, self.ledger, self.dtype = policy, ledger, dtype
        self.shapes = tuple(tuple(s) for s in shapes)
        self.device = ledger.device
        self.slots = [ledger.alloc("expert_cache", (policy.capacity, *s), dtype, tier="trunk",
                                   name=f"expert_cache.{n}", zero=False)
                      for n, s in zip(self.NAMES, self.shapes)]
        self.bytes_moved = 0
        self.pinned_copies = self.pageable_copies = 0

    @classmethod
    def for_spec(cls, spec, ledger, capacity: int, dtype: torch.dtype = torch.float32,
                 protected_fraction: float = 0.75) -> "ExpertCache":
        d, ff = spec.d_model, spec.d_ff_expert
        return cls(SLRUPolicy(capacity, protected_fraction), ledger, ((ff, d), (ff, d), (d, ff)), dtype)

    def fetch(self, layer: int, expert: int, host_weights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(buf[slot] for buf, slot in zip(self.slots, [self.fetch_slot(layer, expert, host_weights)] * 3))

    def fetch_slot(self, layer: int, expert: int, host_weights) -> int:
        """``fetch`` returning the slot index (the expert is in ``slots[*][slot]`` afterwards)."""
        hit, slot, _ = self.policy.access((layer, expert))
        out = tuple(buf[slot] for buf in self.slots)
        if not hit:
            for dst, src, name in zip(out, host_weights, self.NAMES):
                if tuple(src.shape) != tuple(dst.shape) or src.dtype != dst.dtype:
                    raise ConfigError(f"expert ({layer}, {expert}) {name}: host tensor {tuple(src.shape)} "
                                      f"{src.dtype} does not fit a slot {tuple(dst.shape)} {dst.dtype}",
                                      "store host experts in the cache's shape and dtype")
                pinned = src.device.type == "cpu" and src.is_pinned()
                dst.copy_(src, non_blocking=pinned)
                self.bytes_moved += src.nbytes
                if pinned:
                    self.pinned_copies += 1
                else:
                    self.pageable_copies += 1
        return slot

    def layer(self, layer: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> "CachedExperts":
        return CachedExperts(self, layer, gate, up, down)

    def stats(self) -> dict:
        s = self.policy.stats()
        s.update(bytes_moved=self.bytes_moved, pinned_copies=self.pinned_copies,
                 pageable_copies=self.pageable_copies,
                 slot_bytes=sum(b[0].nbytes for b in self.slots) if self.policy.capacity else 0)
        return s


class CachedExperts:
    """A layer's routed experts held on the host ([E, ff, d] / [E, d, ff]), served via the cache."""

    def __init__(self, cache: ExpertCache, layer: int, gate, up, down):
        self.cache, self.layer_index = cache, layer
        self.gate, self.up, self.down = gate, up, down

    def get(self, layer: int, e: int):
        return self.cache.fetch(layer, e, (self.gate[e], self.up[e], self.down[e]))

    def get_many(self, layer: int, experts: list[int]):
        """Experts ``experts`` (fetched in that order) stacked: gate/up [k, ff, d], down [k, d, ff]."""
        slots = [self.cache.fetch_slot(layer, e, (self.gate[e], self.up[e], self.down[e])) for e in experts]
        idx = torch.tensor(slots, device=self.cache.device)
        return tuple(buf.index_select(0, idx) for buf in self.cache.slots)

    def tensors(self):
        return [self.gate, self.up, self.down]
