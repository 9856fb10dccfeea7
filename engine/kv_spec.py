"""KV specs: what a ``kv_dtype`` request may say beyond one dtype: separate K and V formats
(llama.cpp's ``-ctk`` / ``-ctv``) and per-layer overrides (vLLM-like skip layers), in one
canonical string that round-trips, is filesystem-safe and reads well in a report row.

Syntax: tokens joined by ``.``; each token is ``[k-|v-]<dtype>[@<layers>]``:

- ``<dtype>`` (a format of ``engine.formats.KV``: fp32, bf16, q8_0) sets K and V, ``k-<dtype>``
  K only, ``v-<dtype>`` V only;
- without ``@``: the base of every layer; with ``@<layers>``: an override of those layers only,
  ``<layers>`` a comma list of layer indices and inclusive ranges ``a-b`` (``0,23``, ``0-3,12``);
- a component the base does not name is fp32 (``engine.formats.WIDEST_KV``): ``k-q8_0`` is K in
  q8_0 and V in fp32, and ``q8_0@3`` is fp32 everywhere but layer 3;
- overrides apply in the order written (a later one wins on a layer both name); one base token
  per component (``q8_0.bf16`` is an error).

Examples: ``q8_0`` (uniform: exactly the dtype strings of before), ``k-q8_0.v-bf16`` (K q8_0, V
bf16 on every layer), ``q8_0.fp32@0,23`` (q8_0 everywhere, layers 0 and 23 fp32),
``k-q8_0.v-bf16.fp32@0`` (both, combined), ``fp32.k-q8_0@5`` (only layer 5's K narrowed).

Canonical form (``str(spec)``, ``canonical(text)``): the base first, ``<dtype>`` when K and V
agree, else ``k-<dtype>.v-<dtype>``; then one override token per (component, dtype): a layer
whose K and V both differ from the base and agree is written ``<dtype>@``, else ``k-<dtype>@``
and/or ``v-<dtype>@`` for the component(s) that differ; overrides equal to the base vanish;
tokens ordered both, ``k-``, ``v-``, then by the formats table's order; layers ascending,
runs of three or more as ``a-b``. ``parse(str(spec)) == spec`` and ``canonical`` is idempotent.
Characters: letters, digits, ``_ . - @ ,`` only (no ``/``, no spaces).

Resolution against a model: ``spec.layer_formats(n_layers) -> [(k, v), ...]`` (a layer index
out of range is a ConfigError naming it); ``KVSpec.from_layers(pairs)`` is the canonical spec
of a per-layer assignment, with the base chosen as the most frequent K (and V) format (ties:
the one of the lowest layer), so a request and what the engine applied compare as strings
(``model_canonical(text, n_layers)``). ``layer_label(k, v)`` is one layer's cell (``q8_0``,
``k-q8_0.v-bf16``): what ``Engine.kv_dtypes`` lists per layer. Every error is a one-line
``ConfigError`` naming the bad part and the accepted forms. No torch import (the harness reads
this module without loading the engine).

    s = parse("q8_0.fp32@0,23"); str(s)                  # 'q8_0.fp32@0,23'
    s.layer_formats(24)[0], s.layer_formats(24)[1]       # ('fp32', 'fp32'), ('q8_0', 'q8_0')
    canonical("fp32@23,0.q8_0")                          # 'q8_0.fp32@0,23'
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from . import formats
from .errors import ConfigError

ACCEPTED = ("a dtype (fp32, bf16, q8_0), k-<dtype>.v-<dtype>, plus per-layer overrides "
            "[k-|v-]<dtype>@<layers> joined by '.' (e.g. q8_0, k-q8_0.v-bf16, q8_0.fp32@0,23)")
_TOKEN = re.compile(r"^(?:(k|v)-)?([A-Za-z0-9_]+)(?:@(.*))?$")
_KINDS = ("", "k", "v")          # canonical order of override tokens: both, K only, V only


def _err(text: str, why: str) -> ConfigError:
    return ConfigError(f"kv_dtype {text!r}: {why}", f"write {ACCEPTED}")


def _fmt_name(name: str, text: str) -> str:
    if name not in formats.KV:
        raise _err(text, f"unknown dtype {name!r} (known: {', '.join(formats.KV)})")
    return name


def _parse_layers(raw: str, text: str) -> tuple[int, ...]:
    if not raw:
        raise _err(text, "'@' needs layer indices after it (e.g. @0,23 or @0-3)")
    out: list[int] = []
    for part in raw.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise _err(text, f"bad layer list {raw!r}: {part!r} is not an index or a range a-b")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise _err(text, f"bad layer range {part!r}: {b} < {a}")
        out.extend(range(a, b + 1))
    return tuple(sorted(set(out)))


def format_layers(layers) -> str:
    """Ascending indices, runs of three or more as ``a-b``: ``[0, 1, 2, 3, 7]`` -> ``0-3,7``."""
    xs = sorted(set(int(x) for x in layers))
    parts, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{xs[i]}-{xs[j]}")
        else:
            parts.extend(str(x) for x in xs[i:j + 1])
        i = j + 1
    return ",".join(parts)


def layer_label(k: str, v: str) -> str:
    """One layer's formats as a cell: ``q8_0`` when K and V agree, else ``k-q8_0.v-bf16``."""
    return k if k == v else f"k-{k}.v-{v}"


@dataclass(frozen=True)
class KVSpec:
    """A parsed KV spec: base K and V formats and per-layer overrides (``layers``: sorted
    ``(layer, k, v)`` of the layers whose formats differ from the base, effective values)."""
    k: str = formats.WIDEST_KV
    v: str = formats.WIDEST_KV
    layers: tuple[tuple[int, str, str], ...] = ()

    @property
    def uniform(self) -> bool:
        """One dtype for K and V on every layer (the strings of before)."""
        return self.k == self.v and not self.layers

    @property
    def max_layer(self) -> int:
        return max((i for i, _, _ in self.layers), default=-1)

    @property
    def formats_used(self) -> set[str]:
        return {self.k, self.v} | {f for _, k, v in self.layers for f in (k, v)}

    def formats_at(self, layer: int) -> tuple[str, str]:
        for i, k, v in self.layers:
            if i == layer:
                return k, v
        return self.k, self.v

    def layer_formats(self, n_layers: int, model: str = "") -> list[tuple[str, str]]:
        """(K, V) format of each of ``n_layers`` layers; ConfigError when an override names a
        layer the model does not have."""
        if self.max_layer >= n_layers:
            bad = [i for i, _, _ in self.layers if i >= n_layers]
            who = f"{model} has" if model else "the model has"
            raise ConfigError(f"kv_dtype {str(self)!r}: layer {bad[0]} is out of range ({who} {n_layers} "
                              f"layers, 0-{n_layers - 1})", f"name layers 0-{n_layers - 1} only")
        over = {i: (k, v) for i, k, v in self.layers}
        return [over.get(i, (self.k, self.v)) for i in range(n_layers)]

    def __str__(self) -> str:
        base = layer_label(self.k, self.v) if self.k == self.v else f"k-{self.k}.v-{self.v}"
        groups: dict[tuple[str, str], list[int]] = {}
        for i, k, v in self.layers:
            dk, dv = k != self.k, v != self.v
            if dk and dv and k == v:
                groups.setdefault(("", k), []).append(i)
                continue
            if dk:
                groups.setdefault(("k", k), []).append(i)
            if dv:
                groups.setdefault(("v", v), []).append(i)
        order = list(formats.KV)
        toks = [f"{kind + '-' if kind else ''}{f}@{format_layers(ls)}"
                for (kind, f), ls in sorted(groups.items(), key=lambda g: (_KINDS.index(g[0][0]),
                                                                           order.index(g[0][1])))]
        return ".".join([base, *toks])

    @classmethod
    def from_layers(cls, pairs) -> "KVSpec":
        """The canonical spec of a per-layer assignment ``[(k, v), ...]``: the base is the most
        frequent K (and V) format, ties to the lowest layer's."""
        pairs = [(str(k), str(v)) for k, v in pairs]
        if not pairs:
            return cls()

        def base(xs: list[str]) -> str:
            counts: dict[str, int] = {}
            for x in xs:
                counts[x] = counts.get(x, 0) + 1
            top = max(counts.values())
            return next(x for x in xs if counts[x] == top)

        bk, bv = base([k for k, _ in pairs]), base([v for _, v in pairs])
        return cls(bk, bv, tuple((i, k, v) for i, (k, v) in enumerate(pairs) if (k, v) != (bk, bv)))


def parse(text) -> KVSpec:
    """``text`` (see the module doc) -> ``KVSpec``; ConfigError (one line) when malformed."""
    if isinstance(text, KVSpec):
        return text
    if not isinstance(text, str) or not text:
        raise _err(str(text), "empty or not a string")
    if text in formats.KV:                                  # the common case, as before
        return KVSpec(text, text)
    if re.search(r"[^A-Za-z0-9_.@,\-]", text):
        raise _err(text, "only letters, digits and _ . - @ , may appear")
    base: dict[str, str] = {}
    edits: list[tuple[str, str, tuple[int, ...]]] = []
    for tok in text.split("."):
        m = _TOKEN.match(tok)
        if not tok or not m:
            raise _err(text, f"bad token {tok!r}")
        kind, name, layers = m.group(1) or "", m.group(2), m.group(3)
        if kind == "" and name in ("k", "v"):
            raise _err(text, f"bad token {tok!r} (write {name}-<dtype>)")
        name = _fmt_name(name, text)
        if layers is None:
            for comp in (("k", "v") if kind == "" else (kind,)):
                if comp in base:
                    raise _err(text, f"the base {comp.upper()} format is given twice")
                base[comp] = name
        else:
            edits.append((kind, name, _parse_layers(layers, text)))
    bk, bv = base.get("k", formats.WIDEST_KV), base.get("v", formats.WIDEST_KV)
    eff: dict[int, list[str]] = {}
    for kind, name, layers in edits:
        for i in layers:
            cur = eff.setdefault(i, [bk, bv])
            if kind in ("", "k"):
                cur[0] = name
            if kind in ("", "v"):
                cur[1] = name
    over = tuple((i, k, v) for i, (k, v) in sorted(eff.items()) if (k, v) != (bk, bv))
    return KVSpec(bk, bv, over)


def canonical(text) -> str:
    """The canonical string of a spec (independent of any model)."""
    return str(parse(text))


def model_canonical(text, n_layers: int, model: str = "") -> str:
    """The canonical string of the per-layer assignment ``text`` gives a model of ``n_layers``
    layers (``KVSpec.from_layers``): what the engine's applied ``kv_spec`` reads when every
    layer holds what was asked."""
    return str(KVSpec.from_layers(parse(text).layer_formats(n_layers, model)))


def strip_reasons(cell: str) -> str:
    """An applied-dtype observable without its qualifications: ``"q8_0 (q8_0 written wrong: ...
    (its scale) ...)"`` -> ``"q8_0"`` (parenthesized reasons removed, nested ones too)."""
    prev = None
    while prev != cell:
        prev, cell = cell, re.sub(r"\s*\([^()]*\)", "", cell)
    return cell.strip()


def cell_formats(cell: str) -> tuple[str, str]:
    """(K, V) formats of one layer's cell (``layer_label``; a qualified observable is read by the
    formats it names): ``"q8_0"`` -> ``("q8_0", "q8_0")``, ``"k-q8_0.v-bf16"`` -> ``("q8_0", "bf16")``."""
    s = parse(strip_reasons(cell))
    if s.layers:
        raise _err(cell, "a layer's cell has no per-layer overrides")
    return s.k, s.v


def is_spec(text) -> bool:
    """Whether ``text`` parses (no exception)."""
    try:
        parse(text)
    except ConfigError:
        return False
    return True
