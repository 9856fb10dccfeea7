"""The coherence check over a prompt set (issue 15.3): divergence step, fp32 margin, near-tie
vs confident flips, collapse, and the rate gates, which must hold on near-ties and fail on
a bad KV dtype.

Two engines: a toy language model (a test double with the engine API: each prompt has a
planned answer and a planned fp32 margin at every step, and a "narrowed" copy perturbs the
runner-up by a chosen amount, so which prompts flip, and how confidently, is known by
construction), and the real engine on a tiny synthetic model with a planted KV corruption
(``LayerKV.write`` / ``write_at`` monkeypatched to store noise for narrowed dtypes), whose
flips are classified against margins recomputed here from the fp32 logits."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harness.checks import CaseContext, get
from harness.checks.coherence import CoherenceConfig
from harness.runner import judge
from harness.suite import Message, load_suite

ROOT = Path(__file__).resolve().parent.parent
N = 24
EOS, V = 0, 4000


class _Tok:
    eos_ids = frozenset({EOS})

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return [1, 1000 + int(messages[-1]["content"][1:])]        # "q7" -> [1, 1007]

    def decode(self, ids):
        return " ".join(map(str, ids))


class _Spec:
    eos_id = EOS


class Toy:
    """Prompt i's fp32 answer is ``2000 + 40 i + j`` for j < length, then EOS, with the
    fp32 top-1/top-2 margin ``margins[i][j]`` (runner-up: ``3000 + j``). ``push(i, j)``
    is how much a narrowed copy raises the runner-up at step j: it flips when push > margin.
    ``loops`` answers with a repeat loop instead."""
    name = "toy"
    capabilities = frozenset({"generate", "chat", "logits"})

    def __init__(self, margins, length=10, push=lambda i, j: 0.0, loops=(), logits_cap=True):
        self.margins, self.length, self.push, self.loops = margins, length, push, set(loops)
        self.tokenizer, self.spec = _Tok(), _Spec()
        if not logits_cap:
            self.capabilities = frozenset({"generate", "chat"})
        self.last_stop_reason = None

    def _row(self, prompt, answer, pushed: bool) -> torch.Tensor:
        row = torch.full((V,), -5.0)
        i, j = prompt[1] - 1000, len(answer)
        plan = [2000 + 40 * i + t for t in range(self.length)]
        if answer == plan[:j] and j < self.length:
            row[plan[j]] = self.margins[i][j]
            row[3000 + j] = (self.push(i, j) if pushed else 0.0)
        else:                                # off the plan (diverged) or at its end: EOS
            row[EOS] = 1.0
        return row

    def logits(self, tokens, chunk=None):
        tokens = list(tokens)
        return torch.stack([self._row(tokens[:2], tokens[2:k + 1], False) if k >= 1 else torch.zeros(V)
                            for k in range(len(tokens))])

    def generate(self, prompt, max_new_tokens, stop_at_eos=True):
        prompt = list(prompt)
        if prompt[1] - 1000 in self.loops:
            self.last_stop_reason = "length"
            return [7, 8, 9] * (max_new_tokens // 3) + [7] * (max_new_tokens % 3)
        new = []
        self.last_stop_reason = "length"
        while len(new) < max_new_tokens:
            t = int(self._row(prompt, new, pushed=True).argmax())
            new.append(t)
            if t == EOS and stop_at_eos:
                self.last_stop_reason = "eos"
                break
        return new


def _suite_coherence() -> CoherenceConfig:
    """The default suite's coherence check (its gates, tie margin and collapse run)."""
    suite = load_suite(ROOT / "suites" / "kv_dtype.toml")
    return next(c for c in suite.checks if c.KIND == "coherence"), suite.suite


def _toy_cfg(n=N, **kw) -> CoherenceConfig:
    cfg, _ = _suite_coherence()
    fields = {k: getattr(cfg, k) for k in ("tie_margin", "collapse_run", "max_collapse_excess",
                                           "max_confident_divergence_excess", "max_first_eos")}
    fields.update(kw)
    return CoherenceConfig(kind="coherence", max_new_tokens=2 * fields["collapse_run"],
                           messages=[[Message("user", f"q{i}")] for i in range(n)], **fields)


def _ctx(d, suite=None):
    return CaseContext(model="toy", kv_dtype=d, baseline="fp32", suite=suite, device="cpu", seed=0)


def _run(cfg, base, test, d="q8_0"):
    check = get("coherence")
    state = check.prepare(base, cfg, _ctx("fp32"))
    out = check.measure(test, cfg, state, _ctx(d))
    recs, failures, unmeasured = judge(out, cfg, "toy", d)
    return {m.name: m for m in out.metrics}, out, failures, unmeasured


def _margins(tie: float, near_tie_prompts=range(6), high=3.0):
    """Every step confident (``high``) except step 2 of the near-tie prompts (``tie``)."""
    return [[tie if (i in near_tie_prompts and j == 2) else high for j in range(10)] for i in range(N)]


def test_the_default_suite_has_a_prompt_set_and_rate_gates():
    cfg, suite = _suite_coherence()
    assert len(cfg.messages) >= 24
    assert cfg.tie_margin > 0 and cfg.collapse_run >= 2
    for d in suite.kv_dtypes:
        assert cfg.threshold_for("max_collapse_excess", "smollm2-135m", d) is not None
        assert cfg.threshold_for("max_confident_divergence_excess", "smollm2-135m", d) is not None


def test_near_tie_flips_are_reported_not_failed():
    cfg = _toy_cfg()
    tie = cfg.tie_margin / 2
    base = Toy(_margins(tie))
    push = cfg.tie_margin * 0.75               # flips every near-tie (tie < push), no confident step
    m, out, failures, unmeasured = _run(cfg, base, Toy(_margins(tie), push=lambda i, j: push))
    assert failures == [] and unmeasured == []
    assert m["Diverged prompts"].value == 6 and m["Near-tie flips"].value == 6
    assert m["Confident divergences"].value == 0
    assert m["Confident divergence excess"].value < 0
    flips = [s for s in out.info["samples"] if s["flip"]]
    assert [(s["diverged_at"], s["flip"]) for s in flips] == [(2, "near-tie")] * 6
    assert all(s["fp32_margin"] == pytest.approx(tie) for s in flips)
    assert m["Largest flipped margin"].value == pytest.approx(tie)


@pytest.mark.parametrize("confident,fails", [(2, False), (3, True), (24, True)])
def test_confident_divergences_fail_beyond_the_binomial_bound(confident, fails):
    """0 of 24 for the reference allows 1 - 0.05^(1/24) = 11.7%: 2 confident flips pass, 3 fail."""
    cfg = _toy_cfg()
    margins = _margins(cfg.tie_margin / 2)
    bad = cfg.tie_margin * 10 + 5              # beats every planned margin
    test = Toy(margins, push=lambda i, j: bad if (i >= N - confident and j == 4) else 0.0)
    m, out, failures, _ = _run(cfg, Toy(margins), test)
    assert m["Confident divergences"].value == confident and m["Near-tie flips"].value == 0
    assert m["Confident divergence rate"].value == pytest.approx(100 * confident / N)
    assert m["Confident divergence excess"].value == pytest.approx(100 * (confident / N - (1 - 0.05 ** (1 / N))))
    assert any(f.startswith("Confident divergence excess") for f in failures) == fails
    assert {s["diverged_at"] for s in out.info["samples"] if s["flip"]} == {4}


@pytest.mark.parametrize("base_loops,test_loops,fails", [
    ((), (1, 2), False), ((), (1, 2, 3), True), ((5, 6), (5, 6), False), ((5, 6), (5, 6, 1, 2, 3), False),
    ((5, 6), (5, 6, 1, 2, 3, 4), True)])
def test_collapse_rate_is_held_against_the_baselines(base_loops, test_loops, fails):
    """Bounds (one-sided 95% Clopper-Pearson, n = 24, from 1 - 0.05^(1/24) and the binomial
    tail): 0 -> 11.7% (2/24 passes, 3/24 = 12.5% fails); 2 -> 24.0% (5/24 = 20.8% passes,
    6/24 = 25% fails)."""
    cfg = _toy_cfg()
    margins = _margins(0.0, near_tie_prompts=())
    m, out, failures, _ = _run(cfg, Toy(margins, loops=base_loops), Toy(margins, loops=test_loops))
    assert m["Collapse rate"].value == pytest.approx(100 * len(test_loops) / N)
    assert [s["collapsed"] for s in out.info["samples"]] == [i in test_loops for i in range(N)]
    assert any(f.startswith("Collapse excess") for f in failures) == fails


def test_baseline_row_and_missing_logits():
    cfg = _toy_cfg()
    check = get("coherence")
    base = Toy(_margins(0.1))
    state = check.prepare(base, cfg, _ctx("fp32"))
    out = check.measure(base, cfg, state, _ctx("fp32"))
    skipped = {m.name: m.skipped for m in out.metrics if m.skipped}
    assert skipped["Collapse excess"] == skipped["Confident divergence excess"] == \
        "the baseline's answers are the reference itself"
    assert {m.name: m.value for m in out.metrics}["Collapse rate"] == 0
    # a baseline engine without logits: divergences cannot be classified, the gate is unmeasured
    m, _, failures, unmeasured = _run(cfg, Toy(_margins(0.1), logits_cap=False),
                                      Toy(_margins(0.1), push=lambda i, j: 9.0))
    assert m["Confident divergence excess"].skipped and failures == []
    assert any(u.startswith("Confident divergence excess not measured") for u in unmeasured)


# -- the real engine on a tiny synthetic model --------------------------------------------------------
MODEL = "tiny-llama"
PROMPTS = ["What is 7 times 8?", "Name a colour.", "Write a haiku about rain.", "What is the capital of Peru?",
           "Count to five.", "Say hello in French.", "Why is the sky blue?", "Give me a word that rhymes with cat."]


@pytest.fixture(scope="module")
def engines():
    import engine
    return engine, {"last": engine.load(MODEL, kv_dtype="fp32", ctx=256)}   # weights taken over per load


def _corrupt_narrowed_kv(monkeypatch):
    """A bad KV dtype: narrowed layers store their rows in a wrong layout (each row rotated by
    one value and scaled by 3), deterministic so a replay gives the same tokens."""
    from engine import kv as kvmod
    write, write_at = kvmod.LayerKV.write, kvmod.LayerKV.write_at

    def bad(x):
        return x.roll(1, dims=-1) * 3

    def w(self, start, k, v):
        if self.dtype != "fp32":
            k, v = bad(k), bad(v)
        return write(self, start, k, v)

    def wa(self, pos, k, v):
        if self.dtype != "fp32":
            k, v = bad(k), bad(v)
        return write_at(self, pos, k, v)

    monkeypatch.setattr(kvmod.LayerKV, "write", w)
    monkeypatch.setattr(kvmod.LayerKV, "write_at", wa)


def test_tiny_model_margins_flips_and_a_planted_bad_kv_dtype(engines, monkeypatch):
    engine, held = engines
    cfg = CoherenceConfig(kind="coherence", max_new_tokens=6, messages=[[Message("user", p)] for p in PROMPTS],
                          tie_margin=0.02, collapse_run=64, max_confident_divergence_excess={"q8_0": 0.0})
    check = get("coherence")
    fp32 = held["last"] = engine.load(MODEL, kv_dtype="fp32", ctx=256, weights_from=held["last"])
    state = check.prepare(fp32, cfg, _ctx("fp32"))
    # the margins: recomputed from fp32's teacher-forced logits, step j predicting answer token j
    for p, (ans, _), mg in zip(state["prompts"], state["answers"], state["margins"]):
        lg = fp32.logits(p + ans).double().numpy()[len(p) - 1:len(p) - 1 + len(ans)]
        top = np.sort(lg, axis=1)
        assert mg == pytest.approx(list(top[:, -1] - top[:, -2]), abs=1e-5)
        assert list(lg.argmax(axis=1)) == ans                         # the greedy tokens themselves

    def measure():
        q8 = held["last"] = engine.load(MODEL, kv_dtype="q8_0", ctx=256, weights_from=held["last"])
        out = check.measure(q8, cfg, state, _ctx("q8_0"))
        _, failures, _ = judge(out, cfg, MODEL, "q8_0")
        expect_conf = 0
        for s, (ans, _), mg in zip(out.info["samples"], state["answers"], state["margins"]):
            new = s["ids"]
            step = next((j for j, (a, b) in enumerate(zip(ans, new)) if a != b), None)
            if step is None and ans != new:
                step = min(len(ans), len(new))
            assert s["diverged_at"] == step
            if step is not None:
                assert s["fp32_margin"] == pytest.approx(mg[step])
                assert s["flip"] == ("confident" if mg[step] > cfg.tie_margin else "near-tie")
                expect_conf += mg[step] > cfg.tie_margin
        assert {m.name: m.value for m in out.metrics}["Confident divergences"] == expect_conf
        # kvbench's eager engine answered every prompt in one decode step per token, and says so
        gen = out.info["generation"]
        assert gen["path"] == "batched" and gen["sequences"] == len(PROMPTS) == sum(gen["batches"])
        assert "decoded together" in {m.name: m.detail for m in out.metrics}["Prompts"]
        return expect_conf, failures

    conf, failures = measure()                     # the real q8_0: within the bound
    assert failures == [], failures
    _corrupt_narrowed_kv(monkeypatch)
    conf, failures = measure()                     # a bad KV dtype: fails the gate
    assert conf >= 3 and any(f.startswith("Confident divergence excess") for f in failures), failures
