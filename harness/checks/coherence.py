"""coherence: greedy chat answers over a prompt set, held against fp32's, gated on rates.

Contract: for each message set, the prompt is rendered with the model's chat template (raw
prompts make instruct models collapse whatever the KV dtype) and decoded greedily up to
``max_new_tokens`` (stopping at EOS). The baseline's answers are the reference; ``prepare``
also takes the baseline's teacher-forced logits over prompt + answer (the maths of its decode
steps, batched: equal up to float32 summation order, orders of magnitude below ``tie_margin``)
so every answer step has its fp32 *margin*: top-1 minus top-2 logit. Answers come from the
engine's ``generate_batch`` where it has one (kvbench's eager path: every prompt in one step
per token), else from one ``generate`` per prompt; ``info["generation"]`` and the ``Prompts``
row's detail say which.

Per prompt (``info["samples"]``): the answer (text and token ids), its first divergence step from the baseline's
tokens (None when identical), the fp32 margin at that step, the flip's class, and collapse:
- a divergence is a **near-tie flip** when that margin is <= ``tie_margin`` (logits: a
  suite setting, the noise floor of the margin: how far a healthy narrowed KV can move the
  top-1/top-2 gap), else a **confident divergence**;
- an answer **collapses** when ``harness.metrics.longest_repeat_run`` of its tokens (EOS
  dropped) is >= ``collapse_run`` tokens (a repeat loop).

Rates over the prompt set (each with its count and a one-sided 95% Clopper-Pearson bound,
``harness.stats``), gated by the rate rule ``harness.stats.rate_gate``: a rate fails only
when it is above the one-sided 95% upper bound of the reference's rate:
- ``Collapse excess`` (percentage points): this dtype's collapse rate minus the bound of the
  baseline's collapse rate (on the same prompts); gate ``max_collapse_excess`` (e.g. 0);
- ``Confident divergence excess``: the confident-divergence rate minus the bound of zero
  divergences in n (the baseline against itself never diverges); gate
  ``max_confident_divergence_excess``. With 24 prompts the bound is 11.7%: up to 2
  confident divergences are within chance, 3 fail.
Near-tie flips are counted (``Near-tie flips``) and shown, never gated. Neither excess is
measured on the baseline row (it is the reference). Without the baseline's logits (an
engine without the ``logits`` capability as baseline) divergences cannot be classified:
the divergence metrics are skipped (a gate on them goes ``incomplete``), never guessed.

The rate metrics carry no direction (``better`` None): their noise is in the gate's bound,
so ``harness compare`` judges them by the gate (held in base, failed in head), never by a
relative change of a count that one near-tie can move.

Other metrics: ``Identical prefix`` (fewest tokens equal to the fp32 continuation; not on
the baseline), ``First token EOS``, ``Distinct-2`` (lowest), ``Longest repeat run``,
``Stopped at EOS``, ``Collapse rate`` (%; the baseline's own too), ``Diverged prompts``,
``Largest flipped margin`` (the biggest fp32 margin any prompt flipped at, logits).

    [[check]]
    kind = "coherence"; max_new_tokens = 48; tie_margin = 1.0; collapse_run = 24
    max_collapse_excess = { bf16 = 0.0, q8_0 = 0.0 }
    max_confident_divergence_excess = { bf16 = 0.0, q8_0 = 0.0 }
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import SuiteError
from ..metrics import common_prefix, distinct_n, longest_repeat_run
from ..schema import CheckConfig, Message, param, threshold
from ..engine_api import CAP_CHAT, CAP_GENERATE, CAP_GENERATE_BATCH, CAP_LOGITS, capabilities_of
from ..stats import binom_lower, binom_upper, proportion_se, rate_gate
from ..metric_registry import metric
from .base import Check, Outcome, chat_ids, eos_ids, register

DEFAULT_MESSAGES = [
    [Message("user", "What is the capital of France?")],
    [Message("user", "Write a short sentence about the ocean.")],
    [Message("system", "You are a concise assistant."),
     Message("user", "Give three tips for staying focused while studying.")],
]
REFERENCE = "the baseline's answers are the reference itself"


@dataclass
class CoherenceConfig(CheckConfig):
    messages: list[list[Message]] = param(default_factory=lambda: [list(m) for m in DEFAULT_MESSAGES])
    max_new_tokens: int = param(48, lo=1)
    tie_margin: float = param(1.0, lo=0.0, help="fp32 top-1/top-2 logit margin at or below which a "
                                                  "divergence is a near-tie flip (not gated)")
    collapse_run: int = param(24, lo=2, help="a repeat run this many tokens long is a collapse")
    max_first_eos: float | dict[str, float] | None = threshold("First token EOS", "<=", default=0)
    min_identical_prefix: float | dict[str, float] | None = threshold("Identical prefix", ">=")
    min_distinct2: float | dict[str, float] | None = threshold("Distinct-2", ">=", hi=1.0)
    max_repeat_run: float | dict[str, float] | None = threshold("Longest repeat run", "<=")
    max_collapse_excess: float | dict[str, float] | None = threshold("Collapse excess", "<=", lo=-100.0,
                                                                     hi=100.0)
    max_confident_divergence_excess: float | dict[str, float] | None = threshold(
        "Confident divergence excess", "<=", lo=-100.0, hi=100.0)

    def validate(self, path, where: str) -> None:
        if not self.messages or any(not m for m in self.messages):
            raise SuiteError(path, f"{where}.messages", "needs at least one non-empty message set")


def _answer(eng, prompt: list[int], max_new: int) -> tuple[list[int], str]:
    new = list(eng.generate(prompt, max_new, stop_at_eos=True))
    return new, eng.last_stop_reason


def _answers(eng, prompts: list[list[int]], max_new: int) -> tuple[list[tuple[list[int], str]], dict]:
    """Every prompt's greedy answer and stop reason, and how they ran: together through
    ``generate_batch`` where the engine has it (its ``last_generate_batch``), else one by one."""
    if CAP_GENERATE_BATCH in capabilities_of(eng):
        outs = eng.generate_batch(prompts, max_new, stop_at_eos=True)
        return [(list(o), r) for o, r in zip(outs, eng.last_stop_reasons)], dict(eng.last_generate_batch)
    return [_answer(eng, p, max_new) for p in prompts], {"path": "sequential", "sequences": len(prompts)}


def _how(gen: dict) -> str:
    if gen.get("path") == "batched":
        return (f"answers decoded together ({'+'.join(map(str, gen['batches']))} sequences per step, "
                f"{gen.get('decode_steps', '?')} batched steps)")
    return "answers decoded one prompt at a time"


def _margins(eng, prompt: list[int], answer: list[int]) -> list[float]:
    """fp32 top-1 minus top-2 logit at each answer step (teacher-forced over prompt + answer)."""
    if not answer:
        return []
    lg = eng.logits(list(prompt) + list(answer))[len(prompt) - 1:len(prompt) - 1 + len(answer)]
    top = lg.float().topk(2, dim=1).values
    return [float(x) for x in (top[:, 0] - top[:, 1])]


def divergence(base: list[int], new: list[int]) -> int | None:
    """The first answer step where ``new`` differs from ``base`` (None: identical)."""
    if base == new:
        return None
    return common_prefix(base, new)


def collapsed(tokens: list[int], eos: set[int], run: int) -> tuple[bool, int]:
    body = [t for t in tokens if t not in eos]
    r = longest_repeat_run(body)
    return r >= run, r


@register
class Coherence(Check):
    kind = "coherence"
    config = CoherenceConfig
    requires = frozenset({CAP_GENERATE, CAP_CHAT})
    # every metric it emits (harness.metric_registry); "table": the report's coherence table, in this order
    metrics = (
        metric("Identical prefix", "tokens", "higher", "shortest common prefix with the baseline's answer", show=("table",)),
        metric("First token EOS", "sets", "lower", "answers that end before their first token", show=("table",)),
        metric("Distinct-2", "", "higher", "smallest share of distinct bigrams of an answer", show=("table",)),
        metric("Longest repeat run", "tokens", "lower", "longest repeating run of an answer", show=("table",)),
        metric("Stopped at EOS", "sets", None, show=("table",)),
        metric("Prompts", "sets", None, show=("table",)),
        metric("Collapse rate", "%", None, "answers whose repeat run reaches collapse_run", show=("table",)),
        metric("Collapse rate 95% upper bound", "%", None, "one-sided Clopper-Pearson"),
        metric("Collapse excess", "pp", None, "collapse rate beyond the baseline's bound (gated)", show=("table",)),
        metric("Diverged prompts", "sets", None, show=("table",)),
        metric("Near-tie flips", "sets", None, "divergences at a baseline margin <= tie_margin", show=("table",)),
        metric("Confident divergences", "sets", None, "divergences at a margin > tie_margin", show=("table",)),
        metric("Confident divergence rate", "%", None),
        metric("Confident divergence rate 95% lower bound", "%", None, "one-sided Clopper-Pearson"),
        metric("Confident divergence excess", "pp", None, "confident divergences beyond chance (gated)",
               show=("table",)),
        metric("Largest flipped margin", "logits", None, show=("table",)),
    )

    def unmeasured_on_baseline(self, cfg):
        return {"Identical prefix": REFERENCE, "Collapse excess": REFERENCE,
                "Confident divergence excess": REFERENCE}

    def not_applicable(self, cfg, model):
        if model.weights == "random":
            return ("random weights (synthetic model): its greedy text is noise, so repeat loops and "
                    "EOS say nothing about the KV dtype")
        return None

    def prepare(self, eng, cfg: CoherenceConfig, ctx):
        prompts = [chat_ids(eng, m) for m in cfg.messages]
        answers, gen = _answers(eng, prompts, cfg.max_new_tokens)
        margins = None
        if CAP_LOGITS in capabilities_of(eng):
            margins = [_margins(eng, p, a) for p, (a, _) in zip(prompts, answers)]
        return {"prompts": prompts, "answers": answers, "margins": margins, "generation": gen}

    def measure(self, eng, cfg: CoherenceConfig, state, ctx) -> Outcome:
        eos = eos_ids(eng)
        if ctx.is_baseline:
            answers, gen = state["answers"], state["generation"]
        else:
            answers, gen = _answers(eng, state["prompts"], cfg.max_new_tokens)
        margins = state.get("margins")
        out = Outcome()
        n = len(answers)
        samples, prefixes, d2, runs, first_eos = [], [], [], [], 0
        n_collapse = n_collapse_ref = n_div = n_tie = n_conf = 0
        flipped = []
        for i, (msgs, (base, _), (new, reason)) in enumerate(zip(cfg.messages, state["answers"], answers)):
            body = [t for t in new if t not in eos]
            prefix = common_prefix(base, new)
            first_eos += bool(new) and new[0] in eos
            d = distinct_n(body, 2)
            if d is not None:
                d2.append(d)
            is_col, run = collapsed(new, eos, cfg.collapse_run)
            n_collapse += is_col
            n_collapse_ref += collapsed(base, eos, cfg.collapse_run)[0]
            runs.append(run)
            prefixes.append(prefix)
            step = None if ctx.is_baseline else divergence(base, new)
            margin = flip = None
            if step is not None:
                n_div += 1
                if margins is not None and step < len(margins[i]):
                    margin = margins[i][step]
                    flip = "near-tie" if margin <= cfg.tie_margin else "confident"
                    n_tie += flip == "near-tie"
                    n_conf += flip == "confident"
                    flipped.append(margin)
            samples.append({"prompt": msgs[-1].content, "text": eng.tokenizer.decode(body), "ids": list(new),
                            "tokens": len(new), "stop": reason, "identical_prefix": prefix,
                            "baseline_tokens": len(base), "diverged_at": step, "fp32_margin": margin,
                            "flip": flip, "repeat_run": run, "collapsed": bool(is_col)})
        if ctx.is_baseline:
            out.skip("Identical prefix", REFERENCE, "tokens", "higher")
        else:
            out.add("Identical prefix", min(prefixes), "tokens", "higher", detail=f"per set: {prefixes}")
        out.add("First token EOS", first_eos, "sets", "lower")
        if d2:
            out.add("Distinct-2", min(d2), "", "higher")
        else:
            out.skip("Distinct-2", "every answer is shorter than 2 tokens", "", "higher")
        out.add("Longest repeat run", max(runs), "tokens", "lower")
        out.add("Stopped at EOS", sum(s["stop"] == "eos" for s in samples), "sets")
        out.add("Prompts", n, "sets", detail=_how(gen))
        rate, se = proportion_se(n_collapse, n)
        out.add("Collapse rate", 100.0 * rate, "%", None,
                detail=f"{n_collapse}/{n} answers with a repeat run >= {cfg.collapse_run} tokens")
        out.add("Collapse rate SE", 100.0 * se, "%", None)
        out.add("Collapse rate 95% upper bound", 100.0 * binom_upper(n_collapse, n), "%", None)
        if ctx.is_baseline:
            out.skip("Collapse excess", REFERENCE, "pp")
            out.skip("Confident divergence excess", REFERENCE, "pp")
        else:
            g = rate_gate(n_collapse, n, n_collapse_ref, n)
            out.add("Collapse excess", 100.0 * g.excess, "pp", None,
                    detail=g.describe(f"collapsed answers ({ctx.baseline}'s as the reference)"))
            out.add("Diverged prompts", n_div, "sets", None)
            if margins is None:
                why = ("the baseline engine gave no logits, so divergences cannot be told near-ties or not")
                for name, unit in (("Near-tie flips", "sets"), ("Confident divergences", "sets"),
                                   ("Confident divergence rate", "%"), ("Confident divergence excess", "pp")):
                    out.skip(name, why, unit)
            else:
                c = rate_gate(n_conf, n, 0, n)
                out.add("Near-tie flips", n_tie, "sets", None,
                        detail=f"divergences where {ctx.baseline}'s top-1/top-2 margin <= {cfg.tie_margin:g} "
                               "(reported, not gated)")
                out.add("Confident divergences", n_conf, "sets", None,
                        detail=f"divergences where {ctx.baseline}'s margin > {cfg.tie_margin:g}")
                out.add("Confident divergence rate", 100.0 * c.rate, "%", None)
                out.add("Confident divergence rate 95% lower bound", 100.0 * binom_lower(n_conf, n), "%", None)
                out.add("Confident divergence excess", 100.0 * c.excess, "pp", None,
                        detail=c.describe(f"confident divergences (margin > {cfg.tie_margin:g})"))
                if flipped:
                    out.add("Largest flipped margin", max(flipped), "logits", None)
        out.info["samples"] = samples
        out.info["generation"] = gen
        out.info["tie_margin"] = cfg.tie_margin
        out.info["collapse_run"] = cfg.collapse_run
        return out
