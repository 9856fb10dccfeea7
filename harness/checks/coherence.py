"""coherence: greedy chat answers through the model's own template, held against fp32.

Contract: for each message set, the prompt is rendered with the model's chat template (raw
prompts make instruct models collapse whatever the KV dtype) and decoded greedily up to
``max_new_tokens`` (stopping at EOS). Metrics over the sets: ``Identical prefix`` (fewest
tokens equal to the fp32 continuation before the first divergence; not measured on the
baseline itself), ``First token EOS`` (sets whose answer is empty), ``Distinct-2`` (lowest),
``Longest repeat run`` (longest span of back-to-back copies of one n-gram: the collapse
detector). The decoded texts and stop reasons go to ``info`` for the report.

    [[check]]
    kind = "coherence"; max_new_tokens = 48; max_repeat_run = 24
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import SuiteError
from ..metrics import common_prefix, distinct_n, longest_repeat_run
from ..schema import CheckConfig, Message, param, threshold
from ..engine_api import CAP_CHAT, CAP_GENERATE
from .base import Check, Outcome, chat_ids, eos_ids, register

DEFAULT_MESSAGES = [
    [Message("user", "What is the capital of France?")],
    [Message("user", "Write a short sentence about the ocean.")],
    [Message("system", "You are a concise assistant."),
     Message("user", "Give three tips for staying focused while studying.")],
]


@dataclass
class CoherenceConfig(CheckConfig):
    messages: list[list[Message]] = param(default_factory=lambda: [list(m) for m in DEFAULT_MESSAGES])
    max_new_tokens: int = param(48, lo=1)
    max_first_eos: float | dict[str, float] | None = threshold("First token EOS", "<=", default=0)
    min_identical_prefix: float | dict[str, float] | None = threshold("Identical prefix", ">=")
    min_distinct2: float | dict[str, float] | None = threshold("Distinct-2", ">=", hi=1.0)
    max_repeat_run: float | dict[str, float] | None = threshold("Longest repeat run", "<=")

    def validate(self, path, where: str) -> None:
        if not self.messages or any(not m for m in self.messages):
            raise SuiteError(path, f"{where}.messages", "needs at least one non-empty message set")


def _answer(eng, prompt: list[int], max_new: int, eos: set[int]) -> tuple[list[int], str]:
    new = list(eng.generate(prompt, max_new, stop_at_eos=True))
    return new, eng.last_stop_reason


@register
class Coherence(Check):
    kind = "coherence"
    config = CoherenceConfig
    requires = frozenset({CAP_GENERATE, CAP_CHAT})

    def unmeasured_on_baseline(self, cfg):
        return {"Identical prefix": "the baseline's answers are the reference itself"}

    def not_applicable(self, cfg, model):
        if model.weights == "random":
            return ("random weights (synthetic model): its greedy text is noise, so repeat loops and "
                    "EOS say nothing about the KV dtype")
        return None

    def prepare(self, eng, cfg: CoherenceConfig, ctx):
        eos = eos_ids(eng)
        prompts = [chat_ids(eng, m) for m in cfg.messages]
        return {"prompts": prompts, "answers": [_answer(eng, p, cfg.max_new_tokens, eos) for p in prompts]}

    def measure(self, eng, cfg: CoherenceConfig, state, ctx) -> Outcome:
        eos = eos_ids(eng)
        answers = (state["answers"] if ctx.is_baseline else
                   [_answer(eng, p, cfg.max_new_tokens, eos) for p in state["prompts"]])
        out = Outcome()
        samples, prefixes, d2, runs, first_eos = [], [], [], [], 0
        for msgs, (base, _), (new, reason) in zip(cfg.messages, state["answers"], answers):
            body = [t for t in new if t not in eos]
            prefix = common_prefix(base, new)
            first_eos += bool(new) and new[0] in eos
            d = distinct_n(body, 2)
            if d is not None:
                d2.append(d)
            runs.append(longest_repeat_run(body))
            prefixes.append(prefix)
            samples.append({"prompt": msgs[-1].content, "text": eng.tokenizer.decode(body),
                            "tokens": len(new), "stop": reason, "identical_prefix": prefix,
                            "baseline_tokens": len(base)})
        if ctx.is_baseline:
            out.skip("Identical prefix", self.unmeasured_on_baseline(cfg)["Identical prefix"], "tokens", "higher")
        else:
            out.add("Identical prefix", min(prefixes), "tokens", "higher",
                    detail=f"per set: {prefixes}")
        out.add("First token EOS", first_eos, "sets", "lower")
        if d2:
            out.add("Distinct-2", min(d2), "", "higher")
        else:
            out.skip("Distinct-2", "every answer is shorter than 2 tokens", "", "higher")
        out.add("Longest repeat run", max(runs), "tokens", "lower")
        out.add("Stopped at EOS", sum(s["stop"] == "eos" for s in samples), "sets")
        out.info["samples"] = samples
        return out
