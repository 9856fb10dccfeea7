"""throughput: prefill and decode speed, named as llama-bench names them (pp512, tg128).

Contract: ``pp<N>`` prefills N prompt tokens from an empty cache (``eng.prefill`` when the
engine has it, else ``eng.logits``); ``tg<N>`` decodes N tokens greedily after a one-token
prompt (``eng.generate(..., stop_at_eos=False)``). Each runs ``warmup`` times untimed, then
``repeats`` times timed (CUDA synchronized; ``warmup_tokens`` shrinks the warm-up runs where
a full-size one costs too much, e.g. on a 2-core CPU); the metric is the median tok/s and the raw
samples are kept in the record's series.

    [[check]]
    kind = "throughput"; pp = 512; tg = 128; repeats = 3
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..schema import CheckConfig, param, threshold
from ..text import prompt_tokens
from ..engine_api import CAP_CHAT, CAP_GENERATE, CAP_PREFILL
from .base import Check, Outcome, register


@dataclass
class ThroughputConfig(CheckConfig):
    pp: int = param(512, lo=1)
    tg: int = param(128, lo=1)
    repeats: int = param(3, lo=1)
    warmup: int = param(1, lo=0)
    warmup_tokens: int | None = param(None, lo=1, help="size of warm-up runs (default: full size)")
    min_pp_tok_s: float | dict[str, float] | None = threshold("pp{pp}", ">=")
    min_tg_tok_s: float | dict[str, float] | None = threshold("tg{tg}", ">=")


def _sync(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, device: str, warmup: int, repeats: int, warm_n: int | None) -> list[float]:
    for _ in range(warmup):
        fn(warm_n)
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn(None)
        _sync(device)
        out.append(n / (time.perf_counter() - t0))
    return out


@register
class Throughput(Check):
    kind = "throughput"
    config = ThroughputConfig
    requires = frozenset({CAP_PREFILL, CAP_GENERATE, CAP_CHAT})
    needs_baseline = False

    def load_options(self, cfg: ThroughputConfig, suite):
        opts = super().load_options(cfg, suite)
        opts["ctx"] = max(opts["ctx"], cfg.pp, cfg.tg + 1)
        return opts

    def measure(self, eng, cfg: ThroughputConfig, state, ctx) -> Outcome:
        prompt = prompt_tokens(eng.tokenizer, cfg.pp, ctx.seed)

        def pp(n=None):
            eng.prefill(prompt[:n])
            return len(prompt[:n])

        def tg(n=None):
            return len(eng.generate(prompt[:1], n or cfg.tg, stop_at_eos=False))

        pp_s = _timed(pp, ctx.device, cfg.warmup, cfg.repeats, cfg.warmup_tokens)
        tg_s = _timed(tg, ctx.device, cfg.warmup, cfg.repeats, cfg.warmup_tokens)
        out = Outcome()
        out.add(f"pp{cfg.pp}", statistics.median(pp_s), "tok/s", "higher")
        out.add(f"tg{cfg.tg}", statistics.median(tg_s), "tok/s", "higher")
        out.series = {f"pp{cfg.pp}_samples": pp_s, f"tg{cfg.tg}_samples": tg_s}
        out.info.update(prefill_api="eng.prefill", warmup=cfg.warmup, warmup_tokens=cfg.warmup_tokens, repeats=cfg.repeats)
        return out
