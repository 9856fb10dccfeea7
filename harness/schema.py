"""The schema of suite files: the dataclasses a TOML suite maps onto, and how checks declare
their parameters and thresholds. Checks import this module; ``harness.suite`` (loading and
validation) imports the checks: imports only go one way (suite -> checks -> schema).

Contract: ``param(default, lo=, hi=)`` declares a check or suite parameter with bounds,
``threshold(metric, op)`` a pass/fail bound on a metric (a number, or a table per KV dtype);
``CheckConfig`` holds the fields every check accepts and resolves a bound for a (model,
dtype, platform): the check's value, then ``per_platform.<platform>``, then
``per_model.<model>``; ``optional`` names the gates that may go unmeasured and why.
``SuiteSection`` is the ``[suite]`` table.

    class MyConfig(CheckConfig):
        top_k: int = param(5, lo=1)
        max_abs: float | dict[str, float] | None = threshold("Max abs logit diff", "<=")
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Union

from engine import formats

KV_DTYPES = formats.KV_DTYPES
ROLES = ("system", "user", "assistant")
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
WEIGHT_FORMATS = ("auto", *formats.ENGINE_WEIGHT_FORMATS)
PLATFORM_RE = re.compile(r"^(cpu|cuda)-(" + "|".join(formats.ENGINE_WEIGHT_FORMATS) + ")$")


def platform_of(device: str, weight_format: str) -> str:
    """The key of a ``per_platform`` threshold table: ``<device type>-<applied weight format>``."""
    return f"{device.split(':')[0]}-{weight_format}"


def param(default: Any = MISSING, *, lo: float | None = None, hi: float | None = None,
          lo_open: bool = False, default_factory: Any = MISSING, help: str = "") -> Any:
    """A check/suite parameter with bounds checked at load time (``lo``/``hi`` inclusive)."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "help": help}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def threshold(metric: str, op: str, *, default: Any = None, lo: float = 0.0,
              hi: float | None = None, help: str = "") -> Any:
    """A pass/fail bound on the metric named ``metric`` (may use ``{field}`` of the config):
    the metric passes when ``value op bound`` (op is ``<=`` or ``>=``)."""
    assert op in ("<=", ">=")
    meta = {"threshold": True, "metric": metric, "op": op, "lo": lo, "hi": hi,
            "lo_open": False, "help": help}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


Threshold = Union[float, dict[str, float], None]


# engine.load options a suite or a check may set (a check's value wins over the suite's)
LOAD_OPTIONS = ("ctx", "vram_budget_gib", "n_gpu_layers", "wave_budget_mib", "expert_format", "cpu_moe",
                "host_experts")
HOST_EXPERTS = ("cpu", "pcie", "dma", "auto")   # engine.load's host_experts: what computes the cpu_moe layers'
                                                # experts ("auto": cpu, pcie or dma, measured at load)
EXPERT_FORMATS = ("weights", "blocks")


@dataclass
class Message:
    role: str
    content: str

    def as_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


@dataclass
class CheckConfig:
    """Fields every check accepts. Subclasses add parameters and thresholds."""
    kind: str
    name: str = ""                          # defaults to kind (kind#2, ... for repeats)
    # engine.load overrides for this check (default: the [suite] values)
    ctx: int | None = param(None, lo=1)
    vram_budget_gib: float | None = param(None, lo=0, lo_open=True)
    n_gpu_layers: int | None = param(None, lo=0)
    wave_budget_mib: float | None = param(None, lo=0, lo_open=True)
    expert_format: str | None = None        # "weights" | "blocks" (engine.load's expert_format)
    cpu_moe: int | str | None = None        # "auto" or a count: MoE layers' experts on the CPU (blocks)
    host_experts: str | None = None         # "cpu" | "pcie": what computes those experts (engine.load's)
    # this check's weight format (default: the run's, --weight-format / [suite]): a speed check
    # under llama.cpp's placement asks for q8_0, the bytes llama.cpp computes from
    weight_format: str | None = None
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)
    # thresholds per platform ("cpu-f32", "cuda-bf16", ...: device type and applied weight
    # format), calibrated from measured noise floors; per_model still wins over these
    per_platform: dict[str, dict[str, Any]] = field(default_factory=dict)
    # gates that may go unmeasured without making the case incomplete: threshold field, or
    # field.dtype, -> the reason the report prints (per_model.<m>.optional adds more)
    optional: dict[str, str] = field(default_factory=dict)

    KIND = ""   # set by subclasses; class attribute, not a TOML key

    @classmethod
    def threshold_fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in fields(cls) if f.metadata.get("threshold")}

    def gate(self, name: str) -> tuple[str, str]:
        """(metric name, op) of threshold field ``name``."""
        meta = self.threshold_fields()[name].metadata
        return meta["metric"].format(**dataclasses.asdict(self)), meta["op"]

    def threshold_for(self, name: str, model: str, kv_dtype: str, platform: str | None = None) -> float | None:
        """The bound for ``kv_dtype`` on ``model`` on ``platform``: the check's value, then the
        ``per_platform`` table, then the ``per_model`` table (each overrides the one before,
        dtype by dtype when both are tables)."""
        value = getattr(self, name)
        fallback = None         # a number overridden by a table still holds for the dtypes (and
        layers = [self.per_platform.get(platform, {}) if platform else {}, self.per_model.get(model, {})]
        for override in layers:   # KV specs) the table does not name
            if name not in override:
                continue
            o = override[name]
            if isinstance(o, dict):
                if isinstance(value, dict):
                    merged = dict(value)
                else:
                    merged, fallback = {}, value
                merged.update(o)
                value = merged
            else:
                value, fallback = o, None
        if isinstance(value, dict):
            return value.get(kv_dtype, fallback)
        return value

    def gates(self, model: str, kv_dtype: str, platform: str | None = None) -> dict[str, tuple[float, str]]:
        """metric name -> (bound, op) for every threshold that applies here."""
        out = {}
        for name in self.threshold_fields():
            bound = self.threshold_for(name, model, kv_dtype, platform)
            if bound is not None:
                metric, op = self.gate(name)
                out[metric] = (float(bound), op)
        return out

    def optional_reason(self, metric: str, model: str, kv_dtype: str) -> str | None:
        """Why gate ``metric`` may go unmeasured for ``model``/``kv_dtype`` (None: it may not)."""
        names = {self.gate(n)[0]: n for n in self.threshold_fields()}
        fname = names.get(metric)
        if fname is None:
            return None
        tables = [self.optional, self.per_model.get(model, {}).get("optional", {})]
        for key in (f"{fname}.{kv_dtype}", fname):
            for t in reversed(tables):
                if key in t:
                    return t[key]
        return None

    def load_overrides(self) -> dict:
        return {k: getattr(self, k) for k in (*LOAD_OPTIONS, "weight_format") if getattr(self, k) is not None}

    def validate(self, path, where: str) -> None:
        """Cross-field rules of a check kind (override; raise SuiteError)."""


@dataclass
class SuiteSection:
    name: str
    description: str = ""
    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    baseline: str = "fp32"
    kv_dtypes: list[str] = field(default_factory=lambda: ["bf16", "q8_0"])
    device: str = "auto"                  # auto: cuda when there is one, else cpu
    weight_format: str = "auto"           # auto: f32 when it fits half the host RAM, else bf16
    ctx: int = param(4096, lo=1)
    vram_budget_gib: float | None = param(None, lo=0, lo_open=True)
    n_gpu_layers: int | None = param(None, lo=0)
    wave_budget_mib: float | None = param(None, lo=0, lo_open=True)
    expert_format: str | None = None      # "blocks": routed experts in the file's Q4_0/Q8_0 blocks
    cpu_moe: int | str | None = None      # with blocks: "auto" or the first N MoE layers' experts on the CPU
    host_experts: str | None = None       # "cpu" (the host computes them) | "pcie" (the GPU reads them in place) | "dma"
    seed: int = param(0, lo=0)
