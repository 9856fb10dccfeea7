"""SLRU expert cache: routed MoE experts stream from host memory into fixed trunk slots.

Contract: ``SLRUPolicy(capacity, protected_fraction=0.75)`` decides slots only (no tensors).
``access(key) -> (hit, slot, evicted_key)``: a new key enters the probationary segment at
its MRU end; a hit in probationary promotes the key to the protected MRU end; when protected
holds more than ``floor(capacity * protected_fraction)`` keys its LRU key is demoted to the
probationary MRU end; a miss with every slot taken evicts the probationary LRU key (the
protected LRU key if probationary is empty) and reuses its slot. Free slots are handed out
in order 0, 1, 2, ... so a cache as large as the key set never evicts. ``victim()`` names the
key the next miss would evict (None while a slot is free); ``admit(key)`` places a key in a
free slot without counting an access (preloading). Keys are ``(layer, expert)``; stats count
hits, misses, evictions, overall and per layer.

``ExpertCache(policy, ledger, shapes, dtype)`` owns three stacked slot buffers on the ledger's
trunk device (gate/up [S, ff, d], down [S, d, ff], category ``expert_cache``: exactly what
``engine.planner`` prices). ``fetch(layer, expert, (gate, up, down))`` returns views of the
expert's slot, copying the three host tensors in on a miss (non_blocking when they are
pinned; ``bytes_moved`` counts what was copied). A view stays valid until a later fetch
evicts its slot: compute with an expert before fetching the next one (on CUDA the copy and
the compute are ordered on the current stream). ``cache.layer(i, gate, up, down)`` wraps a
layer's stacked host experts in a ``CachedExperts`` (``get(layer, e)`` as ``engine.model``
uses it; ``slot_groups`` for one token's k experts) and registers the layer with the cache.

Resident mode: when the capacity holds every expert of the registered layers
(``can_hold_all``), ``make_resident()`` copies the experts not cached yet into free slots and
builds ``table`` [layers, E] int32 on the device (expert -> slot; nothing can be evicted
afterwards, so it never changes). ``engine.model``'s device-routed decode then reads slots
through the table with no host sync (``engine.cuda_graph``). The host does not see which
experts that path uses: ``note_resident(tokens, k)`` counts its ``tokens x k`` accesses per
layer as hits (``resident_hits``; no miss is possible), while host-routed accesses (prefill,
eager decode) keep going through the policy with real hits/misses. The table is the only
device memory outside the ledger (layers x E x 4 bytes).

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

    def victim(self) -> Hashable | None:
        """The key the next miss would evict (None while a slot is free)."""
        if self._free:
            return None
        seg = self.probation if self.probation else self.protected
        return next(iter(seg)) if seg else None

    def admit(self, key: Hashable) -> int:
        """Place ``key`` (not yet cached) in a free slot at the probationary MRU end without
        counting an access; returns its slot. Refused when no slot is free (it never evicts)."""
        if key in self:
            raise ValueError(f"admit({key!r}): already cached")
        if not self._free:
            raise ConfigError(f"expert cache: no free slot to admit {key!r} (capacity {self.capacity})",
                              "admit only into a cache that holds every key")
        slot = self._free.pop()
        self.probation[key] = slot
        return slot

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
        self._layers: dict[int, tuple] = {}         # layer -> host (gate, up, down): no cycle with CachedExperts
        self.table: torch.Tensor | None = None       # [layers, E] int32 expert -> slot, once resident
        self._table_row: dict[int, int] = {}
        self.preloaded = 0                           # experts copied in by make_resident
        self.resident_hits_per_layer = 0             # device-routed accesses, each layer alike
        self.resident_tokens = 0

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
        if not hit:
            self._copy_in(slot, layer, expert, host_weights)
        return slot

    def _copy_in(self, slot: int, layer: int, expert: int, host_weights) -> None:
        for dst, src, name in zip((buf[slot] for buf in self.slots), host_weights, self.NAMES):
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

    def layer(self, layer: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> "CachedExperts":
        if self.table is not None:
            raise ConfigError(f"expert cache: layer {layer} registered after make_resident()",
                              "register every layer before making the cache resident")
        self._layers[layer] = (gate, up, down)
        return CachedExperts(self, layer, gate, up, down)

    # -- resident mode ---------------------------------------------------------------------
    @property
    def n_keys(self) -> int:
        """Experts of the registered layers: the slots that hold them all."""
        return sum(g.shape[0] for g, _, _ in self._layers.values())

    @property
    def can_hold_all(self) -> bool:
        return self.policy.capacity >= self.n_keys

    def make_resident(self) -> torch.Tensor:
        """Copy every registered expert not cached yet into a free slot (``preloaded``, and
        ``bytes_moved``; not hits or misses) and build the device slot table; idempotent.
        Returns ``table`` [layers, E] int32."""
        if self.table is not None:
            return self.table
        if not self.can_hold_all:
            raise ConfigError(f"expert cache: {self.policy.capacity} slots cannot hold the "
                              f"{self.n_keys} experts of its layers resident",
                              "give the cache a slot per expert, or keep the host-routed (eager) decode")
        rows = sorted(self._layers)
        E = max(g.shape[0] for g, _, _ in self._layers.values())
        table = torch.full((len(rows), E), -1, dtype=torch.int32)
        for r, layer in enumerate(rows):
            gate, up, down = self._layers[layer]
            for e in range(gate.shape[0]):
                slot = self.policy.slot_of((layer, e))
                if slot is None:
                    slot = self.policy.admit((layer, e))
                    self._copy_in(slot, layer, e, (gate[e], up[e], down[e]))
                    self.preloaded += 1
                table[r, e] = slot
        self._table_row = {layer: r for r, layer in enumerate(rows)}
        self.table = table.to(self.device)
        return self.table

    def table_for(self, layer: int) -> torch.Tensor | None:
        """Layer ``layer``'s row of the slot table [E] (None until ``make_resident``)."""
        return None if self.table is None else self.table[self._table_row[layer]]

    def note_resident(self, tokens: int, k: int) -> None:
        """Count ``tokens`` device-routed decode steps of ``k`` experts in every registered
        layer as hits (the host does not see which experts; in resident mode all are hits)."""
        self.resident_tokens += tokens
        self.resident_hits_per_layer += tokens * k

    def stats(self) -> dict:
        """The policy's counts plus the resident path's: ``hits`` includes ``resident_hits``
        (device-routed accesses, host-unseen, hits by construction), ``misses`` and
        ``evictions`` are the host-routed path's; ``bytes_moved`` counts every copy (misses and
        ``preloaded`` experts)."""
        s = self.policy.stats()
        r = self.resident_hits_per_layer
        layers = sorted(set(s["per_layer"]) | (set(self._layers) if r else set()))
        per_layer = {}
        for layer in layers:
            d = s["per_layer"].get(layer, {"hits": 0, "misses": 0})
            rh = r if layer in self._layers else 0
            h, m = d["hits"] + rh, d["misses"]
            per_layer[layer] = {"hits": h, "misses": m, "hit_rate": h / (h + m) if h + m else 0.0,
                                "resident_hits": rh}
        hits = s["hits"] + r * len(self._layers)
        total = hits + s["misses"]
        s.update(hits=hits, hit_rate=hits / total if total else 0.0, per_layer=per_layer,
                 resident_hits=r * len(self._layers), resident_tokens=self.resident_tokens,
                 resident=self.table is not None, preloaded=self.preloaded,
                 bytes_moved=self.bytes_moved, pinned_copies=self.pinned_copies,
                 pageable_copies=self.pageable_copies,
                 slot_bytes=sum(b[0].nbytes for b in self.slots) if self.policy.capacity else 0)
        return s


class CachedExperts:
    """A layer's routed experts held on the host ([E, ff, d] / [E, d, ff]), served via the cache."""

    def __init__(self, cache: ExpertCache, layer: int, gate, up, down):
        self.cache, self.layer_index = cache, layer
        self.gate, self.up, self.down = gate, up, down

    @property
    def n_experts(self) -> int:
        return self.gate.shape[0]

    def get(self, layer: int, e: int):
        return self.cache.fetch(layer, e, (self.gate[e], self.up[e], self.down[e]))

    def slot_groups(self, layer: int, experts: list[int]):
        """One token's ``experts``, fetched in that order through the SLRU policy, yielded as
        groups ``(positions, slots)`` whose slots are all valid together: a group ends before
        a fetch would evict an expert of it (a cache with few probationary slots). Compute
        with a group before asking for the next; usually there is one group of all k."""
        pos, slots, keys = [], [], set()
        for j, e in enumerate(experts):
            if (layer, e) not in self.cache.policy and self.cache.policy.victim() in keys:
                yield pos, slots
                pos, slots, keys = [], [], set()
            slots.append(self.cache.fetch_slot(layer, e, (self.gate[e], self.up[e], self.down[e])))
            pos.append(j)
            keys.add((layer, e))
        if pos:
            yield pos, slots

    def resident_blocker(self, device) -> str | None:
        """Why this layer's experts cannot be read on the device without the host (None if they can)."""
        c, dev = self.cache, torch.device(device)
        if c.device.type != dev.type or None not in (c.device.index, dev.index) and c.device.index != dev.index:
            return f"the expert cache is on {c.device}, the layer runs on {dev}"
        if not c.can_hold_all:
            return (f"the expert cache holds {c.policy.capacity} of {c.n_keys} trunk experts "
                    f"(a miss needs the host's SLRU policy)")
        return None

    def resident_view(self):
        """(gate, up, down slot stacks, slot table row [E]) once the cache is resident, else None."""
        table = self.cache.table_for(self.layer_index)
        return None if table is None else (*self.cache.slots, table)

    def make_resident(self):
        self.cache.make_resident()
        return self.cache

    def tensors(self):
        return [self.gate, self.up, self.down]
