"""throughput: prefill and decode speed, named as llama-bench names them (pp512, tg128),
with the spread of its repetitions and the machine's load during each.

Contract: ``pp<N>`` prefills N prompt tokens from an empty cache (``eng.prefill``);
``tg<N>`` decodes N tokens greedily after a one-token prompt
(``eng.generate(..., stop_at_eos=False)``). Each runs ``warmup`` times untimed, then
``repeats`` (at least 5, issue 15.7) times timed (CUDA synchronized; ``warmup_tokens``
shrinks the warm-up runs where a full-size one costs too much, e.g. on a 2-core CPU; on CUDA
the warm-up is always full size, since the first run at a new size compiles and tunes kernels
for it: pp256 after a pp16 warm-up timed 68-92 tok/s against ~350 for the next four,
reports/h100-2026-12-05c call 5; ``info.warmup_tokens`` is the size applied).

``tg<N>@d<D>`` for each ``tg_depths`` entry D (llama-bench's ``tg N @ d D``, where a KV dtype's
bytes show: at depth 0 the KV is a few kB): the D context tokens are prefilled once, untimed;
each sample rewinds to D (``Engine.rewind``, untimed) and times N greedy decode steps from
there (``decode_greedy``). An engine without ``rewind`` / ``decode_greedy`` (capability
``decode_at``), or whose caches cannot rewind (sliding-window rings), gets the metric skipped
with the reason, never a depth-0 number under a depth label.

Per measure (``pp<N>`` / ``tg<N>`` / ``tg<N>@d<D>``), with ``harness.speedstats.spread`` over the samples:

- metric ``<name>``: the median tok/s (the gated value); its ``detail`` says ``unstable``
  when the row is;
- metric ``<name> stddev`` (tok/s, sample standard deviation) and ``<name> CV`` (%,
  stddev / mean), descriptive;
- metric ``<name> unstable``: true when the CV is above ``max_cv_pct`` (default 10%): such a
  row is shown as unstable and ``harness compare`` does not compare it;
- series ``<name>_samples`` (every tok/s sample, in order: the records ``compare`` ranks),
  ``<name>_load1`` (``os.getloadavg()[0]`` after each sample) and ``<name>_others_cpu``
  (the fraction of all CPUs that *other* processes kept busy during each sample: busy time
  from ``/proc/stat`` minus this process's CPU time, over wall time x CPUs; None where
  ``/proc/stat`` is missing);
- metric ``Others' CPU busy`` (%): the largest such fraction over every sample, descriptive.

Prefill path (``prefill_path``, issue 14.3): ``exact`` (default: the engine's own kernels,
float32 maths over the KV stored at the dtype, as every accuracy check runs) or ``fast``
(``Engine.set_prefill_path("fast")``: bfloat16 SDPA over the stored rows, and bf16 activations
over bf16 weights, as HF's bf16 model runs; for throughput on GPUs). ``pp<N>`` is timed on the path asked for and its ``detail`` names it; with ``fast`` the
check also measures, once per row, metric ``Fast-vs-exact max abs logit`` (teacher-forced
logits of the first ``min(pp, fast_delta_tokens)`` prompt tokens on both paths) and puts the
engine back on ``exact`` afterwards. An engine that cannot set its prefill path gets ``pp<N>``
and the delta as n/a with the reason, never an exact-path number under a fast label.
``info.prefill_path`` records the path, ``info.prefill_activations`` the fast path's activation
dtype where the engine says it.

``info`` holds the deterministic facts: repeats, warm-up, ``cpu_count`` (``os.cpu_count``),
``cpus_usable`` (the affinity mask) and how the load was read. Results written before these
metrics existed hold ``<name>_samples`` only; readers compute the spread from them.

    [[check]]
    kind = "throughput"; pp = 512; tg = 128; repeats = 5
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

# torch loads in the function that uses it: a bad suite fails fast, in one line, without it

from engine.errors import ConfigError

from ..engine_api import (CAP_CHAT, CAP_DECODE_AT, CAP_GENERATE, CAP_LOGITS, CAP_PREFILL, CAP_PREFILL_PATH,
                          capabilities_of)
from ..errors import SuiteError
from ..schema import CheckConfig, param, threshold
from ..speedstats import spread
from ..text import prompt_tokens
from .base import Check, Outcome, metric, register

MIN_REPEATS = 5


@dataclass
class ThroughputConfig(CheckConfig):
    pp: int = param(512, lo=1)
    tg: int = param(128, lo=1)
    repeats: int = param(MIN_REPEATS, lo=MIN_REPEATS,
                         help="timed repetitions (>= 5: the rank test in compare needs them)")
    warmup: int = param(1, lo=0)
    warmup_tokens: int | None = param(None, lo=1, help="size of warm-up runs on the CPU (default and on CUDA: full size)")
    max_cv_pct: float = param(10.0, lo=0, lo_open=True,
                              help="a row whose coefficient of variation is above this is unstable")
    prefill_path: str = param("exact", help='"exact" (float32 maths over the stored KV, as accuracy '
                                            'checks run) or "fast" (bfloat16 SDPA: throughput only)')
    fast_delta_tokens: int = param(512, lo=2, help="prompt tokens of the fast-vs-exact logit comparison")
    tg_depths: list[int] = param(default_factory=list,
                                 help="depths D at which tg is timed again, as llama-bench's tg N @ d D: "
                                      "metric tg<N>@d<D>, after one untimed prefill of D tokens")
    min_pp_tok_s: float | dict[str, float] | None = threshold("pp{pp}", ">=")
    min_tg_tok_s: float | dict[str, float] | None = threshold("tg{tg}", ">=")

    def validate(self, path, where: str) -> None:
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in self.tg_depths):
            raise SuiteError(path, f"{where}.tg_depths", f"{self.tg_depths!r} is not a list of depths",
                             "positive token counts, e.g. [4096, 16384]")
        if self.prefill_path not in ("exact", "fast"):
            raise SuiteError(path, f"{where}.prefill_path", f"{self.prefill_path!r} is not a prefill path",
                             '"exact" or "fast"')


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def _proc_stat() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            first = fh.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    v = [int(x) for x in first[1:9]]          # user nice system idle iowait irq softirq steal
    v += [0] * (8 - len(v))
    return sum(v) - v[3] - v[4], sum(v)


def _n_cpus_in_stat() -> int | None:
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            return sum(1 for line in fh if line.startswith("cpu") and line[3:4].isdigit()) or None
    except OSError:
        return None


class LoadProbe:
    """Around one timed sample: the 1-minute load average after it, and the fraction of all
    CPUs that other processes used during it (system busy time minus ours)."""
    HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __enter__(self):
        self.stat0, self.cpu0, self.t0 = _proc_stat(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        own = time.process_time() - self.cpu0
        stat1 = _proc_stat()
        self.load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        self.others = None
        if self.stat0 and stat1 and stat1[1] > self.stat0[1] and wall > 0:
            busy_s = (stat1[0] - self.stat0[0]) / self.HZ
            cpus = (stat1[1] - self.stat0[1]) / self.HZ / wall    # CPUs the counters covered
            self.others = min(1.0, max(0.0, (busy_s - own) / (wall * max(cpus, 1.0))))
        return False


def _timed(fn, device: str, warmup: int, repeats: int, warm_n: int | None):
    """tok/s of ``repeats`` calls of ``fn(None)`` after ``warmup`` untimed ``fn(warm_n)``; ``fn``
    returns the tokens it ran and is timed whole. A measure with untimed set-up of its own
    (``_AtDepth``) has ``setup(n)``: run untimed before each call, it returns the timed part."""
    setup = getattr(fn, "setup", None)
    for _ in range(warmup):
        (setup(warm_n) if setup else (lambda: fn(warm_n)))()
    _sync(device)
    out, load1, others = [], [], []
    for _ in range(repeats):
        run = setup(None) if setup else (lambda: fn(None))
        _sync(device)
        with LoadProbe() as probe:
            t0 = time.perf_counter()
            n = run()
            _sync(device)
            dt = time.perf_counter() - t0
        out.append(n / dt)
        load1.append(probe.load1)
        others.append(probe.others)
    return out, load1, others


class _AtDepth:
    """``tg<N>@d<D>``: one untimed prefill of the D context tokens (at the first set-up), then per
    sample an untimed ``rewind(D)``; the timed part is ``decode_greedy`` of N tokens from the
    prefill's argmax, each step attending over the D tokens and those decoded so far."""

    def __init__(self, eng, context: list[int], n_tokens: int):
        self.eng, self.context, self.n_tokens, self.first = eng, context, n_tokens, None

    def setup(self, n=None):
        if self.first is None:
            self.first = int(self.eng.prefill(self.context).argmax())
        self.eng.rewind(len(self.context))
        k = n or self.n_tokens
        return lambda: len(self.eng.decode_greedy(self.first, k))


@register
class Throughput(Check):
    kind = "throughput"
    config = ThroughputConfig
    requires = frozenset({CAP_PREFILL, CAP_GENERATE, CAP_CHAT})
    metrics = (
        metric("pp{n}", "tok/s", "higher", "prompt processing (llama-bench pp<n>): median of the repetitions"),
        metric("tg{n}", "tok/s", "higher", "token generation (llama-bench tg<n>): median of the repetitions"),
        metric("tg{n}@d{depth}", "tok/s", "higher",
               "token generation after <depth> tokens of context (llama-bench tg<n> @ d<depth>): median"),
        metric("{measure} stddev", "tok/s", None, "spread of the repetitions"),
        metric("{measure} CV", "%", None, "coefficient of variation of the repetitions"),
        metric("{measure} unstable", "", None, "CV above max_cv_pct: not compared as a speed change"),
        metric("Others' CPU busy", "%", None, "largest share of the CPUs other processes used in a sample"),
        metric("Fast-vs-exact max abs logit", "logits", None,
               "largest teacher-forced logit difference between the fast and the exact prefill path"),
    )
    needs_baseline = False

    def load_options(self, cfg: ThroughputConfig, suite):
        opts = super().load_options(cfg, suite)
        opts["ctx"] = max(opts["ctx"], cfg.pp, cfg.tg + 1, max(cfg.tg_depths, default=0) + cfg.tg)
        return opts

    def measure(self, eng, cfg: ThroughputConfig, state, ctx) -> Outcome:
        prompt = prompt_tokens(eng.tokenizer, cfg.pp, ctx.seed)

        def pp(n=None):
            eng.prefill(prompt[:n])
            return len(prompt[:n])

        def tg(n=None):
            return len(eng.generate(prompt[:1], n or cfg.tg, stop_at_eos=False))

        out = Outcome()
        busiest = []
        fast = cfg.prefill_path == "fast"
        fast_why = fast_act = None
        if fast and CAP_PREFILL_PATH not in capabilities_of(eng):
            fast_why = f"engine {eng.name} cannot set its prefill path (no fast path to time)"
        elif fast:
            try:
                eng.set_prefill_path("fast")
                eng.set_prefill_path("exact")
            except Exception as exc:                         # ConfigError: e.g. sliding-window rings
                fast_why = str(exc.args[0] if exc.args else exc)
        pp_name = f"pp{cfg.pp}"
        warm_n = None if str(ctx.device).startswith("cuda") else cfg.warmup_tokens     # see the docstring
        measures = [(pp_name, pp), (f"tg{cfg.tg}", tg)]
        depth_why = {}
        for depth in cfg.tg_depths:
            name = f"tg{cfg.tg}@d{depth}"
            if CAP_DECODE_AT not in capabilities_of(eng):
                depth_why[name] = f"engine {eng.name} cannot decode from a depth (rewind + decode_greedy)"
            measures.append((name, _AtDepth(eng, prompt_tokens(eng.tokenizer, depth, ctx.seed + depth), cfg.tg)))
        for name, fn in measures:
            if name == pp_name and fast_why:
                out.skip(name, f"prefill path 'fast' not applied: {fast_why}", "tok/s", "higher")
                continue
            if name in depth_why:
                out.skip(name, depth_why[name], "tok/s", "higher")
                continue
            try:
                if name == pp_name and fast:
                    eng.set_prefill_path("fast")
                    fast_act = getattr(eng, "prefill_activations", None)
                samples, load1, others = _timed(fn, ctx.device, cfg.warmup, cfg.repeats, warm_n)
            except ConfigError as exc:           # e.g. rewind on sliding-window rings: not measured, said so
                if name == pp_name or "@d" not in name:
                    raise
                out.skip(name, f"not measured: {exc.args[0] if exc.args else exc}", "tok/s", "higher")
                continue
            finally:
                if name == pp_name and fast:
                    eng.set_prefill_path("exact")
            s = spread(samples)
            unstable = s.unstable(cfg.max_cv_pct / 100.0)
            cv = None if s.cv is None else 100.0 * s.cv
            notes = []
            if name == pp_name and fast:
                notes.append("fast prefill path (bf16 SDPA" + (f", {fast_act} activations)" if fast_act else ")"))
            if unstable:
                notes.append(f"unstable: CV {cv:.1f}% > {cfg.max_cv_pct:g}% over {s.n} repetitions")
            out.add(name, s.median, "tok/s", "higher", detail="; ".join(notes) or None)
            out.add(f"{name} stddev", s.stdev, "tok/s", None)
            out.add(f"{name} CV", cv, "%", None)
            out.add(f"{name} unstable", bool(unstable), "", None)
            out.series[f"{name}_samples"] = samples
            out.series[f"{name}_load1"] = load1
            out.series[f"{name}_others_cpu"] = others
            busiest += [x for x in others if x is not None]
        if busiest:
            out.add("Others' CPU busy", 100.0 * max(busiest), "%", None,
                    detail="largest share of all CPUs other processes used during one timed sample")
        else:
            out.skip("Others' CPU busy", "/proc/stat is not readable on this system", "%")
        if fast and fast_why:
            out.skip("Fast-vs-exact max abs logit", f"prefill path 'fast' not applied: {fast_why}", "logits")
        elif fast and CAP_LOGITS not in capabilities_of(eng):
            out.skip("Fast-vs-exact max abs logit", f"engine {eng.name} gives no teacher-forced logits", "logits")
        elif fast:
            n = min(cfg.pp, cfg.fast_delta_tokens)
            exact_logits = eng.logits(prompt[:n])
            try:
                eng.set_prefill_path("fast")
                fast_logits = eng.logits(prompt[:n])
            finally:
                eng.set_prefill_path("exact")
            delta = (fast_logits.float() - exact_logits.float()).abs().max().item()
            out.add("Fast-vs-exact max abs logit", delta, "logits", None,
                    detail=f"teacher-forced, {n} prompt tokens; the exact path is what accuracy checks use")
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        if fast_act:
            out.info["prefill_activations"] = fast_act
        out.info.update(prefill_api="eng.prefill", prefill_path=cfg.prefill_path, warmup=cfg.warmup, warmup_tokens=warm_n,
                        warmup_tokens_requested=cfg.warmup_tokens,
                        repeats=cfg.repeats, max_cv_pct=cfg.max_cv_pct, cpu_count=os.cpu_count(),
                        cpus_usable=affinity, cpus_in_proc_stat=_n_cpus_in_stat(),
                        load_probe="os.getloadavg()[0] after each sample; others' CPU share from "
                        "/proc/stat busy jiffies minus this process's CPU time")
        return out
