"""The HF transformers adapter against transformers itself on the real SmolLM2-135M GGUF
(transformers' own GGUF loader; optimum-quanto and HQQ from the engines extra): ``make test-engines``.

- HF fp32 and kvbench fp32 are two implementations of one model: their teacher-forced logits
  agree to float noise and their chat prompts tokenize alike.
- Every quantized cache (quanto int4/int2, HQQ int8/int4, fp8) is applied (read from the
  cache HF built) and is exercised: fed in chunks of 8 tokens with an 8-token residual
  window, the first chunk equals the fp32 run bit for bit (full precision, as ``kv_note``
  says) and every later position moves; 2 bits cost more than 4.
- A suite through the CLI with ``--engine hf --engine-kv q8_0=quanto-int4`` records the
  mapping, the full-precision note and HF's KV-only cost, and its report sets them side by side.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_engines_support import engines_only  # noqa: F401  (autouse: make test-engines only)

pytestmark = pytest.mark.engines
ROOT = Path(__file__).resolve().parents[1]
MSGS = [{"role": "user", "content": "Explain how a bicycle stays upright, step by step."}]
KLD: dict[str, float] = {}          # native -> KLD vs fp32, filled by the parametrized test


@pytest.fixture(scope="module")
def ref():
    import engine
    from harness.adapters.hf import HF
    kv = engine.load("smollm2-135m")
    prompt = kv.tokenizer.apply_chat_template(MSGS)
    seq = prompt + kv.generate(prompt, 40, stop_at_eos=False)
    fp32 = HF("smollm2-135m", "fp32", "fp32", {"ctx": 4096})    # held open: the quantized rows share its weights
    yield {"kv": kv, "prompt": prompt, "seq": seq, "fp32": fp32}
    fp32.close()


def kld(r, t):
    lr, lt = torch.log_softmax(r.double(), -1), torch.log_softmax(t.double(), -1)
    return float((lr.exp() * (lr - lt)).sum(-1).mean())


def test_hf_fp32_and_kvbench_fp32_agree(ref):
    hf, kv = ref["fp32"], ref["kv"]
    assert hf.tokenizer.apply_chat_template(MSGS) == kv.tokenizer.apply_chat_template(MSGS)
    a, b = hf.logits(ref["seq"]), kv.logits(ref["seq"])
    diff = float((a - b).abs().max())
    print(f"HF fp32 vs kvbench fp32: max abs {diff:.3g}, mean KLD {kld(b, a):.3g}")
    assert diff < 1e-3
    assert hf.kv_applied_native == ["fp32"] * 30 and hf.weight_format == "f32"
    assert hf.generate(ref["prompt"], 16) == kv.generate(ref["prompt"], 16)


@pytest.mark.parametrize("native", ["quanto-int4", "quanto-int2", "hqq-int8", "hqq-int4", "fp8"])
def test_quantized_caches_are_applied_and_exercised(ref, native):
    from harness.adapters.hf import HF
    e = HF("smollm2-135m", "q8_0", native, {"ctx": 4096})
    try:
        seq = ref["seq"]
        out = e.logits(seq)
        assert e.kv_applied_native == [native] * 30 and e.kv_dtypes == ["q8_0"] * 30
        twin = e.twin("fp32")                      # same chunks of 8, DynamicCache
        full = twin.logits(seq)
        twin.close()
        assert torch.equal(out[:8], full[:8]), "the first chunk attends in full precision"
        moved = (out[8:] - full[8:]).abs().amax(-1)
        k = kld(full[8:], out[8:])
        print(f"HF {native}: KLD vs fp32 (positions >= 8) {k:.4g}, max abs {float(moved.max()):.3g}, "
              f"positions moved {int((moved > 0).sum())}/{len(moved)}; {e.kv_note}")
        assert bool((moved > 0).all())
        KLD[native] = k
    finally:
        e.close()


def test_two_bits_cost_more_than_four():
    k = {n: KLD.get(n) for n in ("quanto-int4", "quanto-int2")}
    if None in k.values():
        pytest.skip("needs test_quantized_caches_are_applied_and_exercised first (same module, run before)")
    assert k["quanto-int2"] > k["quanto-int4"] > 0


def test_bf16_row_is_hfs_bf16_model(ref):
    from harness.adapters.hf import HF
    e = HF("smollm2-135m", "bf16", "bf16", {"ctx": 4096})
    try:
        e.logits(ref["seq"][:16])
        assert e.kv_applied_native == ["bf16"] * 30 and e.weight_format == "bf16"
        assert "bf16 weights and compute" in e.kv_note
    finally:
        e.close()


SMALL = """
[suite]
name = "hf-small"
models = ["smollm2-135m"]
kv_dtypes = ["bf16", "q8_0"]
device = "cpu"
ctx = 1024

[[check]]
kind = "argmax"
positions = 48
noise_chunk = 16
messages = [[{ role = "user", content = "Explain how a bicycle stays upright, step by step." }]]

[[check]]
kind = "vram"
exercise_tokens = 16
optional = { max_plan_diff_pct = "only kvbench has a planner", max_kv_bytes_diff_pct = "HF's cache grows with the sequence" }
"""


def test_suite_with_hfs_quantized_cache_through_the_cli(tmp_path):
    (tmp_path / "s.toml").write_text(SMALL)
    p = subprocess.run([sys.executable, "-m", "harness", "run", str(tmp_path / "s.toml"), "--out", str(tmp_path / "r"),
                        "--engine", "hf", "--engine-kv", "q8_0=quanto-int4", "--no-progress", "--report",
                        str(tmp_path / "rep")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert p.returncode in (0, 1) and last["engine"] == "hf", p.stderr[-3000:]
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert man["engine"]["rows"]["q8_0"] == {"engine": "hf", "kv": "quanto-int4"}
    recs = [json.loads(x) for x in (tmp_path / "r" / "records.jsonl").read_text().splitlines()]
    case = {(r["kv_dtype"], r["check"]): r for r in recs if r["type"] == "case"}
    assert case[("q8_0", "vram")]["status"] == "pass", case[("q8_0", "vram")]       # applied = mapped
    eng = [r["info"]["engine"] for r in recs if r["type"] == "info" and "engine" in r["info"]
           and r["kv_dtype"] == "q8_0"][0]
    assert eng["kv_requested"] == "quanto-int4" and "residual window 8" in eng["kv_note"]
    kv_only = [r["value"] for r in recs if r["type"] == "metric" and r["kv_dtype"] == "q8_0"
               and r["metric"] == "KV-only Mean KLD"]
    assert kv_only and kv_only[0] > 0
    rep = (tmp_path / "rep" / "report.md").read_text()
    assert "## Engines side by side" in rep and "quanto-int4" in rep and "full precision" in rep
    print([(k, c["status"], c["failures"] or c["unmeasured"]) for k, c in case.items()])
