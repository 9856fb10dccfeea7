"""argmax: teacher-forced logits of a narrowed KV cache against the fp32 baseline.

Contract: for each message set, the tokens are the chat-templated prompt followed by the
baseline's greedy continuation, ``positions`` tokens in all. The baseline's logits over
them are the reference; each dtype's logits on the *same tokens* are compared position by
position (``harness.metrics.logit_stats``): fp32 top-1 inside the narrowed top-k, top-1
agreement (``Same top p``), logit max-abs / mean-abs, KLD statistics, PPL ratio. On the
baseline row the same metrics are the *noise floor*: fp32 in one pass against fp32
prefilled in chunks of ``noise_chunk`` tokens, the same maths batched differently.

Routing flips (MoE): a router is discontinuous: at a near-tie, a tiny perturbation swaps the
experts a position runs and moves that position's logits by whole units (random-weight
stand-ins have many near-ties). Where the engine has the ``routes`` capability (kvbench's
engine), each row is run twice: with its own routing (what it really does: every statistic
below, and ``Routing flips``, the % of positions where some MoE layer chose other experts than
the baseline, with its binomial SE) and, where any position flipped, with the baseline's experts
forced (weighted by the row's own router: ``Engine.routed_logits(routes=...)``). The worst-case
gates ``Max abs logit diff`` and ``Top-1 in top-{k}`` hold on the forced run, at every
position: what the narrowed cache did with the router's discrete choice held fixed, so a KV
fault still shows everywhere and a near-tie swap shows as a flip, not as a KV error; their
own-routing values are reported beside as ``... (own routing)``. Without routes (a dense
model, or an engine without the capability) ``Routing flips`` is ``n/a`` with the reason and
the gates hold on the row's own logits.

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

# torch loads in the function that uses it: a bad suite fails fast, in one line, without it

from ..metrics import logit_stats
from ..stats import proportion_se
from ..errors import SuiteError
from ..schema import CheckConfig, Message, param, threshold
from ..engine_api import CAP_CHAT, CAP_CHUNKED_LOGITS, CAP_GENERATE, CAP_LOGITS, CAP_ROUTES, capabilities_of
from ..metric_registry import lookup, metric
from .base import Check, Metric, Outcome, chat_ids, register

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
    metric("Routing flips", "%", "lower", "positions where some MoE layer chose other experts than the "
           "baseline did (Max abs / Top-1 gates hold with the baseline's experts forced)", show=("table", "side")),
    metric("Max abs logit diff (own routing)", "", "lower", "Max abs logit diff, the row routing its own way",
           show=("table",)),
    metric("Top-1 in top-{k} (own routing)", "%", "higher", "Top-1 in top-k, the row routing its own way"),
)

# the worst-case statistics a single routing flip can decide: gated with the baseline's experts forced
ROUTE_HELD = ("Max abs logit diff", "Top-1 in top-{k}")


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
    max_route_flip_pct: float | dict[str, float] | None = threshold("Routing flips", "<=", hi=100.0)

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
        seqs, prompt_lens, logits, routes = [], [], [], []
        routed = CAP_ROUTES in capabilities_of(eng)
        for msgs in cfg.messages:
            prompt = chat_ids(eng, msgs)[:cfg.positions]
            need = cfg.positions - len(prompt)
            cont = eng.generate(prompt, need, stop_at_eos=False) if need > 0 else []
            seq = prompt + list(cont)[:need]
            seqs.append(seq)
            prompt_lens.append(len(prompt))
            if routed:
                lg, rt = eng.routed_logits(seq)
                routes.append(rt)
            else:
                lg = eng.logits(seq)
            logits.append(lg)
        return {"seqs": seqs, "prompt_lens": prompt_lens, "logits": logits,
                "routes": routes if routed else None}

    @staticmethod
    def _no_routes_reason(eng, state) -> str | None:
        """Why routing flips cannot be told on this row, or None."""
        if state.get("routes") is None:
            return "the baseline engine does not report expert routes"
        if CAP_ROUTES not in capabilities_of(eng):
            return f"engine {eng.name} does not provide routes"
        if not state["routes"][0].shape[0]:
            return "dense model: no expert routing"
        return None

    def measure(self, eng, cfg: ArgmaxConfig, state, ctx) -> Outcome:
        import torch
        out = Outcome()
        no_routes = self._no_routes_reason(eng, state)
        chunk = cfg.noise_chunk if ctx.is_baseline else None
        tests, forced, flips = [], [], []
        for seq, base_routes in zip(state["seqs"], state["routes"] or [None] * len(state["seqs"])):
            if no_routes is not None:
                tests.append(eng.logits(seq, chunk=chunk))
                continue
            lg, rt = eng.routed_logits(seq, chunk=chunk)
            flip = (rt != base_routes).any(dim=-1)                       # [L_moe, T]
            tests.append(lg)
            flips.append(flip)
            # same experts everywhere: the forced run is this run (moe_route_forced's contract)
            forced.append(eng.routed_logits(seq, chunk=chunk, routes=base_routes)[0] if bool(flip.any()) else lg)
        base = torch.cat(state["logits"])
        test = torch.cat(tests)
        targets = []
        for seq in state["seqs"]:
            targets += list(seq[1:]) + [-1]      # the last position has no known next token
        stats = logit_stats(base, test, cfg.top_k, targets)
        held: dict[str, Metric] = {}
        if no_routes is None:
            flip = torch.cat(flips, dim=1)                                # [L_moe, T_all]
            held = self._route_held(base, torch.cat(forced), flip.any(dim=0), cfg, stats, out)
            moe = list(eng.spec.moe_layers)
            per_layer = flip.sum(dim=1).tolist()
            first = torch.where(flip.any(dim=0), flip.float().argmax(dim=0), torch.full_like(flip[0], -1, dtype=torch.long))
            out.series["route_flip"] = [bool(x) for x in flip.any(dim=0)]
            out.info["routing"] = {
                "moe_layers": len(moe), "positions": int(flip.shape[1]),
                "flipped_positions": int(flip.any(dim=0).sum()),
                "flips_per_layer": {str(moe[j]): int(n) for j, n in enumerate(per_layer)},
                "first_flip_layer": {str(int(p)): moe[int(first[p])]
                                     for p in torch.nonzero(first >= 0).flatten()[:256]}}
        for name, value in stats.scalars.items():
            d = lookup(self.kind, name)    # "<x> SE": the +/- of x, same unit, descriptive
            if name in held:
                m = held[name]
                out.metrics.append(m)
                continue
            out.add(name, value, d.unit if d else "", d.better if d else None)
        out.add("Positions", int(base.shape[0]), "tokens")
        if no_routes is not None:
            out.not_applicable("Routing flips", no_routes, "%", "lower")
        out.series.update(stats.series)
        out.info["segments"] = [{"prompt_tokens": p, "tokens": len(s), "ids": list(s)}
                                for p, s in zip(state["prompt_lens"], state["seqs"])]
        out.info["reference"] = (f"{ctx.baseline} one pass vs {ctx.baseline} prefilled in chunks of "
                                 f"{cfg.noise_chunk} (noise floor)" if ctx.is_baseline
                                 else f"{ctx.kv_dtype} vs {ctx.baseline}, same tokens")
        return out

    def _route_held(self, base, forced, flips, cfg: ArgmaxConfig, stats, out: Outcome) -> dict:
        """Emit ``Routing flips`` and the own-routing values of ``ROUTE_HELD``; return those
        metrics on the forced run (the baseline's experts at every position)."""
        T = int(flips.numel())
        k = int(flips.sum())
        p, se = proportion_se(k, T)
        out.add("Routing flips", 100.0 * p, "%", "lower",
                detail=f"{k} of {T} positions chose other experts than the baseline in some MoE layer")
        out.add("Routing flips SE", 100.0 * se, "%")
        names = [n.replace("{k}", str(cfg.top_k)) for n in ROUTE_HELD]
        for n in names:
            d = lookup(self.kind, n)
            out.add(f"{n} (own routing)", stats.scalars[n], d.unit, d.better)
        sub = logit_stats(base, forced, cfg.top_k)
        out.series["max_abs_routes_forced"] = sub.series["max_abs"]
        held = {}
        for n in names:
            d = lookup(self.kind, n)
            held[n] = Metric(n, sub.scalars[n], d.unit, d.better,
                             detail=f"the baseline's experts forced at all {T} positions "
                                    f"(own routing: {stats.scalars[n]:.4g} with {k} routing flips)")
        return held
