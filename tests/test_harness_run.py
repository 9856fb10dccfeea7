"""The harness on the real engine with a tiny synthetic model: the smoke suite end to end
through the CLI, each check's numbers against an independent computation, fault injection
caught by the default suite's vram check, and interrupt + --resume == one clean run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest

import engine
from harness.results import load_results, read_records
from harness.runner import Runner
from harness.suite import load_suite, parse_suite
from record_norm import stable

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-qwen3"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One CLI run of suites/smoke.toml (the `make test` smoke suite) with its report."""
    tmp = tmp_path_factory.mktemp("smoke")
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "suites/smoke.toml", "--out",
                           str(tmp / "results"), "--report", str(tmp / "report"), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    return proc, load_results(tmp / "results"), tmp


def metric(res, dtype, check, name):
    for r in res.of_type("metric"):
        if (r["kv_dtype"], r["check"], r["metric"]) == (dtype, check, name):
            return r
    raise KeyError((dtype, check, name))


def test_smoke_suite_end_to_end(smoke):
    proc, res, tmp = smoke
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["verdict"] == "pass" and last["cases"] == 15 and last["failed"] == 0
    assert last["statuses"] == {"pass": 12, "n/a": 3}
    assert {(c["kv_dtype"], c["check"]) for c in res.cases()} == {
        (d, c) for d in ("fp32", "bf16", "q8_0")
        for c in ("argmax", "coherence", "wave_prefill", "vram", "throughput")}
    # coherence cannot mean anything on random weights: declared n/a with its reason, not run
    for c in res.cases():
        if c["check"] == "coherence":
            assert c["status"] == "n/a" and "random weights" in c["reason"]
            assert not any(r["check"] == "coherence" for r in res.of_type("metric"))
    man = res.manifest
    assert man["git"]["sha"] and man["versions"]["torch"] and man["device"]["requested"] == "cpu"
    assert man["device"]["resolved"] == "cpu" and man["weight_format"]["models"][MODEL]["applied"] == "f32"
    proc_rec = man["processes"][-1]
    assert proc_rec["max_live_engines"] == 1 and proc_rec["engine_loads"] == 1
    assert proc_rec["host_peak_anon_bytes"] > 0
    assert man["seed"] == 0 and "suites/smoke.toml" in man["command"] and man["finished"]
    assert (tmp / "results" / "summary.csv").read_text().startswith("model,kv_dtype,check,kind,metric")
    md = (tmp / "report" / "report.md").read_text()
    assert "| tiny-qwen3 | vram | ✅ pass | ✅ pass | ✅ pass |" in md
    assert "Traceback" not in proc.stderr


def test_argmax_matches_a_direct_computation(smoke):
    _, res, _ = smoke
    segs = res.info(MODEL, "q8_0", "argmax")["segments"]
    ids = segs[0]["ids"]
    assert len(ids) == 48 and segs[0]["prompt_tokens"] < 40
    base = engine.load(MODEL, kv_dtype="fp32", ctx=1024).logits(ids)
    q8 = engine.load(MODEL, kv_dtype="q8_0", ctx=1024).logits(ids)
    diff = (base - q8).abs()
    assert metric(res, "q8_0", "argmax", "Max abs logit diff")["value"] == pytest.approx(
        diff.max().item(), rel=1e-6)
    same = (base.argmax(1) == q8.argmax(1)).double().mean().item() * 100
    assert metric(res, "q8_0", "argmax", "Same top p")["value"] == pytest.approx(same)
    assert diff.max().item() > 0              # q8_0 really narrowed: not fp32 against fp32
    # the continuation after the prompt is fp32's own greedy choice at every position
    p = segs[0]["prompt_tokens"]
    assert ids[p:] == base[p - 1:-1].argmax(1).tolist()
    noise = metric(res, "fp32", "argmax", "Max abs logit diff")
    assert noise["threshold"] == 0.001 and noise["passed"] is True
    assert len(res.series(MODEL, "q8_0", "argmax")["kld"]) == 48


def test_coherence_uses_the_chat_template():
    # the check's own code on the tiny model (the runner declares it n/a on random weights)
    from harness.checks import CaseContext, get
    from harness.checks.coherence import CoherenceConfig
    from harness.suite import Message
    check, cfg = get("coherence"), CoherenceConfig(kind="coherence", max_new_tokens=8,
                                                   messages=[[Message("user", "What is the capital of France?")]])
    suite = load_suite(ROOT / "suites" / "smoke.toml").suite
    ctx = lambda d: CaseContext(model=MODEL, kv_dtype=d, baseline="fp32", suite=suite, device="cpu", seed=0)  # noqa: E731
    state = check.prepare(engine.load(MODEL, kv_dtype="fp32", ctx=1024), cfg, ctx("fp32"))
    eng = engine.load(MODEL, kv_dtype="bf16", ctx=1024)
    out = check.measure(eng, cfg, state, ctx("bf16"))
    prompt = eng.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    new = eng.generate(prompt, 8)
    sample = out.info["samples"][0]
    assert sample["text"] == eng.tokenizer.decode([t for t in new if t not in eng.tokenizer.eos_ids])
    assert sample["tokens"] == len(new) and sample["stop"] in ("eos", "length")
    base = check.measure(engine.load(MODEL, kv_dtype="fp32", ctx=1024), cfg, state, ctx("fp32"))
    assert {m.name: m.skipped for m in base.metrics}["Identical prefix"] == \
        "the baseline's answers are the reference itself"
    assert 0 <= {m.name: m.value for m in out.metrics}["Identical prefix"] <= 8


def test_wave_prefill_takes_several_waves(smoke):
    _, res, _ = smoke
    for d in ("fp32", "bf16", "q8_0"):
        waves = metric(res, d, "wave_prefill", "Waves")
        assert waves["value"] >= 2 and waves["passed"] is True
        assert metric(res, d, "wave_prefill", "Prefill tok/s")["value"] > 0
    assert metric(res, "fp32", "wave_prefill", "Max abs logit diff")["value"] == 0   # waves: exact on CPU
    assert metric(res, "q8_0", "wave_prefill", "Max abs logit diff")["value"] > 0
    assert len(res.series(MODEL, "q8_0", "wave_prefill")["max_abs"]) == 300 - 200


def test_vram_reports_applied_dtypes_and_bytes(smoke):
    _, res, _ = smoke
    r = gguf.GGUFReader(engine.models.resolve(MODEL))

    def meta(key):
        return int(r.fields[key].parts[-1][0])

    n_layers, n_kv, head_dim = meta("qwen3.block_count"), meta("qwen3.attention.head_count_kv"), \
        meta("qwen3.attention.key_length")
    for d, bpv in (("fp32", 4), ("bf16", 2), ("q8_0", 34 / 32)):   # DESIGN.md's KV table
        info = res.info(MODEL, d, "vram")
        assert info["applied"] == [d] * n_layers
        expect = n_layers * 2 * 1024 * n_kv * head_dim * bpv / 2**20
        assert metric(res, d, "vram", "KV bytes (runtime)")["value"] == pytest.approx(expect)
        assert metric(res, d, "vram", "KV dtype mismatches")["value"] == 0


def test_throughput_keeps_raw_samples(smoke):
    _, res, _ = smoke
    for d in ("fp32", "bf16", "q8_0"):
        assert metric(res, d, "throughput", "pp32")["value"] > 0
        assert metric(res, d, "throughput", "tg8")["value"] > 0
        assert len(res.series(MODEL, d, "throughput")["tg8_samples"]) == 5     # smoke.toml: repeats = 5


def _default_vram_suite():
    """The shipped default suite, reduced to its vram check, on the tiny model."""
    suite = load_suite(ROOT / "suites" / "kv_dtype.toml")
    suite.checks = [c for c in suite.checks if c.KIND == "vram"]
    suite.checks[0].ctx = 1024
    return suite


@pytest.mark.parametrize("fault,detail", [
    ("ignore_kv_dtype", "layer 0 holds fp32, requested {d} (+3 more layers)"),
    ("skip_narrow_layer:1", "layer 1 holds fp32, requested {d}"),
])
def test_fault_injection_fails_the_default_suite(tmp_path, monkeypatch, fault, detail):
    monkeypatch.setenv("KVBENCH_FAULT", fault)
    suite = _default_vram_suite()
    summary = Runner(suite, tmp_path / "r", models=[MODEL], progress=False).run()
    assert summary.exit_code == 1
    failed = {(c["kv_dtype"], c["check"]): c for c in summary.failed}
    assert set(failed) == {("bf16", "vram"), ("q8_0", "vram")}      # the baseline is fp32 anyway
    for d in ("bf16", "q8_0"):
        msgs = failed[(d, "vram")]["failures"]
        assert msgs[0] == "KV dtype mismatches = {} layers (required <= 0): {}".format(
            4 if fault == "ignore_kv_dtype" else 1, detail.format(d=d))
    assert load_results(tmp_path / "r").manifest["env"]["KVBENCH_FAULT"] == fault


def _norm(records):
    """Records minus what legitimately differs between two runs (tests/record_norm.py)."""
    return [stable(r) for r in records]


RESUME_SUITE = """
[suite]
name = "resume"
models = ["tiny-qwen3"]
kv_dtypes = ["q8_0"]
ctx = 512

[[check]]
kind = "argmax"
positions = 40
noise_chunk = 8
messages = [[{ role = "user", content = "Count to five." }]]

[[check]]
kind = "vram"
exercise_tokens = 8
max_kv_bytes_diff_pct = 0.5
"""


@pytest.mark.slow(seconds=22)
def test_kill_and_resume_gives_the_records_of_one_clean_run(tmp_path):
    path = tmp_path / "resume.toml"
    path.write_text(RESUME_SUITE)
    clean = Runner(load_suite(path), tmp_path / "clean", progress=False).run()
    assert clean.exit_code == 0 and len(clean.cases) == 4

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "harness", "run", str(path), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:   # kill -9 as soon as a case is on disk
        if sum(r["type"] == "case" for r in read_records(out)) >= 1 or proc.poll() is not None:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sum(r["type"] == "case" for r in read_records(out))
    assert 1 <= done < 4, f"kill landed after {done} cases"

    resumed = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["ran"] == 4 - done
    assert _norm(read_records(out)) == _norm(read_records(tmp_path / "clean"))
    man = load_results(out).manifest
    assert man["finished"] and len(man["resumed"]) == 1


def test_resume_refuses_a_changed_suite(tmp_path):
    path = tmp_path / "resume.toml"
    path.write_text(RESUME_SUITE)
    Runner(load_suite(path), tmp_path / "r", progress=False, max_cases=1).run()
    path.write_text(RESUME_SUITE.replace("positions = 40", "positions = 41"))
    from harness.errors import ResultsError
    with pytest.raises(ResultsError, match="different version of"):
        Runner(load_suite(path), tmp_path / "r", progress=False, resume=True).run()
    with pytest.raises(ResultsError, match="already holds a run"):
        Runner(load_suite(path), tmp_path / "r", progress=False).run()


def test_shards_cover_the_matrix_once():
    from harness.runner import matrix, shard
    suite = parse_suite({"suite": {"name": "s", "models": ["tiny-qwen3", "tiny-llama"]},
                         "check": [{"kind": "vram"}, {"kind": "argmax"}]})
    cases = matrix(suite, suite.suite.models)
    parts = [shard(cases, i, 4) for i in range(4)]
    assert sorted(c.key for p in parts for c in p) == sorted(c.key for c in cases) and all(parts)
    assert all(len({c.model for c in p}) == 1 for p in parts)       # shards keep models whole here


def test_missing_user_model_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_MODELS_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "harness", "run", str(ROOT / "suites" / "kv_dtype.toml"),
                           "--model", "coder30b", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: model 'coder30b'") and "Qwen3-Coder-30B-A3B-Instruct" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_a_run_where_every_case_is_na_is_not_a_pass(tmp_path):
    """A suite whose only check declares itself n/a on the model (expert blocks on a model whose
    experts are F32) measured nothing: verdict "nothing measured", exit 1, never "pass"."""
    suite = tmp_path / "blocks.toml"
    suite.write_text('[suite]\nname = "blocks-only"\nmodels = ["tiny-qwen3moe"]\nbaseline = "fp32"\n'
                     'kv_dtypes = ["bf16"]\ndevice = "cpu"\nctx = 256\nseed = 0\n\n'
                     '[[check]]\nkind = "throughput"\nname = "throughput_blocks"\nexpert_format = "blocks"\n'
                     'pp = 8\ntg = 4\n')
    proc = subprocess.run([sys.executable, "-m", "harness", "run", str(suite), "--out", str(tmp_path / "r"),
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["statuses"] == {"n/a": 2} and last["verdict"] == "nothing measured", proc.stdout[-2000:]
    assert proc.returncode == 1 and "nothing measured: every one of the 2 cases is n/a" in proc.stdout
    from harness.report import build_report
    assert "**Nothing measured**: every case is n/a" in build_report(tmp_path / "r", tmp_path / "rep").read_text()


def test_throughput_times_decode_at_a_depth_or_says_why_not(tmp_path):
    """tg_depths = [D]: metric tg<N>@d<D> timed after a D-token prefill; on a model whose
    sliding-window rings cannot rewind, the metric is skipped with that reason (never a
    depth-0 number under the depth's name)."""
    out = {}
    for model, ctx in (("tiny-qwen3", 256), ("tiny-gemma3", 1024)):
        suite = tmp_path / f"{model}.toml"
        suite.write_text(f'[suite]\nname = "depth"\nmodels = ["{model}"]\nbaseline = "fp32"\nkv_dtypes = ["q8_0"]\n'
                         f'device = "cpu"\nctx = {ctx}\nseed = 0\n\n[[check]]\nkind = "throughput"\npp = 8\ntg = 4\n'
                         'warmup = 0\ntg_depths = [64]\n')
        proc = subprocess.run([sys.executable, "-m", "harness", "run", str(suite), "--out", str(tmp_path / model),
                               "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        out[model] = {(r["kv_dtype"], r["metric"]): r for r in read_records(tmp_path / model)
                      if r["type"] == "metric" and r["metric"].startswith("tg4@d64")}
    for d in ("fp32", "q8_0"):
        assert out["tiny-qwen3"][(d, "tg4@d64")]["value"] > 0
        assert out["tiny-qwen3"][(d, "tg4@d64 CV")]["value"] is not None
        skipped = out["tiny-gemma3"][(d, "tg4@d64")]
        assert skipped["value"] is None and "sliding-window ring" in skipped["skipped"]
