"""engine.kernels.gemv (the decode step's fused matrix-vector products) against its torch
reference and a float64 oracle written here (TRITON_INTERPRET=1 on CPU; compiled on CUDA).

The oracle computes the prologue in float64, rounds the product's input to the weight dtype as
``engine.model.mm`` does, sums in float64, rounds the output to the weight dtype: the kernel
must land within one rounding of it (its float32 sums differ from float64's only far below a
bf16 ulp, so a value at a rounding boundary can go either way, nothing more)."""
from __future__ import annotations

import math
import os

if not __import__("torch").cuda.is_available():          # before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from engine.kernels.gemv import gemv, gemv_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def oracle(x, w, prologue, g, eps, residual):
    xd = x.double().reshape(-1)
    if prologue == "rms":
        xd = xd * torch.rsqrt(xd.pow(2).mean() + eps) * g.double()
    elif prologue in ("silu", "gelu_tanh"):
        gate, up = xd.chunk(2)
        if prologue == "silu":
            gate = gate * torch.sigmoid(gate)
        else:
            gate = 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate ** 3)))
        xd = gate * up
    if w.dtype != torch.float32:
        xd = xd.to(w.dtype).double()
    y = w.double() @ xd
    bound = w.double().abs() @ xd.abs()                   # scale of each dot's summation error
    if w.dtype != torch.float32:
        y = y.to(w.dtype).double()
    if residual is not None:
        y = y + residual.double().reshape(-1)
    return y, bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prologue,residual", [("none", False), ("none", True), ("rms", False),
                                                ("silu", True), ("gelu_tanh", True), ("silu", False)])
@pytest.mark.parametrize("N,K,tiles", [(37, 200, "small"), (96, 64, "default")])
def test_gemv_matches_oracle_and_reference(dtype, prologue, residual, N, K, tiles, monkeypatch):
    if tiles == "small":       # many programs and several K steps, ragged at both ends
        monkeypatch.setenv("KVBENCH_GEMV_BLOCK_N", "4")
        monkeypatch.setenv("KVBENCH_GEMV_BLOCK_K", "64")
    gen = torch.Generator().manual_seed(N * K)
    kx = 2 * K if prologue in ("silu", "gelu_tanh") else K
    # w as a row view of a wider buffer (a fused qkv / gate-up view): row stride != K
    buf = torch.randn(N + 5, K, generator=gen).to(dtype)
    w = buf[3:3 + N]
    x = (torch.randn(1, kx, generator=gen) * 2).to(DEV)
    g = (torch.rand(K, generator=gen) + 0.5).to(DEV) if prologue == "rms" else None
    r = torch.randn(1, N, generator=gen).to(DEV) if residual else None
    w = w.to(DEV)
    eps = 1e-5
    got = gemv(x, w, prologue, g=g, eps=eps, residual=r)
    ref = gemv_ref(x, w, prologue, g=g, eps=eps, residual=r)
    want, bound = oracle(x.cpu(), w.cpu(), prologue, None if g is None else g.cpu(), eps,
                         None if r is None else r.cpu())
    assert got.shape == ref.shape == (1, N) and got.dtype == torch.float32
    # one rounding of the output (at the weight dtype) plus float32 summation error
    sum_err = 1e-6 * bound + 1e-30
    rounding = ULP[dtype] * (want - (0 if r is None else r.double().cpu().reshape(-1))).abs()
    tol = rounding + sum_err + (ULP[torch.float32] * want.abs() if r is not None else 0)
    for name, y in (("kernel", got), ("torch reference", ref)):
        err = (y.double().cpu().reshape(-1) - want).abs()
        assert (err <= tol * 1.01 + 1e-12).all(), \
            f"{name} vs oracle ({prologue}, {dtype}): worst {(err - tol).max().item():.3e} over the bound"
    # the kernel and the reference: same maths, so nearly every output is bit-identical after
    # rounding at narrow dtypes; a few may sit one ulp apart at a rounding boundary
    same = (got.cpu() == ref.cpu()).float().mean().item()
    if dtype != torch.float32:
        assert same >= 0.9, f"only {same:.0%} of outputs equal the torch reference"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_norm_out_is_the_normed_input(dtype, monkeypatch):
    """``norm_out``: the rms prologue's normed input written once beside the product (a MoE
    layer's expert input), equal to a float64 rms_norm to float32 rounding, and the product
    itself bit-equal to the launch without it."""
    monkeypatch.setenv("KVBENCH_GEMV_BLOCK_N", "4")
    monkeypatch.setenv("KVBENCH_GEMV_BLOCK_K", "64")
    gen = torch.Generator().manual_seed(3)
    N, K, eps = 24, 200, 1e-6
    w = torch.randn(N, K, generator=gen).to(dtype).to(DEV)
    x = (torch.randn(1, K, generator=gen) * 3).to(DEV)
    g = (torch.rand(K, generator=gen) + 0.5).to(DEV)
    h = torch.full((1, K), float("nan"), device=DEV)
    y = gemv(x, w, "rms", g=g, eps=eps, norm_out=h)
    xd = x.double().cpu().reshape(-1)
    want = xd * torch.rsqrt(xd.pow(2).mean() + eps) * g.double().cpu()
    assert torch.isfinite(h).all()
    assert ((h.double().cpu().reshape(-1) - want).abs() <= 4 * ULP[torch.float32] * want.abs() + 1e-30).all()
    assert torch.equal(y, gemv(x, w, "rms", g=g, eps=eps))
    with pytest.raises(ValueError, match="norm_out"):
        gemv(x, w, "none", norm_out=h)
    with pytest.raises(ValueError, match="norm_out"):
        gemv(x, w, "rms", g=g, norm_out=torch.zeros(1, K - 1, device=DEV))


def test_gemv_rejects_bad_shapes():
    w = torch.zeros(8, 16)
    with pytest.raises(ValueError, match="prologue"):
        gemv(torch.zeros(1, 16), w, "relu")
    with pytest.raises(ValueError, match="32 values"):
        gemv(torch.zeros(1, 16), w, "silu")
    with pytest.raises(ValueError, match="needs g"):
        gemv(torch.zeros(1, 16), w, "rms")
    with pytest.raises(ValueError, match="rows contiguous"):
        gemv(torch.zeros(1, 8), w.T, "none")
    with pytest.raises(ValueError, match="residual"):
        gemv(torch.zeros(1, 16), w, residual=torch.zeros(1, 9))


@pytest.fixture
def triton_backend():
    from engine import kernels
    prev = kernels.set_backend("triton")
    yield
    kernels.set_backend(prev)


def fused_gemv_off_and_on(eng, monkeypatch, prompt=(5, 17, 3, 99, 42, 7, 11, 64)):
    """Logits of two static decode steps after the same prefill (prefilled through the torch
    backend), with KVBENCH_DECODE_FUSED_GEMV off and on; asserts each setting was applied."""
    from engine import kernels
    prompt = list(prompt)
    runs = {}
    for on in (False, True):
        monkeypatch.setenv("KVBENCH_DECODE_FUSED_GEMV", "1" if on else "0")
        eng.set_decode_mode("static")
        prev = kernels.set_backend("torch")
        try:
            eng.prefill(prompt)
        finally:
            kernels.set_backend(prev)
        runs[on] = torch.stack([eng.decode(prompt[-1] + i) for i in range(2)])
        assert eng._static.fused_gemv == on
    return runs[False], runs[True]


@pytest.mark.slow(seconds=40)
def test_static_step_with_fused_gemv_matches_unfused_on_bf16_weights(triton_backend, monkeypatch):
    """tiny-llama with bf16 weights: the static decode step with KVBENCH_DECODE_FUSED_GEMV on
    (norm + q/k/v, output projection + residual, norm + gate/up, SwiGLU + down + residual: four
    gemv launches per layer) against it off (the compiled torch maths and mm). The same
    roundings, so the logits differ only where a float32 sum lands on the other side of a
    bf16 rounding: a small fraction of the logits' spread. The applied flag says it ran."""
    import engine
    from engine import synth
    eng = engine.load(synth.ensure("tiny-llama"), kv_dtype="fp32", ctx=40, weight_format="bf16", device=DEV)
    assert eng.model.layers[0].wqkv.dtype == torch.bfloat16
    off, on = fused_gemv_off_and_on(eng, monkeypatch)
    err = (on - off).abs().max().item()
    spread = off.std().item()
    print(f"tiny-llama bf16 weights: fused gemv vs off, logits max-abs {err:.3e} (logit std {spread:.3f})")
    assert 0 <= err <= 0.05 * spread


def test_gemv_tiles_must_be_powers_of_two(monkeypatch):
    from engine.errors import ConfigError
    from engine.kernels.gemv import block_k, block_n
    monkeypatch.setenv("KVBENCH_GEMV_BLOCK_N", "6")
    with pytest.raises(ConfigError, match="KVBENCH_GEMV_BLOCK_N=6 is not a power of two"):
        block_n(64)
    monkeypatch.setenv("KVBENCH_GEMV_BLOCK_N", "8")
    monkeypatch.setenv("KVBENCH_GEMV_BLOCK_K", "48")
    assert block_n(64) == 8
    with pytest.raises(ConfigError, match="KVBENCH_GEMV_BLOCK_K=48"):
        block_k(64)
