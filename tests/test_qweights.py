"""Matrices kept in Q8_0 (``weight_format="q8_0"``, ``engine.qweights``).

References: ``gguf.quants`` (the GGUF package's own Q8_0 quantize / dequantize) for the layout,
a float64 product written here for ``mm`` and the gemv kernel's Q8_0 path (TRITON_INTERPRET=1 on
CPU), HF transformers loading the same GGUF for the engine's logits, and the planner for the
bytes (plan == ledger)."""
from __future__ import annotations

import os

if not __import__("torch").cuda.is_available():          # before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants

import engine
from engine import qweights, synth
from engine.errors import ConfigError
from engine.gguf_io import open_gguf
from engine.kernels.gemv import gemv, gemv_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def ggml_matrix(N, K, seed):
    """(raw Q8_0 bytes [N, K/32*34] as torch uint8, gguf.quants' values float32 [N, K])."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, K)) / K ** 0.5).astype(np.float32)
    w[0, :32] *= 1e-4                                 # a block of tiny values
    w[1, 32:64] = 0                                   # an all-zero block (d = 0)
    raw = quants.quantize(w, QT.Q8_0)
    return torch.from_numpy(raw.copy()), torch.from_numpy(quants.dequantize(raw, QT.Q8_0).copy()), w


def test_layout_gives_back_ggml_bytes_and_values():
    raw, ref, w = ggml_matrix(7, 96, seed=1)
    m = qweights.from_ggml(raw)
    assert m.dtype == torch.int8 and tuple(m.shape) == (7, 96 + 96 // 16) and m.nbytes == raw.numel()
    assert torch.equal(qweights.to_ggml(m), raw), "the split rows do not give back ggml's bytes"
    assert torch.equal(qweights.dequantize(m), ref), "values differ from gguf.quants.dequantize"
    assert qweights.in_features(m) == 96 and qweights.is_q8(m)
    # quantising the float values is gguf.quants' Q8_0, byte for byte
    assert torch.equal(qweights.to_ggml(qweights.quantize(torch.from_numpy(w))), raw)
    assert torch.equal(qweights.dequantize(m[[4, 0]]), ref[[4, 0]])       # gathered rows: an embedding lookup
    # a row view (a fused buffer's q/k/v) is rows of the same layout
    assert torch.equal(qweights.dequantize(m[2:5]), ref[2:5])


def test_layout_refuses_what_is_not_q8_rows():
    with pytest.raises(ValueError, match="multiple of 32"):
        qweights.row_bytes(48)
    with pytest.raises(ValueError, match="not Q8_0 rows"):
        qweights.in_features(torch.zeros(2, 35, dtype=torch.int8))
    with pytest.raises(ValueError, match="not rows of Q8_0 blocks"):
        qweights.from_ggml(torch.zeros(2, 35, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not a Q8_0 matrix"):
        qweights.split(torch.zeros(2, 34))


def test_mm_is_the_exact_values_product_in_chunks(monkeypatch):
    raw, ref, _ = ggml_matrix(45, 128, seed=2)
    m = qweights.from_ggml(raw)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    want = x.double() @ ref.double().T
    bound = x.double().abs() @ ref.double().abs().T
    whole = qweights.mm(x, m)
    monkeypatch.setattr(qweights, "MM_CHUNK_BYTES", 4 * 128 * 8)      # 8 rows a chunk: 6 chunks
    chunked = qweights.mm(x, m)
    for y in (whole, chunked):
        assert y.dtype == torch.float32 and y.shape == (3, 45)
        assert ((y.double() - want).abs() <= 1e-6 * bound + 1e-30).all()
    assert torch.equal(whole, chunked)            # each output column is the same dot either way
    # bfloat16 activations (the fast prefill path): the values rounded to bf16, a bf16 result
    yb = qweights.mm(x.to(torch.bfloat16), m)
    wantb = x.to(torch.bfloat16).double() @ ref.to(torch.bfloat16).double().T
    assert yb.dtype == torch.bfloat16
    assert ((yb.double() - wantb).abs() <= 2 ** -8 * wantb.abs() + 1e-6 * bound + 1e-30).all()
    with pytest.raises(ValueError, match="features"):
        qweights.mm(torch.zeros(1, 96), m)


@pytest.mark.parametrize("form", ["blocks", "gather"])
@pytest.mark.parametrize("prologue,residual", [("none", False), ("rms", True), ("silu", True),
                                                ("gelu_tanh", False)])
def test_gemv_over_q8_rows_matches_float64(prologue, residual, form, monkeypatch):
    """The decode step's gemv reading Q8_0 rows in place, in both forms of the sum: float32
    maths over the exact values, so within float32 summation error of a float64 product (no
    rounding to a narrow dtype)."""
    monkeypatch.setenv("KVBENCH_GEMV_Q8_FORM", form)
    monkeypatch.setenv("KVBENCH_GEMV_BLOCK_N", "4")
    monkeypatch.setenv("KVBENCH_GEMV_BLOCK_K", "64")
    N, K = 37, 160                                   # ragged tiles at both ends; 5 blocks a row
    raw, ref, _ = ggml_matrix(N + 5, K, seed=3)
    w = qweights.from_ggml(raw)[3:3 + N].to(DEV)     # a row view: a fused buffer's part
    ref = ref[3:3 + N].double()
    gen = torch.Generator().manual_seed(4)
    kx = 2 * K if prologue in ("silu", "gelu_tanh") else K
    x = (torch.randn(1, kx, generator=gen) * 2).to(DEV)
    g = (torch.rand(K, generator=gen) + 0.5).to(DEV) if prologue == "rms" else None
    r = torch.randn(1, N, generator=gen).to(DEV) if residual else None
    got = gemv(x, w, prologue, g=g, eps=1e-5, residual=r)
    tref = gemv_ref(x, w, prologue, g=g, eps=1e-5, residual=r)
    xd = x.double().cpu().reshape(-1)
    if prologue == "rms":
        xd = xd * torch.rsqrt(xd.pow(2).mean() + 1e-5) * g.double().cpu()
    elif prologue != "none":
        gate, up = xd.chunk(2)
        act = torch.nn.functional.silu if prologue == "silu" else \
            (lambda v: torch.nn.functional.gelu(v, approximate="tanh"))
        xd = act(gate) * up
    want = ref @ xd + (0 if r is None else r.double().cpu().reshape(-1))
    tol = 2e-6 * (ref.abs() @ xd.abs()) + (0 if r is None else 2e-7 * want.abs()) + 1e-30
    for name, y in (("kernel", got), ("torch reference", tref)):
        err = (y.double().cpu().reshape(-1) - want).abs()
        assert (err <= tol).all(), f"{name}: worst {(err - tol).max().item():.3e} over the bound"


def test_gemv_q8_blocks_form_needs_whole_blocks_a_step(monkeypatch):
    raw, _, _ = ggml_matrix(8, 64, seed=5)
    w = qweights.from_ggml(raw).to(DEV)
    monkeypatch.setenv("KVBENCH_GEMV_BLOCK_K", "16")
    with pytest.raises(ConfigError, match="KVBENCH_GEMV_BLOCK_K=16 is below a Q8_0 block"):
        gemv(torch.ones(1, 64, device=DEV), w)
    monkeypatch.setenv("KVBENCH_GEMV_Q8_FORM", "gather")        # the gather form takes any tile
    assert torch.allclose(gemv(torch.ones(1, 64, device=DEV), w), gemv_ref(torch.ones(1, 64, device=DEV), w))


def test_engine_q8_0_keeps_the_files_q8_0_bytes_and_quantizes_a_float_file():
    """A Q8_0 file's matrices are its bytes; a float32 file's are gguf.quants' Q8_0 of its values."""
    for name, qtype in (("tiny-llama-q8_0", QT.Q8_0), ("tiny-llama", QT.F32)):
        path = synth.ensure(name)
        g = open_gguf(path)
        eng = engine.load(path, weight_format="q8_0", ctx=64)
        assert eng.plan.weight_format == "q8_0" and g.qtype("blk.1.attn_output.weight") == qtype
        wo = eng.model.layers[1].wo
        assert wo.dtype == torch.int8
        stored = np.asarray(g.tensors["blk.1.attn_output.weight"].data)
        want = stored.view(np.uint8).reshape(wo.shape[0], -1) if qtype == QT.Q8_0 else \
            quants.quantize(stored.reshape(wo.shape[0], -1).astype(np.float32), QT.Q8_0)
        assert torch.equal(qweights.to_ggml(wo), torch.from_numpy(np.ascontiguousarray(want)))
        assert eng.model.embed.dtype == torch.int8 and eng.model.layers[0].attn_norm.dtype == torch.float32
        assert all(r.diff == 0 for r in eng.ledger.compare(eng.plan)), eng.ledger.compare(eng.plan)


@pytest.mark.slow(seconds=10)
def test_moe_router_stays_float32_and_plan_equals_ledger():
    """coder30b-mini-synth (Q8_0 attention, F32 router, Q4_0 experts): q8_0 weights keep its
    attention as the file's Q8_0 and its router float32, so every logit equals the f32-weights
    engine's (the same values, the same float32 products), and the planner prices both."""
    path = synth.ensure("coder30b-mini-synth")
    a = engine.load(path, weight_format="f32", expert_format="blocks", ctx=64)
    b = engine.load(path, weight_format="q8_0", expert_format="blocks", ctx=64)
    lw = b.model.layers[0]
    assert lw.wo.dtype == torch.int8 and lw.router.dtype == torch.float32
    assert all(r.diff == 0 for r in b.ledger.compare(b.plan))
    toks = list(range(3, 40))
    la, lb = a.logits(toks), b.logits(toks)
    assert torch.allclose(la, lb, rtol=0, atol=1e-5), (la - lb).abs().max()
    s = b.spec                       # the attention matrices shrink from 4 to 34/32 bytes a value
    m = s.d_model * (2 * s.q_dim + 2 * s.kv_dim)
    assert a.plan.layer_weight_bytes[0] - b.plan.layer_weight_bytes[0] == m * 4 - m * 34 // 32


def test_q8_0_weights_refusals():
    with pytest.raises(ConfigError, match="pass expert_format='blocks'"):
        engine.load(synth.ensure("tiny-qwen3moe-q8_0"), weight_format="q8_0", ctx=32)
    from dataclasses import replace
    from engine.planner import plan
    spec = engine.ModelSpec.from_gguf(open_gguf(synth.ensure("tiny-llama")))
    with pytest.raises(ConfigError, match="d_ff=100 values are not whole 32-value blocks"):
        plan(replace(spec, d_ff=100), weight_format="q8_0")
    moe = engine.ModelSpec.from_gguf(open_gguf(synth.ensure("coder30b-mini-synth")))
    with pytest.raises(ConfigError, match="pass expert_format='blocks'"):
        plan(moe, weight_format="q8_0")
    assert plan(moe, weight_format="q8_0", expert_blocks="q4_0").weight_format == "q8_0"


def test_harness_refuses_q8_0_on_moe_without_blocks_before_writing(tmp_path, capsys):
    """The suite's preflight plans every engine: the refusal is one line, exit 2, nothing written."""
    from harness import cli
    out = tmp_path / "run"
    rc = cli.main(["run", "suites/kv_dtype.toml", "--model", "coder30b-mini-synth", "--weight-format", "q8_0",
                   "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "expert_format='blocks'" in err[0], err
    assert not out.exists() or not any(out.iterdir())


def test_engine_cli_q8_0_on_moe_without_blocks_is_one_line(capsys):
    from engine import cli
    rc = cli.main(["generate", "coder30b-mini-synth", "hi", "--ctx", "64", "--weight-format", "q8_0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--expert-format blocks" in err[0], err


@pytest.fixture
def triton_backend():
    from engine import kernels
    prev = kernels.set_backend("triton")
    yield
    kernels.set_backend(prev)


@pytest.mark.slow(seconds=40)
def test_static_step_with_fused_gemv_over_q8_0_matches_unfused(triton_backend, monkeypatch, tmp_path):
    """tiny-llama-q8_0 widened to d_model 128 at q8_0 weights: the static step with the gemv
    kernel reading Q8_0 rows (norm + q/k/v, output + residual, norm + gate/up, SwiGLU + down +
    residual, and the head) against it off (compiled torch maths over ``qweights.mm``). Both
    float32 over the same values: only summation order differs. The width makes q, k, v, gate
    and up whole 512-byte allocator blocks at 136 bytes a Q8_0 row, so CUDA fuses them as the
    CPU does (at d_model 64 it declines: ``engine.hybrid.fuse_qkv``)."""
    import dataclasses
    from engine.hybrid import fuse_gate_up, fuse_qkv
    cfg = dataclasses.replace(synth.config("tiny-llama-q8_0"), name="tiny-llama-q8_0-d128", d_model=128,
                              head_dim=32, d_ff=128)
    path = synth.write(cfg, tmp_path / "tiny-llama-q8_0-d128.gguf")
    eng = engine.load(path, kv_dtype="fp32", ctx=40, weight_format="q8_0", device=DEV)
    assert fuse_qkv(eng.spec, torch.int8, torch.device(DEV)) and fuse_gate_up(eng.spec, torch.int8, torch.device(DEV))
    assert eng.model.layers[0].wqkv is not None and eng.model.layers[0].wqkv.dtype == torch.int8
    assert eng.model.fused_gemv_layers(DEV) == [True] * eng.spec.n_layers
    from test_gemv import fused_gemv_off_and_on
    off, on = fused_gemv_off_and_on(eng, monkeypatch)
    err = (on - off).abs().max().item()
    print(f"tiny-llama q8_0 weights: fused gemv vs off, logits max-abs {err:.3e}")
    assert err <= 1e-4 * off.abs().max().item()


def test_weights_taken_over_at_q8_0_keep_their_bytes():
    """``weights_from`` at q8_0 (the benchmarks' next KV dtype): the int8 matrices move over as
    they are, plan == ledger holds, and the new engine's logits equal a fresh load's."""
    path = synth.ensure("tiny-llama-q8_0")
    first = engine.load(path, weight_format="q8_0", ctx=64)
    wo = first.model.layers[0].wo
    assert wo.dtype == torch.int8
    second = engine.load(path, weight_format="q8_0", ctx=64, kv_dtype="bf16", weights_from=first)
    assert second.model.layers[0].wo is wo and first.model is None
    assert all(r.diff == 0 for r in second.ledger.compare(second.plan))
    toks = list(range(3, 30))
    fresh = engine.load(path, weight_format="q8_0", ctx=64, kv_dtype="bf16")
    assert torch.equal(second.logits(toks), fresh.logits(toks))
