"""Runner: a suite's matrix (model x KV dtype x check) through the engine into a results dir.

Contract: ``run(suite, out_dir, ...)`` runs every case of the matrix in a fixed order
(model, then baseline dtype first, then each check), writing each case's records as soon as
it finishes (``harness.results.RecordWriter``: appended, flushed, fsynced). Each check's
baseline state (reference tokens and logits) is computed once per model on the baseline
engine and kept in memory; a resumed or sharded run recomputes it when it needs it (the
baseline is deterministic). Thresholds from the suite turn metrics into pass/fail; a case
whose engine raises an ``EngineError`` is recorded as ``error`` and the run goes on.
Returns a ``RunSummary``; the CLI maps it to exit code 0 (all pass) or 1 (a case failed).

    summary = run(load_suite("suites/smoke.toml"), "results/smoke")
    summary.exit_code
"""
from __future__ import annotations

import gc
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import EngineError

from . import checks as registry
from .checks import CaseContext, Outcome
from .errors import ResultsError, UsageError
from .results import (MANIFEST, RecordWriter, case_key, device_info, git_info, load_results, now,
                      repair, versions, write_manifest, write_summary)
from .suite import DEVICE_RE, CheckConfig, Suite, SuiteError, load_suite, validate_model


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

    @property
    def failed(self) -> list[dict]:
        return [c for c in self.cases if c["status"] != "pass"]

    @property
    def exit_code(self) -> int:
        if self.unexpected:
            return 3
        return 1 if self.failed else 0


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


def judge(outcome: Outcome, cfg: CheckConfig, model: str, kv_dtype: str) -> tuple[list[dict], list[str]]:
    """Metric records with thresholds applied, and one line per failed threshold."""
    gates = cfg.gates(model, kv_dtype)
    recs, failures = [], []
    for m in outcome.metrics:
        bound, op = gates.pop(m.name, (None, None))
        passed = None
        if bound is not None and m.skipped is None and isinstance(m.value, (int, float)):
            v = float(m.value)
            passed = (v <= bound if op == "<=" else v >= bound) and not math.isnan(v)
            if not passed:
                unit = f" {m.unit}" if m.unit else ""
                failures.append(f"{m.name} = {_fmt(m.value)}{unit} (required {op} {bound:g})"
                                + (f": {m.detail}" if m.detail else ""))
        recs.append({"type": "metric", "metric": m.name, "value": m.value, "unit": m.unit,
                     "better": m.better, "threshold": bound, "op": op, "passed": passed,
                     "skipped": m.skipped, "detail": m.detail})
    for name, (bound, op) in gates.items():   # a threshold on a metric the check did not report
        recs.append({"type": "metric", "metric": name, "value": None, "unit": "", "better": None,
                     "threshold": bound, "op": op, "passed": None,
                     "skipped": "not reported by the check", "detail": None})
    return recs, failures


class Runner:
    def __init__(self, suite: Suite, out_dir: str | Path, *, models: list[str] | None = None,
                 device: str | None = None, shard_spec: str | None = None, resume: bool = False,
                 max_cases: int | None = None, console=None, progress: bool = True):
        self.suite = suite
        self.models = models or list(suite.suite.models)
        self.device = device or suite.suite.device
        self.shard = parse_shard(shard_spec)
        self.dir = Path(out_dir)
        self.resume = resume
        self.max_cases = max_cases
        self.console = console
        self.progress = progress
        self.cases = shard(matrix(suite, self.models), *self.shard)
        self._eng_key, self._eng = None, None
        self.summary = RunSummary(self.dir)

    # -- setup ----------------------------------------------------------------------------
    def _matrix_info(self) -> dict:
        return {"models": self.models, "dtypes": self.suite.dtypes,
                "checks": [c.name for c in self.suite.checks]}

    def _manifest(self) -> dict:
        return {"schema": 1, "run": self.dir.name, "suite": self.suite.to_dict(),
                "matrix": self._matrix_info(), "shard": f"{self.shard[0]}/{self.shard[1]}",
                "device": device_info(self.device), "seed": self.suite.suite.seed,
                "git": git_info(), "versions": versions(), "command": " ".join(sys.argv),
                "argv": list(sys.argv), "env": {"KVBENCH_FAULT": os.environ.get("KVBENCH_FAULT")},
                "started": now(), "finished": None}

    def _prepare_dir(self) -> set:
        """Create or reopen the results dir; returns the keys of cases already finished."""
        manifest = self.dir / MANIFEST
        if self.resume and manifest.is_file():
            old = load_results(self.dir).manifest
            if old.get("suite", {}).get("sha256") != self.suite.sha256:
                raise ResultsError(f"{self.dir} was written by a different version of "
                                   f"{self.suite.path}", "resume with the same suite file, or use a new --out")
            if old.get("matrix") != self._matrix_info() or old.get("shard") != self._manifest()["shard"]:
                raise ResultsError(f"{self.dir} holds a different matrix/shard ({old.get('matrix')}, "
                                   f"shard {old.get('shard')})", "resume with the same --model/--shard")
            done = {case_key(r) for r in repair(self.dir) if r.get("type") == "case"}
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

    # -- engines --------------------------------------------------------------------------
    def _load(self, model: str, kv_dtype: str, opts: dict):
        import engine
        kw: dict[str, Any] = {"kv_dtype": kv_dtype, "device": self.device, "ctx": int(opts["ctx"])}
        if opts.get("vram_budget_gib"):
            kw["vram_budget"] = int(opts["vram_budget_gib"] * 2**30)
        if opts.get("n_gpu_layers") is not None:
            kw["n_gpu_layers"] = int(opts["n_gpu_layers"])
        if opts.get("wave_budget_mib"):
            kw["wave_budget_bytes"] = int(opts["wave_budget_mib"] * 2**20)
        return engine.load(model, **kw)

    def _engine(self, model: str, kv_dtype: str, opts: dict):
        key = (model, kv_dtype, tuple(sorted(opts.items())))
        if key != self._eng_key:
            self._release()
            self._eng = self._load(model, kv_dtype, opts)
            self._eng_key = key
        return self._eng

    def _release(self) -> None:
        self._eng_key, self._eng = None, None
        gc.collect()
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def _ctx(self, model: str, kv_dtype: str, opts: dict) -> CaseContext:
        return CaseContext(model=model, kv_dtype=kv_dtype, baseline=self.suite.suite.baseline,
                           suite=self.suite.suite, device=self.device, seed=self.suite.suite.seed,
                           load=lambda **over: self._load(model, kv_dtype, {**opts, **over}))

    # -- the run --------------------------------------------------------------------------
    def run(self) -> RunSummary:
        if not DEVICE_RE.match(self.device):
            raise UsageError(f"--device {self.device!r}: expected cpu, cuda or cuda:N")
        if self.device.startswith("cuda"):
            import torch
            if not torch.cuda.is_available():
                raise UsageError(f"device {self.device!r} (suite {self.suite.path}): CUDA is not available "
                                 "on this machine", "run on a GPU machine or pass --device cpu")
        from engine.models import resolve
        for m in dict.fromkeys(c.model for c in self.cases):
            resolve(m)      # a missing user model is bad input: fail before running anything
        done = self._prepare_dir()
        pending = [c for c in self.cases if c.key not in done]
        if self.max_cases is not None:
            pending = pending[:self.max_cases]
        writer = RecordWriter(self.dir)
        try:
            with _Progress(self.console, len(pending), self.progress) as bar:
                for model in dict.fromkeys(c.model for c in pending):
                    self._run_model(model, [c for c in pending if c.model == model], writer, bar)
        finally:
            writer.close()
            self._release()
            recs = load_results(self.dir).records
            write_summary(self.dir, recs)
            mine = {c.key for c in self.cases}
            self.summary.cases = [r for r in recs if r.get("type") == "case" and case_key(r) in mine]
            complete = all(c.key in {case_key(r) for r in self.summary.cases} for c in self.cases)
            self.manifest["finished"] = now() if complete else None
            write_manifest(self.dir, self.manifest)
        return self.summary

    def _run_model(self, model: str, pending: list[Case], writer: RecordWriter, bar) -> None:
        suite, base = self.suite, self.suite.suite.baseline
        states: dict[str, Any] = {}

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
            cfg = suite.check(case.check)
            check = registry.get(cfg.KIND)
            opts = check.load_options(cfg, suite.suite)
            bar.start(case)
            t0 = time.perf_counter()
            common = {"run": self.dir.name, "suite": suite.name, "model": model,
                      "kv_dtype": case.kv_dtype, "baseline": case.kv_dtype == base,
                      "check": cfg.name, "kind": cfg.KIND}
            recs: list[dict] = []
            status, failures, error, engine_info = "pass", [], None, {}
            try:
                import torch
                torch.manual_seed(suite.suite.seed)
                state = state_for(cfg, check, opts)
                if isinstance(state, EngineError):
                    raise EngineError(f"baseline {base} failed: {state}")
                eng = self._engine(model, case.kv_dtype, opts)
                ctx = self._ctx(model, case.kv_dtype, opts)
                outcome = check.measure(eng, cfg, state, ctx)
                recs, failures = judge(outcome, cfg, model, case.kv_dtype)
                recs += [{"type": "series", "name": k, "values": v} for k, v in outcome.series.items()]
                if outcome.info:
                    recs.append({"type": "info", "info": outcome.info})
                engine_info = {"load_options": opts, "spec": _spec_dict(eng),
                               "kv_dtypes": list(eng.kv_dtypes)}
                status = "fail" if failures else "pass"
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
            seconds = time.perf_counter() - t0
            eng = None      # drop this frame's reference: the next load must not overlap it
            case_rec = {"type": "case", "status": status, "failures": failures, "error": error,
                        "seconds": round(seconds, 3), "finished": now(), "engine": engine_info}
            writer.write_case([{**common, **r} for r in recs] + [{**common, **case_rec}])
            self.summary.ran += 1
            bar.done(case, status, failures, error, seconds)
            if case.kv_dtype == base:
                st = states.get(cfg.name)
                if isinstance(st, dict) and "ref" in st:
                    st["ref"] = None            # only the baseline row uses it


def _spec_dict(eng) -> dict:
    spec = getattr(eng, "spec", None)
    if spec is None:
        return {}
    try:
        return spec.to_dict()
    except AttributeError:
        return {}


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
        style = {"pass": "green", "fail": "red", "error": "red"}[status]
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
            "error": "[bold red]error[/bold red]"}
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
    parser.add_argument("--device", help="override the suite's device (cpu, cuda, cuda:N)")
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
    suite = load_suite(args.suite)
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
                    resume=args.resume, max_cases=args.max_cases, progress=not args.no_progress)
    summary = runner.run()
    console = Console()
    console.print(summary_table(summary, suite, models))
    for c in summary.failed:
        why = c.get("error") or "; ".join(c.get("failures") or [])
        console.print(f"[red]{c['status']}[/red] {c['model']} {c['kv_dtype']} {c['check']}: {why}",
                      highlight=False, soft_wrap=True)
    report_path = None
    if args.report is not None:
        from .report import build_report
        report_path = build_report(out, args.report or None)
        console.print(f"report: {report_path}")
    verdict = {0: "pass", 1: "fail", 3: "error"}[summary.exit_code]
    print(json.dumps({"verdict": verdict, "results": str(out), "report": str(report_path) if report_path
                      else None, "cases": len(summary.cases), "failed": len(summary.failed),
                      "ran": summary.ran}))
    return summary.exit_code
