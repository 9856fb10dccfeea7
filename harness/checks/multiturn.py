"""multiturn: a 6-turn chat and a long greedy generation per KV dtype, held against fp32's
own tokens (issue 15 item 4: quantized-KV bugs that show only deep into a chat).

Contract:

- *Conversation*: ``turns`` user messages (default: a fixed 6-turn trip-planning chat, after
  an optional ``system`` message). Each turn renders the whole conversation so far through the
  model's own chat template (``apply_chat_template(..., add_generation_prompt=True)``) and
  decodes greedily up to ``max_new_tokens`` (stopping at EOS); the answer, decoded to text
  without EOS tokens, is fed back as the assistant message of the next turn. Every dtype
  holds *its own* conversation (a dtype that diverged at turn 2 carries its own answer into
  turn 3), as a chat user would.
- *Long generation*: one chat-templated prompt (``long_prompt``), then ``long_tokens``
  greedy tokens (``long_stop_at_eos``: default false, so the cache is read at every depth up
  to ``long_tokens``).
- The fp32 tokens come from ``prepare`` on the baseline engine (as ``coherence`` gets its
  reference); the baseline row reuses them.

Per segment (each turn, and the long generation): the *first divergence step* is the
number of leading answer tokens equal to fp32's answer of the same segment (None when the
two answers are identical); the segment *collapses* when ``longest_repeat_run`` (harness.
metrics; back-to-back copies of one n-gram of period <= 32) of its answer is at least
``collapse_run`` tokens.

Metrics: ``Turns before divergence`` (leading turns identical to fp32), ``Identical tokens
before divergence`` (answer tokens of those turns plus the divergence step of the first
divergent turn), ``Long first divergence`` (tokens of the long generation equal to fp32's
before the first difference; all of them when none): the three not measured on the baseline
row; ``Collapsed turns``; ``Long repeat run`` (tokens); ``Collapse beyond fp32``: segments
that collapsed where fp32's same segment did not: gated ``<= 0`` by default (a dtype that
makes a chat collapse that fp32 kept healthy fails). Per-turn values are the series
``turn_divergence`` (None: identical), ``turn_repeat_run``, ``baseline_turn_repeat_run``;
answers (clipped) and per-turn facts go to ``info``. Not applicable on random-weight
synthetic models (their greedy text is noise), as ``coherence`` declares.

    [[check]]
    kind = "multiturn"; max_new_tokens = 96; long_tokens = 1024; collapse_run = 24
"""
from __future__ import annotations

from dataclasses import dataclass

from ..engine_api import CAP_CHAT, CAP_GENERATE
from ..errors import SuiteError
from ..metric_registry import metric
from ..metrics import common_prefix, longest_repeat_run
from ..schema import CheckConfig, Message, param, threshold
from .base import Check, Outcome, eos_ids, register

DEFAULT_TURNS = [
    "I am planning a three-day trip to Lisbon in spring. What should I see on the first day?",
    "That sounds good. What about the second day? I like museums and old churches.",
    "Where could I have dinner near those places? Give two suggestions.",
    "How do I get from the airport to the city centre cheaply?",
    "Please summarise the whole plan so far as a short list.",
    "Thank you! Now translate the first item of that list into Portuguese.",
]
DEFAULT_LONG_PROMPT = ("Write a long, detailed story about a lighthouse keeper who finds a message in a "
                       "bottle. Describe the characters, the island, the weather and what happens over "
                       "several days, chapter by chapter.")
TEXT_CHARS = 600
RANDOM_WEIGHTS = ("random weights (synthetic model): its greedy text is noise, so divergence and repeat "
                  "loops say nothing about the KV dtype")


@dataclass
class MultiturnConfig(CheckConfig):
    turns: list[str] = param(default_factory=lambda: list(DEFAULT_TURNS))
    system: str | None = param(None, help="optional system message before the first turn")
    max_new_tokens: int = param(96, lo=1, help="greedy tokens per turn (stops at EOS)")
    long_prompt: str = param(DEFAULT_LONG_PROMPT)
    long_tokens: int = param(1024, lo=0, help="tokens of the long greedy generation (0: none)")
    long_stop_at_eos: bool = param(False)
    collapse_run: int = param(24, lo=2, help="a segment collapses when its longest repeat run "
                              "is at least this many tokens")
    max_new_collapse: float | dict[str, float] | None = threshold("Collapse beyond fp32", "<=", default=0)
    min_turns_before_divergence: float | dict[str, float] | None = threshold("Turns before divergence", ">=")
    min_long_first_divergence: float | dict[str, float] | None = threshold("Long first divergence", ">=")

    def validate(self, path, where: str) -> None:
        if not self.turns or any(not isinstance(t, str) or not t.strip() for t in self.turns):
            raise SuiteError(path, f"{where}.turns", "needs at least one non-empty user message")
        if self.long_tokens and not self.long_prompt.strip():
            raise SuiteError(path, f"{where}.long_prompt", "must not be empty when long_tokens > 0")


def _chat(eng, messages: list[dict]) -> list[int]:
    return list(eng.tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def _gen(eng, prompt: list[int], n: int, stop_at_eos: bool) -> tuple[list[int], str]:
    new = list(eng.generate(prompt, n, stop_at_eos=stop_at_eos))
    return new, getattr(eng, "last_stop_reason", "")


def converse(eng, cfg: MultiturnConfig) -> dict:
    """The dtype's own conversation and long generation: {"turns": [{"prompt_tokens", "tokens",
    "stop"}...], "long": {"tokens", "stop"} | None}."""
    eos = eos_ids(eng)
    history = [Message("system", cfg.system).as_dict()] if cfg.system else []
    turns = []
    for user in cfg.turns:
        history.append(Message("user", user).as_dict())
        prompt = _chat(eng, history)
        new, stop = _gen(eng, prompt, cfg.max_new_tokens, True)
        body = [t for t in new if t not in eos]
        history.append(Message("assistant", eng.tokenizer.decode(body)).as_dict())
        turns.append({"prompt_tokens": len(prompt), "tokens": new, "stop": stop})
    long = None
    if cfg.long_tokens:
        prompt = _chat(eng, [*([Message("system", cfg.system).as_dict()] if cfg.system else []),
                             Message("user", cfg.long_prompt).as_dict()])
        new, stop = _gen(eng, prompt, cfg.long_tokens, cfg.long_stop_at_eos)
        long = {"prompt_tokens": len(prompt), "tokens": new, "stop": stop}
    return {"turns": turns, "long": long}


def divergence(base: list[int], new: list[int]) -> int | None:
    """Leading tokens equal to the reference before the first difference; None if identical."""
    return None if list(base) == list(new) else common_prefix(base, new)


@register
class Multiturn(Check):
    kind = "multiturn"
    metrics = (
        metric("Turns before divergence", "turns", "higher", "turns identical to the baseline's before the first divergence"),
        metric("Identical tokens before divergence", "tokens", "higher", "answer tokens identical to the baseline's"),
        metric("Long first divergence", "tokens", "higher", "first step of the long generation that differs"),
        metric("Collapsed turns", "turns", "lower", "turns whose longest repeat run reaches collapse_run"),
        metric("Long repeat run", "tokens", "lower", "longest repeat run of the long generation"),
        metric("Collapse beyond fp32", "segments", "lower", "turns / long generation collapsed where the baseline did not"),
    )
    config = MultiturnConfig
    requires = frozenset({CAP_GENERATE, CAP_CHAT})

    def load_options(self, cfg: MultiturnConfig, suite):
        opts = super().load_options(cfg, suite)
        # room for the whole conversation (prompts grow by each answer) and the long generation
        need = max(len(cfg.turns) * (cfg.max_new_tokens + 128) + 512, cfg.long_tokens + 512)
        opts["ctx"] = max(opts["ctx"], need)
        return opts

    def unmeasured_on_baseline(self, cfg):
        why = "the baseline's tokens are the reference itself"
        return {"Turns before divergence": why, "Identical tokens before divergence": why,
                "Long first divergence": why}

    def not_applicable(self, cfg, model):
        return RANDOM_WEIGHTS if model.weights == "random" else None

    def prepare(self, eng, cfg: MultiturnConfig, ctx):
        return converse(eng, cfg)

    def measure(self, eng, cfg: MultiturnConfig, state, ctx) -> Outcome:
        eos = eos_ids(eng)
        mine = state if ctx.is_baseline else converse(eng, cfg)
        out = Outcome()

        def body(tokens):
            return [t for t in tokens if t not in eos]

        per_turn, divs, runs, base_runs = [], [], [], []
        for i, (b, h) in enumerate(zip(state["turns"], mine["turns"])):
            d = divergence(b["tokens"], h["tokens"])
            run, brun = longest_repeat_run(body(h["tokens"])), longest_repeat_run(body(b["tokens"]))
            divs.append(d)
            runs.append(run)
            base_runs.append(brun)
            per_turn.append({"turn": i + 1, "user": cfg.turns[i], "tokens": len(h["tokens"]),
                             "stop": h["stop"], "prompt_tokens": h["prompt_tokens"],
                             "history_identical": all(x is None for x in divs[:-1]),
                             "first_divergence": d, "repeat_run": run, "baseline_repeat_run": brun,
                             "collapsed": run >= cfg.collapse_run,
                             "baseline_collapsed": brun >= cfg.collapse_run,
                             "text": _clip(eng.tokenizer.decode(body(h["tokens"])))})
        new_collapse = sum(t["collapsed"] and not t["baseline_collapsed"] for t in per_turn)
        where = [f"turn {t['turn']}" for t in per_turn if t["collapsed"] and not t["baseline_collapsed"]]
        long_info = None
        if state["long"] is not None:
            b, h = state["long"], mine["long"]
            d = divergence(b["tokens"], h["tokens"])
            run, brun = longest_repeat_run(body(h["tokens"])), longest_repeat_run(body(b["tokens"]))
            long_info = {"tokens": len(h["tokens"]), "stop": h["stop"], "prompt_tokens": h["prompt_tokens"],
                         "first_divergence": d, "repeat_run": run, "baseline_repeat_run": brun,
                         "collapsed": run >= cfg.collapse_run, "baseline_collapsed": brun >= cfg.collapse_run,
                         "text": _clip(eng.tokenizer.decode(body(h["tokens"])))}
            if long_info["collapsed"] and not long_info["baseline_collapsed"]:
                new_collapse += 1
                where.append("long generation")

        if ctx.is_baseline:
            for name, unit in (("Turns before divergence", "turns"),
                               ("Identical tokens before divergence", "tokens"),
                               ("Long first divergence", "tokens")):
                out.skip(name, self.unmeasured_on_baseline(cfg)[name], unit, "higher")
        else:
            lead = next((i for i, d in enumerate(divs) if d is not None), len(divs))
            same = sum(len(t["tokens"]) for t in state["turns"][:lead]) + (divs[lead] if lead < len(divs) else 0)
            out.add("Turns before divergence", lead, "turns", "higher",
                    detail=f"first divergence step per turn (None: identical): {divs}")
            out.add("Identical tokens before divergence", same, "tokens", "higher")
            if long_info is None:
                out.skip("Long first divergence", "long_tokens = 0", "tokens", "higher")
            else:
                d = long_info["first_divergence"]
                out.add("Long first divergence", len(state["long"]["tokens"]) if d is None else d, "tokens",
                        "higher", detail="identical to the baseline" if d is None else None)
        out.add("Collapsed turns", sum(t["collapsed"] for t in per_turn), "turns", "lower",
                detail=f"longest repeat run per turn: {runs} (baseline {base_runs}; collapse >= {cfg.collapse_run})")
        if long_info is None:
            out.skip("Long repeat run", "long_tokens = 0", "tokens", "lower")
        else:
            out.add("Long repeat run", long_info["repeat_run"], "tokens", "lower",
                    detail=f"baseline {long_info['baseline_repeat_run']}")
        out.add("Collapse beyond fp32", new_collapse, "segments", "lower",
                detail=f"collapsed where {ctx.baseline} did not: {', '.join(where)}" if where else None)
        out.series = {"turn_divergence": divs, "turn_repeat_run": runs, "baseline_turn_repeat_run": base_runs}
        out.info.update(turns=per_turn, long=long_info, collapse_run=cfg.collapse_run,
                        max_new_tokens=cfg.max_new_tokens, long_tokens=cfg.long_tokens)
        return out


def _clip(text: str, n: int = TEXT_CHARS) -> str:
    return text if len(text) <= n else text[:n].rstrip() + " …"
