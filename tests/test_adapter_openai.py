"""The OpenAI-compatible adapter against a real server: llama-cpp-python's own server
(``python -m llama_cpp.server``, the [server] extra) on loopback, serving the real SmolLM2-135M
GGUF: ``make test-engines``.

- Teacher-forced top-k through ``echo`` + ``logprobs``: the server is llama.cpp, so with the
  same settings (q8_0 KV, flash attention) its top-10 log-probabilities equal llama.cpp's
  in-process logits at every scored position (the alignment the adapter learnt from the
  server's greedy tokens is right), and the top-k+tail KLD between them is ~0.
- Greedy chat through the server's own template (``/v1/chat/completions``) gives the text the
  completions endpoint gives on the GGUF template rendered by kvbench's tokenizer, which is
  also what llama.cpp in-process generates.
- A server started without log-probabilities (``--logits_all false``) is bad input: one line,
  exit 2, naming the fix.
- A suite over one server: argmax and vram are ``n/a`` with the reason (no logits, no applied
  KV type through the API), top-k runs on both rows, and the second row is flagged
  ``not applied?`` because one server (one KV type) answered both rows bit for bit alike.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_engines_support import engines_only, llama_server  # noqa: F401  (autouse: make test-engines only)

pytestmark = pytest.mark.engines
ROOT = Path(__file__).resolve().parents[1]
MSGS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    from engine.models import resolve
    with llama_server(resolve("smollm2-135m"), "--n_ctx", "2048", "--flash_attn", "true",
                      "--type_k", "8", "--type_v", "8") as url:
        yield url


def test_server_topk_equals_llamacpp_in_process(server):
    import engine
    from harness import adapters
    from harness.adapters.topk import topk_stats
    kv = engine.load("smollm2-135m")
    prompt = kv.tokenizer.apply_chat_template([{"role": "user", "content": "Explain how a bicycle stays upright."}])
    seq = prompt + kv.generate(prompt, 48, stop_at_eos=False)
    srv = adapters.load(adapters.parse(server), "smollm2-135m", "q8_0", {"ctx": 2048})
    assert srv.convention in ("openai", "after-token")
    lc = adapters.load(adapters.parse("llama.cpp"), "smollm2-135m", "q8_0", {"ctx": 2048})
    try:
        tk = srv.topk_logprobs(seq, 10)
        st = topk_stats(lc.logits(seq), tk).scalars
        print(f"server vs in-process llama.cpp ({srv.convention} convention, {tk.notes}): {st}")
        assert st["Positions scored"] >= len(seq) - 6
        assert st["Max abs logprob diff (top-10)"] < 1e-4
        assert st["Mean KLD (top-10+tail)"] < 1e-6
        assert st["Same top p"] == 100.0
        ours = srv.tokenizer.apply_chat_template(MSGS)
        via_completions = srv.generate(ours, 16)
        assert via_completions == lc.generate(ours, 16)[:len(via_completions)]
        text = srv.tokenizer.decode([t for t in via_completions if t not in srv.eos])
        assert srv.chat(MSGS, 16) == text
        print("greedy through the server's template:", repr(text))
    finally:
        srv.close()
        lc.close()


def test_a_server_without_logprobs_is_bad_input(tmp_path):
    from engine.models import resolve
    with llama_server(resolve("smollm2-135m"), "--n_ctx", "512", "--logits_all", "false") as url:
        p = subprocess.run([sys.executable, "-m", "harness", "run", "suites/engines.toml", "--engine", url,
                            "--out", str(tmp_path / "r"), "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
    assert lines[0].startswith(f"error: the server at http://{url.split('//')[1]} does not return log-probabilities")
    assert "logits_all" in lines[0] and "start it with them on" in lines[0]
    assert not (tmp_path / "r").exists()


SMALL = """
[suite]
name = "openai-small"
models = ["smollm2-135m"]
kv_dtypes = ["bf16", "q8_0"]
device = "cpu"
ctx = 1024

[[check]]
kind = "argmax"
positions = 48
messages = [[{ role = "user", content = "Explain how a bicycle stays upright, step by step." }]]

[[check]]
kind = "topk_argmax"
positions = 48
top_logprobs = 10
noise_chunk = 16
messages = [[{ role = "user", content = "Explain how a bicycle stays upright, step by step." }]]
max_mean_kld = { fp32 = 1e-6, bf16 = 0.05, q8_0 = 0.05 }

[[check]]
kind = "coherence"
max_new_tokens = 16
messages = [[{ role = "user", content = "Write a short sentence about the ocean." }]]

[[check]]
kind = "vram"
"""


def test_a_suite_over_one_server(server, tmp_path):
    (tmp_path / "s.toml").write_text(SMALL)
    p = subprocess.run([sys.executable, "-m", "harness", "run", str(tmp_path / "s.toml"), "--engine", server,
                        "--out", str(tmp_path / "r"), "--no-progress", "--report", str(tmp_path / "rep")],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 1, p.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "r" / "records.jsonl").read_text().splitlines()]
    case = {(r["kv_dtype"], r["check"]): r for r in recs if r["type"] == "case"}
    assert case[("q8_0", "argmax")]["status"] == "n/a"
    assert "engine openai does not provide chunked_logits, logits" in case[("q8_0", "argmax")]["reason"]
    assert case[("q8_0", "vram")]["status"] == "n/a" and "kv_applied" in case[("q8_0", "vram")]["reason"]
    assert case[("bf16", "topk_argmax")]["status"] == "pass", case[("bf16", "topk_argmax")]
    assert case[("q8_0", "topk_argmax")]["failures"][0].startswith(
        "not applied? q8_0 on openai: its top-k log-probabilities equal row bf16's bit for bit")
    assert case[("q8_0", "coherence")]["status"] == "pass"
    kld = [r for r in recs if r["type"] == "metric" and r["kv_dtype"] == "q8_0" and r["check"] == "topk_argmax"
           and r["metric"] == "Mean KLD (top-10+tail)"][0]
    assert "lower bound of the full-vocabulary KLD" in kld["detail"]
    rep = (tmp_path / "rep" / "report.md").read_text()
    assert "## Engines side by side" in rep and "⚠️ yes" in rep
    print({k: (c["status"], (c["failures"] or [c.get("reason")])[:1]) for k, c in case.items()})
