"""The interface every check implements, and the registry of check kinds.

Check modules import this module and register themselves; ``harness.checks`` imports every
check module (so the registry is complete) and re-exports what is here: imports go one
way, harness.checks -> harness.checks.<kind> -> harness.checks.base.

Contract: a check is a class registered with ``@register`` that names its ``kind``, its
config dataclass (a ``CheckConfig`` subclass, i.e. the TOML table's schema) and two steps:

- ``prepare(eng, cfg, ctx) -> state`` runs once per model on the *baseline* engine (fp32):
  the reference tokens / logits that every dtype is held against;
- ``measure(eng, cfg, state, ctx) -> Outcome`` runs on each dtype's engine (the baseline
  included: there it measures the noise floor or the baseline's own health).

An ``Outcome`` carries named ``Metric`` values (``skipped`` with a reason when the engine
cannot provide one yet: never a made-up number), per-position ``series`` for plots and
JSON-able ``info``. Thresholds are applied by the runner from the config, not by checks; a
gated metric that is skipped or missing makes the case ``incomplete``, never a pass.

Every metric a check emits is declared once on the class, ``metrics = (metric(name, unit,
better, show=...), ...)`` (``harness.metric_registry``: unit, direction, report views; the
gate is read from the config's thresholds): ``register`` hands them to the registry that the
runner, the report and ``compare`` read. The ``unit``/``better`` a check passes to
``Outcome.add`` must agree with its declaration (tests/test_metric_registry.py).

Declarations that come before anything runs (``inputs(cfg)``, the fixed inputs a check
reads, e.g. a pinned corpus, goes into the manifest and fails the run early when missing):
- ``unmeasured_on_baseline(cfg) -> {metric: reason}``: metrics the check never measures on
  the baseline row (the suite refuses a baseline gate on them when it loads);
- ``not_applicable(cfg, model: ModelInfo) -> reason | None``: the check cannot mean anything
  on this model (e.g. coherence on random weights); the runner records its cases as ``n/a``
  with the reason and does not run them.

    from harness import checks
    check = checks.get("argmax"); cfg_cls = checks.config_class("argmax")
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .. import metric_registry
from ..metric_registry import MetricDecl, metric  # noqa: F401  (what checks declare their metrics with)
from ..schema import CheckConfig, SuiteSection


@dataclass
class Metric:
    name: str
    value: Any = None                 # number (or bool/str for descriptive metrics)
    unit: str = ""
    better: str | None = None         # "lower" | "higher" | None (descriptive)
    skipped: str | None = None        # why it could not be measured
    detail: str | None = None         # what a failing value means (e.g. the first bad layer)
    na: bool = False                  # skipped because it cannot apply here (e.g. the engine has
                                      # no planner): its gate is 'n/a', not unmeasured


@dataclass
class Outcome:
    metrics: list[Metric] = field(default_factory=list)
    series: dict[str, list] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, value=None, unit: str = "", better: str | None = None, **kw) -> Metric:
        m = Metric(name, value, unit, better, **kw)
        self.metrics.append(m)
        return m

    def skip(self, name: str, reason: str, unit: str = "", better: str | None = None) -> Metric:
        return self.add(name, None, unit, better, skipped=reason)

    def not_applicable(self, name: str, reason: str, unit: str = "", better: str | None = None) -> Metric:
        """A metric that cannot apply to this case (say, plan vs runtime on an engine without a
        planner): a gate on it is recorded as ``n/a`` with ``reason``, neither measured nor
        unmeasured. A case whose every gate is n/a is itself ``n/a``, never ``pass``."""
        return self.add(name, None, unit, better, skipped=reason, na=True)


@dataclass(frozen=True)
class ModelInfo:
    """What is known about a model before it is loaded (metadata only)."""
    name: str
    spec: Any                          # engine.spec.ModelSpec
    weights: str | None = None         # "random" / "upcycled" for synthetic models, else None


@dataclass
class CaseContext:
    """What a check knows about the case it runs in."""
    model: str
    kv_dtype: str
    baseline: str
    suite: SuiteSection
    device: str
    seed: int
    platform: str = ""                # "<device type>-<weight format>" of the per_platform gates
    # load(**overrides) -> a new engine of this model and dtype with other load options;
    # load(kv_dtype=spec, ...) one of another KV spec (engine.kv_spec), e.g. one layer narrowed
    load: Callable[..., Any] = None
    measure_baseline: bool = True     # (prepare only) whether the baseline row will be measured

    @property
    def is_baseline(self) -> bool:
        return self.kv_dtype == self.baseline


class Check:
    kind: str = ""
    config: type[CheckConfig] = CheckConfig
    needs_baseline: bool = True       # False: prepare() is not run (no reference state)
    requires: frozenset[str] = frozenset()   # harness.engine_api capabilities the check uses
    metrics: tuple[MetricDecl, ...] = ()     # every metric it emits (harness.metric_registry)

    def load_options(self, cfg: CheckConfig, suite: SuiteSection) -> dict:
        """engine.load keyword arguments (beyond model/kv_dtype/device) for this check."""
        from ..schema import LOAD_OPTIONS
        opts = {k: getattr(suite, k) for k in LOAD_OPTIONS}
        opts.update(cfg.load_overrides())
        return opts

    def unmeasured_on_baseline(self, cfg: CheckConfig) -> dict[str, str]:
        """Metrics this check never measures on the baseline row, with the reason."""
        return {}

    def inputs(self, cfg: CheckConfig) -> dict | None:
        """Fixed inputs the check reads (e.g. a pinned corpus), resolved before any case runs:
        a JSON-able dict for the run manifest's ``inputs``; a missing input raises a one-line
        ``HarnessError`` (bad input, exit 2). None: the check reads none."""
        return None

    def not_applicable(self, cfg: CheckConfig, model: ModelInfo) -> str | None:
        """Why this check cannot mean anything on ``model`` (None: it can)."""
        return None

    def prepare(self, eng, cfg: CheckConfig, ctx: CaseContext) -> Any:
        return None

    def measure(self, eng, cfg: CheckConfig, state: Any, ctx: CaseContext) -> Outcome:
        raise NotImplementedError


_REGISTRY: dict[str, Check] = {}


def register(cls: type[Check]) -> type[Check]:
    _REGISTRY[cls.kind] = cls()
    cls.config.KIND = cls.kind
    if cls.metrics:
        metric_registry.declare(cls.kind, cls.metrics, cls.config)
    return cls


def kinds() -> list[str]:
    return list(_REGISTRY)


def get(kind: str) -> Check:
    return _REGISTRY[kind]


def config_class(kind: str) -> type[CheckConfig]:
    return _REGISTRY[kind].config


def eos_ids(eng) -> set[int]:
    ids = set(eng.tokenizer.eos_ids or ())
    if eng.spec.eos_id is not None:
        ids.add(int(eng.spec.eos_id))
    return ids


def chat_ids(eng, messages) -> list[int]:
    return list(eng.tokenizer.apply_chat_template([m.as_dict() for m in messages],
                                                  add_generation_prompt=True))
