"""Memory ledger: every runtime buffer recorded with a category and a tier, so plan and
runtime can be compared per category.

Contract: ``Ledger(device)`` owns the buffers it records (it keeps a reference until
``free``/``release``, so the ledger and the allocator see the same live memory). Tiers:
``"trunk"`` (the ledger's device) and ``"host"`` (CPU). Categories: weights, kv, scratch,
expert_cache (``reserve`` exists in plans only and cannot be allocated). Each buffer counts
``formats.round_alloc(storage bytes, device type)``: exact on CPU, rounded up to 512 B on
CUDA (``engine.formats`` owns the rule; the planner prices with the same function).
``current``/``peak`` are per (tier, category); ``unaccounted`` is ``torch.cuda.memory_allocated() - memory at construction - trunk total``
on CUDA and 0 on CPU. ``compare(plan)`` returns one ``CompareRow`` per allocated category
and tier with ``diff = runtime - planned``.

    led = Ledger("cuda"); k = led.alloc("kv", (4096, 4, 128), torch.bfloat16, name="blk.0.k")
    led.compare(plan)   # [CompareRow('weights', 'trunk', planned, runtime, diff), ...]
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import formats
from .errors import ConfigError
from .planner import CATEGORIES, Plan

TIERS = ("trunk", "host")
ALLOCATED = tuple(c for c in CATEGORIES if c != "reserve")


class CompareRow(NamedTuple):
    category: str
    tier: str
    planned: int
    runtime: int
    diff: int           # runtime - planned


@dataclass
class _Entry:
    name: str
    category: str
    tier: str
    nbytes: int         # what the allocator takes (rounded on CUDA)
    tensor: torch.Tensor


class Ledger:
    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._entries: dict[str, _Entry] = {}
        self._by_storage: dict[tuple, str] = {}
        self._current = {(t, c): 0 for t in TIERS for c in ALLOCATED}
        self._peak = dict(self._current)
        self._peak_total = {t: 0 for t in TIERS}
        self._baseline = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    # -- recording -------------------------------------------------------------------------
    def tier_device(self, tier: str) -> torch.device:
        if tier not in TIERS:
            raise ConfigError(f"unknown tier {tier!r}", "use 'trunk' or 'host'")
        return self.device if tier == "trunk" else torch.device("cpu")

    def alloc(self, category: str, shape, dtype: torch.dtype = torch.float32, tier: str = "trunk",
              name: str | None = None, zero: bool = True, pin: bool = False) -> torch.Tensor:
        """Allocate a buffer on the tier's device (zeroed unless ``zero=False``) and record it.

        ``pin=True`` pins a host buffer when CUDA is available (for async copies)."""
        self._check_category(category, name)
        dev = self.tier_device(tier)
        pin = pin and dev.type == "cpu" and torch.cuda.is_available()
        make = torch.zeros if zero else torch.empty
        t = make(tuple(shape), dtype=dtype, device=dev, pin_memory=pin)
        return self.register(category, t, tier, name)

    def register(self, category: str, tensor: torch.Tensor, tier: str = "trunk",
                 name: str | None = None) -> torch.Tensor:
        """Record a tensor created elsewhere (its whole storage counts); returns it."""
        self._check_category(category, name)
        dev = self.tier_device(tier)
        if tensor.device.type != dev.type or (dev.index is not None and tensor.device.index != dev.index):
            raise ConfigError(f"ledger: {name or category} is on {tensor.device} but tier {tier!r} is {dev}",
                              "move it to the tier's device before registering")
        name = name or f"{category}.{len(self._entries)}"
        if name in self._entries:
            raise ConfigError(f"ledger: a buffer named {name!r} is already recorded", "use a unique name")
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if storage.nbytes() and key in self._by_storage:
            raise ConfigError(f"ledger: {name!r} shares storage with {self._by_storage[key]!r}",
                              "record each buffer once")
        e = _Entry(name, category, tier, formats.round_alloc(storage.nbytes(), tensor.device.type), tensor)
        self._entries[name] = e
        if storage.nbytes():
            self._by_storage[key] = name
        self._current[(tier, category)] += e.nbytes
        self._peak[(tier, category)] = max(self._peak[(tier, category)], self._current[(tier, category)])
        self._peak_total[tier] = max(self._peak_total[tier], self.total(tier))
        return tensor

    def release(self, name: str) -> None:
        e = self._entries.pop(name, None)
        if e is None:
            raise ConfigError(f"ledger: no buffer named {name!r}", "release only what was recorded")
        storage = e.tensor.untyped_storage()
        self._by_storage.pop((str(e.tensor.device), storage.data_ptr()), None)
        self._current[(e.tier, e.category)] -= e.nbytes

    @contextlib.contextmanager
    def lend(self, names):
        """The named buffers (those recorded; others are skipped) released for the block, so their
        memory returns to the allocator and the block's transient tensors reuse it (on CUDA the
        caching allocator splits the freed blocks), then allocated again under the same name,
        category, tier and size: at rest the ledger is what it was. Yields the names lent.
        Another buffer allocated for good inside the block may take that memory, and then the
        buffers come back from fresh memory: lend around compute, not loads."""
        taken = []
        for name in names:
            e = self._entries.get(name)
            if e is not None:
                taken.append((name, e.category, e.tier, tuple(e.tensor.shape), e.tensor.dtype))
                self.release(name)
                e.tensor = None
        try:
            yield [t[0] for t in taken]
        finally:
            for name, category, tier, shape, dtype in taken:
                self.alloc(category, shape, dtype, tier, name=name, zero=False)

    def free(self, tensor: torch.Tensor) -> None:
        """Forget the buffer holding ``tensor``'s storage (the ledger drops its reference)."""
        key = (str(tensor.device), tensor.untyped_storage().data_ptr())
        name = self._by_storage.get(key)
        if name is None:
            raise ConfigError("ledger: free() of a tensor the ledger does not hold", "free only what was recorded")
        self.release(name)

    def _check_category(self, category: str, name) -> None:
        if category not in ALLOCATED:
            raise ConfigError(f"ledger: category {category!r} for {name or 'a buffer'} is not one of "
                              f"{', '.join(ALLOCATED)}", "reserve is planned only; pick an allocated category")

    # -- reporting -------------------------------------------------------------------------
    def current(self, category: str, tier: str = "trunk") -> int:
        return self._current[(tier, category)]

    def peak(self, category: str, tier: str = "trunk") -> int:
        return self._peak[(tier, category)]

    def total(self, tier: str = "trunk") -> int:
        return sum(v for (t, _), v in self._current.items() if t == tier)

    def peak_total(self, tier: str = "trunk") -> int:
        return self._peak_total[tier]

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    @property
    def unaccounted(self) -> int:
        if self.device.type != "cuda":
            return 0
        return torch.cuda.memory_allocated(self.device) - self._baseline - self.total("trunk")

    def as_dict(self) -> dict:
        return {
            "device": str(self.device),
            "current": {t: {c: self._current[(t, c)] for c in ALLOCATED} for t in TIERS},
            "peak": {t: {c: self._peak[(t, c)] for c in ALLOCATED} for t in TIERS},
            "total": {t: self.total(t) for t in TIERS},
            "peak_total": dict(self._peak_total),
            "unaccounted": self.unaccounted,
            "buffers": len(self._entries),
        }

    def compare(self, plan: Plan | dict, use: str = "current") -> list[CompareRow]:
        """Planned vs runtime bytes per allocated category and tier (``use``: current|peak)."""
        if isinstance(plan, dict):
            plan = Plan.from_dict(plan)
        if use not in ("current", "peak"):
            raise ConfigError(f"compare(use={use!r}) must be 'current' or 'peak'")
        src = self._current if use == "current" else self._peak
        rows = []
        for tier in TIERS:
            for cat in ALLOCATED:
                planned, runtime = plan.tier(tier).get(cat), src[(tier, cat)]
                rows.append(CompareRow(cat, tier, planned, runtime, runtime - planned))
        return rows
