"""Attention/KV kernels: one file per op (Triton kernel, launch wrapper, torch ``*_ref``).

Contract: ``use_triton(device)`` says which implementation an op runs. The backend is
chosen once from ``KVBENCH_ATTN_BACKEND`` (``auto`` | ``torch`` | ``triton``; default
``auto`` = Triton on CUDA, the torch reference elsewhere) and can be forced with
``set_backend``. Format facts (``Q8_BLOCK``, ``Q8_BYTES``, ``Q8_SCALE_BYTES``: ggml block_q8_0's
32 values in 34 bytes, a 2-byte fp16 scale first) come from ``engine.formats``; the Triton
kernels read them as ``tl.constexpr`` globals; ``KV_FORMAT_CODES`` is the kernels' own FMT
code of each format. Without CUDA, Triton kernels run in its interpreter: this package sets
``TRITON_INTERPRET=1`` before any kernel module is imported (``triton.jit`` reads the knob
when it decorates), so the import order of tests does not matter.

    from engine import kernels
    kernels.set_backend("triton")   # force the kernels (interpreted on CPU) for a test
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch

from ..errors import ConfigError
from ..formats import Q8_BLOCK, Q8_BYTES, Q8_SCALE_BYTES  # noqa: F401  (block geometry: engine.formats)

BACKENDS = ("auto", "torch", "triton")
KV_FORMAT_CODES = {"fp32": 0, "bf16": 1, "q8_0": 2}   # the FMT constexpr every kernel takes


def _repair_interpreter() -> None:
    """Triton's own @jit library functions (tl.sum, tl.max, ...) are interpreted only if
    TRITON_INTERPRET was set when triton was first imported; if something imported triton
    earlier (torch._dynamo does), rewrap them so that interpreted kernels can call them."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    swapped = {}
    for mod in (tl.standard, tl.random, tl):
        for name, value in list(vars(mod).items()):
            if isinstance(value, JITFunction):
                new = swapped.setdefault(id(value), InterpretedFunction(value.fn))
                setattr(mod, name, new)
    for name, value in list(vars(tl.tensor).items()):
        if isinstance(value, JITFunction) and id(value) in swapped:
            setattr(tl.tensor, name, swapped[id(value)])


if not torch.cuda.is_available():
    _triton_was_imported = "triton" in sys.modules
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if _triton_was_imported and os.environ["TRITON_INTERPRET"] not in ("", "0"):
        _repair_interpreter()


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ConfigError(f"{source}={name!r} is not one of {', '.join(BACKENDS)}", "pick one of those")
    return name


_backend = _check(os.environ.get("KVBENCH_ATTN_BACKEND", "auto").strip().lower() or "auto",
                  "KVBENCH_ATTN_BACKEND")


def set_backend(name: str) -> str:
    """Force ``auto``/``torch``/``triton`` for every later call; returns the previous one."""
    global _backend
    prev, _backend = _backend, _check(name, "set_backend")
    return prev


def get_backend() -> str:
    return _backend


def planted(fault: str) -> bool:
    """Whether ``KVBENCH_FAULT`` plants ``fault`` here (harness self-tests only; declared in
    ``engine.settings``). The kernels' faults, in the torch references and the Triton kernels
    alike: ``wave_mask_off_by_one`` (waves after a prefill's first see one key past their
    position: the causal mask shifted by one), ``q8_scale_bf16`` (q8_0 block scales rounded
    to bfloat16's width before they are stored as fp16) and ``q8_scale_shift`` (each q8_0 block
    stored with the scale of the block before it in its row)."""
    from .. import settings
    return (settings.get("KVBENCH_FAULT") or ("", None))[0] == fault


class LaunchLog:
    """What a kernel module's launches applied, observable: inside ``recording()`` each launch's
    configuration (kernel, tiles, form, as the launch read them) is appended to the list it
    yields; outside, nothing is kept. ``distinct(entries)``: each distinct configuration once,
    with how many launches made it (``layers``: a decode step launches once a layer)."""

    def __init__(self):
        self.active: list | None = None

    @contextlib.contextmanager
    def recording(self):
        prev, self.active = self.active, []
        try:
            yield self.active
        finally:
            self.active = prev

    def record(self, entry: dict) -> None:
        if self.active is not None:
            self.active.append(entry)

    def compiled(self, handle) -> None:
        """Add to the last recorded launch what its compiled kernel ``handle`` (what a Triton
        launch returns) reports: registers a thread and spills (``n_regs``, ``n_spills``), where
        the backend compiled it (not the interpreter: nothing is added)."""
        if self.active and getattr(handle, "n_regs", None) is not None:
            self.active[-1].update(n_regs=int(handle.n_regs), n_spills=int(getattr(handle, "n_spills", 0) or 0))

    @staticmethod
    def distinct(entries: list[dict]) -> list[dict]:
        seen: dict = {}
        for cfg in entries:
            key = tuple(sorted((k, str(v)) for k, v in cfg.items()))
            seen.setdefault(key, dict(cfg, layers=0))["layers"] += 1
        return list(seen.values())


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(device: torch.device | str) -> bool:
    dev = torch.device(device)
    if _backend == "torch":
        return False
    if _backend == "auto":
        return dev.type == "cuda"
    if dev.type == "cpu" and not interpreted():
        raise ConfigError("KVBENCH_ATTN_BACKEND=triton on a CPU tensor needs TRITON_INTERPRET=1 "
                          "before triton is imported", "unset TRITON_INTERPRET=0 or use the torch backend")
    return True
