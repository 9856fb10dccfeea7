"""needle: a passkey hidden in a long filler context, answered by greedy decode (needle in a haystack).

Contract: for each context length in ``lengths`` (tokens of the whole chat-templated prompt;
``"trained"`` = the model's trained context, capped at ``trained_cap``; lengths beyond it are
dropped) and each depth in ``depths_pct`` (0 = the needle opens the document, 100 = it
closes it), a prompt is built from the pinned corpus (``harness.corpus``, the filler) with a
needle sentence ``The secret passkey is NNNNN.`` inserted at that depth (at a line start), a
question after the document, all through the model's own chat template, and answered by
greedy decode (``max_new_tokens``). A cell is *found* when the answer holds the passkey's
digits. The passkey of each cell is seeded (suite seed, length, depth), so every dtype sees
the same prompts.

Scoring per dtype x depth x length, against the baseline (fp32) on the same prompts: a cell
where fp32 itself misses the needle is *uninformative* (it says nothing about the KV dtype:
never a pass, never a failure). ``Needle score`` = % of informative cells this dtype still
finds, ``Lost needles`` = informative cells it misses; both are skipped (so a gate on them
goes ``incomplete``) on the baseline row, whose answers define the informative cells, and
when fp32 found no needle at all. Descriptive: ``Found`` (cells found of ``Cells``),
``Informative cells``, ``Gained needles`` (found where fp32 missed). ``info["cells"]`` holds
every cell (length asked, tokens, depth asked and placed, passkey, answer, status) for the
heat map the report draws per dtype (``needle_section``, registered with
``harness.report.register_section``). On random-weight synthetic models the check is
``n/a``: such a model answers noise whatever its KV cache holds.

    [[check]]
    kind = "needle"; lengths = [1024, 4096, "trained"]; depths_pct = [0, 25, 50, 75, 100]
    min_score = { bf16 = 100, q8_0 = 100 }
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .. import corpus as corpora
from ..engine_api import CAP_CHAT, CAP_GENERATE
from ..errors import HarnessError, SuiteError
from ..metric_registry import metric
from ..schema import CheckConfig, param, threshold
from .base import Check, Outcome, register
from .corpus_kld import check_depth_list, ensure_ctx, resolve_lengths

INTRO = ("Below is a long document. Somewhere in it there is a secret passkey. Read the document, "
         "then answer the question after it.")
NEEDLE = "The secret passkey is {key}. Remember it: the passkey is {key}."
QUESTION = "What is the secret passkey hidden in the document? Answer with the passkey number only."

FOUND, LOST, UNINFORMATIVE, GAINED, MISSED = "found", "lost", "uninformative", "gained", "missed"


@dataclass
class NeedleConfig(CheckConfig):
    corpus: str = param(corpora.DEFAULT, help="filler: registry name in harness.corpus, or a text file")
    corpus_sha256: str | None = param(None, help="pin for a local corpus file")
    lengths: list[int | str] = param(default_factory=lambda: [1024, 2048, 4096, "trained"],
                                     help='prompt lengths in tokens; "trained" = the model\'s context')
    depths_pct: list[float] = param(default_factory=lambda: [0.0, 25.0, 50.0, 75.0, 100.0])
    trained_cap: int = param(32768, lo=2)
    max_new_tokens: int = param(16, lo=1)
    min_score: float | dict[str, float] | None = threshold("Needle score", ">=", hi=100.0)
    max_lost: float | dict[str, float] | None = threshold("Lost needles", "<=")

    def validate(self, path, where: str) -> None:
        check_depth_list(self.lengths, path, f"{where}.lengths", "length")
        if not self.depths_pct:
            raise SuiteError(path, f"{where}.depths_pct", "needs at least one depth", "0 .. 100")
        for i, d in enumerate(self.depths_pct):
            if not 0.0 <= d <= 100.0:
                raise SuiteError(path, f"{where}.depths_pct[{i}]", f"depth {d:g}% is outside the document",
                                 "0 .. 100")
        if len(set(self.depths_pct)) != len(self.depths_pct):
            raise SuiteError(path, f"{where}.depths_pct", f"repeated depth in {self.depths_pct}")
        if self.corpus_sha256 is not None and self.corpus in corpora.CORPORA:
            raise SuiteError(path, f"{where}.corpus_sha256", f"corpus {self.corpus!r} is pinned by the "
                             "registry already", "remove corpus_sha256, or give a file path as corpus")


def passkey(seed: int, length: int, depth: float) -> str:
    """The cell's 5-digit passkey (the same for every dtype and machine)."""
    return str(random.Random(f"needle/{seed}/{length}/{depth:g}").randrange(10000, 100000))


def found(answer: str, key: str) -> bool:
    """True when the answer holds the passkey's digits as one number (commas/spaces ignored)."""
    return re.search(rf"(?<!\d){key}(?!\d)", re.sub(r"(?<=\d)[\s,.](?=\d)", "", answer)) is not None


def _render(eng, doc: str) -> list[int]:
    from engine.errors import ChatTemplateError
    text = f"{INTRO}\n\n<document>\n{doc}\n</document>\n\n{QUESTION}"
    try:
        return list(eng.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                      add_generation_prompt=True))
    except ChatTemplateError:         # no template: plain text ending in an answer cue
        return list(eng.tokenizer.encode(text + "\nAnswer: The passkey is"))


def build_prompt(eng, filler: list[int], length: int, depth: float, key: str) -> dict:
    """A prompt of at most ``length`` tokens (within a few of it) with the needle at ``depth`` %
    of the document, inserted at the start of a line; the document is ``filler``'s text."""
    needle = NEEDLE.format(key=key)
    budget = max(0, length - len(_render(eng, needle)))
    ids, placed = None, 0.0
    for _ in range(6):
        cut = int(round(budget * depth / 100.0))
        left = eng.tokenizer.decode(filler[:cut])
        right = eng.tokenizer.decode(filler[cut:budget])
        nl = left.rfind("\n")
        if 0 < cut < budget and nl >= 0:      # the needle starts a line
            left, right = left[:nl + 1], left[nl + 1:] + right
        doc = "".join(p for p in (left.rstrip("\n"), "\n" if left.strip() else "", needle,
                                  "\n" if right.strip() else "", right.lstrip("\n")))
        ids = _render(eng, doc)
        placed = 100.0 * len(left) / max(1, len(left) + len(right))
        over = len(ids) - length
        if -8 <= over <= 0 or budget == 0:
            break
        budget = max(0, budget - over)
    if len(ids) > length:
        raise HarnessError(f"needle: cannot build a prompt of {length} tokens (the shortest is {len(ids)})",
                           "give longer lengths")
    return {"ids": ids, "tokens": len(ids), "placed_pct": round(placed, 2)}


def _cells(eng, cfg: NeedleConfig, seed: int):
    text = corpora.load(cfg.corpus, cfg.corpus_sha256)
    lengths, dropped = resolve_lengths(cfg.lengths, eng.spec, cfg.trained_cap)
    if not lengths:
        raise HarnessError(f"needle: every length {sorted(dropped)} exceeds the model's trained context "
                           f"({eng.spec.ctx_train})", "give smaller lengths")
    filler = corpora.tokens(eng.tokenizer, text)
    bos = getattr(eng.tokenizer, "bos_id", None)
    if filler and bos is not None and filler[0] == bos:
        filler = filler[1:]
    if len(filler) < lengths[-1]:
        raise HarnessError(f"needle: corpus {text.name!r} is {len(filler)} tokens, the longest prompt needs "
                           f"{lengths[-1]}", "lower the lengths, or pick a longer corpus")
    cells = []
    for L in lengths:
        for d in cfg.depths_pct:
            key = passkey(seed, L, d)
            cells.append({"length": L, "depth_pct": d, "passkey": key, **build_prompt(eng, filler, L, d, key)})
    return cells, lengths, dropped, text.manifest


def _answer(eng, cell: dict, max_new: int) -> dict:
    new = list(eng.generate(cell["ids"], max_new, stop_at_eos=True))
    eos = set(eng.tokenizer.eos_ids or ())
    answer = eng.tokenizer.decode([t for t in new if t not in eos])
    return {"answer": answer, "found": found(answer, cell["passkey"])}


@register
class Needle(Check):
    kind = "needle"
    metrics = (
        metric("Needle score", "%", "higher", "informative cells whose passkey the dtype found", show=("table",)),
        metric("Lost needles", "cells", "lower", "informative cells the dtype missed"),
        metric("Found", "cells", "higher"),
        metric("Cells", "cells", None),
        metric("Informative cells", "cells", None, "cells where the baseline found the passkey"),
        metric("Gained needles", "cells", None, "cells the dtype found where the baseline did not"),
    )
    config = NeedleConfig
    requires = frozenset({CAP_GENERATE, CAP_CHAT})

    def inputs(self, cfg: NeedleConfig) -> dict:
        return {"corpus": corpora.load(cfg.corpus, cfg.corpus_sha256).manifest}

    def unmeasured_on_baseline(self, cfg):
        why = "the baseline's answers define which cells are informative"
        return {"Needle score": why, "Lost needles": why}

    def not_applicable(self, cfg, model):
        if model.weights == "random":
            return ("random weights (synthetic model): it cannot retrieve a passkey whatever its KV cache "
                    "holds, so every cell would be uninformative")
        return None

    def prepare(self, eng, cfg: NeedleConfig, ctx):
        cells, lengths, dropped, manifest = _cells(eng, cfg, ctx.seed)
        eng = ensure_ctx(self, eng, cfg, ctx, max(c["tokens"] for c in cells) + cfg.max_new_tokens)
        answers = [_answer(eng, c, cfg.max_new_tokens) for c in cells]
        return {"cells": cells, "answers": answers, "lengths": lengths, "dropped": dropped,
                "corpus": manifest}

    def measure(self, eng, cfg: NeedleConfig, state, ctx) -> Outcome:
        cells, base = state["cells"], state["answers"]
        if ctx.is_baseline:
            mine = base
        else:
            eng = ensure_ctx(self, eng, cfg, ctx, max(c["tokens"] for c in cells) + cfg.max_new_tokens)
            mine = [_answer(eng, c, cfg.max_new_tokens) for c in cells]
        rows = []
        for c, b, m in zip(cells, base, mine):
            if ctx.is_baseline:
                status = FOUND if m["found"] else UNINFORMATIVE
            elif not b["found"]:
                status = GAINED if m["found"] else UNINFORMATIVE
            else:
                status = FOUND if m["found"] else LOST
            rows.append({k: c[k] for k in ("length", "tokens", "depth_pct", "placed_pct", "passkey")}
                        | {"answer": m["answer"][:80], "found": m["found"], "baseline_found": b["found"],
                           "status": status})
        return score(rows, ctx.is_baseline, len(cells), state, ctx)


def score(rows: list[dict], is_baseline: bool, n: int, state: dict | None = None, ctx=None) -> Outcome:
    """The case's metrics from its cells (``status`` per cell; see the module docstring)."""
    out = Outcome()
    informative = [r for r in rows if r["baseline_found"]]
    lost = sum(r["status"] == LOST for r in rows)
    if is_baseline:
        why = "the baseline's answers define which cells are informative"
        out.skip("Needle score", why, "%", "higher")
        out.skip("Lost needles", why, "cells", "lower")
    elif not informative:
        why = (f"uninformative: the baseline found the needle in none of the {n} cells, so no cell "
               "can show what the KV dtype costs")
        out.skip("Needle score", why, "%", "higher")
        out.skip("Lost needles", why, "cells", "lower")
    else:
        out.add("Needle score", 100.0 * (len(informative) - lost) / len(informative), "%", "higher",
                detail=f"{len(informative) - lost} of {len(informative)} informative cells found")
        out.add("Lost needles", lost, "cells", "lower",
                detail=", ".join(f"{r['length']} tokens at {r['depth_pct']:g}%" for r in rows
                                 if r["status"] == LOST) or None)
    out.add("Found", sum(r["found"] for r in rows), "cells", "higher")
    out.add("Cells", n, "cells")
    out.add("Informative cells", len(informative), "cells")
    if not is_baseline:
        out.add("Gained needles", sum(r["status"] == GAINED for r in rows), "cells")
    out.info["cells"] = rows
    if state is not None:
        out.info.update({"lengths": state["lengths"], "dropped_lengths": state["dropped"],
                         "corpus": state["corpus"]})
    return out


# -- report section -------------------------------------------------------------------------

def needle_section(report, names: list[str]) -> None:
    """Per check: a table per model x dtype (score, lost, informative) and a heat map per dtype
    (depth x length: found / missed / uninformative)."""
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    from ..report import md_table
    report.md.append("## Needle in a haystack (greedy decode)\n")
    report.md.append("A cell where the baseline itself misses the needle is **uninformative**: it says "
                     "nothing about the KV dtype and counts neither as a pass nor as a failure.\n")
    for chk in names:
        rows = []
        for m in report.models:
            for d in report.dtypes:
                c = report.case.get((m, d, chk))
                if c is None:
                    continue
                if c["status"] == "n/a":
                    rows.append({"model": m, "dtype": d, "status": f"n/a ({c.get('reason')})"})
                    continue
                rows.append({"model": m, "dtype": report.label(d, "baseline"), "status": c["status"],
                             **{x: report.value(m, d, chk, x) for x in (
                                 "Needle score", "Lost needles", "Found", "Informative cells",
                                 "Gained needles", "Cells")}})
        if rows:
            report.md.append(f"### `{chk}`\n")
            report.md.append(md_table(pd.DataFrame(rows).dropna(axis=1, how="all")) + "\n")
        for m in report.models:
            for d in report.dtypes:
                cells = report.res.info(m, d, chk).get("cells") or []
                if not cells:
                    continue
                lengths = sorted({r["length"] for r in cells})
                depths = sorted({r["depth_pct"] for r in cells})
                grid = np.full((len(depths), len(lengths)), np.nan)
                text = {}
                for r in cells:
                    i, j = depths.index(r["depth_pct"]), lengths.index(r["length"])
                    st = r["status"]
                    grid[i, j] = {FOUND: 1.0, GAINED: 1.0, LOST: 0.0}.get(st, np.nan)
                    text[(i, j)] = {FOUND: "found", LOST: "LOST", GAINED: "found*",
                                    UNINFORMATIVE: "uninf."}[st]
                table = pd.DataFrame([[text[(i, j)] for j in range(len(lengths))] for i in range(len(depths))],
                                     columns=[f"{L} tok" for L in lengths])
                table.insert(0, "depth", [f"{x:g}%" for x in depths])
                report.md.append(f"**{m}**, `{d}`" + (" (baseline: uninf. = it missed the needle)"
                                                      if d == report.baseline else
                                                      " (found* = found where the baseline missed)") + ":\n")
                report.md.append(md_table(table) + "\n")
                fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.0 + 0.55 * len(depths)))
                ax.set_facecolor("#d9d9d9")
                ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
                for (i, j), t in text.items():
                    ax.text(j, i, t, ha="center", va="center", fontsize=8)
                ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
                ax.set_yticks(range(len(depths)), [f"{x:g}%" for x in depths])
                ax.set_xlabel("context length (tokens)")
                ax.set_ylabel("needle depth")
                ax.set_title(f"{m}, {d}: needle retrieval", fontsize=9)
                from ..report import _slug
                report.save(fig, f"{_slug(chk)}_{_slug(m)}_{d}.png", f"needle heat map, {m}, {d}")


def _register_section() -> None:
    from ..report import register_section
    register_section("needle")(needle_section)


_register_section()
