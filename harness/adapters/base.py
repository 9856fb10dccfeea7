"""What every engine adapter shares: the KV request, what was applied, and the logits tape.

Contract: an adapter is one engine (llama.cpp, HF transformers, an OpenAI-compatible server)
loaded for one model and one suite row (``kv_dtype_requested``: fp32 / bf16 / q8_0), run with
the engine's own KV setting for that row (``kv_native_requested``: e.g. llama.cpp ``q8_0``,
HF ``quanto-int4``). It declares its capabilities (``harness.engine_api``) on the class, like
kvbench's engine, and honours the same call contracts (every call starts from an empty
cache; ``logits`` is teacher-forced float32 ``[T, vocab]``; ``generate`` is greedy).

- A KV setting the engine cannot apply raises (``KVNotSupported``), never a fallback.
- What was applied is observable where the engine tells: ``kv_applied_native`` per layer,
  read from the engine itself (llama.cpp's own KV log line, HF's cache layers); ``kv_dtypes``
  gives it in kvbench's names (the row name when the row's own setting was applied).
- Load options that mean nothing to the engine (kvbench's simulated VRAM budget, wave
  budget, GPU layer split on a CPU build) are not silently dropped: each one is a line in
  ``notes``, which the runner records with the case.
- Teacher-forced ``logits`` calls are kept on a ``tape`` (tokens, result; up to
  ``TAPE_POSITIONS`` positions) so the "dtype changed nothing" detector
  (``harness.engines.EnginePool.kv_effect``) can replay the same tokens on a ``twin``: the same
  engine and weights with another KV setting.

    eng = harness.adapters.load("llama.cpp", "smollm2-135m", "q8_0", {"ctx": 4096})
    eng.kv_dtypes[0], eng.kv_applied_native[0], eng.notes
"""
from __future__ import annotations

from typing import Any

from ..errors import HarnessError

TAPE_POSITIONS = 4096          # teacher-forced positions kept for the detector (~800 MB at 49k vocab)

# load options of kvbench's own engine that another engine has no use for, and why
FOREIGN_OPTIONS = {
    "vram_budget_gib": "kvbench's simulated device budget (its planner); {engine} plans its own memory",
    "n_gpu_layers": "kvbench's trunk/tail split; {engine} runs every layer on {device}",
    "wave_budget_mib": "kvbench's attention wave budget; {engine} has no wave prefill",
    "wave_split": "kvbench's attention waves; {engine} has no wave prefill",
    "expert_format": "kvbench's storage of routed experts; {engine} keeps its own",
    "cpu_moe": "kvbench's experts-on-the-CPU placement; {engine} places its own experts",
}


class EngineUnavailable(HarnessError):
    """The engine cannot be used here: a missing build or package, a server that cannot be
    reached or lacks what the harness needs (bad input: exit 2, one line naming the fix)."""


class KVNotSupported(HarnessError):
    """A KV setting the engine does not have (raised, never replaced by another one)."""


class Adapter:
    """Base of the engine adapters (see the module docstring)."""

    name = "adapter"
    capabilities: frozenset[str] = frozenset()
    weight_format = "native"            # what the engine computes with ("gguf": the file's own types)
    NATIVE: tuple[str, ...] = ()        # the engine's KV settings, widest first
    ROWS: dict[str, str] = {}           # suite row -> the engine's setting for it (default mapping)
    SAME_FORMAT: dict[str, str] = {}  # engine setting -> kvbench's name for the same format

    @classmethod
    def valid_native(cls, native: str) -> bool:
        """Whether ``native`` is one of this engine's KV settings."""
        return native in cls.NATIVE

    @classmethod
    def native_of(cls, row: str) -> str | None:
        """The engine's setting for suite row ``row`` by default (None: it has none)."""
        return cls.ROWS.get(row)

    def __init__(self, model: str, row: str, native: str, opts: dict | None = None, device: str = "cpu"):
        from engine.models import resolve, spec_for
        if not self.valid_native(native):
            raise KVNotSupported(f"{self.name} has no KV setting {native!r}",
                                 f"use one of {', '.join(self.NATIVE)}")
        self.model_name, self.kv_dtype_requested, self.kv_native_requested = model, row, native
        self.path = resolve(model)
        self.spec = spec_for(model)
        self.device = device
        self.opts = dict(opts or {})
        self.ctx = int(self.opts.get("ctx") or 4096)
        self.notes: list[str] = []
        for key, why in FOREIGN_OPTIONS.items():
            if self.opts.get(key) not in (None, 0, False):
                self.notes.append(f"{key}={self.opts[key]} not used: "
                                  + why.format(engine=self.name, device=device))
        self.tape: list[tuple[list[int], Any]] = []
        self.model = True                # truthy while the adapter holds its engine (EnginePool)
        self.last_stop_reason = "length"

    # -- what was applied -------------------------------------------------------------------
    @property
    def kv_applied_native(self) -> list[str]:
        """The engine's KV setting per layer, as the engine itself reports it."""
        raise NotImplementedError

    @property
    def kv_dtypes(self) -> list[str]:
        """Per layer: the row's name when the engine holds the setting the row asked for, else
        what it holds (kvbench's name for the format where it has one)."""
        return [self.kv_dtype_requested if a == self.kv_native_requested else self.SAME_FORMAT.get(a, a)
                for a in self.kv_applied_native]

    @property
    def kv_note(self) -> str | None:
        """What the engine keeps in full precision although a narrower KV was asked (None: nothing)."""
        return None

    def describe(self) -> dict:
        return {"engine": self.name, "row": self.kv_dtype_requested, "kv_requested": self.kv_native_requested,
                "kv_applied": sorted(set(self.kv_applied_native)), "kv_note": self.kv_note,
                "notes": list(self.notes), "weight_format": self.weight_format}

    # -- the detector's hooks ---------------------------------------------------------------
    def references(self) -> list[str]:
        """Settings of this engine the row is held against by the "dtype changed nothing"
        detector: the widest, then every other one at least as wide as the request (a request
        that fell back to any of them leaves the logits equal to its run)."""
        i = self.NATIVE.index(self.kv_native_requested)
        return [n for n in self.NATIVE[:i] if n in self.DETECTOR_REFERENCES]

    DETECTOR_REFERENCES: tuple[str, ...] = ()

    def twin(self, native: str) -> "Adapter":
        """The same engine, model and weights with another KV setting (for the detector)."""
        raise NotImplementedError

    def record(self, tokens: list[int], logits) -> None:
        used = sum(len(t) for t, _ in self.tape)
        if used + len(tokens) <= TAPE_POSITIONS:
            self.tape.append((list(tokens), logits))

    def close(self) -> None:
        self.model = None
        self.tape = []


def greedy(logits_row) -> int:
    """The greedy choice over one position's logits (first index on ties, as torch.argmax)."""
    import torch
    return int(torch.as_tensor(logits_row).argmax())
