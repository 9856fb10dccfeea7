"""The multiturn check (issue 15 item 4): a chat whose answers are fed back, a long greedy
generation, first divergence from fp32 per segment, and the gate on collapse where fp32 did
not collapse.

Two kinds of engine:
- a scripted engine (no model): its greedy tokens are chosen by the test, so divergence
  steps, fed-back answers and collapse are known independently of the check's code;
- the real engine on tiny-llama (random weights: the runner declares the check ``n/a`` there,
  so the check is called directly), with a planted bad KV dtype: every narrowed layer's
  cache stores a saturated V (the same 1e3 in every value), so attention returns a constant
  and greedy decode repeats one token. The gate must fail on it and hold without it.

    .venv/bin/python -m pytest -q tests/test_multiturn.py
"""
from __future__ import annotations

import random

import pytest
import torch

from harness import checks
from harness.checks.base import CaseContext, ModelInfo
from harness.checks.multiturn import DEFAULT_TURNS, MultiturnConfig
from harness.runner import judge
from harness.schema import SuiteSection

CHAR0 = 2000          # scripted tokenizer: characters are CHAR0 + ord(c), generated tokens 100..999
EOS = 1


class ScriptTok:
    eos_ids = (EOS,)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return [CHAR0 + ord(c) for c in text] + ([CHAR0] if add_generation_prompt else [])

    def decode(self, ids):
        return " ".join(str(t) for t in ids if t < CHAR0)

    def encode(self, text):
        return [CHAR0 + ord(c) for c in text]


class ScriptEngine:
    """Greedy tokens: a pseudo-random non-repeating sequence seeded by the prompt. ``diverge``
    = (turn, step): from that turn's answer on, the token at ``step`` changes; ``collapse`` =
    a turn number (or "long"): that segment repeats one token."""

    class spec:
        eos_id = EOS

    def __init__(self, diverge=None, collapse=None):
        self.diverge, self.collapse, self.prompts = diverge, collapse, []
        self.tokenizer = ScriptTok()

    def generate(self, prompt, n, stop_at_eos=True):
        self.prompts.append(list(prompt))
        user = self.tokenizer.encode("<user>")
        turn = sum(1 for i in range(len(prompt)) if prompt[i:i + len(user)] == user)
        is_long = n > 50
        rng = random.Random(sum(prompt) * 31 + len(prompt))
        out = rng.sample(range(100, 1000), n)          # distinct: no repeat run at all
        if self.collapse == ("long" if is_long else turn):
            out = [555] * n
        if self.diverge and not is_long and turn >= self.diverge[0]:
            s = self.diverge[1]
            out[s] = 99                                # a token the healthy run never makes
        self.last_stop_reason = "length"
        return out


def _ctx(dtype, baseline="fp32"):
    return CaseContext("m", dtype, baseline, SuiteSection(name="t"), "cpu", 0)


def _metrics(out):
    return {m.name: m for m in out.metrics}


CFG = dict(kind="multiturn", max_new_tokens=12, long_tokens=60, collapse_run=8)


def test_not_applicable_on_random_weights_only():
    chk = checks.get("multiturn")
    cfg = MultiturnConfig(**CFG)
    assert "random weights" in chk.not_applicable(cfg, ModelInfo("tiny-llama", None, "random"))
    assert chk.not_applicable(cfg, ModelInfo("smollm2-135m", None, None)) is None
    assert chk.not_applicable(cfg, ModelInfo("smollm2-moe", None, "upcycled")) is None


def test_identical_engine_passes_with_every_token_identical():
    chk, cfg = checks.get("multiturn"), MultiturnConfig(**CFG)
    base = chk.prepare(ScriptEngine(), cfg, _ctx("fp32"))
    assert len(base["turns"]) == len(DEFAULT_TURNS) == 6
    m = _metrics(chk.measure(ScriptEngine(), cfg, base, _ctx("q8_0")))
    assert m["Turns before divergence"].value == 6
    assert m["Identical tokens before divergence"].value == 6 * 12
    assert m["Long first divergence"].value == 60
    assert m["Collapse beyond fp32"].value == 0 and m["Collapsed turns"].value == 0
    # the baseline row does not measure divergence from itself (declared before the run)
    mb = _metrics(chk.measure(ScriptEngine(), cfg, base, _ctx("fp32")))
    assert mb["Turns before divergence"].skipped and mb["Long first divergence"].skipped
    assert set(chk.unmeasured_on_baseline(cfg)) == {"Turns before divergence",
                                                    "Identical tokens before divergence", "Long first divergence"}


def test_answers_are_fed_back_through_the_chat_template():
    chk, cfg = checks.get("multiturn"), MultiturnConfig(**CFG)
    eng = ScriptEngine()
    state = chk.prepare(eng, cfg, _ctx("fp32"))
    tok = eng.tokenizer
    # turn k's prompt holds every earlier user message and the decoded answer of each turn
    for k in range(1, 6):
        prompt = eng.prompts[k]
        for j in range(k):
            assert _contains(prompt, tok.encode(DEFAULT_TURNS[j]))
            assert _contains(prompt, tok.encode("<assistant>" + tok.decode(state["turns"][j]["tokens"])))
        assert _contains(prompt, tok.encode(DEFAULT_TURNS[k]))
    assert state["long"]["prompt_tokens"] == len(eng.prompts[-1])


def _contains(seq, sub):
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_divergence_step_per_turn():
    chk, cfg = checks.get("multiturn"), MultiturnConfig(**CFG)
    base = chk.prepare(ScriptEngine(), cfg, _ctx("fp32"))
    out = chk.measure(ScriptEngine(diverge=(3, 5)), cfg, base, _ctx("bf16"))
    m = _metrics(out)
    assert m["Turns before divergence"].value == 2
    assert m["Identical tokens before divergence"].value == 2 * 12 + 5
    # turn 3 diverges at step 5; the histories differ from then on, so later turns differ at 0
    # (their prompts hold another answer, so the scripted engine's seed changes)
    assert out.series["turn_divergence"][:3] == [None, None, 5]
    assert all(d is not None for d in out.series["turn_divergence"][3:])
    assert [t["history_identical"] for t in out.info["turns"]] == [True, True, True, False, False, False]
    assert m["Collapse beyond fp32"].value == 0
    recs, failures, _ = judge(out, cfg, "m", "bf16")
    assert not failures                    # divergence alone is reported, not gated by default


@pytest.mark.parametrize("where", [4, "long"])
def test_collapse_where_fp32_did_not_fails_the_gate(where):
    chk, cfg = checks.get("multiturn"), MultiturnConfig(**CFG)
    base = chk.prepare(ScriptEngine(), cfg, _ctx("fp32"))
    out = chk.measure(ScriptEngine(collapse=where), cfg, base, _ctx("q8_0"))
    m = _metrics(out)
    assert m["Collapse beyond fp32"].value == 1
    assert m["Collapsed turns"].value == (1 if where == 4 else 0)
    _, failures, unmeasured = judge(out, cfg, "m", "q8_0")
    assert not unmeasured
    assert len(failures) == 1 and failures[0].startswith("Collapse beyond fp32 = 1")
    assert ("turn 4" if where == 4 else "long generation") in failures[0]


def test_collapse_that_fp32_shares_is_not_a_failure():
    chk, cfg = checks.get("multiturn"), MultiturnConfig(**CFG)
    base = chk.prepare(ScriptEngine(collapse=4), cfg, _ctx("fp32"))
    out = chk.measure(ScriptEngine(collapse=4), cfg, base, _ctx("q8_0"))
    assert _metrics(out)["Collapsed turns"].value == 1
    assert _metrics(out)["Collapse beyond fp32"].value == 0
    assert not judge(out, cfg, "m", "q8_0")[1]


def test_suite_keys_are_validated(tmp_path):
    from harness.errors import SuiteError
    from harness.suite import load_suite
    body = '[suite]\nname = "t"\nmodels = ["tiny-llama"]\n\n[[check]]\nkind = "multiturn"\n'
    p = tmp_path / "s.toml"
    p.write_text(body + "long_tokens = 1024\nmax_new_tokens = 64\n")
    c = load_suite(p).check("multiturn")
    assert (c.long_tokens, c.max_new_tokens, c.max_new_collapse) == (1024, 64, 0)
    for bad in ("turns = []\n", "max_new_tokens = 0\n", "collapse_run = 1\n", "turn = 3\n"):
        p.write_text(body + bad)
        with pytest.raises(SuiteError):
            load_suite(p)


# -- the real engine ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    import engine
    from harness.metrics import longest_repeat_run
    turns = DEFAULT_TURNS[:2]
    e32 = engine.load("tiny-llama", kv_dtype="fp32", ctx=768)
    cfg = MultiturnConfig(kind="multiturn", turns=turns, max_new_tokens=6, long_tokens=40)
    state = checks.get("multiturn").prepare(e32, cfg, _ctx("fp32"))
    # fp32 must not collapse: set the bar just above its own longest run (random weights repeat)
    worst = max(longest_repeat_run(s["tokens"]) for s in [*state["turns"], state["long"]])
    assert worst < cfg.long_tokens, "fp32 repeats one token throughout: no room to plant a collapse"
    cfg.collapse_run = worst + 1
    return {"last": e32}, cfg, state      # "last": the engine whose weights the next load takes over


def test_real_engine_clean_q8_0_matches_its_own_generation(tiny):
    import engine
    held, cfg, state = tiny
    eq = held["last"] = engine.load("tiny-llama", kv_dtype="q8_0", ctx=768, weights_from=held["last"])
    out = checks.get("multiturn").measure(eq, cfg, state, _ctx("q8_0"))
    m = _metrics(out)
    # independent: the long prompt through the template, greedy on q8_0, compared by hand
    prompt = eq.tokenizer.apply_chat_template([{"role": "user", "content": cfg.long_prompt}],
                                              add_generation_prompt=True)
    mine = list(eq.generate(prompt, cfg.long_tokens, stop_at_eos=False))
    ref = state["long"]["tokens"]
    n = next((i for i, (a, b) in enumerate(zip(ref, mine)) if a != b), min(len(ref), len(mine)))
    assert m["Long first divergence"].value == n
    assert m["Collapse beyond fp32"].value == 0
    assert not judge(out, cfg, "tiny-llama", "q8_0")[1]


def test_real_engine_planted_bad_kv_dtype_fails_the_gate(tiny, monkeypatch):
    import engine
    from engine import kv as kvmod
    held, cfg, state = tiny
    write = kvmod.LayerKV.write

    def saturated(self, start, k, v):           # the planted fault: narrowed V is garbage
        if self.dtype != "fp32":
            v = torch.full_like(v, 1e3)
        return write(self, start, k, v)

    monkeypatch.setattr(kvmod.LayerKV, "write", saturated)
    bad = held["last"] = engine.load("tiny-llama", kv_dtype="bf16", ctx=768, weights_from=held["last"])
    out = checks.get("multiturn").measure(bad, cfg, state, _ctx("bf16"))
    m = _metrics(out)
    assert m["Collapse beyond fp32"].value >= 1
    failures = judge(out, cfg, "tiny-llama", "bf16")[1]
    assert any(f.startswith("Collapse beyond fp32") for f in failures)
