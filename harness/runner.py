"""Runner: a suite's matrix (model x KV dtype x check) through the engine into a results dir.

Contract: ``run(suite, out_dir, ...)`` runs every case of the matrix in a fixed order
(model, then baseline dtype first, then each check), writing each case's records as soon as
it finishes (``harness.results.RecordWriter``: appended, flushed, fsynced). Each check's
baseline state (reference tokens and logits) is computed once per model on the baseline
engine and kept in memory; a resumed or sharded run recomputes it when it needs it (the
baseline is deterministic). A metric record's unit and direction are its declaration in
``harness.metric_registry`` (the check's own values where it declares none), and the manifest
records the declarations of the suite's checks (``metrics``) for the report and ``compare``.
Thresholds from the suite turn metrics into pass/fail; a case
whose engine raises an ``EngineError`` is recorded as ``error`` and the run goes on.
Returns a ``RunSummary``; the CLI maps it to exit code 0 (all pass) or 1 (a case failed, a
case not run, or nothing measured: every case n/a is verdict "nothing measured", never a pass).

Case statuses: ``pass``; ``fail`` (a gate measured and missed); ``incomplete`` (a gated
metric skipped, missing or not finite, and not marked ``optional`` in the suite: exit 1 like
a failure); ``error`` (the engine raised); ``n/a`` (the check declared before running that it
cannot mean anything on this model, with the reason: not run, not a failure).

Before anything is written: the device is resolved (``--device`` over the suite's ``device``;
``auto`` = CUDA when present), every model is opened from metadata (a synthetic model is not
generated yet) and every engine the matrix needs is planned, host RAM included: a plan that
does not fit, a bad model file or a wave budget below the model's smallest wave is bad input
(exit 2) before any case runs. Engines: at most one holds weights at a time (``EnginePool``):
a new KV dtype or load option of the same model takes the loaded weights over
(``engine.load(weights_from=...)``) when the plan places them the same way, else the old
engine is closed and its memory given back before the next load. Peak host memory
(``engine.hostmem``) and GPU memory are recorded per case and for the run.

    summary = run(load_suite("suites/smoke.toml"), "results/smoke")
    summary.exit_code
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import settings
from engine.cli import check_interrupt
from engine.errors import EngineError

from . import checks as registry
from . import metric_registry
from .checks import CaseContext, ModelInfo, Outcome
from .engine_api import missing
from .engines import EnginePool, weight_format_of, weight_format_requested_of
from .errors import ResultsError, UsageError
from .results import (MANIFEST, RECORDS, RecordWriter, RunLock, atomic_write, case_key, device_info,
                      git_info, load_results, nothing_measured, now, process_identity, read_records, runtime_env,
                      versions, write_manifest, write_summary)
from .suite import (DEVICE_RE, WEIGHT_FORMATS, CheckConfig, Suite, SuiteError, load_suite, platform_of,
                    validate_model)

FINISHED = ("pass", "fail", "n/a")      # statuses --resume keeps; error / incomplete run again


@dataclass(frozen=True)
class Case:
    model: str
    kv_dtype: str
    check: str

    @property
    def key(self) -> tuple[str, str, str]:
        return self.model, self.kv_dtype, self.check

    def __str__(self) -> str:
        return f"{self.model} {self.kv_dtype} {self.check}"


@dataclass
class RunSummary:
    dir: Path
    cases: list[dict] = field(default_factory=list)      # case records of this matrix, in order
    ran: int = 0                                          # cases run now (not resumed)
    unexpected: list[str] = field(default_factory=list)   # traceback files of harness bugs

    expected: int = 0                                     # cases in this run's matrix (shard)

    @property
    def failed(self) -> list[dict]:
        """Cases that did not pass: fail, incomplete, error (n/a is declared, not failed)."""
        return [c for c in self.cases if c["status"] not in ("pass", "n/a")]

    @property
    def not_run(self) -> int:
        """Cases of the matrix with no record (``--max-cases`` stopped early, or interrupted)."""
        return max(0, self.expected - len(self.cases))

    @property
    def verdict(self) -> str:
        if self.unexpected:
            return "error"
        if self.failed:
            return "fail"
        if self.not_run:
            return "incomplete"
        return "nothing measured" if nothing_measured(c["status"] for c in self.cases) else "pass"

    @property
    def exit_code(self) -> int:
        if self.unexpected:
            return 3
        return 0 if self.verdict == "pass" else 1


def _experts_applied(eng) -> dict:
    """Where the routed experts went, as the engine's plan applied it (kvbench; {} for a peer):
    kept at the weight format or in the file's blocks, and how many MoE layers' experts live on
    the host (an "auto" request resolved to its count), so a row's placement is read, not assumed."""
    plan = getattr(eng, "plan", None)
    if plan is None or not hasattr(plan, "expert_format"):
        return {}
    return {"expert_format": plan.expert_format, "cpu_moe": plan.cpu_moe,
            "cpu_moe_requested": plan.cpu_moe_requested or None, "host_experts": plan.host_experts,
            **({"host_experts_requested": plan.host_experts_requested,
                "host_experts_reason": plan.host_experts_reason} if getattr(plan, "host_experts_requested", "") else {})}


def matrix(suite: Suite, models: list[str]) -> list[Case]:
    """Every case in run order: model, then dtype (baseline first), then checks grouped by
    their engine.load options (so one engine serves consecutive checks), suite order within."""
    return [Case(m, d, c.name) for m in models for d in suite.dtypes for c in check_order(suite)]


def check_order(suite: Suite) -> list[CheckConfig]:
    keys = []
    for c in suite.checks:
        opts = registry.get(c.KIND).load_options(c, suite.suite)
        keys.append(tuple(sorted(opts.items())))
    first = {k: keys.index(k) for k in keys}
    return [c for _, _, c in sorted((first[k], i, c) for i, (k, c) in enumerate(zip(keys, suite.checks)))]


def shard(cases: list[Case], i: int, n: int) -> list[Case]:
    """Shard ``i`` of ``n``: contiguous (model, dtype) groups, so a shard tends to hold whole
    models and recomputes few baselines."""
    groups = list(dict.fromkeys((c.model, c.kv_dtype) for c in cases))
    lo, hi = (len(groups) * i) // n, (len(groups) * (i + 1)) // n
    mine = set(groups[lo:hi])
    return [c for c in cases if (c.model, c.kv_dtype) in mine]


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text!r}: need 0 <= i < n", "e.g. --shard 0/4 ... --shard 3/4")
    return i, n


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def judge(outcome: Outcome, cfg: CheckConfig, model: str, kv_dtype: str,
          platform: str | None = None) -> tuple[list[dict], list[str], list[str]]:
    """Metric records with thresholds applied; one line per failed gate; one line per gate
    left unmeasured (skipped, not reported, not a finite number) that the suite does not
    mark ``optional``: those make the case ``incomplete``, never ``pass``."""
    gates = cfg.gates(model, kv_dtype, platform)
    recs, failures, unmeasured = [], [], []

    def unmeasured_gate(rec: dict, why: str) -> None:
        reason = cfg.optional_reason(rec["metric"], model, kv_dtype)
        rec["optional"] = reason
        if reason is None:
            unmeasured.append(f"{rec['metric']} not measured ({why}); required {rec['op']} {rec['threshold']:g}")

    kind = getattr(cfg, "KIND", "")
    for m in outcome.metrics:
        bound, op = gates.pop(m.name, (None, None))
        decl = metric_registry.lookup(kind, m.name)       # unit and direction, declared once
        rec = {"type": "metric", "metric": m.name, "value": m.value, "unit": decl.unit if decl else m.unit,
               "better": decl.better if decl else m.better, "threshold": bound, "op": op, "passed": None,
               "skipped": m.skipped, "detail": m.detail}
        if getattr(m, "na", False):
            rec["na"] = m.skipped or "not applicable"
        if bound is not None:
            numeric = isinstance(m.value, (int, float)) and not isinstance(m.value, bool)
            if rec.get("na"):
                pass                         # declared not applicable: neither measured nor missing
            elif m.skipped is not None:
                unmeasured_gate(rec, m.skipped)
            elif not numeric or not math.isfinite(float(m.value)):
                unmeasured_gate(rec, f"value {m.value!r} is not a finite number")
            else:
                v = float(m.value)
                rec["passed"] = v <= bound if op == "<=" else v >= bound
                if not rec["passed"]:
                    unit = f" {rec['unit']}" if rec["unit"] else ""
                    failures.append(f"{m.name} = {_fmt(m.value)}{unit} (required {op} {bound:g})"
                                    + (f": {m.detail}" if m.detail else ""))
        recs.append(rec)
    for name, (bound, op) in gates.items():   # a threshold on a metric the check did not report
        decl = metric_registry.lookup(kind, name)
        rec = {"type": "metric", "metric": name, "value": None, "unit": decl.unit if decl else "",
               "better": decl.better if decl else None, "threshold": bound, "op": op, "passed": None,
               "skipped": "not reported by the check", "detail": None}
        unmeasured_gate(rec, "not reported by the check")
        recs.append(rec)
    return recs, failures, unmeasured


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; anything else as given
    (a CUDA request on a machine without CUDA is bad input)."""
    if not DEVICE_RE.match(requested):
        raise UsageError(f"--device {requested!r}: expected auto, cpu, cuda or cuda:N")
    import torch
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {requested!r}: CUDA is not available on this machine",
                         "run on a GPU machine, or pass --device cpu (or auto)")
    return requested


class Runner:
    def __init__(self, suite: Suite, out_dir: str | Path, *, models: list[str] | None = None,
                 device: str | None = None, shard_spec: str | None = None, resume: bool = False,
                 max_cases: int | None = None, console=None, progress: bool = True,
                 weight_format: str | None = None, engine: str | None = None,
                 engine_kv: list[str] | dict | None = None):
        self.suite = suite
        self.models = models or list(suite.suite.models)
        dupes = sorted({m for m in self.models if self.models.count(m) > 1})
        if dupes:
            raise UsageError(f"--model {dupes[0]} is given more than once", "name each model once")
        self.device_requested = device or suite.suite.device
        self.weight_format = weight_format or suite.suite.weight_format
        if self.weight_format not in WEIGHT_FORMATS:
            raise UsageError(f"--weight-format {self.weight_format!r}: expected one of {', '.join(WEIGHT_FORMATS)}")
        if max_cases is not None and max_cases < 1:
            raise UsageError(f"--max-cases {max_cases}: must be at least 1", "omit it to run every case")
        self.shard = parse_shard(shard_spec)
        self.dir = Path(out_dir)
        self.resume = resume
        self.max_cases = max_cases
        self.console = console
        self.progress = progress
        self.cases = shard(matrix(suite, self.models), *self.shard)
        # bad engine flags exit 2 here, before the device is resolved (which imports torch; a bad
        # --device exits 2 there)
        self.pool = EnginePool(None, self.weight_format, engine=engine, engine_kv=engine_kv,
                               baseline=suite.suite.baseline, rows=suite.dtypes)
        self.device = self.pool.device = resolve_device(self.device_requested)
        self.infos: dict[str, ModelInfo] = {}
        self.summary = RunSummary(self.dir, expected=len(self.cases))

    # -- setup ----------------------------------------------------------------------------
    def _matrix_info(self) -> dict:
        return {"models": self.models, "dtypes": self.suite.dtypes,
                "checks": [c.name for c in self.suite.checks]}

    def _manifest(self) -> dict:
        from engine.hostmem import available
        ram = available()
        return {"schema": 1, "run": self.dir.name, "suite": self.suite.to_dict(),
                "matrix": self._matrix_info(), "shard": f"{self.shard[0]}/{self.shard[1]}",
                "device": {**device_info(self.device), "requested": self.device_requested,
                           "resolved": self.device,
                           "host_ram_available": ram.bytes, "host_ram_total": ram.total,
                           "host_ram_source": ram.source},
                "weight_format": {"requested": self.weight_format, "models": {},
                                  # checks that ask for their own (CheckConfig.weight_format)
                                  "checks": {c.name: c.weight_format for c in self.suite.checks
                                             if c.weight_format}},
                "engine": self.pool.describe(),
                "seed": self.suite.suite.seed,
                "git": git_info(), "versions": versions(), "command": " ".join(sys.argv),
                "argv": list(sys.argv), "settings": settings.snapshot(),
                "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("KVBENCH_")},
                "runtime_env": runtime_env(),
                "inputs": getattr(self, "_inputs", {}),
                "metrics": metric_registry.to_json(dict.fromkeys(c.KIND for c in self.suite.checks)),
                "not_applicable": {}, "started": now(), "finished": None}

    def _prepare_dir(self) -> set:
        """Create or reopen the results dir; returns the keys of cases already finished
        (pass, fail, n/a: an ``error`` or ``incomplete`` case is dropped and runs again)."""
        manifest = self.dir / MANIFEST
        if self.resume and manifest.is_file():
            old = load_results(self.dir).manifest
            if old.get("suite", {}).get("sha256") != self.suite.sha256:
                raise ResultsError(f"{self.dir} was written by a different version of "
                                   f"{self.suite.path}", "resume with the same suite file, or use a new --out")
            if (old.get("engine") or {}).get("spec", "kvbench") != self.pool.describe()["spec"]:
                raise ResultsError(f"{self.dir} was run with --engine {(old.get('engine') or {}).get('spec', 'kvbench')}",
                                   "resume with the same --engine, or use a new --out")
            if old.get("matrix") != self._matrix_info() or old.get("shard") != self._manifest()["shard"]:
                raise ResultsError(f"{self.dir} holds a different matrix/shard ({old.get('matrix')}, "
                                   f"shard {old.get('shard')})", "resume with the same --model/--shard")
            recs = read_records(self.dir)
            done = {case_key(r) for r in recs if r.get("type") == "case" and r.get("status") in FINISHED}
            keep = [r for r in recs if case_key(r) in done]
            atomic_write(self.dir / RECORDS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))
            self.manifest = old
            self.manifest.setdefault("resumed", []).append({"at": now(), "command": " ".join(sys.argv),
                                                            "git": git_info()})
            self.manifest["finished"] = None
        else:
            if manifest.is_file() or (self.dir / "records.jsonl").exists():
                raise ResultsError(f"{self.dir} already holds a run", "pass --resume to continue it, "
                                   "or --out with a new directory")
            self.dir.mkdir(parents=True, exist_ok=True)
            self.manifest = self._manifest()
            done = set()
        write_manifest(self.dir, self.manifest)
        return done

    def preflight(self) -> None:
        """Everything that can be known before a case runs (see the module docstring): model
        files readable, every engine of the matrix planned with host RAM, wave budgets possible,
        checks that cannot apply to a model. Bad input raises before anything is written."""
        from engine.errors import ConfigError
        from engine.models import expert_blocks
        from engine.planner import model_file_bytes, plan, require_host_fit, spec_for_model
        from engine.synth import weights_origin
        self._inputs = {}       # fixed inputs of the checks (pinned corpora): bad input if missing
        self._blocks_na = {}    # model -> why experts in blocks cannot apply (its blocks cases: n/a)
        self._wf_na = {}        # (model, check) -> why the check's own weight format cannot apply
        for cfg in self.suite.checks:
            got = registry.get(cfg.KIND).inputs(cfg)
            if got:
                self._inputs[cfg.name] = got
        for model in dict.fromkeys(c.model for c in self.cases):
            spec = spec_for_model(model)          # metadata only; a synthetic model is not written yet
            self.infos[model] = ModelInfo(model, spec, weights_origin(model))
            fmt = self.weight_format
            size = model_file_bytes(model)
            seen = set()
            for case in (c for c in self.cases if c.model == model):
                cfg = self.suite.check(case.check)
                opts = registry.get(cfg.KIND).load_options(cfg, self.suite.suite)
                key = (case.kv_dtype, tuple(sorted((k, str(v)) for k, v in opts.items())))
                if key in seen:
                    continue
                seen.add(key)
                kw = self.pool.kwargs(model, case.kv_dtype, opts)
                blocks = None
                if kw.get("expert_format") == "blocks":
                    try:
                        blocks = expert_blocks(model)
                    except ConfigError as e:      # the option cannot apply to this model: its cases are n/a
                        self._blocks_na[model] = f"expert_format 'blocks' does not apply: {e.args[0].split('; ')[0]}"
                        continue
                own = opts.get("weight_format")    # the check's own weight format, else the run's
                if own == "q8_0":                  # a model Q8_0 matrices cannot hold: n/a, not a refusal
                    from engine.planner import check_q8_weights
                    try:
                        check_q8_weights(spec, blocks)
                    except ConfigError as e:
                        self._wf_na[(model, cfg.name)] = f"weight_format q8_0 does not apply: {e.args[0].split('; ')[0]}"
                        continue
                try:
                    p = plan(spec, kv_dtype=case.kv_dtype, ctx=kw["ctx"], vram_budget=kw.get("vram_budget"),
                             n_gpu_layers=kw.get("n_gpu_layers"), weight_format=own or fmt, device=self.device,
                             file_bytes=size, expert_blocks=blocks, cpu_moe=kw.get("cpu_moe"),
                             # "auto" is decided at load (it measures the machine), which falls
                             # back to pcie where the CPU tier's host memory does not fit: pcie's plan
                             # is what must fit here
                             host_experts={"auto": "pcie"}.get(kw.get("host_experts", "cpu"),
                                                               kw.get("host_experts", "cpu")),
                             **({"wave_budget_bytes": kw["wave_budget_bytes"]} if "wave_budget_bytes" in kw else {}))
                    require_host_fit(p)
                    if "wave_budget_bytes" in kw and cfg.KIND == "wave_prefill":
                        from engine.kernels.prefill_attention import plan_waves
                        plan_waves(cfg.tokens, 0, spec.n_heads, spec.n_kv_heads, spec.head_dim,
                                   kw["wave_budget_bytes"])
                except EngineError as e:
                    if isinstance(e, ConfigError) and "wave_budget" in str(e):
                        raise UsageError(f"check {cfg.name!r} on {model}: {e}") from None
                    raise
                if not own:
                    fmt = p.weight_format      # auto resolves once per model, as the pool will

    # -- engines --------------------------------------------------------------------------
    def _engine(self, model: str, kv_dtype: str, opts: dict):
        return self.pool.get(model, kv_dtype, opts)

    def _ctx(self, model: str, kv_dtype: str, opts: dict, platform: str = "") -> CaseContext:
        return CaseContext(model=model, kv_dtype=kv_dtype, baseline=self.suite.suite.baseline,
                           suite=self.suite.suite, device=self.device, seed=self.suite.suite.seed,
                           platform=platform,
                           load=lambda kv_dtype=kv_dtype, **over: self.pool.get(model, kv_dtype, {**opts, **over}))

    # -- the run --------------------------------------------------------------------------
    def run(self) -> RunSummary:
        from engine.models import resolve
        self.preflight()
        for m in dict.fromkeys(c.model for c in self.cases):
            resolve(m)      # a missing user model is bad input: fail before running anything
        with RunLock(self.dir):     # one writer per results directory for the whole run
            return self._run_locked()

    def _run_locked(self) -> RunSummary:
        from engine.hostmem import PeakSampler
        done = self._prepare_dir()
        # who measures this process's cases (results.case_origin): a resumed run's rows may come
        # from other commits or machines, and the report says so
        self._process = process_identity(device_info(self.device))
        pending = [c for c in self.cases if c.key not in done]
        if self.max_cases is not None:
            pending = pending[:self.max_cases]
        writer = RecordWriter(self.dir)
        self._gpu_peak = {"allocated": 0, "reserved": 0}
        sampler = PeakSampler()
        try:
            with sampler, _Progress(self.console, len(pending), self.progress) as bar:
                for model in dict.fromkeys(c.model for c in pending):
                    self._run_model(model, [c for c in pending if c.model == model], writer, bar)
        finally:
            writer.close()
            self.pool.release()
            recs = load_results(self.dir).records
            write_summary(self.dir, recs)
            mine = {c.key for c in self.cases}
            self.summary.cases = [r for r in recs if r.get("type") == "case" and case_key(r) in mine]
            complete = all(c.key in {case_key(r) for r in self.summary.cases} for c in self.cases)
            self.manifest["finished"] = now() if complete else None
            self.manifest.setdefault("weight_format", {}).setdefault("models", {}).update(self.pool.formats)
            self.manifest.setdefault("not_applicable", {}).update(
                {f"{m} {c}": why for (m, c), why in getattr(self, "_na", {}).items()})
            runs = self.manifest.setdefault("processes", [])
            runs.append({"at": now(), "pid": os.getpid(), "cases_run": self.summary.ran,
                         "host_peak_anon_bytes": sampler.peak_anon, "host_peak_rss_bytes": sampler.peak_hwm,
                         "gpu_peak_allocated_bytes": self._gpu_peak["allocated"],
                         "gpu_peak_reserved_bytes": self._gpu_peak["reserved"],
                         "engine_loads": self.pool.loads, "engine_rebinds": self.pool.rebinds,
                         "max_live_engines": self.pool.max_live})
            write_manifest(self.dir, self.manifest)
        return self.summary

    def _gpu_reset(self) -> None:
        import torch
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

    def _gpu_peaks(self) -> dict:
        import torch
        if not self.device.startswith("cuda"):
            return {}
        out = {"gpu_peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
               "gpu_peak_reserved_bytes": int(torch.cuda.max_memory_reserved())}
        self._gpu_peak["allocated"] = max(self._gpu_peak["allocated"], out["gpu_peak_allocated_bytes"])
        self._gpu_peak["reserved"] = max(self._gpu_peak["reserved"], out["gpu_peak_reserved_bytes"])
        return out

    def _run_model(self, model: str, pending: list[Case], writer: RecordWriter, bar) -> None:
        from engine.hostmem import PeakSampler
        suite, base = self.suite, self.suite.suite.baseline
        states: dict[str, Any] = {}
        info = self.infos[model]
        self._na = getattr(self, "_na", {})

        def state_for(cfg: CheckConfig, check, opts: dict):
            if not check.needs_baseline:
                return None
            if cfg.name not in states:
                ctx = self._ctx(model, base, opts)
                ctx.measure_baseline = any(c.check == cfg.name and c.kv_dtype == base for c in pending)
                try:
                    states[cfg.name] = check.prepare(self._engine(model, base, opts), cfg, ctx)
                except EngineError as e:
                    states[cfg.name] = e
            return states[cfg.name]

        for case in pending:
            check_interrupt()        # a Ctrl-C swallowed during the last case stops the run here
            cfg = suite.check(case.check)
            check = registry.get(cfg.KIND)
            opts = check.load_options(cfg, suite.suite)
            bar.start(case)
            t0 = time.perf_counter()
            common = {"run": self.dir.name, "suite": suite.name, "model": model,
                      "kv_dtype": case.kv_dtype, "baseline": case.kv_dtype == base,
                      "check": cfg.name, "kind": cfg.KIND}
            recs: list[dict] = []
            status, failures, error, engine_info, reason = "pass", [], None, {}, None
            unmeasured: list[str] = []
            memory: dict = {}
            na = check.not_applicable(cfg, info) or \
                (self._blocks_na.get(model) if opts.get("expert_format") == "blocks" else None) or \
                self._wf_na.get((model, cfg.name)) or \
                missing(self.pool.engine_class_for(case.kv_dtype), check.requires)
            if na is not None:
                status, reason = "n/a", na
                self._na[(model, cfg.name)] = na
            else:
                self._gpu_reset()
                sampler = PeakSampler()
                try:
                    with sampler:
                        import torch
                        torch.manual_seed(suite.suite.seed)
                        state = state_for(cfg, check, opts)
                        if isinstance(state, EngineError):
                            raise EngineError(f"baseline {base} failed: {state}")
                        eng = self._engine(model, case.kv_dtype, opts)
                        platform = platform_of(self.device, weight_format_of(eng))
                        ctx = self._ctx(model, case.kv_dtype, opts, platform)
                        outcome = check.measure(eng, cfg, state, ctx)
                        eng = self._engine(model, case.kv_dtype, opts)   # a check may have switched engines
                        recs, failures, unmeasured = judge(outcome, cfg, model, case.kv_dtype, platform)
                        more, flags = self.pool.kv_effect(model, case.kv_dtype, eng)   # "not applied?" on other engines
                        failures = flags + failures
                        recs += [{"type": "series", "name": k, "values": v} for k, v in outcome.series.items()]
                        if outcome.info:
                            recs.append({"type": "info", "info": outcome.info})
                        recs += more                # after the check's own info (Results.info reads the first)
                        engine_info = {"load_options": {k: v for k, v in opts.items()},
                                       "spec": _spec_dict(eng), "kv_dtypes": list(eng.kv_dtypes),
                                       "kv_spec": getattr(eng, "kv_spec", None),   # applied, canonical (kvbench)
                                       "device": str(eng.device), "platform": platform,
                                       "weight_format": weight_format_of(eng),
                                       "weight_format_requested": weight_format_requested_of(eng),
                                       "engine": eng.name,
                                       "decode_path": getattr(eng, "decode_path", None),  # kvbench only
                                       **_experts_applied(eng)}
                        status = "fail" if failures else ("incomplete" if unmeasured else "pass")
                        gated = [r for r in recs if r.get("type") == "metric" and r.get("threshold") is not None]
                        if status == "pass" and gated and all(r.get("na") for r in gated):
                            # every gate declared n/a: nothing was judged, so the case is n/a, not pass
                            status = "n/a"
                            reason = "; ".join(dict.fromkeys(r["na"] for r in gated))
                except EngineError as e:
                    status, error = "error", str(e)
                except (KeyboardInterrupt, MemoryError):
                    raise
                except Exception as e:   # a bug: keep the traceback, record the case, go on
                    tb = self.dir / "errors" / f"{model}-{case.kv_dtype}-{cfg.name}.txt".replace("/", "_")
                    tb.parent.mkdir(exist_ok=True)
                    tb.write_text(traceback.format_exc())
                    status, error = "error", f"unexpected {type(e).__name__}: {e} (traceback: {tb})"
                    self.summary.unexpected.append(str(tb))
                memory = {"host_peak_anon_bytes": sampler.peak_anon, "host_peak_rss_bytes": sampler.peak_hwm,
                          **self._gpu_peaks()}
            seconds = time.perf_counter() - t0
            eng = None      # drop this frame's reference: the next load must not overlap it
            case_rec = {"type": "case", "status": status, "failures": failures, "unmeasured": unmeasured,
                        "error": error, "reason": reason, "seconds": round(seconds, 3), "finished": now(),
                        "engine": engine_info, "memory": memory, "process": self._process}
            writer.write_case([{**common, **r} for r in recs] + [{**common, **case_rec}])
            self.summary.ran += 1
            bar.done(case, status, failures or unmeasured, error or reason, seconds)
            if case.kv_dtype == base:
                st = states.get(cfg.name)
                if isinstance(st, dict) and "ref" in st:
                    st["ref"] = None            # only the baseline row uses it


def _spec_dict(eng) -> dict:
    return eng.spec.to_dict()


class _Progress:
    """rich progress bar over the pending cases, plus one line per finished case."""

    def __init__(self, console, total: int, enabled: bool):
        from rich.console import Console
        self.console = console or Console(stderr=True)
        self.total, self.enabled = total, enabled
        self.prog = None

    def __enter__(self):
        if self.enabled and self.total:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                                       TextColumn, TimeElapsedColumn)
            self.prog = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=self.console,
                                 transient=True)
            self.prog.__enter__()
            self.task = self.prog.add_task("cases", total=self.total)
        return self

    def start(self, case: Case) -> None:
        if self.prog:
            self.prog.update(self.task, description=str(case))

    def done(self, case: Case, status: str, failures: list[str], error: str | None, seconds: float):
        style = {"pass": "green", "fail": "red", "error": "red", "incomplete": "yellow", "n/a": "dim"}[status]
        why = f" - {error}" if error else (f" - {failures[0]}" if failures else "")
        self.console.print(f"[{style}]{status:5}[/{style}] {case} ({seconds:.1f}s){why}", highlight=False,
                           markup=True, soft_wrap=True)
        if self.prog:
            self.prog.advance(self.task)

    def __exit__(self, *exc):
        if self.prog:
            self.prog.__exit__(*exc)
        return False


# -- CLI -------------------------------------------------------------------------------------

def default_out(suite: Suite, models: list[str]) -> Path:
    tag = models[0] if len(models) == 1 else f"{len(models)}models"
    tag = Path(tag).stem if tag.endswith(".gguf") else tag
    return Path("results") / f"{suite.name}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_out(suite: Suite, models: list[str]) -> Path:
    stem = default_out(suite, models).name.rsplit("-", 2)[0]
    found = sorted(p for p in Path("results").glob(f"{stem}-*") if (p / MANIFEST).is_file())
    if not found:
        raise UsageError(f"--resume: no earlier run results/{stem}-* to resume", "pass --out DIR")
    return found[-1]


def summary_table(summary: RunSummary, suite: Suite, models: list[str]):
    from rich.table import Table
    by_key = {case_key(c): c for c in summary.cases}
    t = Table(title=f"{suite.name}: {summary.dir}")
    t.add_column("model")
    t.add_column("kv dtype")
    for c in suite.checks:
        t.add_column(c.name)
    cell = {"pass": "[green]pass[/green]", "fail": "[bold red]FAIL[/bold red]",
            "error": "[bold red]error[/bold red]", "incomplete": "[bold yellow]incomplete[/bold yellow]",
            "n/a": "[dim]n/a[/dim]"}
    for m in models:
        for d in suite.dtypes:
            row = [m, d + (" (baseline)" if d == suite.suite.baseline else "")]
            for c in suite.checks:
                rec = by_key.get((m, d, c.name))
                row.append(cell[rec["status"]] if rec else "[dim]-[/dim]")
            t.add_row(*row)
    return t


def add_cli_args(parser) -> None:
    parser.add_argument("suite", help="suite file, e.g. suites/kv_dtype.toml")
    parser.add_argument("--model", action="append", help="run this model instead of the suite's "
                        "list (registry name or .gguf path; repeatable)")
    parser.add_argument("--out", help="results directory (default results/<suite>-<model>-<time>)")
    parser.add_argument("--device", help="override the suite's device (auto, cpu, cuda, cuda:N; "
                        "auto: cuda when there is one)")
    parser.add_argument("--weight-format", choices=WEIGHT_FORMATS,
                        help="override the suite's weight format (auto: f32 when it needs at most "
                        "half the available host RAM, else bf16)")
    parser.add_argument("--engine", help="engine of the narrowed rows: kvbench (default), llama.cpp, hf or "
                        "openai://HOST:PORT; the baseline row runs on kvbench's engine")
    parser.add_argument("--engine-kv", action="append", metavar="ROW=SETTING", help="the engine's own KV "
                        "setting for a suite row, e.g. q8_0=quanto-int4 (hf) or q8_0=q4_0 (llama.cpp); repeatable")
    parser.add_argument("--set", action="append", metavar="CHECK.KEY=VALUE", help="override one key of "
                        "the suite (TOML value), e.g. corpus_kld.depths=[512,2048] or suite.ctx=8192; "
                        "CHECK is a check's name or kind; recorded in the manifest; repeatable")
    parser.add_argument("--shard", help="run shard i of n of the matrix, e.g. 0/4")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out "
                        "(default: the latest run of this suite and model), skipping finished cases")
    parser.add_argument("--report", nargs="?", const="", default=None, metavar="DIR",
                        help="also write the markdown report (default reports/<run>)")
    parser.add_argument("--max-cases", type=int, help="stop after this many cases (to test resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    import json

    from rich.console import Console
    suite = load_suite(args.suite, overrides=args.set)
    models = args.model or list(suite.suite.models)
    for m in models:
        try:
            validate_model(m, args.suite, "--model")
        except SuiteError as e:
            raise UsageError(str(e).replace(f"{args.suite}: --model: ", "--model: ")) from None
    if args.out:
        out = Path(args.out)
    elif args.resume:
        out = latest_out(suite, models)
    else:
        out = default_out(suite, models)
    runner = Runner(suite, out, models=models, device=args.device, shard_spec=args.shard,
                    resume=args.resume, max_cases=args.max_cases, progress=not args.no_progress,
                    weight_format=args.weight_format, engine=args.engine, engine_kv=args.engine_kv)
    summary = runner.run()
    console = Console()
    console.print(summary_table(summary, suite, models))
    console.print(f"device {runner.device} (requested {runner.device_requested}); weights "
                  + ", ".join(f"{m} {f['applied']} ({f['requested']}" + (f": {f['reason']})" if f.get('reason') else ")")
                              for m, f in runner.pool.formats.items()), highlight=False, soft_wrap=True)
    for c in summary.failed:
        why = c.get("error") or "; ".join((c.get("failures") or []) + (c.get("unmeasured") or []))
        console.print(f"[red]{c['status']}[/red] {c['model']} {c['kv_dtype']} {c['check']}: {why}",
                      highlight=False, soft_wrap=True)
    for c in summary.cases:
        if c["status"] == "n/a":
            console.print(f"[dim]n/a[/dim] {c['model']} {c['kv_dtype']} {c['check']}: {c.get('reason')}",
                          highlight=False, soft_wrap=True)
    if summary.verdict == "nothing measured":
        console.print(f"[yellow]nothing measured[/yellow]: every one of the {len(summary.cases)} cases is n/a; "
                      "pick a model the suite's checks apply to", highlight=False, soft_wrap=True)
    if summary.not_run:
        console.print(f"[yellow]incomplete[/yellow]: {summary.not_run} of {summary.expected} cases not run; "
                      f"rerun with --resume --out {out}", highlight=False, soft_wrap=True)
    report_path = None
    if args.report is not None:
        from .report import build_report
        report_path = build_report(out, args.report or None)
        console.print(f"report: {report_path}")
    statuses = [c["status"] for c in summary.cases]
    print(json.dumps({"verdict": summary.verdict, "engine": str(runner.pool.spec),
                      "statuses": {k: statuses.count(k) for k in dict.fromkeys(statuses)},
                      "not_run": summary.not_run, "results": str(out), "report": str(report_path) if report_path
                      else None, "cases": len(summary.cases), "failed": len(summary.failed),
                      "ran": summary.ran}))
    return summary.exit_code
