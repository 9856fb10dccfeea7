"""KV specs (engine/kv_spec.py, issue 15 item 6): separate K and V dtypes and per-layer KV
dtypes, parsed into one canonical string; applied per layer and per K/V by the caches, read
back from the buffers, priced by the planner to the byte.

References: the canonical form's own rules (round trip, idempotence, one name per
assignment); an independent attention written here (K and V quantized with gguf.quants Q8_0
or rounded to bf16 by torch, each by its own format, then softmax attention in float64) for
the torch path and the Triton kernels (Triton's interpreter on CPU); the planner's arithmetic
against the bytes really allocated; fp32 logits for a spec whose overrides give every layer
fp32.
"""
from __future__ import annotations

import os

if not __import__("torch").cuda.is_available():          # before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

import engine
from engine import formats, kernels
from engine.errors import ConfigError, KVGeometryError
from engine.kv import LayerKV, make_layer_kv
from engine.kv_ring import RingKV
from engine.kv_spec import KVSpec, canonical, cell_formats, format_layers, model_canonical, parse
from engine.planner import plan as make_plan
from engine.planner import spec_for_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"
MODEL = "tiny-llama"          # 4 layers, 2 KV heads x 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- syntax -------------------------------------------------------------------------------

@pytest.mark.parametrize("text,canon", [
    ("q8_0", "q8_0"), ("bf16", "bf16"), ("fp32", "fp32"),                 # the strings of before
    ("k-q8_0.v-bf16", "k-q8_0.v-bf16"), ("v-bf16.k-q8_0", "k-q8_0.v-bf16"),
    ("k-q8_0", "k-q8_0.v-fp32"), ("k-bf16.v-bf16", "bf16"),
    ("q8_0.fp32@0,23", "q8_0.fp32@0,23"), ("fp32@23,0.q8_0", "q8_0.fp32@0,23"),
    ("q8_0.fp32@0-3,7", "q8_0.fp32@0-3,7"), ("q8_0.fp32@0,1", "q8_0.fp32@0,1"),
    ("q8_0@3", "fp32.q8_0@3"), ("k-q8_0@5", "fp32.k-q8_0@5"),
    ("q8_0.fp32@0-3,7.bf16@2", "q8_0.fp32@0,1,3,7.bf16@2"),                # a later override wins
    ("q8_0.k-fp32@1.v-fp32@1", "q8_0.fp32@1"), ("q8_0.fp32@0.q8_0@0", "q8_0"),
    ("k-q8_0.v-bf16.fp32@0", "k-q8_0.v-bf16.fp32@0"), ("k-q8_0.v-bf16.bf16@4", "k-q8_0.v-bf16.k-bf16@4"),
    ("bf16.v-q8_0@2.k-fp32@2", "bf16.k-fp32@2.v-q8_0@2"),
])
def test_canonical_form_round_trips(text, canon):
    s = parse(text)
    assert str(s) == canon == canonical(canon)            # idempotent
    assert parse(canon) == s                              # round trip
    assert "/" not in canon and " " not in canon and set(canon) <= set(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-@,")


def test_uniform_strings_are_exactly_the_dtypes_of_before():
    for d in formats.KV:
        assert parse(d).uniform and str(parse(d)) == d and parse(d).layer_formats(3) == [(d, d)] * 3


def test_every_assignment_has_one_canonical_name():
    """Random per-layer (K, V) assignments: from_layers gives a spec that resolves back to the
    same assignment, whose string parses back to it, and any spec resolving to that assignment
    on that model has the same model-canonical name."""
    rng = random.Random(0)
    names = list(formats.KV)
    for _ in range(300):
        n = rng.randint(1, 30)
        pairs = [(rng.choice(names), rng.choice(names)) for _ in range(n)]
        s = KVSpec.from_layers(pairs)
        assert s.layer_formats(n) == pairs and parse(str(s)) == s
        assert model_canonical(str(s), n) == str(s)
        # the same assignment written the long way (fp32 base, one override per layer)
        long = ".".join(["fp32", *(f"k-{k}@{i}.v-{v}@{i}" for i, (k, v) in enumerate(pairs))])
        assert model_canonical(long, n) == str(s)
    assert format_layers([7, 0, 1, 2, 3, 9, 10]) == "0-3,7,9,10"


@pytest.mark.parametrize("bad,why", [
    ("", "empty"), ("q9", "unknown dtype 'q9'"), ("q8_0.bf16", "base K format is given twice"),
    ("q8_0.fp32@", "'@' needs layer indices"), ("q8_0.fp32@a", "bad layer list 'a'"),
    ("q8_0.fp32@3-1", "bad layer range '3-1'"), ("k", "bad token 'k'"), ("x-q8_0", "bad token 'x-q8_0'"),
    ("q8_0..fp32@1", "bad token ''"), ("q8_0/fp32", "only letters, digits"), ("q8_0 fp32", "only letters"),
    ("k-q8_0.k-bf16", "base K format is given twice"), ("q8_0.fp32@-1", "bad layer list"),
])
def test_bad_specs_are_one_line_errors_naming_the_accepted_forms(bad, why):
    with pytest.raises(ConfigError) as e:
        parse(bad)
    msg = str(e.value)
    assert why in msg and "\n" not in msg and "k-<dtype>.v-<dtype>" in msg and "<dtype>@<layers>" in msg


def test_a_layer_out_of_range_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"layer 30 is out of range \(tiny-llama has 4 layers, 0-3\)"):
        parse("q8_0.fp32@30").layer_formats(4, "tiny-llama")
    with pytest.raises(ConfigError, match="layer 4 is out of range"):
        make_plan(spec_for_model(MODEL), kv_dtype="q8_0.fp32@4", ctx=32, device="cpu")
    with pytest.raises(ConfigError, match="layer 9 is out of range"):
        engine.load(MODEL, kv_dtype="q8_0.fp32@9", ctx=32)
    assert cell_formats("k-q8_0.v-bf16") == ("q8_0", "bf16")
    assert cell_formats("q8_0 (q8_0 written wrong: block 0 byte 1 (its scale) is 0x3c)") == ("q8_0", "q8_0")


def test_the_clis_refuse_a_bad_spec_with_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "engine", "plan", MODEL, "--kv-dtype", "q8_0.fp32@9", "--ctx", "32"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: kv_dtype 'q8_0.fp32@9': layer 9 is out of "
                                                             "range"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    suite = tmp_path / "s.toml"
    suite.write_text('[suite]\nname = "s"\nmodels = ["tiny-llama"]\nkv_dtypes = ["q8_0.fp32@x"]\n'
                     '[[check]]\nkind = "vram"\n')
    r = subprocess.run([sys.executable, "-m", "harness", "run", str(suite), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "suite.kv_dtypes[0]: bad KV spec" in r.stderr and "bad layer list 'x'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_suites_take_canonical_specs_and_refuse_others():
    from harness.errors import SuiteError
    from harness.suite import parse_suite

    def load(dtypes, **check):
        return parse_suite({"suite": {"name": "s", "models": [MODEL], "kv_dtypes": dtypes},
                            "check": [{"kind": "vram", **check}]})

    s = load(["q8_0", "k-q8_0.v-bf16", "q8_0.fp32@0,3"], max_kv_mismatches={"q8_0.fp32@0,3": 0})
    assert s.dtypes == ["fp32", "q8_0", "k-q8_0.v-bf16", "q8_0.fp32@0,3"]
    assert s.checks[0].threshold_for("max_kv_mismatches", MODEL, "q8_0.fp32@0,3") == 0
    for dtypes, msg in ((["fp32@3.q8_0"], "not in canonical form: write 'q8_0.fp32@3'"),
                        (["q8_0.bf16"], "bad KV spec"), (["q4_0"], "unknown KV dtype 'q4_0'"),
                        (["fp32.fp32@1"], "not in canonical form"), (["q8_0", "q8_0"], "repeated dtype")):
        with pytest.raises(SuiteError, match="suite.kv_dtypes") as e:
            load(dtypes)
        assert msg in str(e.value) and "\n" not in str(e.value)


# -- attention reads K and V each in its own format ------------------------------------------------

def stored(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """What a cache in ``fmt`` holds for float32 ``x`` [T, Hkv, D], independently of the engine:
    gguf.quants Q8_0 there and back along each token's row, torch's bf16 rounding, fp32 as is."""
    if fmt == "fp32":
        return x.double()
    if fmt == "bf16":
        return x.to(torch.bfloat16).double()
    rows = x.reshape(x.shape[0], -1).numpy()
    back = dequantize(quantize(rows, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(np.asarray(back, dtype=np.float64)).reshape(x.shape)


def attention64(q, k, v, start, scale, window=None):
    """float64 causal softmax(q k^T) v with GQA: q [T, Hq, D] at positions start.., keys [0, start+T)."""
    T, Hq, D = q.shape
    n = start + T
    g = Hq // k.shape[1]
    k = k[:n].repeat_interleave(g, 1)
    v = v[:n].repeat_interleave(g, 1)
    s = torch.einsum("thd,nhd->htn", q.double(), k) * scale
    qpos = torch.arange(start, n)[:, None]
    kpos = torch.arange(n)[None, :]
    mask = kpos > qpos
    if window:
        mask = mask | (kpos <= qpos - window)
    return torch.einsum("htn,nhd->thd", s.masked_fill(mask, float("-inf")).softmax(-1), v)


PAIRS = [("q8_0", "bf16"), ("bf16", "q8_0"), ("fp32", "q8_0"), ("q8_0", "fp32"), ("bf16", "fp32")]


def _inputs(T: int, hkv: int, hq: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    k, v, q = (torch.randn(T, h, d, generator=g) * s for h, s in ((hkv, 1.5), (hkv, 3.0), (hq, 1.0)))
    return k, v, q


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kf,vf", PAIRS, ids=[f"k-{k}.v-{v}" for k, v in PAIRS])
def test_mixed_cache_attention_equals_an_independent_float64_attention(kf, vf, backend):
    """A LayerKV with K in ``kf`` and V in ``vf``: its buffers hold those formats, and prefill
    (two calls) and a decode step give the attention of an independent float64 computation over
    K and V stored each by its own format (gguf.quants / torch bf16). The torch path and the
    Triton kernels alike (interpreted on CPU; with D = 32 and q8_0 on both sides only the
    uniform q8_0 kernel would run, so these pairs go through the generic kernel)."""
    T, hkv, hq, d = 21, 2, 4, 32
    k, v, q = _inputs(T, hkv, hq, d, seed=len(kf) * 7 + len(vf))
    prev = kernels.set_backend(backend)
    try:
        c = LayerKV(0, hkv, d, T + 3, kf, device=DEV, v_dtype=vf)
        assert (c.k_format, c.v_format, c.dtype) == (kf, vf, f"k-{kf}.v-{vf}")
        c.write(0, k[:12].to(DEV), v[:12].to(DEV))
        out1 = c.attend(q[:12].to(DEV), 0, d ** -0.5).cpu()
        c.write(12, k[12:T - 1].to(DEV), v[12:T - 1].to(DEV))
        out2 = c.attend(q[12:T - 1].to(DEV), 12, d ** -0.5).cpu()
        c.write(T - 1, k[T - 1:].to(DEV), v[T - 1:].to(DEV))          # one decode step
        out3 = c.attend(q[T - 1:].to(DEV), T - 1, d ** -0.5).cpu()
    finally:
        kernels.set_backend(prev)
    ks, vs = stored(k, kf), stored(v, vf)
    want = attention64(q, ks, vs, 0, d ** -0.5)
    got = torch.cat([out1, out2, out3])
    err = (got.double() - want).abs().max().item()
    assert err < 2e-5, f"{kf}/{vf} {backend}: max-abs {err:.2e}"
    # and the wrong pairing (V read as K's format) is far off: the test can tell them apart
    wrong = attention64(q, ks, stored(v, kf), 0, d ** -0.5)
    if kf != vf:
        assert (got.double() - wrong).abs().max().item() > 20 * max(err, 1e-7)


@pytest.mark.parametrize("kf,vf", [("q8_0", "bf16"), ("bf16", "q8_0")])
def test_triton_decode_kernel_reads_k_and_v_each_in_its_format(kf, vf):
    """decode_attention over a mixed cache (several splits, D = 64 so the q8_0 kernel would fit
    if both were q8_0) against the independent float64 attention."""
    from engine.kernels.decode_attention import decode_attention
    T, hkv, hq, d = 40, 2, 6, 64
    k, v, q = _inputs(T, hkv, hq, d, seed=3)
    prev = kernels.set_backend("torch")
    try:
        c = LayerKV(0, hkv, d, T, kf, device=DEV, v_dtype=vf)
        c.write(0, k.to(DEV), v.to(DEV))
    finally:
        kernels.set_backend(prev)
    want = attention64(q[-1:], stored(k, kf), stored(v, vf), T - 1, d ** -0.5)[0]
    for cfg in ({"block_n": 16}, {"block_n": 32, "fuse_combine": True}):
        got = decode_attention(q[-1].to(DEV), c.k, c.v, kf, T, d ** -0.5, hkv, cfg=cfg, v_fmt=vf).cpu()
        err = (got.double() - want).abs().max().item()
        assert err < 2e-5, f"{cfg}: {err:.2e}"


def test_a_ring_holds_k_and_v_in_their_formats_bit_for_bit_like_a_full_cache():
    """A sliding-window ring with q8_0 K and bf16 V, through a two-wave prefill and a decode step,
    equals a full-length mixed cache (torch.equal) and the independent windowed attention."""
    T, hkv, hq, d, window = 300, 2, 4, 32, 40
    k, v, q = _inputs(T + 1, hkv, hq, d, seed=11)
    ring = RingKV(0, hkv, d, 512, window, "q8_0", v_dtype="bf16", chunk=128)
    full = LayerKV(0, hkv, d, 512, "q8_0", v_dtype="bf16")
    assert ring.kv_dtypes == full.kv_dtypes == ("q8_0", "bf16") and ring.rows < 512
    outs = []
    for c in (ring, full):
        c.write(0, k[:T], v[:T])
        a = c.attend(q[:T], 0, d ** -0.5, window=window)
        c.write(T, k[T:], v[T:])
        outs.append(torch.cat([a, c.attend(q[T:], T, d ** -0.5, window=window)]))
    assert torch.equal(outs[0], outs[1])
    want = attention64(q, stored(k, "q8_0"), stored(v, "bf16"), 0, d ** -0.5, window=window)
    assert (outs[0].double() - want).abs().max().item() < 2e-5


# -- the engine: applied per layer and per K/V, priced to the byte ----------------------------------

def _row_bytes(f: str, spec) -> float:
    return spec.n_kv_heads * spec.head_dim * {"fp32": 4, "bf16": 2, "q8_0": 34 / 32}[f]


@pytest.mark.parametrize("text,n_gpu", [("q8_0.fp32@0.k-bf16@2", None), ("k-q8_0.v-bf16.fp32@3", None),
                                        ("bf16.k-q8_0@1", 2)])
def test_per_layer_spec_is_applied_observable_and_priced(text, n_gpu):
    ctx = 48
    eng = engine.load(MODEL, kv_dtype=text, ctx=ctx, n_gpu_layers=n_gpu)
    spec, L = eng.spec, eng.spec.n_layers
    k_trunk = n_gpu if n_gpu is not None else L
    want = [f if i < k_trunk else ("fp32", "fp32") for i, f in enumerate(parse(text).layer_formats(L))]
    assert eng.kv_formats == want                                    # read from the buffers
    assert [(c.k_format, c.v_format) for c in eng.caches] == want
    assert eng.kv_spec == str(KVSpec.from_layers(want)) == eng.plan.kv_spec
    if n_gpu is None:
        assert eng.kv_spec == canonical(text)
    # plan == allocated == the independent arithmetic: ctx rows x (K bytes + V bytes) per layer
    for i, c in enumerate(eng.caches):
        assert eng.plan.layer_kv_bytes[i] == c.nbytes == ctx * (_row_bytes(want[i][0], spec)
                                                                + _row_bytes(want[i][1], spec))
    kv_rows = [r for r in eng.ledger.compare(eng.plan) if r.category == "kv"]
    assert all(r.diff == 0 for r in kv_rows) and sum(r.runtime for r in kv_rows) == sum(c.nbytes for c in eng.caches)
    assert eng.kv_dtypes == [f[0] if f[0] == f[1] else f"k-{f[0]}.v-{f[1]}" for f in want]
    assert eng.plan.layer_kv_dtypes == eng.kv_dtypes
    eng.close()


def test_a_narrowed_block_format_needs_whole_blocks_on_its_layer_only():
    """tiny-llama-kv48 (3 x 16 = 48 values a row): q8_0 K anywhere is refused naming the layer;
    a bf16 V with fp32 K is fine."""
    spec = spec_for_model("tiny-llama-kv48")
    with pytest.raises(KVGeometryError, match="layer 1: kv_dtype q8_0"):
        make_layer_kv(spec, 1, 16, "fp32", v_dtype="q8_0")
    with pytest.raises(KVGeometryError, match="q8_0"):
        make_plan(spec, kv_dtype="bf16.k-q8_0@1", ctx=16, device="cpu")
    p = make_plan(spec, kv_dtype="v-bf16", ctx=16, device="cpu")
    assert p.layer_k_dtypes == ["fp32"] * 2 and p.layer_v_dtypes == ["bf16"] * 2


def test_all_fp32_overrides_give_fp32_logits_bit_for_bit_and_one_layer_does_not():
    ids = list(range(300, 340))
    ref = engine.load(MODEL, ctx=64).logits(ids)
    wide = engine.load(MODEL, kv_dtype="q8_0.fp32@0-3", ctx=64)
    assert wide.kv_spec == "fp32" and torch.equal(wide.logits(ids), ref)
    wide2 = engine.load(MODEL, kv_dtype="k-q8_0.v-bf16.fp32@0,1,2,3", ctx=64)
    assert wide2.kv_formats == [("fp32", "fp32")] * 4 and torch.equal(wide2.logits(ids), ref)
    one = engine.load(MODEL, kv_dtype="fp32.k-q8_0@2", ctx=64)
    assert one.kv_formats[2] == ("q8_0", "fp32") and not torch.equal(one.logits(ids), ref)


# -- the harness: specs are rows of results, reports and compare ---------------------------------

def test_mixed_rows_flow_through_results_report_and_compare(tmp_path, monkeypatch):
    """A suite with a K/V split and a per-layer row: the vram check holds each layer's applied
    K/V cells to the request (expected vs applied spec in its info) and the KV bytes to the
    per-K/V arithmetic; the rows are the report's and compare's rows; a planted one-layer fault
    is a regression compare names on the mixed row."""
    from harness.compare import compare
    from harness.report import build_report
    from harness.results import load_results
    from harness.runner import Runner
    from harness.suite import parse_suite
    rows = ["q8_0", "k-q8_0.v-bf16", "q8_0.fp32@0"]
    suite = {"suite": {"name": "mixed", "models": [MODEL], "ctx": 64, "kv_dtypes": rows},
             "check": [{"kind": "vram", "exercise_tokens": 8, "ctx": 64}]}
    summary = Runner(parse_suite(suite), tmp_path / "a", progress=False).run()
    assert summary.exit_code == 0, [(c["kv_dtype"], c.get("failures")) for c in summary.cases]
    res = load_results(tmp_path / "a")
    spec = spec_for_model(MODEL)
    for row in rows:
        info = res.info(MODEL, row, "vram")
        assert info["applied_spec"] == info["expected_spec"] == row
        want = sum(64 * (_row_bytes(k, spec) + _row_bytes(v, spec)) for k, v in parse(row).layer_formats(4))
        df = res.metrics()
        got = df[(df.kv_dtype == row) & (df.metric == "KV bytes (runtime)")].value.iloc[0]
        assert got * 2**20 == pytest.approx(want, rel=1e-12)
    md = build_report(tmp_path / "a", tmp_path / "rep").read_text()
    for row in rows:
        assert f"| {row} |" in md
    monkeypatch.setenv("KVBENCH_FAULT", "skip_narrow_layer:1")
    Runner(parse_suite(suite), tmp_path / "b", progress=False).run()
    cmp = compare(tmp_path / "a", tmp_path / "b", allow_settings_change=True)
    bad = {r.get("kv_dtype") or r.get("dtype") for r in cmp.regressions}
    assert "k-q8_0.v-bf16" in bad and "q8_0.fp32@0" in bad, cmp.regressions
    assert "k-q8_0.v-bf16" in cmp.markdown()


def test_static_decode_with_a_mixed_spec_matches_eager():
    """The static step (device position: ``write_at`` / ``attend_at``, the step a CUDA graph
    captures; Triton interpreted on CPU) over K q8_0 / V bf16 with one layer fp32: the same
    logits as the eager step to float32 summation order, the same greedy tokens."""
    prev = kernels.set_backend("triton")
    try:
        eng = engine.load("tiny-qwen3", kv_dtype="k-q8_0.v-bf16.fp32@1", ctx=32)
        prompt = [5, 17, 3, 99, 42, 7, 11, 64]
        eng.set_decode_mode("eager")
        eng.prefill(prompt)
        ref = torch.stack([eng.decode(prompt[-1] + i) for i in range(4)])
        eager = eng.generate(prompt, 5, stop_at_eos=False)
        eng.set_decode_mode("static")
        eng.prefill(prompt)
        got = torch.stack([eng.decode(prompt[-1] + i) for i in range(4)])
        assert eng.generate(prompt, 5, stop_at_eos=False) == eager
    finally:
        kernels.set_backend(prev)
    assert eng.kv_formats[1] == ("fp32", "fp32") and eng.kv_formats[0] == ("q8_0", "bf16")
    assert (got - ref).abs().max().item() < 1e-4


def test_rows_map_to_llamacpp_ctk_ctv_without_the_build():
    """What ``--engine llama.cpp`` runs for a row (no llama.cpp needed to decide it): uniform rows
    by name, K/V rows as ``type_k/type_v``, per-layer rows refused with the fix."""
    from harness.adapters import EngineSpec, native_for
    from harness.adapters.llamacpp import LlamaCpp
    from harness.errors import UsageError
    assert [LlamaCpp.native_of(r) for r in ("fp32", "bf16", "q8_0")] == ["f32", "bf16", "q8_0"]
    assert LlamaCpp.native_of("k-q8_0.v-bf16") == "q8_0/bf16"
    assert LlamaCpp.native_of("k-bf16") == "bf16/f32"            # V unnamed: fp32
    assert LlamaCpp.native_of("q8_0.fp32@0,23") is None and LlamaCpp.native_of("nonsense!") is None
    assert LlamaCpp.valid_native("q4_0/f16") and not LlamaCpp.valid_native("q8_0/q8_0")
    assert not LlamaCpp.valid_native("q8_0/q2_k")
    assert native_for(EngineSpec("llama.cpp"), "k-q8_0.v-bf16", {}) == "q8_0/bf16"
    with pytest.raises(UsageError, match="has no KV cache in q8_0.fp32@0's format"):
        native_for(EngineSpec("llama.cpp"), "q8_0.fp32@0", {})
