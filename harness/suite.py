"""Suites: TOML files mapped one-to-one onto dataclasses, validated before anything runs.

Contract: ``load_suite(path) -> Suite``. A suite has one ``[suite]`` table (``SuiteSection``:
name, models, baseline, kv_dtypes, device, ctx, budgets, seed) and a list of ``[[check]]``
tables, each parsed into the config dataclass its ``kind`` registers in ``harness.checks``.
Every mistake raises ``SuiteError`` naming the file, the key path (``check[2].top_k``) and
what is allowed: TOML syntax (with line), unknown keys, wrong types, unknown check kinds,
unknown models, thresholds that cannot hold, an empty matrix.

``kv_dtypes`` rows are KV dtypes or KV specs (``engine.kv_spec``: ``k-q8_0.v-bf16``,
``q8_0.fp32@0,23``) in canonical form (a row's one name in results, reports and threshold
tables; a spec in another form is refused naming its canonical form); layer indices are held
against each model when the run is planned (``Runner.preflight``: one line, exit 2).

Thresholds are fields declared with ``threshold(metric, op)``: a number (every KV dtype)
or a table per dtype (``max_abs = { bf16 = 2.5, q8_0 = 3.5 }``); a check's ``per_model``
table overrides them per model (``per_model.coder30b = { max_abs = { q8_0 = 5.0 } }``).

The schema itself (``CheckConfig``, ``SuiteSection``, ``param``, ``threshold``) lives in
``harness.schema`` and is re-exported here; imports go one way: suite -> checks -> schema.

    suite = load_suite("suites/kv_dtype.toml")
    suite.checks[0].threshold_for("max_abs", "smollm2-135m", "q8_0")   # -> 3.5
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import re
import tomllib
import types
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from . import checks as registry
from .errors import SuiteError

from .schema import (DEVICE_RE, EXPERT_FORMATS, HOST_EXPERTS, KV_DTYPES, PLATFORM_RE, ROLES, WEIGHT_FORMATS, CheckConfig,  # noqa: F401
                     Message, SuiteSection, Threshold, param, platform_of, threshold)


@dataclass
class Suite:
    path: str
    suite: SuiteSection
    checks: list[CheckConfig]
    sha256: str = ""
    overrides: list[str] = dataclasses.field(default_factory=list)   # --set CHECK.KEY=VALUE

    @property
    def name(self) -> str:
        return self.suite.name

    @property
    def dtypes(self) -> list[str]:
        """Baseline first, then the narrowed dtypes: the order cases run in."""
        return [self.suite.baseline, *self.suite.kv_dtypes]

    def check(self, name: str) -> CheckConfig:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, **({"overrides": list(self.overrides)}
                                                              if self.overrides else {}),
                "suite": dataclasses.asdict(self.suite),
                "checks": [dataclasses.asdict(c) for c in self.checks]}


# -- loading ---------------------------------------------------------------------------

def load_suite(path: str | Path, overrides: list[str] | None = None) -> Suite:
    """Read and validate a suite file; raises ``SuiteError`` naming file and key.

    ``overrides`` (``--set``): ``CHECK.KEY=VALUE`` strings applied to the TOML before it is
    validated (``CHECK``: a check's name or kind, or ``suite``; ``VALUE``: a TOML value, a
    bare word is a string). The suite's sha256 then covers them too, and ``overrides`` is kept."""
    p = Path(path)
    if not p.is_file():
        raise SuiteError(p, None, "suite file not found" if not p.exists() else "not a file",
                         "a .toml file such as suites/kv_dtype.toml")
    raw = p.read_bytes()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SuiteError(p, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise SuiteError(p, None, f"TOML syntax error: {e}") from None
    overrides = list(overrides or [])
    for text in overrides:
        _apply_override(data, text, p)
    suite = parse_suite(data, p)
    suite.sha256 = hashlib.sha256(raw + "".join(f"\n--set {o}" for o in overrides).encode()).hexdigest()
    suite.overrides = overrides
    return suite


def _apply_override(data: dict, text: str, path) -> None:
    """One ``--set CHECK.KEY=VALUE`` on the raw TOML tables (validated with the rest later)."""
    target, eq, value = text.partition("=")
    owner, dot, key = target.strip().rpartition(".")
    if not eq or not dot or not owner or not key:
        raise SuiteError(path, f"--set {text}", "expected CHECK.KEY=VALUE",
                         "e.g. corpus_kld.depths=[512,2048] or suite.ctx=8192")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()              # a bare word: a string
    if owner == "suite":
        tables = [data.setdefault("suite", {})]
    else:
        checks = data.get("check") if isinstance(data.get("check"), list) else []
        tables = [c for c in checks if isinstance(c, dict)
                  and (c.get("name") == owner or (not c.get("name") and c.get("kind") == owner))]
        if not tables:
            names = [str(c.get("name") or c.get("kind")) for c in checks if isinstance(c, dict)]
            raise SuiteError(path, f"--set {text}", f"no check named {owner!r}",
                             ", ".join(["suite", *names]))
    for t in tables:
        t[key] = parsed


def parse_suite(data: dict, path: str | Path = "<suite>") -> Suite:

    _no_unknown(data, {"suite", "check"}, path, "")
    if "suite" not in data:
        raise SuiteError(path, "suite", "missing table [suite]", "a [suite] table with at least name")
    section = _build(SuiteSection, data["suite"], path, "suite")
    _validate_section(section, path)

    raw_checks = data.get("check", [])
    if not isinstance(raw_checks, list) or not all(isinstance(c, dict) for c in raw_checks):
        raise SuiteError(path, "check", f"expected an array of tables [[check]], got "
                         f"{_tname(raw_checks)}")
    if not raw_checks:
        raise SuiteError(path, "check", "empty matrix: the suite has no [[check]] tables",
                         f"one or more of kinds {', '.join(registry.kinds())}")
    checks: list[CheckConfig] = []
    seen: dict[str, int] = {}
    for i, rc in enumerate(raw_checks):
        where = f"check[{i}]"
        kind = rc.get("kind")
        if kind is None:
            raise SuiteError(path, f"{where}.kind", "missing", ", ".join(registry.kinds()))
        if not isinstance(kind, str) or kind not in registry.kinds():
            close = difflib.get_close_matches(str(kind), registry.kinds(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SuiteError(path, f"{where}.kind", f"unknown check kind {kind!r}{hint}",
                             ", ".join(registry.kinds()))
        cfg = _build(registry.config_class(kind), rc, path, where)
        _validate_check(cfg, section, path, where)
        if not cfg.name:
            seen[kind] = seen.get(kind, 0) + 1
            cfg.name = kind if seen[kind] == 1 else f"{kind}#{seen[kind]}"
        if any(c.name == cfg.name for c in checks):
            raise SuiteError(path, f"{where}.name", f"duplicate check name {cfg.name!r}",
                             "a name used by no other check")
        checks.append(cfg)
    return Suite(str(path), section, checks)


def validate_model(name: str, path: str | Path, key: str) -> None:
    """A registry name or a .gguf path; anything else is a SuiteError with close names."""
    import engine  # noqa: F401  (registers the synthetic models)
    from engine import models
    if name in models.names() or name.endswith(".gguf"):
        return
    close = difflib.get_close_matches(name, models.names(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise SuiteError(path, key, f"unknown model {name!r}{hint}",
                     f"{', '.join(models.names())}, or a path ending in .gguf")


def _validate_section(s: SuiteSection, path) -> None:
    if not s.name.strip():
        raise SuiteError(path, "suite.name", "must not be empty")
    if not s.models:
        raise SuiteError(path, "suite.models", "empty matrix: no models", "one or more model names")
    for i, m in enumerate(s.models):
        validate_model(m, path, f"suite.models[{i}]")
    if s.baseline not in KV_DTYPES:
        raise SuiteError(path, "suite.baseline", f"unknown KV dtype {s.baseline!r}", ", ".join(KV_DTYPES))
    if not s.kv_dtypes:
        raise SuiteError(path, "suite.kv_dtypes", "empty matrix: no KV dtypes to hold against the baseline",
                         ", ".join(KV_DTYPES))
    for i, d in enumerate(s.kv_dtypes):
        _validate_kv_spec(d, path, f"suite.kv_dtypes[{i}]")
        if d == s.baseline:
            raise SuiteError(path, f"suite.kv_dtypes[{i}]", f"{d!r} is the baseline; list only the "
                             "dtypes compared against it", ", ".join(x for x in KV_DTYPES if x != s.baseline))
    if len(set(s.kv_dtypes)) != len(s.kv_dtypes):
        raise SuiteError(path, "suite.kv_dtypes", f"repeated dtype in {s.kv_dtypes}")
    if not DEVICE_RE.match(s.device):
        raise SuiteError(path, "suite.device", f"unknown device {s.device!r}", "auto, cpu, cuda, cuda:N")
    if s.weight_format not in WEIGHT_FORMATS:
        raise SuiteError(path, "suite.weight_format", f"unknown weight format {s.weight_format!r}",
                         ", ".join(WEIGHT_FORMATS))
    _validate_experts(s.expert_format, s.cpu_moe, path, "suite", s.host_experts)


def _validate_experts(fmt, cpu_moe, path, where: str, host=None) -> None:
    """``expert_format``, ``cpu_moe`` and ``host_experts`` (suite or check, after the check
    inherits the suite's)."""
    if fmt is not None and fmt not in EXPERT_FORMATS:
        raise SuiteError(path, f"{where}.expert_format", f"unknown expert format {fmt!r}", ", ".join(EXPERT_FORMATS))
    if host is not None and host not in HOST_EXPERTS:
        raise SuiteError(path, f"{where}.host_experts", f"unknown host_experts {host!r}", ", ".join(HOST_EXPERTS))
    if host not in (None, "cpu") and fmt != "blocks":
        raise SuiteError(path, f"{where}.host_experts", "places the experts of cpu_moe layers, which needs them in "
                         f"the file's blocks (expert_format {fmt or 'unset'})", 'expert_format = "blocks" beside it')
    if cpu_moe is None:
        return
    if isinstance(cpu_moe, str) and cpu_moe != "auto" or isinstance(cpu_moe, int) and cpu_moe < 0:
        raise SuiteError(path, f"{where}.cpu_moe", f"{cpu_moe!r} is not auto or a count", "auto, or an integer >= 0")
    if fmt != "blocks":
        raise SuiteError(path, f"{where}.cpu_moe", "computes experts from their GGUF blocks, but the experts "
                         f"are kept at the weight format (expert_format {fmt or 'unset'})",
                         'expert_format = "blocks" beside it (or in [suite])')


def _validate_kv_spec(d, path, key: str) -> None:
    """A row of ``kv_dtypes``: a KV dtype, or a KV spec (``engine.kv_spec``: K/V split, per-layer
    overrides) written in its canonical form (the row's label in results and reports, so one
    setting has one name). Layer indices are held against each model when the run is planned."""
    from engine.errors import ConfigError
    from engine.kv_spec import ACCEPTED, parse
    if not isinstance(d, str) or not d:
        raise SuiteError(path, key, f"expected a KV dtype string, got {_tname(d)}", ACCEPTED)
    if d in KV_DTYPES:
        return
    if re.fullmatch(r"[A-Za-z0-9_]+", d):            # a bare word: an unknown dtype, as before
        raise SuiteError(path, key, f"unknown KV dtype {d!r}", ", ".join(KV_DTYPES) + ", or a KV spec "
                         "such as k-q8_0.v-bf16 or q8_0.fp32@0,23")
    try:
        spec = parse(d)
    except ConfigError as e:
        raise SuiteError(path, key, f"bad KV spec: {str(e).split('; write ')[0]}", ACCEPTED) from None
    if str(spec) != d:
        raise SuiteError(path, key, f"KV spec {d!r} is not in canonical form: write {str(spec)!r}",
                         "the canonical form, the row's one name in results and reports")


def _validate_check(cfg: CheckConfig, s: SuiteSection, path, where: str) -> None:
    _validate_experts(cfg.expert_format or s.expert_format,
                      cfg.cpu_moe if cfg.cpu_moe is not None else s.cpu_moe, path, where,
                      cfg.host_experts or s.host_experts)
    if cfg.weight_format is not None and cfg.weight_format not in WEIGHT_FORMATS:
        raise SuiteError(path, f"{where}.weight_format", f"unknown weight format {cfg.weight_format!r}",
                         ", ".join(WEIGHT_FORMATS))
    dtypes = [s.baseline, *s.kv_dtypes]
    tfields = cfg.threshold_fields()

    def check_bound(name: str, value, key: str):
        f = tfields[name]
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for dt, v in items:
            k = f"{key}.{dt}" if dt is not None else key
            if dt is not None and dt not in dtypes:
                raise SuiteError(path, k, f"KV dtype {dt!r} is not in this suite's matrix", ", ".join(dtypes))
            _check_bounds(v, f.metadata, path, k, threshold=True)

    for name in tfields:
        value = getattr(cfg, name)
        if value is not None:
            check_bound(name, value, f"{where}.{name}")
    def check_optional(table, key: str):
        if not isinstance(table, dict):
            raise SuiteError(path, key, f"expected a table of reasons, got {_tname(table)}")
        for k, reason in table.items():
            fname, _, dt = k.partition(".")
            if fname not in tfields:
                raise SuiteError(path, f"{key}.{k}", "unknown threshold", ", ".join(tfields) or "none")
            if dt and dt not in dtypes:
                raise SuiteError(path, f"{key}.{k}", f"KV dtype {dt!r} is not in this suite's matrix",
                                 ", ".join(dtypes))
            if not isinstance(reason, str) or not reason.strip():
                raise SuiteError(path, f"{key}.{k}", "an optional gate needs its reason (a non-empty "
                                 "string the report prints)")

    check_optional(cfg.optional, f"{where}.optional")
    for table_name, table in (("per_model", cfg.per_model), ("per_platform", cfg.per_platform)):
        for owner, over in table.items():
            key = f"{where}.{table_name}.{owner}"
            if table_name == "per_model":
                validate_model(owner, path, key)
            elif not PLATFORM_RE.match(owner):
                raise SuiteError(path, key, f"unknown platform {owner!r}",
                                 "<cpu|cuda>-<f32|bf16|f16>, e.g. cuda-bf16")
            if not isinstance(over, dict):
                raise SuiteError(path, key, f"expected a table of thresholds, got {_tname(over)}")
            for name, value in over.items():
                if name == "optional" and table_name == "per_model":
                    check_optional(value, f"{key}.optional")
                    continue
                if name not in tfields:
                    raise SuiteError(path, f"{key}.{name}", f"unknown threshold ({table_name} overrides "
                                     "thresholds only)", ", ".join(tfields) or "none for this check")
                hint = get_type_hints(type(cfg))[name]
                value = _coerce(value, hint, path, f"{key}.{name}")
                over[name] = value
                check_bound(name, value, f"{key}.{name}")
    cfg.validate(path, where)
    _refuse_unmeasurable(cfg, s, path, where)


def _refuse_unmeasurable(cfg: CheckConfig, s: SuiteSection, path, where: str) -> None:
    """A gate written for the baseline dtype on a metric the check never measures there (it
    declares which: ``unmeasured_on_baseline``) can never be evaluated: refuse it now."""
    never = registry.get(cfg.KIND).unmeasured_on_baseline(cfg)
    if not never:
        return
    tables = [("", getattr(cfg, n), n) for n in cfg.threshold_fields()]
    for table_name in ("per_platform", "per_model"):
        for owner, over in getattr(cfg, table_name).items():
            tables += [(f"{table_name}.{owner}.", v, n) for n, v in over.items() if n in cfg.threshold_fields()]
    for prefix, value, name in tables:
        metric = cfg.gate(name)[0]
        if metric in never and isinstance(value, dict) and s.baseline in value:
            raise SuiteError(path, f"{where}.{prefix}{name}.{s.baseline}",
                             f"gate on {metric!r} for the baseline can never be measured: {never[metric]}",
                             "remove it, or change the check so the baseline measures it")


def _check_bounds(v, meta, path, key, threshold=False) -> None:
    if v is None or isinstance(v, (list, dict, str, bool)):
        return
    if isinstance(v, float) and not math.isfinite(v):
        raise SuiteError(path, key, f"{'threshold' if threshold else 'value'} {v!r} is not a finite number")
    lo, hi = meta.get("lo"), meta.get("hi")
    what = "threshold that can never hold" if threshold else "value out of range"
    if lo is not None and (v < lo or (meta.get("lo_open") and v == lo)):
        rel = ">" if meta.get("lo_open") else ">="
        raise SuiteError(path, key, f"{what}: {v!r}", f"{rel} {lo:g}" + (f" and <= {hi:g}" if hi is not None else ""))
    if hi is not None and v > hi:
        raise SuiteError(path, key, f"{what}: {v!r}", f"<= {hi:g}" + (f" and >= {lo:g}" if lo is not None else ""))


def _no_unknown(table: dict, allowed, path, where: str) -> None:
    for k in table:
        if k not in allowed:
            close = difflib.get_close_matches(k, list(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            key = f"{where}.{k}" if where else k
            raise SuiteError(path, key, f"unknown key{hint}", ", ".join(sorted(allowed)))


def _build(cls, table, path, where: str):
    """Dataclass ``cls`` from a TOML table: every key known, every value the declared type."""
    if not isinstance(table, dict):
        raise SuiteError(path, where, f"expected a table, got {_tname(table)}")
    hints = get_type_hints(cls)
    flds = {f.name: f for f in fields(cls) if f.init}
    _no_unknown(table, set(flds), path, where)
    kwargs = {}
    for name, f in flds.items():
        key = f"{where}.{name}"
        if name not in table:
            if f.default is MISSING and f.default_factory is MISSING:
                raise SuiteError(path, key, "missing required key")
            continue
        value = _coerce(table[name], hints[name], path, key)
        if not f.metadata.get("threshold"):
            _check_bounds(value, f.metadata, path, key)
        kwargs[name] = value
    return cls(**kwargs)


def _coerce(value, tp, path, key):
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        for a in options:
            try:
                return _coerce(value, a, path, key)
            except SuiteError:
                continue
        raise SuiteError(path, key, f"expected {_describe(tp)}, got {_tname(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item,) = get_args(tp)
            return [_coerce(v, item, path, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            _, vt = get_args(tp)
            return {str(k): _coerce(v, vt, path, f"{key}.{k}") for k, v in value.items()}
    elif tp is Message:
        msg = _build(Message, value, path, key)
        if msg.role not in ROLES:
            raise SuiteError(path, f"{key}.role", f"unknown role {msg.role!r}", ", ".join(ROLES))
        return msg
    elif dataclasses.is_dataclass(tp):
        return _build(tp, value, path, key)
    raise SuiteError(path, key, f"expected {_describe(tp)}, got {_tname(value)}")


def _describe(tp) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp) if a is not type(None))
    if origin is list:
        return f"an array of {_describe(get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return f"a table of {_describe(get_args(tp)[1]).removeprefix('a ').removeprefix('an ')}s"
    if tp is Message:
        return "a message table { role, content }"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _tname(v) -> str:
    if isinstance(v, bool):
        return f"boolean {str(v).lower()}"
    if isinstance(v, int):
        return f"integer {v}"
    if isinstance(v, float):
        return f"number {v:g}"
    if isinstance(v, str):
        return f"string {v[:40]!r}"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return type(v).__name__
