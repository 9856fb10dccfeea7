"""Top-k log-probabilities with the tail mass kept as one bucket, and the check that uses them.

Contract: ``TopK`` is what an engine that only reports its k most likely next tokens gives
for a teacher-forced sequence (an OpenAI-compatible completions server with ``echo`` and
``logprobs``): per position, ``buckets`` (each a tuple of token ids: one token, or every id
whose text is the same string when the server keys tokens by text) with their
log-probabilities, and ``target`` (log p of the token that follows, NaN where unknown).
Everything else is one *tail bucket* of mass ``1 - sum(p)``.

``topk_stats(base_logits, topk)`` holds full-vocabulary baseline logits against it. KL
divergence is computed over the buckets plus the tail (``Mean KLD (top-10+tail)``): merging
outcomes can only lower a KL divergence, so it is a **lower bound** of the full-vocabulary
KLD, and every metric computed that way says so in its name. ``Top-1 in top-k`` and ``Same
top p`` are exact (the baseline's top-1 among the engine's k, or first); ``Mean
PPL(Q)/PPL(base)`` is exact where every target's log-probability is known.

The ``topk_argmax`` check (registered here, used by suites/engines.toml) is the argmax check
for such engines: the same corpus (chat prompt + the baseline's greedy continuation), the
baseline's full logits as reference, the engine's top-k (from ``topk_logprobs``, or from its
full logits when it has them, so engines can be set side by side on the same statistic).
On the baseline row it measures kvbench's own noise floor through the same top-k lens.

    tk = TopK.from_logits(logits, tokens, k=10)
    topk_stats(base_logits, tk).scalars["Mean KLD (top-10+tail)"]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

if TYPE_CHECKING:      # torch loads in the functions that use it: a bad input fails fast, in one line
    import torch

from ..checks.argmax import DEFAULT_MESSAGES
from ..checks.base import Check, Outcome, chat_ids, register
from ..engine_api import CAP_LOGITS, CAP_TOPK_LOGPROBS, capabilities_of
from ..errors import SuiteError
from ..metric_registry import metric
from ..schema import CheckConfig, Message, param, threshold

TINY = 1e-30


@dataclass
class TopK:
    buckets: list[list[tuple[int, ...]] | None]   # [T][<=k] token-id groups, most likely first (None: not scored)
    logprobs: list[list[float] | None]            # [T][<=k] their log-probabilities
    target: list[float]                       # [T] log p(tokens[t+1]) at t; NaN where unknown
    k: int
    source: str = ""
    notes: list[str] = field(default_factory=list)
    # [T][<=k] True where a bucket's log-probability is not the whole group's (a server that keeps
    # one value per text): used for top-1 containment, left in the tail bucket for the KLD
    inexact: list[list[bool] | None] | None = None

    @classmethod
    def from_logits(cls, logits: torch.Tensor, tokens: list[int], k: int, source: str = "full logits") -> "TopK":
        import torch
        lp = torch.log_softmax(logits.double(), dim=-1)          # [T, V]
        vals, ids = lp.topk(k, dim=-1)
        nxt = torch.tensor(list(tokens[1:]) + [0])
        tgt = lp.gather(1, nxt[:, None])[:, 0].tolist()
        tgt[-1] = math.nan
        return cls([[(int(i),) for i in row] for row in ids.tolist()], vals.tolist(), tgt, k, source)

    def __len__(self) -> int:
        return len(self.buckets)

    def digest(self) -> str:
        """A fingerprint of every number here (the detector compares rows of one server with it)."""
        import hashlib
        h = hashlib.sha256()
        for b, p in zip(self.buckets, self.logprobs):
            h.update(repr((b, [float(x).hex() for x in p or []])).encode())
        h.update(repr([float(x).hex() for x in self.target]).encode())
        return h.hexdigest()


@dataclass
class TopKStats:
    scalars: dict[str, float]
    series: dict[str, list] = field(default_factory=dict)


def _kld_name(stat: str, k: int) -> str:
    return f"{stat} (top-{k}+tail)"


def topk_stats(base: torch.Tensor, test: TopK) -> TopKStats:
    """Baseline full logits [T, V] against an engine's top-k with the tail as one bucket."""
    import torch
    T = base.shape[0]
    if len(test) != T:
        raise ValueError(f"{T} baseline positions vs {len(test)} top-k positions")
    k = test.k
    lb = torch.log_softmax(base.double(), dim=-1)
    top1 = lb.argmax(dim=-1).tolist()
    kld, in_k, same, dlp = [], [], [], []
    scored = [t for t in range(T) if test.buckets[t] is not None]
    if not scored:
        raise ValueError("no position was scored")
    for t in scored:
        pb_all = lb[t]
        pb, pt, seen = [], [], set()
        rough = (test.inexact or [None] * T)[t] or [False] * len(test.buckets[t])
        for group, lp, skip in zip(test.buckets[t], test.logprobs[t], rough):
            if skip:
                continue
            ids = [i for i in group if i not in seen]
            seen.update(ids)
            pb.append(float(torch.logsumexp(pb_all[ids], 0).exp()) if ids else 0.0)
            pt.append(math.exp(lp))
            if len(group) == 1:
                dlp.append(abs(float(pb_all[group[0]]) - lp))
        tail_b, tail_t = max(0.0, 1.0 - sum(pb)), max(TINY, 1.0 - sum(pt))
        d = sum(b * (math.log(max(b, TINY)) - math.log(max(q, TINY))) for b, q in zip(pb, pt) if b > 0)
        if tail_b > 0:
            d += tail_b * (math.log(tail_b) - math.log(tail_t))
        kld.append(max(0.0, d))
        groups = test.buckets[t]
        in_k.append(any(top1[t] in g for g in groups))
        same.append(bool(groups) and top1[t] in groups[0])
    kld_t = torch.tensor(kld, dtype=torch.float64)
    sc = {
        f"Top-1 in top-{k}": 100.0 * sum(in_k) / len(scored),
        "Same top p": 100.0 * sum(same) / len(scored),
        _kld_name("Mean KLD", k): float(kld_t.mean()),
        _kld_name("99.0% KLD", k): float(torch.quantile(kld_t, 0.99)),
        _kld_name("Maximum KLD", k): float(kld_t.max()),
    }
    if dlp:
        sc[f"Max abs logprob diff (top-{k})"] = max(dlp)
    sc["Positions scored"] = len(scored)
    return TopKStats(sc, {"kld_topk_tail": [float(f"{x:.6g}") for x in kld]})


def ppl_ratio(base: torch.Tensor, test: TopK, tokens: list[int]) -> float | None:
    """exp(mean NLL under the engine - mean NLL under the baseline) over positions whose next
    token is known; None when the engine did not give every target's log-probability."""
    import torch
    lb = torch.log_softmax(base.double(), dim=-1)
    nb, nt = [], []
    for t in range(len(tokens) - 1):
        lt = test.target[t]
        if lt is None or math.isnan(lt):
            return None
        nb.append(-float(lb[t, tokens[t + 1]]))
        nt.append(-lt)
    if not nb:
        return None
    return math.exp(sum(nt) / len(nt) - sum(nb) / len(nb))


# -- the check -------------------------------------------------------------------------------

@dataclass
class TopKArgmaxConfig(CheckConfig):
    messages: list[list[Message]] = param(default_factory=lambda: [list(m) for m in DEFAULT_MESSAGES])
    positions: int = param(256, lo=2, help="tokens per message set: prompt + greedy continuation")
    top_logprobs: int = param(10, lo=1, hi=100, help="k: log-probabilities asked per position")
    noise_chunk: int = param(64, lo=1, help="prefill chunk of the baseline's second run (noise floor)")
    min_top_k_pct: float | dict[str, float] | None = threshold(
        "Top-1 in top-{top_logprobs}", ">=", default=100.0, hi=100.0)
    min_same_top_pct: float | dict[str, float] | None = threshold("Same top p", ">=", hi=100.0)
    max_mean_kld: float | dict[str, float] | None = threshold("Mean KLD (top-{top_logprobs}+tail)", "<=")
    max_kld_99: float | dict[str, float] | None = threshold("99.0% KLD (top-{top_logprobs}+tail)", "<=")
    max_ppl_ratio: float | dict[str, float] | None = threshold("Mean PPL(Q)/PPL(base)", "<=")

    def validate(self, path, where: str) -> None:
        if not self.messages or any(not m for m in self.messages):
            raise SuiteError(path, f"{where}.messages", "needs at least one non-empty message set")


def topk_of(eng, tokens: list[int], k: int, chunk: int | None = None) -> TopK:
    """The engine's top-k: ``topk_logprobs`` when it has it, else from its full logits."""
    caps = capabilities_of(eng)
    if CAP_TOPK_LOGPROBS in caps and chunk is None:
        return eng.topk_logprobs(tokens, k)
    return TopK.from_logits(eng.logits(tokens, chunk=chunk) if chunk else eng.logits(tokens), tokens, k,
                            source=f"{eng.name} full logits")


@register
class TopKArgmax(Check):
    kind = "topk_argmax"
    metrics = (
        metric("Top-1 in top-{k}", "%", "higher", "baseline top-1 among the engine's top-k"),
        metric("Same top p", "%", "higher", "engine top-1 == baseline top-1"),
        metric("Mean KLD (top-{k}+tail)", "nats", "lower", "KL over the top-k + one tail bucket: a lower bound",
               show=("table", "side")),
        metric("99.0% KLD (top-{k}+tail)", "nats", "lower", "lower bound, 99th percentile"),
        metric("Maximum KLD (top-{k}+tail)", "nats", "lower", "lower bound, maximum"),
        metric("Max abs logprob diff (top-{k})", "", "lower", "largest log-probability change of a top-k token"),
        metric("Mean PPL(Q)/PPL(base)", "", "lower", "exp of the mean NLL difference"),
        metric("Positions scored", "tokens", None, "positions with a known next token"),
        metric("Positions", "tokens", None, "teacher-forced positions"),
    )
    config = TopKArgmaxConfig
    # the row's engine needs top-k log-probabilities or full logits; the baseline (kvbench) has logits
    requires = frozenset()

    def prepare(self, eng, cfg: TopKArgmaxConfig, ctx):
        seqs, logits = [], []
        for msgs in cfg.messages:
            prompt = chat_ids(eng, msgs)[:cfg.positions]
            need = cfg.positions - len(prompt)
            cont = eng.generate(prompt, need, stop_at_eos=False) if need > 0 else []
            seq = prompt + list(cont)[:need]
            seqs.append(seq)
            logits.append(eng.logits(seq))
        return {"seqs": seqs, "logits": logits}

    def measure(self, eng, cfg: TopKArgmaxConfig, state, ctx) -> Outcome:
        out, k = Outcome(), cfg.top_logprobs
        caps = capabilities_of(eng)
        names = [f"Top-1 in top-{k}", "Same top p", _kld_name("Mean KLD", k), _kld_name("99.0% KLD", k),
                 "Mean PPL(Q)/PPL(base)"]
        if not caps & {CAP_TOPK_LOGPROBS, CAP_LOGITS}:
            why = f"engine {eng.name} gives neither top-k log-probabilities nor logits"
            for n in names:
                out.skip(n, why)
            return out
        chunk = cfg.noise_chunk if ctx.is_baseline else None
        tests = [topk_of(eng, seq, k, chunk) for seq in state["seqs"]]
        scal: dict[str, list[tuple[float, int]]] = {}
        ratios, series = [], []
        for base, test, seq in zip(state["logits"], tests, state["seqs"]):
            st = topk_stats(base, test)
            for n, v in st.scalars.items():
                scal.setdefault(n, []).append((v, st.scalars["Positions scored"]))
            series += st.series["kld_topk_tail"]
            ratios.append(ppl_ratio(base, test, seq))
        for n, vals in scal.items():
            if n == "Positions scored":
                out.add(n, int(sum(x for x, _ in vals)), "tokens")
                continue
            if n.startswith(("Maximum", "99.0%", "Max abs")):
                v = max(x for x, _ in vals)
            else:
                v = sum(x * w for x, w in vals) / sum(w for _, w in vals)
            kld = "KLD" in n
            out.add(n, v, "nats" if kld else ("%" if n.startswith(("Top-1", "Same")) else ""),
                    "higher" if n.startswith(("Top-1", "Same")) else "lower",
                    detail=(f"KL over the engine's top-{k} tokens + one tail bucket: a lower bound of "
                            "the full-vocabulary KLD") if kld else None)
        if any(r is None for r in ratios):
            out.skip("Mean PPL(Q)/PPL(base)", "the engine did not give the log-probability of every "
                     "next token (only its top-k)", "", "lower")
        else:
            nll = sum(math.log(r) * len(s) for r, s in zip(ratios, state["seqs"])) / sum(len(s) for s in state["seqs"])
            out.add("Mean PPL(Q)/PPL(base)", math.exp(nll), "", "lower")
        out.add("Positions", sum(len(s) for s in state["seqs"]), "tokens")
        out.series = {"kld_topk_tail": series}
        out.info["topk"] = {"k": k, "source": tests[0].source, "tail": "one bucket (1 - sum of top-k)",
                            "notes": sorted({n for t in tests for n in t.notes})}
        out.info["reference"] = (f"{ctx.baseline} one pass vs {ctx.baseline} prefilled in chunks of "
                                 f"{cfg.noise_chunk} (noise floor), through top-{k}" if ctx.is_baseline
                                 else f"{ctx.kv_dtype} top-{k}+tail vs {ctx.baseline} full logits, same tokens")
        return out
