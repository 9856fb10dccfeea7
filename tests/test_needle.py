"""The needle check (issue 15 item 5): prompts, scoring, uninformative cells, the report's heat
maps, and that a bad KV dtype fails it.

A scripted engine answers the passkey it reads in its prompt (so the check's bookkeeping is
tested without a model that can really retrieve one); it misses needles in the last fifth of
long documents on every dtype (so fp32 itself fails there: uninformative cells), and a
planted bad KV dtype answers noise. The real tiny engine checks the prompt builder (lengths,
needle placement) and that random weights are n/a, or, forced to run, never pass."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.checks import CaseContext, ModelInfo, get
from harness.checks.needle import (GAINED, LOST, NeedleConfig, UNINFORMATIVE, build_prompt, found, passkey,
                                   score)
from harness.runner import judge
from harness.schema import SuiteSection

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog, step {i * 7 % 13}.\n" for i in range(800))


def test_passkeys_are_seeded_and_matched_as_whole_numbers():
    k = passkey(0, 1024, 50.0)
    assert k == passkey(0, 1024, 50.0) and len(k) == 5 and k != passkey(0, 1024, 75.0)
    assert found(f"The passkey is {k}.", k) and found(f"{k[:2]},{k[2:]}", k) and found(f" {k}", k)
    assert not found(f"1{k}", k) and not found(f"{k}9", k) and not found("I don't know.", k)


# -- a scripted engine ----------------------------------------------------------------------------

class _Tok:
    """One token per character; a minimal chat template."""
    eos_ids = frozenset({0})
    bos_id = None

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return self.encode("<user>" + messages[-1]["content"] + "<assistant>")


class _Spec:
    ctx_train = 100000
    vocab_size = 0x110000


class ScriptedEngine:
    name = "scripted"
    capabilities = frozenset({"generate", "chat"})
    spec, tokenizer = _Spec(), _Tok()

    def __init__(self, dtype, bad=False):
        self.dtype, self.bad = dtype, bad
        self.last_stop_reason = "eos"

    def generate(self, tokens, max_new_tokens, stop_at_eos=True):
        text = self.tokenizer.decode(tokens)
        doc = text.split("<document>")[1].split("</document>")[0]
        m = re.search(r"passkey is (\d+)", doc)
        deep = m and m.start() > 0.8 * len(doc) and len(doc) > 1500   # "lost in the end" of long documents
        if self.bad or not m or deep:
            answer = "12"
        else:
            answer = m.group(1)
        return self.tokenizer.encode(answer)[:max_new_tokens] + [0]


def _run(cfg, bad_dtype=None):
    check = get("needle")
    suite = SuiteSection(name="t", ctx=1 << 20)
    ctx = lambda d: CaseContext(model="m", kv_dtype=d, baseline="fp32", suite=suite, device="cpu", seed=0)  # noqa: E731
    state = check.prepare(ScriptedEngine("fp32"), cfg, ctx("fp32"))
    outs = {d: check.measure(ScriptedEngine(d, bad=d == bad_dtype), cfg, state, ctx(d)) for d in ("fp32", "bf16", "q8_0")}
    return {d: ({m.name: m for m in o.metrics}, o) for d, o in outs.items()}


def _cfg(tmp_path, **kw):
    p = tmp_path / "filler.txt"
    p.write_text(TEXT)
    base = dict(kind="needle", corpus=str(p), lengths=[600, 3000], depths_pct=[0.0, 50.0, 100.0],
                min_score={"bf16": 80.0, "q8_0": 80.0})
    base.update(kw)
    return NeedleConfig(**base)


def test_scoring_informative_and_uninformative_cells_and_a_bad_kv_dtype(tmp_path):
    cfg = _cfg(tmp_path)
    res = _run(cfg, bad_dtype="q8_0")
    m, out = res["fp32"]
    assert m["Needle score"].skipped and m["Lost needles"].skipped       # the baseline defines the cells
    assert m["Cells"].value == 6 and m["Found"].value == 5 and m["Informative cells"].value == 5
    deep = [c for c in out.info["cells"] if c["status"] == UNINFORMATIVE]
    assert [(c["length"], c["depth_pct"]) for c in deep] == [(3000, 100.0)]   # fp32 missed it there
    for c in out.info["cells"]:
        assert c["tokens"] <= c["length"] and c["tokens"] >= c["length"] - 8
    m, out = res["bf16"]
    assert m["Needle score"].value == 100.0 and m["Lost needles"].value == 0 and m["Found"].value == 5
    assert {c["status"] for c in out.info["cells"]} == {"found", UNINFORMATIVE}
    recs, failures, unmeasured = judge(out, cfg, "m", "bf16")
    assert not failures and not unmeasured
    m, out = res["q8_0"]                    # the planted bad KV dtype loses every informative needle
    assert m["Needle score"].value == 0.0 and m["Lost needles"].value == 5
    assert sum(c["status"] == LOST for c in out.info["cells"]) == 5
    recs, failures, unmeasured = judge(out, cfg, "m", "q8_0")
    assert failures and failures[0].startswith("Needle score = 0 % (required >= 80)")


def test_cells_where_fp32_fails_are_never_a_pass(tmp_path):
    rows = [{"length": 1024, "tokens": 1020, "depth_pct": d, "placed_pct": d, "passkey": "11111", "answer": "x",
             "found": d == 50.0, "baseline_found": False, "status": GAINED if d == 50.0 else UNINFORMATIVE}
            for d in (0.0, 50.0, 100.0)]
    out = score(rows, False, 3)
    m = {x.name: x for x in out.metrics}
    assert m["Needle score"].skipped.startswith("uninformative: the baseline found the needle in none of the 3")
    assert m["Gained needles"].value == 1 and m["Informative cells"].value == 0
    cfg = NeedleConfig(kind="needle", min_score={"bf16": 80.0})
    recs, failures, unmeasured = judge(out, cfg, "m", "bf16")
    assert not failures and unmeasured and unmeasured[0].startswith("Needle score not measured (uninformative")


def test_random_weights_are_not_applicable_and_suite_keys_are_validated(tmp_path):
    from harness.errors import SuiteError
    from harness.suite import load_suite
    check = get("needle")
    assert "random weights" in check.not_applicable(NeedleConfig(kind="needle"), ModelInfo("tiny-llama", None, "random"))
    assert check.not_applicable(NeedleConfig(kind="needle"), ModelInfo("smollm2-135m", None, None)) is None
    for bad, what in (("depths_pct = [101]", "outside the document"), ("lengths = []", "at least one length"),
                      ('lengths = ["long"]', "unknown length"), ("depths_pct = [0, 0]", "repeated depth")):
        s = tmp_path / "s.toml"
        s.write_text(f'[suite]\nname = "x"\nmodels = ["tiny-llama"]\n[[check]]\nkind = "needle"\n{bad}\n')
        with pytest.raises(SuiteError, match=what):
            load_suite(s)
    suite = load_suite(Path(__file__).parent.parent / "suites" / "long.toml")
    assert {"corpus_kld", "needle"} <= {c.KIND for c in suite.checks}


def test_prompts_on_a_real_tokenizer_and_forced_random_weights_never_pass(tmp_path, monkeypatch):
    """The tiny engine's tokenizer (SmolLM2's): prompts hit their length and hold the needle at
    its depth; forced past n/a, a random-weight model's cells are all uninformative, so the
    narrowed rows go incomplete (never pass)."""
    import engine
    from harness.runner import Runner
    from harness.suite import parse_suite
    eng = engine.load("tiny-llama", ctx=512)
    filler = eng.tokenizer.encode(TEXT)
    for L, d in ((300, 0.0), (300, 50.0), (400, 100.0)):
        p = build_prompt(eng, filler, L, d, "48213")
        assert L - 8 <= p["tokens"] <= L
        text = eng.tokenizer.decode(p["ids"])
        assert text.count("The secret passkey is 48213.") == 1 and abs(p["placed_pct"] - d) < 10
    del eng
    p = tmp_path / "filler.txt"
    p.write_text(TEXT)
    monkeypatch.setattr(type(get("needle")), "not_applicable", lambda self, cfg, model: None)
    suite = parse_suite({"suite": {"name": "n", "models": ["tiny-llama"], "ctx": 160},
                         "check": [{"kind": "needle", "corpus": str(p), "lengths": [150], "depths_pct": [0, 100],
                                    "max_new_tokens": 4, "min_score": {"bf16": 80, "q8_0": 80}}]})
    summary = Runner(suite, tmp_path / "r", progress=False).run()
    cases = {c["kv_dtype"]: c for c in summary.cases}
    assert cases["fp32"]["status"] == "pass" and summary.exit_code == 1
    for d in ("bf16", "q8_0"):
        assert cases[d]["status"] == "incomplete" and "uninformative" in cases[d]["unmeasured"][0]
    from harness.report import build_report
    md = build_report(tmp_path / "r", tmp_path / "rep").read_text()
    assert "## Needle in a haystack" in md and "uninf." in md
    assert (tmp_path / "rep" / "needle_tiny-llama_q8_0.png").is_file()
