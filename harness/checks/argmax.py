"""argmax: teacher-forced logits of a narrowed KV cache against the fp32 baseline.

Contract: for each message set, the tokens are the chat-templated prompt followed by the
baseline's greedy continuation, ``positions`` tokens in all. The baseline's logits over
them are the reference; each dtype's logits on the *same tokens* are compared position by
position (``harness.metrics.logit_stats``): fp32 top-1 inside the narrowed top-k, top-1
agreement (``Same top p``), logit max-abs / mean-abs, KLD statistics, PPL ratio. On the
baseline row the same metrics are the *noise floor*: fp32 in one pass against fp32
prefilled in chunks of ``noise_chunk`` tokens, the same maths batched differently.

Uncertainty: ``Mean KLD``, ``Same top p``, ``RMS Δp``, ``Mean PPL(Q)/PPL(base)`` and
``Mean ln(PPL(Q)/PPL(base))`` each come with a descriptive metric ``"<name> SE"`` (same unit,
no direction: never gated, never a regression by itself), the ``+/-`` llama-perplexity
prints (``harness.stats``). The report holds a dtype's delta against the baseline row (the
noise floor) with ``harness.stats.significant`` and marks the significant ones.

    [[check]]
    kind = "argmax"; positions = 256; top_k = 5; max_abs = { bf16 = 2.5, q8_0 = 3.5 }
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..metrics import logit_stats
from ..errors import SuiteError
from ..schema import CheckConfig, Message, param, threshold
from ..engine_api import CAP_CHAT, CAP_CHUNKED_LOGITS, CAP_GENERATE, CAP_LOGITS
from ..metric_registry import lookup, metric
from .base import Check, Outcome, chat_ids, register

DEFAULT_MESSAGES = [
    [Message("user", "Write a short story about a lighthouse keeper who finds a message in a bottle.")],
    [Message("user", "Explain how a bicycle stays upright, step by step, for a curious child.")],
]

# every metric the check emits (harness.metric_registry; "<name> SE" derive from them),
# named as llama-perplexity's KL-divergence report names them (harness.metrics.logit_stats)
METRICS = (
    metric("Max abs logit diff", "", "lower", "largest |logit - baseline logit|", show=("table", "side")),
    metric("Mean abs logit diff", "", "lower", "mean |logit - baseline logit|", show=("table",)),
    metric("Top-1 in top-{k}", "%", "higher", "baseline top-1 within the narrowed top-k", show=("table",)),
    metric("Same top p", "%", "higher", "positions with the same top-1", show=("table", "side")),
    metric("Mean KLD", "nats", "lower", "KL(baseline || narrowed), mean over positions", show=("table", "side")),
    metric("Median KLD", "nats", "lower", show=("table",)),
    metric("99.9% KLD", "nats", "lower"),
    metric("99.0% KLD", "nats", "lower", show=("table",)),
    metric("10.0% KLD", "nats", "lower"),
    metric("5.0% KLD", "nats", "lower"),
    metric("Maximum KLD", "nats", "lower", show=("table",)),
    metric("Minimum KLD", "nats", "lower"),
    metric("Mean PPL(base)", "", None, "perplexity of the baseline on the sequences"),
    metric("Mean PPL(Q)", "", None, "perplexity of the narrowed row"),
    metric("Mean PPL(Q)/PPL(base)", "", "lower", show=("table", "side")),
    metric("Mean ln(PPL(Q)/PPL(base))", "", "lower"),
    metric("RMS Δp", "%", "lower", "RMS of the change of the target token's probability", show=("table",)),
    metric("Positions", "tokens", None, "teacher-forced positions", show=("table",)),
)


@dataclass
class ArgmaxConfig(CheckConfig):
    messages: list[list[Message]] = param(default_factory=lambda: [list(m) for m in DEFAULT_MESSAGES])
    positions: int = param(256, lo=2, help="tokens per message set: prompt + greedy continuation")
    top_k: int = param(5, lo=1)
    noise_chunk: int = param(64, lo=1, help="prefill chunk of the second fp32 run (noise floor)")
    min_top_k_pct: float | dict[str, float] | None = threshold(
        "Top-1 in top-{top_k}", ">=", default=100.0, hi=100.0)
    min_same_top_pct: float | dict[str, float] | None = threshold("Same top p", ">=", hi=100.0)
    max_abs: float | dict[str, float] | None = threshold("Max abs logit diff", "<=")
    max_mean_abs: float | dict[str, float] | None = threshold("Mean abs logit diff", "<=")
    max_mean_kld: float | dict[str, float] | None = threshold("Mean KLD", "<=")
    max_kld_99: float | dict[str, float] | None = threshold("99.0% KLD", "<=")
    max_ppl_ratio: float | dict[str, float] | None = threshold("Mean PPL(Q)/PPL(base)", "<=")

    def validate(self, path, where: str) -> None:
        if not self.messages or any(not m for m in self.messages):
            raise SuiteError(path, f"{where}.messages", "needs at least one non-empty message set")


@register
class Argmax(Check):
    kind = "argmax"
    config = ArgmaxConfig
    requires = frozenset({CAP_LOGITS, CAP_CHUNKED_LOGITS, CAP_GENERATE, CAP_CHAT})
    metrics = METRICS

    def prepare(self, eng, cfg: ArgmaxConfig, ctx):
        seqs, prompt_lens, logits = [], [], []
        for msgs in cfg.messages:
            prompt = chat_ids(eng, msgs)[:cfg.positions]
            need = cfg.positions - len(prompt)
            cont = eng.generate(prompt, need, stop_at_eos=False) if need > 0 else []
            seq = prompt + list(cont)[:need]
            seqs.append(seq)
            prompt_lens.append(len(prompt))
            logits.append(eng.logits(seq))
        return {"seqs": seqs, "prompt_lens": prompt_lens, "logits": logits}

    def measure(self, eng, cfg: ArgmaxConfig, state, ctx) -> Outcome:
        out = Outcome()
        tests = [eng.logits(seq, chunk=cfg.noise_chunk) if ctx.is_baseline else eng.logits(seq)
                 for seq in state["seqs"]]
        base = torch.cat(state["logits"])
        test = torch.cat(tests)
        targets = []
        for seq in state["seqs"]:
            targets += list(seq[1:]) + [-1]      # the last position has no known next token
        stats = logit_stats(base, test, cfg.top_k, targets)
        for name, value in stats.scalars.items():
            d = lookup(self.kind, name)    # "<x> SE": the +/- of x, same unit, descriptive
            out.add(name, value, d.unit if d else "", d.better if d else None)
        out.add("Positions", int(base.shape[0]), "tokens")
        out.series = stats.series
        out.info["segments"] = [{"prompt_tokens": p, "tokens": len(s), "ids": list(s)}
                                for p, s in zip(state["prompt_lens"], state["seqs"])]
        out.info["reference"] = (f"{ctx.baseline} one pass vs {ctx.baseline} prefilled in chunks of "
                                 f"{cfg.noise_chunk} (noise floor)" if ctx.is_baseline
                                 else f"{ctx.kv_dtype} vs {ctx.baseline}, same tokens")
        return out
