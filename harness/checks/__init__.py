"""Checks: the registry of check kinds and the interface they implement (``harness.checks.base``).

Importing this package imports every check module, so ``kinds()`` is complete. Imports go
one way: this package -> each check module -> ``harness.checks.base`` -> ``harness.schema``.

    from harness import checks
    check = checks.get("argmax"); cfg_cls = checks.config_class("argmax")
"""
from __future__ import annotations

from .base import (CaseContext, Check, Metric, ModelInfo, Outcome, chat_ids, config_class,  # noqa: F401
                   eos_ids, get, kinds, register)
from . import argmax, coherence, wave_prefill, vram, throughput, multiturn  # noqa: E402,F401  (register)
from .. import summary  # noqa: E402,F401  (registers the report sections of the run summary and multiturn)
from . import corpus_kld, needle  # noqa: E402,F401  (register; issue 15 items 2 and 5)
from . import layer_sensitivity  # noqa: E402,F401  (register; issue 15 item 6)
