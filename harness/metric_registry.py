"""The metric registry: every metric a check emits, declared once (name, unit, direction, gate).

Contract: a check declares its metrics as a class attribute ``metrics = (metric(...), ...)``
(``harness.checks.base.register`` hands them to ``declare`` with the check's config class);
this module imports nothing from the harness, so the runner, the report and ``compare`` read
it without import cycles. A declaration:

- ``name``: the metric's exact name, or a pattern with ``{placeholders}`` for names built from
  the config (``"Top-1 in top-{k}"``, ``"pp{n}"``, ``"{measure} CV"``); a placeholder matches
  a non-empty run of non-blank characters, and the most specific pattern (most literal text)
  wins;
- ``unit``: ``"%"``, ``"nats"``, ``"MiB"``, ``"tok/s"``, ``"tokens"``, ... (``""``: none);
- ``better``: ``"lower"`` / ``"higher"`` (``compare`` flags a change in the worse direction as a
  regression) or ``None`` (descriptive: never a regression by itself);
- ``show``: the report views that list it (``"table"``: the check's metric table;
  ``"side"``: the engines side by side table); the report keeps the declared order;
- ``gate`` (not written by the check): the config field whose threshold gates the metric,
  filled by ``declare`` from the config's ``threshold(...)`` fields; a gate must point the
  same way as the direction (``<=``: lower is better, ``>=``: higher), checked there.

``"<metric> SE"`` (a standard error) is declared implicitly for every declared metric: same
unit, descriptive. ``lookup(kind, name)`` returns the declaration (or None), ``direction``
and ``unit`` its facts, ``shown(kind, view)`` the names a report view lists, ``to_json`` /
``from_json`` the form a run's manifest records (``metrics``), so a report rebuilt later
reads what the run declared.

How a new check declares (say ``needle``)::

    from ..metric_registry import metric

    @register
    class Needle(Check):
        kind = "needle"
        metrics = (metric("Needle score", "%", "higher", show=("table",), about="found passkeys"),
                   metric("Needle cells", "cells", about="informative cells"))

``tests/test_metric_registry.py`` holds every metric each check emits on a tiny model against
these declarations (name, unit and direction must agree).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable

DIRECTIONS = ("lower", "higher", None)
_OP_DIRECTION = {"<=": "lower", ">=": "higher"}


@dataclass(frozen=True)
class MetricDecl:
    name: str
    unit: str = ""
    better: str | None = None
    about: str = ""
    show: tuple[str, ...] = ()
    gate: str | None = None           # filled by declare() from the check's config
    _re: Any = field(default=None, compare=False, repr=False)

    def matches(self, name: str) -> bool:
        return name == self.name or (self._re is not None and self._re.fullmatch(name) is not None)


def metric(name: str, unit: str = "", better: str | None = None, about: str = "",
           show: Iterable[str] = ()) -> MetricDecl:
    """One metric's declaration (see the module docstring)."""
    if better not in DIRECTIONS:
        raise ValueError(f"metric {name!r}: better must be 'lower', 'higher' or None, got {better!r}")
    return MetricDecl(name, unit, better, about, tuple(show))


def _pattern(name: str):
    if "{" not in name:
        return None
    parts = re.split(r"\{[^{}]*\}", name)
    return re.compile(r"\S+?".join(re.escape(p) for p in parts))


_DECLARED: dict[str, tuple[MetricDecl, ...]] = {}


def declare(kind: str, decls: Iterable[MetricDecl], config: type | None = None) -> tuple[MetricDecl, ...]:
    """Register ``kind``'s metrics (replacing an earlier declaration of the same kind). With
    ``config`` (a ``CheckConfig`` class), each threshold field gates the metric it names: its
    field name becomes that declaration's ``gate``; a gate on an undeclared metric, or one
    whose op disagrees with the declared direction, is a ValueError (a bug in the check)."""
    out = []
    for d in decls:
        if any(o.name == d.name for o in out):
            raise ValueError(f"{kind}: metric {d.name!r} declared twice")
        out.append(replace(d, _re=_pattern(d.name)))
    if config is not None:
        from dataclasses import fields
        for f in fields(config):
            meta = f.metadata or {}
            if not meta.get("threshold"):
                continue
            target = meta["metric"]
            i = next((i for i, d in enumerate(out) if d.name == target or d.matches(target)
                      or (_pattern(target) is not None and _pattern(target).fullmatch(d.name))), None)
            if i is None:
                raise ValueError(f"{kind}: threshold {f.name} gates {target!r}, which the check does not declare")
            want = _OP_DIRECTION[meta["op"]]
            if out[i].better not in (None, want):
                raise ValueError(f"{kind}: threshold {f.name} ({meta['op']}) gates {out[i].name!r}, declared "
                                 f"{out[i].better} is better")
            out[i] = replace(out[i], gate=f.name)
    _DECLARED[kind] = tuple(out)
    return _DECLARED[kind]


def kinds() -> list[str]:
    return list(_DECLARED)


def declared(kind: str) -> tuple[MetricDecl, ...]:
    return _DECLARED.get(kind, ())


def lookup(kind: str, name: str, table: dict | None = None) -> MetricDecl | None:
    """The declaration of ``name`` in ``kind`` (exact names first, then patterns; ``"<x> SE"``
    derives from ``x``'s), from ``table`` (``from_json`` of a manifest) or the live registry."""
    decls = (table or {}).get(kind) or _DECLARED.get(kind, ())
    for d in decls:
        if d.name == name:
            return d
    # the most specific pattern first: "{measure} CV" before "pp{n}" for "pp512 CV"
    for d in sorted((d for d in decls if d._re is not None), key=lambda d: -len(re.sub(r"\{[^{}]*\}", "", d.name))):
        if d.matches(name):
            return d
    if name.endswith(" SE"):
        base = lookup(kind, name[:-3], table)
        if base is not None:
            return MetricDecl(name, base.unit, None, f"standard error of {base.name}")
    return None


def direction(kind: str, name: str, default: str | None = None, table: dict | None = None) -> str | None:
    d = lookup(kind, name, table)
    return d.better if d is not None else default


def unit(kind: str, name: str, default: str = "", table: dict | None = None) -> str:
    d = lookup(kind, name, table)
    return d.unit if d is not None else default


def shown(kind: str, view: str, names: Iterable[str] | None = None, table: dict | None = None) -> list[str]:
    """The metrics ``view`` lists for ``kind``: without ``names``, the declared names in the
    declared order; with ``names`` (what a run recorded), those whose declaration lists the
    view, in the recorded order (a ``"<x> SE"`` is never listed: it goes beside its metric).
    When ``kind`` has no declaration at all (an old run read without its checks): every name."""
    decls = (table or {}).get(kind) or _DECLARED.get(kind, ())
    names = None if names is None else list(dict.fromkeys(names))
    if not decls:
        return [] if names is None else [n for n in names if not n.endswith(" SE")]
    decls = [d for d in decls if view in d.show]
    if names is None:
        return [d.name for d in decls]
    return [n for n in names if any(d.matches(n) for d in decls)]


def to_json(kinds_: Iterable[str] | None = None) -> dict[str, list[dict]]:
    """The declarations of ``kinds_`` (default: all) as a run manifest records them."""
    ks = list(_DECLARED) if kinds_ is None else [k for k in kinds_ if k in _DECLARED]
    return {k: [{x: v for x, v in asdict(d).items() if x != "_re"} | {"show": list(d.show)} for d in _DECLARED[k]]
            for k in ks}


def from_json(data: dict | None) -> dict[str, tuple[MetricDecl, ...]]:
    """``to_json``'s output back as declarations (an old manifest without it: ``{}``)."""
    out = {}
    for k, decls in (data or {}).items():
        if isinstance(decls, list):
            out[k] = tuple(MetricDecl(d["name"], d.get("unit", ""), d.get("better"), d.get("about", ""),
                                      tuple(d.get("show") or ()), d.get("gate"), _pattern(d["name"]))
                           for d in decls if isinstance(d, dict) and "name" in d)
    return out
