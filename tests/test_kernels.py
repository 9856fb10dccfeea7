"""Triton kernels vs their torch references (TRITON_INTERPRET=1 on CPU; full shapes on CUDA).

Each kernel file has a torch ``*_ref``; these tests hold the kernel against it on ragged
lengths, GQA ratios 1/3/8, head_dim 64 and 128 and every KV dtype, and hold the references
against a plain float64 softmax(QK^T)V oracle written here.
"""
from __future__ import annotations

import os

if not __import__("torch").cuda.is_available():          # before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from engine import kernels
from engine.kv import KV_DTYPES, LayerKV, dequantize_q8_0, quantize_q8_0
from engine.kv_layout import alloc_kv, to_ggml_bytes
from engine.kernels.decode_attention import decode_attention, decode_attention_ref, decode_bytes_read
from engine.kernels.kv_append import kv_append, kv_append_ref
from engine.kernels.prefill_attention import CONFIG as PREFILL_CONFIG
from engine.kernels.prefill_attention import plan_waves, prefill_attention, prefill_attention_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {"fp32": 2e-5, "bf16": 2e-5, "q8_0": 2e-5}     # kernel vs ref on the same cached values


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float) -> None:
    """Max-abs and RMS-relative error of ``out`` against ``ref``; both must be <= tol."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    d = (out.double() - ref.double())
    max_abs = d.abs().max().item()
    rms_rel = (d.norm() / ref.double().norm().clamp_min(1e-30)).item()
    print(f"{name}: max-abs {max_abs:.3e}, rms-rel {rms_rel:.3e}")
    assert max_abs <= tol and rms_rel <= tol, f"{name}: max-abs {max_abs:.3e}, rms-rel {rms_rel:.3e} > {tol}"


def dequant(cache: LayerKV) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cache holds as float32; q8_0 decoded from its ggml block view (the oracle's input)."""
    shape = (cache.max_tokens, cache.n_kv_heads, cache.head_dim)
    if cache.dtype == "q8_0":
        return tuple(dequantize_q8_0(b, shape) for b in cache.to_ggml_blocks())
    return cache.k.float(), cache.v.float()


def oracle(q, k, v, start, scale):
    """float64 causal softmax(q k^T) v with GQA, q at positions start.., keys [0, start+T)."""
    T, Hq, D = q.shape
    n = start + T
    g = Hq // k.shape[1]
    k = k[:n].double().repeat_interleave(g, 1)
    v = v[:n].double().repeat_interleave(g, 1)
    s = torch.einsum("thd,nhd->htn", q.double(), k) * scale
    s = s.masked_fill(torch.arange(n)[None, :].to(q.device) > torch.arange(start, n, device=q.device)[:, None],
                      float("-inf"))
    return torch.einsum("htn,nhd->thd", s.softmax(-1), v).float()


def filled(fmt, hkv, d, n, seed, cap=None):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    cache = LayerKV(0, hkv, d, cap or n, fmt, device=DEV)
    prev = kernels.set_backend("torch")
    try:
        cache.write(0, torch.randn(n, hkv, d, device=DEV, generator=gen),
                    torch.randn(n, hkv, d, device=DEV, generator=gen) * 2)
    finally:
        kernels.set_backend(prev)
    return cache, gen


@pytest.fixture
def triton_backend():
    prev = kernels.set_backend("triton")
    yield
    kernels.set_backend(prev)


SHAPES = [  # (T or n_keys, Hq, Hkv, D): ragged lengths, GQA 1 / 3 / 8, head_dim 64 and 128
    (37, 9, 3, 64), (100, 8, 1, 128), (77, 4, 4, 64), (70, 16, 2, 128),
]
CASES = [pytest.param(*s, f, id=f"T{s[0]}-Hq{s[1]}-Hkv{s[2]}-D{s[3]}-{f}") for s in SHAPES for f in KV_DTYPES]


@pytest.mark.parametrize("T,Hq,Hkv,D,fmt", CASES)
def test_kv_append_kernel_matches_ref(T, Hq, Hkv, D, fmt, triton_backend):
    cache, gen = filled(fmt, Hkv, D, 8, seed=T)
    x = torch.randn(T, Hkv, D, device=DEV, generator=gen) * torch.logspace(-3, 3, T, device=DEV)[:, None, None]
    ref, out = (alloc_kv(T + 5, Hkv, D, fmt, DEV) for _ in range(2))
    kv_append_ref(ref, 3, x, fmt)
    kv_append(out, 3, x, fmt)
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8)), f"{fmt}: kernel bytes differ from the reference"
    if fmt == "q8_0":                 # and the rows hold ggml's block bytes (gguf: test_kv.py)
        assert torch.equal(to_ggml_bytes(out, fmt, Hkv, D)[3:3 + T].cpu(), quantize_q8_0(x.reshape(T, -1).cpu()))


@pytest.mark.parametrize("T,Hq,Hkv,D,fmt", CASES)
def test_decode_kernel_matches_ref(T, Hq, Hkv, D, fmt, triton_backend):
    cache, gen = filled(fmt, Hkv, D, T, seed=T + 1)
    q = torch.randn(Hq, D, device=DEV, generator=gen)
    scale = D ** -0.5
    ref = decode_attention_ref(q, cache.k, cache.v, fmt, T, scale, Hkv)
    k, v = dequant(cache)
    assert_close(f"ref-vs-oracle decode {fmt}", oracle(q[None], k, v, T - 1, scale)[0], ref, 1e-5)
    for cfg in ({"block_n": 16}, {"block_n": 32, "q8_kernel": False},    # several splits, every q8_0 path
                {"block_n": 16, "q8_impl": "batched"}, {"block_n": 16, "q8_impl": "blocks"},
                {"block_n": 16, "q8_words": "kv"}, {"block_n": 16, "bf16_stack": True},
                {"block_n": 32, "bf16_stack": True, "fuse_combine": True, "num_warps": 4},
                # q8_0's streams forms and the rows kernel's stacked terms (other formats would run
                # the generic kernel again)
                *([{"block_n": 16, "q8_impl": "streams"}, {"block_n": 16, "q8_impl": "streams2"},
                   {"block_n": 16, "q8_stack": True}, {"block_n": 32, "q8_stack": True, "fuse_combine": True}]
                  if fmt == "q8_0" else [])):
        out = decode_attention(q, cache.k, cache.v, fmt, T, scale, Hkv, cfg=cfg)
        assert_close(f"decode {fmt} {cfg}", ref, out, TOL[fmt])


@pytest.mark.parametrize("fmt", KV_DTYPES)
def test_decode_pdl_launch(fmt, triton_backend, monkeypatch):
    """Programmatic dependent launch (``pdl``, ``KVBENCH_DECODE_PDL``): compiled, the split kernel
    and the combine wait for the kernel before them, so the result equals the reference, eagerly
    and replayed from a captured graph after the cache and position changed under it; every
    launch records it. Asked by name, it refuses interpreted (no griddepcontrol) or with the fused
    combine; KVBENCH_STEP_PDL's default (auto) applies it only where the launch can take it."""
    from engine.kernels import decode_attention as da
    Hq, Hkv, D, n = 16, 4, 128, 300
    cache, gen = filled(fmt, Hkv, D, n, seed=7, cap=512)
    q = torch.randn(Hq, D, device=DEV, generator=gen)
    if DEV == "cpu":
        with da.recording() as log:     # KVBENCH_STEP_PDL's default (auto) does not apply it here
            decode_attention(q, cache.k, cache.v, fmt, n, D ** -0.5, Hkv)
        assert [x["pdl"] for x in log] == [False]
        monkeypatch.setenv("KVBENCH_DECODE_PDL", "1")
        with pytest.raises(ValueError, match="pdl.*interpreter"):
            decode_attention(q, cache.k, cache.v, fmt, n, D ** -0.5, Hkv)
        return
    with pytest.raises(ValueError, match="pdl.*fused combine"):
        decode_attention(q, cache.k, cache.v, fmt, n, D ** -0.5, Hkv, cfg={"pdl": True, "fuse_combine": True})
    monkeypatch.setenv("KVBENCH_STEP_PDL", "auto")      # the default: applied where the launch can take it
    with da.recording() as log:
        decode_attention(q, cache.k, cache.v, fmt, n, D ** -0.5, Hkv, cfg={"fuse_combine": True})
        decode_attention(q, cache.k, cache.v, fmt, n, D ** -0.5, Hkv)
    assert [x["pdl"] for x in log] == [False, torch.cuda.get_device_capability() >= (9, 0)]
    monkeypatch.delenv("KVBENCH_STEP_PDL")
    with da.recording() as log:
        out = decode_attention(q, cache.k, cache.v, fmt, n, D ** -0.5, Hkv, cfg={"pdl": True})
    assert [x["pdl"] for x in log] == [True]
    assert_close(f"decode {fmt} pdl", decode_attention_ref(q, cache.k, cache.v, fmt, n, D ** -0.5, Hkv), out, TOL[fmt])
    pos = torch.tensor([n - 1], dtype=torch.int32, device=DEV)
    qs = q.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):   # q scaled by a kernel inside the graph: the split kernel must wait for it
        qs.mul_(1.0)
        got = decode_attention(qs, cache.k, cache.v, fmt, None, D ** -0.5, Hkv, pos=pos, cfg={"pdl": True})
    q2 = torch.randn(Hq, D, device=DEV, generator=gen)
    qs.copy_(q2)
    pos.fill_(n - 50)
    g.replay()
    torch.cuda.synchronize()
    ref = decode_attention_ref(q2, cache.k, cache.v, fmt, n - 49, D ** -0.5, Hkv)
    assert_close(f"decode {fmt} pdl, graph replay", ref, got, TOL[fmt])


@pytest.mark.parametrize("Hq,Hkv", [(32, 8), (32, 4), (8, 8), (6, 3)])
def test_bf16_stacked_decode_is_the_three_dot_form(Hq, Hkv, triton_backend, monkeypatch):
    """bf16 K and V with the three bf16 terms of q and p stacked along one operand's rows (G = 4,
    8, 1 and 2 query heads a KV head: 16, 32, 16 and 16 rows): the float64 oracle's result as the
    three-dot form gives it, at a host position and a device one (most splits empty). The launch
    records the kernel it ran: "auto" (the default) stacks where the operand is 16 rows, "1"
    (setting) or True (cfg) everywhere, "0" / False never; asked on with a window, it refuses, and
    "auto" with a window takes the windowed kernel."""
    from engine.kernels import decode_attention as da
    monkeypatch.delenv("KVBENCH_DECODE_BF16_STACK", raising=False)
    D, n = 128, 300
    cache, gen = filled("bf16", Hkv, D, n, seed=Hq + Hkv, cap=512)
    q = torch.randn(Hq, D, device=DEV, generator=gen) * 3
    k, v = dequant(cache)
    want = oracle(q[None], k, v, n - 1, D ** -0.5)[0]
    pos = torch.tensor([n - 1], dtype=torch.int32, device=DEV)
    G = Hq // Hkv
    rows = max(16, 4 * (1 << (G - 1).bit_length()))
    with da.recording() as log:
        three = decode_attention(q, cache.k, cache.v, "bf16", n, D ** -0.5, Hkv, cfg={"bf16_stack": False})
        stacked = decode_attention(q, cache.k, cache.v, "bf16", n, D ** -0.5, Hkv, cfg={"bf16_stack": True})
        auto = decode_attention(q, cache.k, cache.v, "bf16", n, D ** -0.5, Hkv)
        monkeypatch.setenv("KVBENCH_DECODE_BF16_STACK", "1")
        at = decode_attention(q, cache.k, cache.v, "bf16", None, D ** -0.5, Hkv, pos=pos)
        monkeypatch.setenv("KVBENCH_DECODE_BF16_STACK", "0")
        decode_attention(q, cache.k, cache.v, "bf16", n, D ** -0.5, Hkv)
    S, T = "_decode_bf16_stacked_kernel", "_decode_split_kernel"
    assert [x["kernel"] for x in log] == [T, S, S if rows == 16 else T, S, T]
    assert log[1]["rows"] == rows and da.bf16_stack_rows(G) == rows
    for name, out in (("three dots", three), ("stacked", stacked), ("auto", auto),
                      ("stacked at a device position", at)):
        assert_close(f"bf16 {name} vs float64", want, out, TOL["bf16"])
    monkeypatch.setenv("KVBENCH_DECODE_BF16_STACK", "1")
    with pytest.raises(ValueError, match="bf16_stack"):
        decode_attention(q, cache.k, cache.v, "bf16", n, D ** -0.5, Hkv, window=64)
    monkeypatch.delenv("KVBENCH_DECODE_BF16_STACK")
    with da.recording() as log:
        decode_attention(q, cache.k, cache.v, "bf16", n, D ** -0.5, Hkv, window=64)
    assert [x["kernel"] for x in log] == [T]
    with pytest.raises(ValueError, match="bf16_stack"):
        decode_attention(q, cache.k, cache.v, "bf16", n, D ** -0.5, Hkv, cfg={"bf16_stack": "yes"})


@pytest.mark.parametrize("dev_pos,window,n_keys,per,n_used", [(False, 0, 20, 8, 3), (True, 0, 20, 8, 3),
                                                               (False, 8, 20, 8, 1), (True, 12, 20, 8, 2),
                                                               (True, 0, 1, 8, 1), (False, 0, 80, 8, 10)])
def test_decode_combine_reads_only_the_splits_holding_keys(dev_pos, window, n_keys, per, n_used, triton_backend):
    """The combine takes splits [0, ceil(keys / per)) only (keys: n_keys, or the window's), the
    position read on the device when the launch is a CUDA graph's: the splits past them are
    NaN here and must not reach the output, which equals a float64 combine of the used ones."""
    from engine.kernels.decode_attention import _decode_combine_kernel
    Hq, S, D = 3, 10, 16
    gen = torch.Generator().manual_seed(n_keys + window)
    m = torch.randn(Hq, S, generator=gen) * 4
    l = torch.rand(Hq, S, generator=gen) + 0.5
    acc = torch.randn(Hq, S, D, generator=gen)
    want_m, want_l, want_acc = m[:, :n_used].double(), l[:, :n_used].double(), acc[:, :n_used].double()
    m[:, n_used:], l[:, n_used:], acc[:, n_used:] = float("nan"), float("nan"), float("nan")
    w = torch.exp2(want_m - want_m.amax(1, keepdim=True))
    want = (w[..., None] * want_acc).sum(1) / (w * want_l).sum(1, keepdim=True)
    out = torch.empty(Hq, D, device=DEV)
    pos = torch.tensor([n_keys - 1], dtype=torch.int32, device=DEV)
    _decode_combine_kernel[(Hq,)](m.to(DEV), l.to(DEV), acc.to(DEV), out, pos, 1 if dev_pos else n_keys, per, S,
                                  D=D, S_PAD=16, BLOCK_S=4, DEV_POS=dev_pos, WINDOW=window, num_warps=4)
    got = out.cpu().double()
    assert torch.isfinite(got).all(), "a split past the keys reached the output"
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("block", ["2", "32"])
def test_decode_combine_block_setting(block, triton_backend, monkeypatch):
    """KVBENCH_DECODE_COMBINE_BLOCK (splits per step of the combine's loop: many steps here, where
    the default 128 reads them all in one) changes nothing but speed: the reference's result."""
    monkeypatch.setenv("KVBENCH_DECODE_COMBINE_BLOCK", block)
    cache, gen = filled("bf16", 2, 64, 300, seed=3)
    q = torch.randn(6, 64, device=DEV, generator=gen)
    ref = decode_attention_ref(q, cache.k, cache.v, "bf16", 201, 0.125, 2)
    out = decode_attention(q, cache.k, cache.v, "bf16", None, 0.125, 2, cfg={"block_n": 16},
                           pos=torch.tensor([200], device=DEV))
    assert_close(f"combine block {block}", ref, out, TOL["bf16"])


@pytest.mark.parametrize("fmt", KV_DTYPES)
def test_decode_at_a_short_depth_in_a_long_buffer(fmt, triton_backend):
    """The captured step's launch: position 20 held on the device, splits over a 512-row buffer
    (most of them empty): the reference's result at 21 keys."""
    Hq, Hkv, D, n = 6, 2, 64, 21
    cache, gen = filled(fmt, Hkv, D, 512, seed=5)
    q = torch.randn(Hq, D, device=DEV, generator=gen)
    ref = decode_attention_ref(q, cache.k, cache.v, fmt, n, D ** -0.5, Hkv)
    pos = torch.tensor([n - 1], dtype=torch.int32, device=DEV)
    for cfg in ({"block_n": 16}, {"block_n": 16, "q8_kernel": False}):
        out = decode_attention(q, cache.k, cache.v, fmt, None, D ** -0.5, Hkv, cfg=cfg, pos=pos)
        assert_close(f"decode {fmt} at 21 of 512 {cfg}", ref, out, TOL[fmt])


def q8_magnitude_instance(D: int) -> dict:
    """The magnitude test's instance (also benchmarks/oneoff/q8_rows_map.py's): 8 query heads over
    2 KV heads, 90 keys; q heads 1e-3..1e2, K tokens 1e-3..10, V blocks 1e-2..1e4 (``vmag``, per KV
    head and column), one all-zero V block; the cache written through the append kernel. ``gen``
    continues the instance's generator."""
    Hq, Hkv, n, cap = 8, 2, 90, 200
    gen = torch.Generator(device=DEV).manual_seed(D)
    k = torch.randn(n, Hkv, D, device=DEV, generator=gen) * torch.logspace(-3, 1, n, device=DEV)[:, None, None]
    vmag = torch.logspace(-2, 4, Hkv * D // 32, device=DEV)
    vmag = vmag[torch.randperm(len(vmag), generator=gen, device=DEV)].repeat_interleave(32).view(Hkv, D)
    v = torch.randn(n, Hkv, D, device=DEV, generator=gen) * vmag
    v[7, 0, :32] = 0.0
    cache = LayerKV(0, Hkv, D, cap, "q8_0", device=DEV)
    cache.write(0, k, v)                                   # through the Triton append kernel
    qmag = torch.logspace(-3, 2, Hq, device=DEV)
    q = torch.randn(Hq, D, device=DEV, generator=gen) * qmag[:, None]
    return {"Hq": Hq, "Hkv": Hkv, "n": n, "gen": gen, "cache": cache, "q": q, "qmag": qmag, "vmag": vmag,
            "scale": D ** -0.5}


@pytest.mark.parametrize("D", [64, 128])
def test_q8_decode_kernel_across_magnitudes_and_at_a_device_position(D, triton_backend):
    """q8_0's own decode kernels (split layout; block rows on float16 dots, per-block batched float16 dots): its two-term
    float16 splits keep float32 fidelity whatever the magnitudes (q heads 1e-3..1e2, K tokens
    1e-3..10, V blocks 1e-2..1e4, an all-zero V block), with the combine fused or not, and the
    device-position launch of a CUDA graph (splits over the whole buffer, the empty ones
    weighing nothing) gives the host launch's result."""
    inst = q8_magnitude_instance(D)
    Hq, Hkv, n, gen, cache, q, scale = (inst[x] for x in ("Hq", "Hkv", "n", "gen", "cache", "q", "scale"))
    ref = decode_attention_ref(q, cache.k, cache.v, "q8_0", n, scale, Hkv)
    kd, vd = dequant(cache)
    want = oracle(q[None], kd, vd, n - 1, scale)[0]
    # relative per query head and 32-value block of the output (V's blocks span 10 decades),
    # to the block's sum p |v| (a random-sign sum may cancel far below its terms)
    size = oracle(q[None], kd, vd.abs(), n - 1, scale)[0]
    blk = lambda t: t.reshape(Hq, D // 32, 32).abs().amax(2)
    rel = lambda out: (blk(out - want) / blk(size)).max().item()
    # The instance's sensitivity: how far a 2^-22 relative perturbation of q (the resolution of
    # the kernels' two-term float16 split) moves the float64 result. The softmax amplifies it
    # instance by instance (on the CPU, over 12 seeds at head_dim 128: 1e-7 to 1.2e-5, and the
    # float32 reference's own error reaches 2x it), so a fixed bound alone passes or fails by seed.
    sens = 0.0
    for _ in range(4):
        sign = torch.randint(0, 2, q.shape, generator=gen, device=DEV).double() * 2 - 1
        sens = max(sens, rel(oracle((q.double() * (1 + 2.0 ** -22 * sign))[None], kd, vd, n - 1, scale)[0]))
    bound = max(2e-6, 4 * sens)
    print(f"q8_0 reference: rel {rel(ref):.2e}; sensitivity to 2^-22 in q {sens:.2e}, bound {bound:.2e}")
    assert rel(ref) < max(4e-6, 4 * sens)
    pos = torch.tensor([n - 1], dtype=torch.int32, device=DEV)
    bad = []
    for cfg in ({"block_n": 16}, {"block_n": 32, "fuse_combine": True}, {"block_n": 16, "q8_impl": "batched"},
                {"block_n": 64}, {"block_n": 128, "num_stages": 2}, {"block_n": 16, "q8_impl": "blocks"},
                {"block_n": 64, "q8_impl": "blocks", "fuse_combine": True}, {"block_n": 64, "q8_words": "kv"},
                {"block_n": 16, "q8_words": "k"}, {"block_n": 32, "q8_words": "v", "fuse_combine": True},
                # the V scales' power of two from the split's largest (the default) or each tile's
                {"block_n": 64, "q8_vnorm": "split"}, {"block_n": 16, "q8_vnorm": "split", "fuse_combine": True},
                {"block_n": 64, "q8_vnorm": "tile"}, {"block_n": 16, "q8_vnorm": "tile", "fuse_combine": True},
                # the rows kernel's two float16 terms stacked along one operand's rows
                {"block_n": 64, "q8_stack": True}, {"block_n": 16, "q8_stack": True, "fuse_combine": True},
                # the batched form at the launches the occupancy model bets on (reports/cpu-2026-12-06d)
                {"block_n": 32, "q8_impl": "batched", "num_warps": 2, "num_stages": 2, "programs_per_sm": 6},
                {"block_n": 32, "q8_impl": "batched", "num_warps": 4, "num_stages": 2, "programs_per_sm": 4},
                # float32 FMAs, no tensor cores: R streams a program (R = block_n)
                {"block_n": 32, "q8_impl": "streams", "num_warps": 8}, {"block_n": 16, "q8_impl": "streams2"},
                # PTX: compiled only; on a CUDA device rows by name (the default there is auto: cuda_mma)
                # and the CUDA C++ form (mma.sync dots) at 3, 2 and 4 stages, with its packed terms (G 4 here: auto packs) and without
                *([] if kernels.interpreted() else [{"block_n": 64, "q8_words": "kv_prmt"}]),
                *([{"q8_impl": "rows"}, {"q8_impl": "cuda_mma"}, {"q8_impl": "cuda_mma", "num_stages": 2},
                   {"q8_impl": "cuda_mma", "num_stages": 4}, {"q8_impl": "cuda_mma", "q8_pack": True},
                   {"q8_impl": "cuda_mma", "q8_pack": False},
                   # the warp-softmax form, where it has an entry point (G 4 at head_dim 128 here)
                   *([{"q8_impl": "cuda_mma", "q8_softmax": "warp"},
                      {"q8_impl": "cuda_mma", "q8_softmax": "warp", "q8_pack": False}] if D == 128 else [])]
                  if DEV == "cuda" and not kernels.interpreted() else [])):
        out = decode_attention(q, cache.k, cache.v, "q8_0", n, scale, Hkv, cfg=cfg)
        at = decode_attention(q, cache.k, cache.v, "q8_0", None, scale, Hkv, cfg=cfg, pos=pos)
        print(f"q8_0 kernel {cfg}: rel {rel(out):.2e}, at pos {rel(at):.2e}")
        if not (rel(out) < bound and rel(at) < bound):
            bad.append(f"{cfg}: rel {rel(out):.2e}, at pos {rel(at):.2e}")
    assert not bad, f"q8_0 kernel beyond {bound:.2e} of the float64 oracle: " + "; ".join(bad)


def test_q8_streams_forms_refuse_what_they_cannot_apply(triton_backend):
    """The streams forms compute in float32 with no float16 terms, norms or guards and no fused
    combine, serve up to 8 query heads a KV head, and unpack by PTX permutes only compiled: each
    of those asked of them raises, naming it; what they applied is recorded."""
    from engine.kernels import decode_attention as da
    cache, gen = filled("q8_0", 2, 64, 40, seed=3)
    q = torch.randn(8, 64, device=DEV, generator=gen)
    for impl in ("streams", "streams2"):
        with pytest.raises(ValueError, match="fused combine"):
            decode_attention(q, cache.k, cache.v, "q8_0", 40, 0.125, 2, cfg={"q8_impl": impl, "fuse_combine": True})
        with pytest.raises(ValueError, match="q8_terms"):
            decode_attention(q, cache.k, cache.v, "q8_0", 40, 0.125, 2, cfg={"q8_impl": impl, "q8_terms": (1, 1)})
        with pytest.raises(ValueError, match="up to 8 query heads"):
            decode_attention(torch.randn(18, 64, device=DEV, generator=gen), cache.k, cache.v, "q8_0", 40, 0.125, 1,
                             cfg={"q8_impl": impl})
        with pytest.raises(ValueError, match="q8_unpack 'bytes'"):
            decode_attention(q, cache.k, cache.v, "q8_0", 40, 0.125, 2, cfg={"q8_impl": impl, "q8_unpack": "bytes"})
        if kernels.interpreted():
            with pytest.raises(ValueError, match="q8_unpack 'prmt'"):
                decode_attention(q, cache.k, cache.v, "q8_0", 40, 0.125, 2, cfg={"q8_impl": impl, "q8_unpack": "prmt"})
        with da.recording() as log:
            decode_attention(q, cache.k, cache.v, "q8_0", 40, 0.125, 2, cfg={"q8_impl": impl, "block_n": 8})
        assert log[0]["kernel"] == f"_decode_q8_{impl}_kernel" and log[0]["block_n"] == 8
        assert log[0]["q8_unpack"] == ("magic" if kernels.interpreted() else "prmt")


@pytest.mark.parametrize("vnorm", ["tile", "split"])
def test_q8_decode_with_v_scales_spread_across_keys(vnorm, triton_backend):
    """The rows kernel's power-of-two normalisation of p * dv holds where one block's V scales
    spread over 8 decades from key to key (the case "split" is weakest in: a tile's values sit far
    below the split's largest scale), with keys' weights spread too: within the float64 oracle's
    sensitivity to a 2^-22 perturbation of q, as the magnitude test, per query head and block."""
    Hq, Hkv, D, n = 8, 2, 128, 300
    gen = torch.Generator(device=DEV).manual_seed(17)
    k = torch.randn(n, Hkv, D, device=DEV, generator=gen)
    vmag = torch.logspace(-4, 4, n, device=DEV)[torch.randperm(n, generator=gen, device=DEV)]
    v = torch.randn(n, Hkv, D, device=DEV, generator=gen) * vmag[:, None, None]
    cache = LayerKV(0, Hkv, D, n, "q8_0", device=DEV)
    cache.write(0, k, v)
    q = torch.randn(Hq, D, device=DEV, generator=gen) * torch.logspace(-1, 0.5, Hq, device=DEV)[:, None]
    kd, vd = dequant(cache)
    want = oracle(q[None], kd, vd, n - 1, D ** -0.5)[0]
    size = oracle(q[None], kd, vd.abs(), n - 1, D ** -0.5)[0]
    blk = lambda t: t.reshape(Hq, D // 32, 32).abs().amax(2)
    rel = lambda out: (blk(out - want) / blk(size)).max().item()
    sens = 0.0
    for _ in range(4):
        sign = torch.randint(0, 2, q.shape, generator=gen, device=DEV).double() * 2 - 1
        sens = max(sens, rel(oracle((q.double() * (1 + 2.0 ** -22 * sign))[None], kd, vd, n - 1, D ** -0.5)[0]))
    bound = max(2e-6, 4 * sens)
    for cfg in ({"block_n": 16}, {"block_n": 64}, *([{"block_n": 64, "q8_stack": True}] if vnorm == "split" else [])):
        out = decode_attention(q, cache.k, cache.v, "q8_0", n, D ** -0.5, Hkv, cfg={**cfg, "q8_vnorm": vnorm})
        print(f"q8_0 vnorm {vnorm} {cfg}: rel {rel(out):.2e} (bound {bound:.2e})")
        assert rel(out) < bound, f"vnorm {vnorm} {cfg}: rel {rel(out):.2e} beyond {bound:.2e}"


@pytest.mark.parametrize("T,Hq,Hkv,D,fmt", CASES)
def test_prefill_kernel_matches_ref(T, Hq, Hkv, D, fmt, triton_backend):
    start = 19                                        # a chunked prefill: earlier rows already cached
    cache, gen = filled(fmt, Hkv, D, start + T, seed=T + 2)
    q = torch.randn(T, Hq, D, device=DEV, generator=gen)
    scale = D ** -0.5
    plan = plan_waves(T, start, Hq, Hkv, D, 256 << 20)
    ref, _ = prefill_attention_ref(q, cache.k, cache.v, fmt, start, scale, Hkv, plan)
    k, v = dequant(cache)
    assert_close(f"ref-vs-oracle prefill {fmt}", oracle(q, k, v, start, scale), ref, 1e-5)
    out = prefill_attention(q, cache.k, cache.v, fmt, start, scale, Hkv, cfg={"block_m": 32, "block_n": 32})
    assert_close(f"prefill {fmt}", ref, out, TOL[fmt])


@pytest.mark.parametrize("k_fmt,v_fmt", [(a, b) for a in KV_DTYPES for b in KV_DTYPES])
def test_kv_append_pair_writes_the_bytes_of_two_appends(k_fmt, v_fmt, triton_backend, monkeypatch):
    """The captured step's one-launch K+V append (``kv_append_pair``, device position) leaves
    both buffers byte-equal to two ``kv_append`` calls and to the torch reference, for every
    K x V format pair; a planted q8_0 scale fault is planted in it too."""
    from engine.kernels.kv_append import kv_append_pair
    Hkv, D, n = 2, 64, 12
    gen = torch.Generator(device=DEV).manual_seed(11)
    pair_k, pair_v = alloc_kv(n, Hkv, D, k_fmt, DEV), alloc_kv(n, Hkv, D, v_fmt, DEV)
    ref_k, ref_v = alloc_kv(n, Hkv, D, k_fmt, DEV), alloc_kv(n, Hkv, D, v_fmt, DEV)
    two_k, two_v = alloc_kv(n, Hkv, D, k_fmt, DEV), alloc_kv(n, Hkv, D, v_fmt, DEV)
    for p in (0, 5, n - 1):
        k = torch.randn(1, Hkv, D, device=DEV, generator=gen) * 3
        v = torch.randn(1, Hkv, D, device=DEV, generator=gen)
        pos = torch.tensor([p], device=DEV)
        kv_append_pair(pair_k, pair_v, k, v, k_fmt, v_fmt, pos)
        kv_append(two_k, None, k, k_fmt, pos=pos)
        kv_append(two_v, None, v, v_fmt, pos=pos)
        kv_append_ref(ref_k, p, k, k_fmt)
        kv_append_ref(ref_v, p, v, v_fmt)
    for a, b, c in ((pair_k, two_k, ref_k), (pair_v, two_v, ref_v)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        assert torch.equal(a.view(torch.uint8), c.view(torch.uint8))
    if "q8_0" in (k_fmt, v_fmt):
        monkeypatch.setenv("KVBENCH_FAULT", "q8_scale_bf16")
        kv_append_pair(pair_k, pair_v, k, v, k_fmt, v_fmt, torch.tensor([1], device=DEV))
        kv_append(two_k, None, k, k_fmt, pos=torch.tensor([1], device=DEV))
        kv_append(two_v, None, v, v_fmt, pos=torch.tensor([1], device=DEV))
        assert torch.equal(pair_k.view(torch.uint8), two_k.view(torch.uint8))
        assert torch.equal(pair_v.view(torch.uint8), two_v.view(torch.uint8))
        monkeypatch.delenv("KVBENCH_FAULT")
        clean_k, clean_v = pair_k.clone(), pair_v.clone()
        kv_append_pair(clean_k, clean_v, k, v, k_fmt, v_fmt, torch.tensor([1], device=DEV))
        q8 = (pair_k, clean_k) if k_fmt == "q8_0" else (pair_v, clean_v)
        assert not torch.equal(q8[0].view(torch.uint8), q8[1].view(torch.uint8))   # the fault did act


def test_prefill_tiles_fit_shared_memory():
    """gemma3's head_dim 256: the default 64 x 64 / 64 x 32 tiles asked the H200 for 393216 /
    327680 bytes of shared memory (227 KB offered) and the suite errored on CUDA
    (reports/h200-2026-12-04d). ``fit_tiles`` shrinks them until the estimate, an upper bound
    of what Triton asked for, fits; D <= 128 keeps its tuned tiles; no fit raises."""
    from engine.kernels.prefill_attention import fit_tiles, tile_smem_bytes
    h200 = 232448
    assert tile_smem_bytes(256, 64, 32) == 327680 and tile_smem_bytes(256, 64, 64) >= 393216
    bm, bn = fit_tiles(256, 64, 64, h200)
    assert tile_smem_bytes(256, bm, bn) <= h200 - 8192 and (bm, bn) == (32, 16)
    assert fit_tiles(64, 64, 64, h200) == (64, 64)
    with pytest.raises(ValueError, match="head_dim 1024"):
        fit_tiles(1024, 64, 64, 48 * 1024)


@pytest.mark.parametrize("fmt", KV_DTYPES)
def test_prefill_kernel_head_dim_256_matches_ref(fmt, triton_backend):
    """The kernel on gemma3's head size with the tiles ``fit_tiles`` picks for a 227 KB device."""
    from engine.kernels.prefill_attention import fit_tiles
    T, Hq, Hkv, D, start = 40, 4, 1, 256, 9
    cache, gen = filled(fmt, Hkv, D, start + T, seed=5)
    q = torch.randn(T, Hq, D, device=DEV, generator=gen)
    plan = plan_waves(T, start, Hq, Hkv, D, 256 << 20)
    ref, _ = prefill_attention_ref(q, cache.k, cache.v, fmt, start, D ** -0.5, Hkv, plan)
    bm, bn = fit_tiles(D, 64, 64, 232448)
    out = prefill_attention(q, cache.k, cache.v, fmt, start, D ** -0.5, Hkv, cfg={"block_m": bm, "block_n": bn})
    assert_close(f"prefill D=256 {fmt}", ref, out, TOL[fmt])


@pytest.mark.parametrize("fmt", KV_DTYPES)
def test_layer_kv_triton_path_waves_match_torch_path(fmt, triton_backend):
    """LayerKV through the kernels (write + multi-wave attend + decode) equals the torch path."""
    T, Hq, Hkv, D = 260, 6, 2, 64
    gen = torch.Generator(device=DEV).manual_seed(7)
    k, v, q = (torch.randn(T, h, D, device=DEV, generator=gen) for h in (Hkv, Hkv, Hq))
    tri = LayerKV(0, Hkv, D, T + 1, fmt, device=DEV, wave_budget_bytes=4 << 20, wave_max_rows=128)
    tri.write(0, k, v)
    out = tri.attend(q, 0, D ** -0.5)
    assert tri.last_waves >= 3
    kernels.set_backend("torch")
    ref_cache = LayerKV(0, Hkv, D, T + 1, fmt, device=DEV)
    ref_cache.write(0, k, v)
    assert torch.equal(tri.k.view(torch.uint8), ref_cache.k.view(torch.uint8))
    assert_close(f"LayerKV waves {fmt}", ref_cache.attend(q, 0, D ** -0.5), out, TOL[fmt])


def test_backend_switch_rejects_unknown_name():
    from engine.errors import ConfigError
    with pytest.raises(ConfigError, match="set_backend"):
        kernels.set_backend("cuda-magic")


# --- GPU: full shapes -----------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", KV_DTYPES)
def test_gpu_decode_full_shape(fmt, triton_backend):
    ctx, Hq, Hkv, D = 16384, 32, 8, 128
    cache, gen = filled(fmt, Hkv, D, ctx, seed=11)
    q = torch.randn(Hq, D, device=DEV, generator=gen)
    ref = decode_attention_ref(q, cache.k, cache.v, fmt, ctx, D ** -0.5, Hkv)
    out = decode_attention(q, cache.k, cache.v, fmt, ctx, D ** -0.5, Hkv)
    assert_close(f"gpu decode {fmt}", ref, out, 1e-4)
    assert decode_bytes_read(ctx, Hkv, D, fmt) == {"fp32": 134217728, "bf16": 67108864, "q8_0": 35651584}[fmt]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["streams", "streams2"])
@pytest.mark.parametrize("unpack", ["prmt", "magic"])
@pytest.mark.parametrize("geo", [(16384, 32, 8), (1000, 32, 8), (4096, 32, 4)])
def test_gpu_q8_streams_match_the_reference(impl, unpack, geo, triton_backend):
    """The compiled q8_0 streams forms, by each unpack: the PTX byte permutes are what the
    interpreter cannot run (a wrong byte order there once gave max-abs 0.06 on outputs of 0.05)."""
    from engine.kernels import decode_attention as da
    ctx, Hq, Hkv = geo
    D = 128
    cache, gen = filled("q8_0", Hkv, D, ctx, seed=13)
    q = torch.randn(Hq, D, device=DEV, generator=gen)
    ref = decode_attention_ref(q, cache.k, cache.v, "q8_0", ctx, D ** -0.5, Hkv)
    with da.recording() as rec:
        out = decode_attention(q, cache.k, cache.v, "q8_0", ctx, D ** -0.5, Hkv,
                               cfg={"q8_impl": impl, "block_n": 16, "q8_unpack": unpack})
    launch = next(x for x in rec if x["kernel"].startswith("_decode_q8_streams"))
    assert (launch["q8_impl"], launch["q8_unpack"]) == (impl, unpack)
    assert_close(f"gpu q8_0 {impl} {unpack}", ref, out, 1e-5)


def test_q8_stack_applies_where_asked_and_refuses_what_it_cannot(monkeypatch, triton_backend):
    """q8_stack (cfg or KVBENCH_DECODE_Q8_STACK) is recorded as applied; asked where it cannot
    apply (one float16 term, the tile normalisation, an ablation, another q8_0 form) it raises,
    naming the setting, instead of running unstacked."""
    from engine.kernels import decode_attention as da
    monkeypatch.delenv("KVBENCH_DECODE_Q8_STACK", raising=False)
    cache, gen = filled("q8_0", 2, 128, 40, seed=5)
    q = torch.randn(16, 128, device=DEV, generator=gen)

    def applied(**cfg):
        with da.recording() as log:
            decode_attention(q, cache.k, cache.v, "q8_0", 40, 0.1, 2, cfg={"block_n": 16, **cfg})
        return log[0]["q8_stack"]

    assert applied() is False and applied(q8_stack=True) is True
    monkeypatch.setenv("KVBENCH_DECODE_Q8_STACK", "1")
    assert applied() is True
    for bad in ({"q8_terms": (2, 1)}, {"q8_vnorm": "tile"}, {"q8_ablate": "qk"}, {"q8_impl": "batched"}):
        with pytest.raises(ValueError, match="q8_stack"):
            applied(**bad)
    monkeypatch.delenv("KVBENCH_DECODE_Q8_STACK")
    with pytest.raises(ValueError, match="q8_stack 'auto'"):
        applied(q8_stack="auto")
    with da.recording() as log:      # off, spelled as its variable spells it, for another form
        decode_attention(q, cache.k, cache.v, "q8_0", 40, 0.1, 2, cfg={"q8_stack": "0", "q8_impl": "batched"})
    assert log[0]["kernel"] == "_decode_q8_kernel"


@pytest.mark.gpu
@pytest.mark.parametrize("geo", [(16384, 32, 4), (4096, 32, 4), (1000, 32, 8), (777, 16, 2)])
def test_gpu_q8_stacked_terms_match_the_reference(geo, triton_backend):
    """The compiled rows kernel with its float16 terms stacked (at coder30b's G 8 a 64-row
    operand, which sm_90 runs as a warpgroup MMA the interpreter never models)."""
    from engine.kernels import decode_attention as da
    ctx, Hq, Hkv = geo
    D = 128
    cache, gen = filled("q8_0", Hkv, D, ctx, seed=21)
    q = torch.randn(Hq, D, device=DEV, generator=gen)
    ref = decode_attention_ref(q, cache.k, cache.v, "q8_0", ctx, D ** -0.5, Hkv)
    for bn in (32, 64):
        with da.recording() as rec:
            out = decode_attention(q, cache.k, cache.v, "q8_0", ctx, D ** -0.5, Hkv, cfg={"q8_stack": True, "block_n": bn})
        assert rec[0]["q8_stack"] is True
        assert_close(f"gpu q8_0 stack bn {bn}", ref, out, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", KV_DTYPES)
def test_gpu_append_bytes_equal_cpu_reference(fmt, triton_backend):
    x = torch.randn(1000, 8, 128, device=DEV) * torch.logspace(-20, 4, 1000, device=DEV)[:, None, None]
    gpu = LayerKV(0, 8, 128, 1000, fmt, device=DEV)
    gpu.write(0, x, x)
    cpu = alloc_kv(1000, 8, 128, fmt)
    kv_append_ref(cpu, 0, x.cpu(), fmt)
    assert torch.equal(gpu.k.cpu().view(torch.uint8), cpu.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", KV_DTYPES)
def test_gpu_wave_prefill_matches_one_pass(fmt, triton_backend):
    n, Hq, Hkv, D = 6169, 9, 3, 64
    gen = torch.Generator(device=DEV).manual_seed(3)
    k, v, q = (torch.randn(n, h, D, device=DEV, generator=gen) for h in (Hkv, Hkv, Hq))
    waves = LayerKV(0, Hkv, D, n, fmt, device=DEV, wave_budget_bytes=8 << 20)
    one = LayerKV(0, Hkv, D, n, fmt, device=DEV, wave_max_rows=1 << 30)
    for c in (waves, one):
        c.write(0, k, v)
    a, b = waves.attend(q, 0, D ** -0.5), one.attend(q, 0, D ** -0.5)
    assert waves.last_waves >= 3 and one.last_waves == 1
    flash = fmt == "bf16" and PREFILL_CONFIG["bf16_flash"]   # q and p rounded to bf16 (as HF's SDPA)
    # flash picks its tiling from the sequence lengths, so a wave's rows are summed in another
    # order than in one pass; with p in bf16 (2^-9) that moves outputs of size ~1 by ~2e-3.
    # The model-level bound (logits <= 1e-3) is test_static_decode's wave test.
    assert_close(f"gpu waves vs one pass {fmt}", b, a, 4e-3 if flash else 1e-3)
    kernels.set_backend("torch")
    assert_close(f"gpu waves vs torch {fmt}", waves.attend(q, 0, D ** -0.5), a, 2e-2 if flash else 1e-4)


@pytest.mark.gpu
def test_gpu_bf16_flash_prefill_chunk_matches_ref(triton_backend):
    """Flash attention over a bf16 cache for a chunk after cached rows: the causal mask must be
    aligned to the last row (a top-left mask would let row 0 see only key 0)."""
    start, T, Hq, Hkv, D = 700, 1300, 32, 8, 128
    cache, gen = filled("bf16", Hkv, D, start + T, seed=5)
    q = torch.randn(T, Hq, D, device=DEV, generator=gen)
    plan = plan_waves(T, start, Hq, Hkv, D, 256 << 20)
    ref, _ = prefill_attention_ref(q, cache.k, cache.v, "bf16", start, D ** -0.5, Hkv, plan)
    flash = prefill_attention(q, cache.k, cache.v, "bf16", start, D ** -0.5, Hkv, cfg={"bf16_flash": True})
    assert_close("gpu bf16 flash chunk", ref, flash, 2e-2)
    tri = prefill_attention(q, cache.k, cache.v, "bf16", start, D ** -0.5, Hkv, cfg={"bf16_flash": False})
    assert_close("gpu bf16 triton chunk", ref, tri, TOL["bf16"])


def test_decode_launch_config_reads_tile_variables_when_called(monkeypatch):
    """A tile variable set after import (a bench variant sets it around a capture) is the launch's
    value, over the format's default; unset, the (format, head_dim) default applies. Before, the
    variable only removed the format default and the import-time value ran instead."""
    from engine.kernels import decode_attention as da
    for name in da._LIVE_KEYS.values():
        monkeypatch.delenv(name, raising=False)
    assert da.resolved_config("q8_0", "q8_0", 64)["block_n"] == da.HEAD_DIM_CONFIG[("q8_0", 64)]["block_n"]
    assert da.resolved_config("bf16", "bf16", 64)["num_warps"] == da.FORMAT_CONFIG["bf16"]["num_warps"]
    monkeypatch.setenv("KVBENCH_DECODE_BLOCK_N", "16")
    monkeypatch.setenv("KVBENCH_DECODE_PROGRAMS_PER_SM", "5")
    monkeypatch.setenv("KVBENCH_DECODE_Q8_IMPL", "batched")
    monkeypatch.setenv("KVBENCH_DECODE_Q8_KERNEL", "0")
    monkeypatch.setenv("KVBENCH_DECODE_FUSE", "1")
    got = da.resolved_config("q8_0", "q8_0", 64)
    assert (got["block_n"], got["programs_per_sm"], got["q8_impl"]) == (16, 5, "batched")
    assert (got["q8_kernel"], got["fuse_combine"]) == (False, True)
    assert da.resolved_config("q8_0", "q8_0", 64, {"block_n": 32})["block_n"] == 32   # cfg= over all


def test_q8_tiles_set_q8_0_launches_only(monkeypatch, triton_backend):
    """``KVBENCH_DECODE_Q8_TILES`` sets the launch of q8_0's own kernel (tiles, splits, warps, stages)
    and nothing else: a bf16 launch in the same process keeps its own, as do mixed K/V formats (the
    generic kernel). What ran is in the launch log, the output still equals the reference, and a
    malformed value is a one-line ConfigError naming the variable, before any launch."""
    from engine import settings
    from engine.errors import ConfigError
    from engine.kernels import decode_attention as da
    for name in (*da._LIVE_KEYS.values(), "KVBENCH_DECODE_Q8_TILES", "KVBENCH_DECODE_Q8_IMPL"):
        monkeypatch.delenv(name, raising=False)
    Hq, Hkv, D, n = 8, 2, 64, 70
    q = torch.randn(Hq, D, device=DEV)
    caches = {fmt: filled(fmt, Hkv, D, n, seed=21)[0] for fmt in ("bf16", "q8_0")}
    with da.recording() as before:
        for fmt, c in caches.items():
            decode_attention(q, c.k, c.v, fmt, n, D ** -0.5, Hkv)
    mixed = da.resolved_config("bf16", "q8_0", 64)          # K bf16, V q8_0: the generic kernel
    monkeypatch.setenv("KVBENCH_DECODE_Q8_TILES", "16x3x2x2")     # (x: a bench variant's lists split on commas)
    monkeypatch.setenv("KVBENCH_DECODE_Q8_IMPL", "batched")
    ref = decode_attention_ref(q, caches["q8_0"].k, caches["q8_0"].v, "q8_0", n, D ** -0.5, Hkv)
    with da.recording() as after:
        for fmt, c in caches.items():
            out = decode_attention(q, c.k, c.v, fmt, n, D ** -0.5, Hkv)
    assert_close("q8_0 batched at KVBENCH_DECODE_Q8_TILES", ref, out, TOL["q8_0"])
    assert {k: after[0][k] for k in ("kernel", "block_n", "num_warps", "num_stages", "splits")} == \
        {k: before[0][k] for k in ("kernel", "block_n", "num_warps", "num_stages", "splits")}     # bf16 untouched
    got = after[1]
    assert (got["kernel"], got["block_n"], got["num_warps"], got["num_stages"]) == ("_decode_q8_kernel", 16, 2, 2)
    assert got["keys_per_split"] % 16 == 0 and got["splits"] * got["keys_per_split"] >= n
    assert da.resolved_config("q8_0", "q8_0", 64)["programs_per_sm"] == 3
    assert da.resolved_config("bf16", "q8_0", 64) == {**mixed, "q8_impl": "batched"}     # only the form's setting moved
    for bad in ("32,6,2", "24,6,2,2", "32,6,3,2", "a,b,c,d"):
        monkeypatch.setenv("KVBENCH_DECODE_Q8_TILES", bad)
        with pytest.raises(ConfigError, match="KVBENCH_DECODE_Q8_TILES"):
            settings.validate()


def test_prefill_launch_config_reads_its_variables_when_called(monkeypatch):
    """The prefill kernel's tunables set after import (a variant) are applied; unset, CONFIG's."""
    from engine.kernels import prefill_attention as pa
    for name in pa._LIVE_KEYS.values():
        monkeypatch.delenv(name, raising=False)
    assert pa.resolved_config() == pa.CONFIG
    monkeypatch.setenv("KVBENCH_PREFILL_BLOCK_M", "32")
    monkeypatch.setenv("KVBENCH_PREFILL_BF16_FLASH", "1")
    got = pa.resolved_config()
    assert (got["block_m"], got["bf16_flash"]) == (32, True)
    assert pa.resolved_config({"block_m": 16})["block_m"] == 16


def test_decode_launches_are_recorded_as_applied(monkeypatch, triton_backend):
    """``decode_attention.recording`` yields what each launch ran (kernel, tiles, combine step),
    read from the launch itself: a tile variable set now shows in it, the q8_0 form too."""
    from engine.kernels import decode_attention as da
    for name in da._LIVE_KEYS.values():
        monkeypatch.delenv(name, raising=False)
    Hq, Hkv, D, n = 6, 2, 64, 40
    q = torch.randn(Hq, D, device=DEV)
    caches = {fmt: filled(fmt, Hkv, D, n, seed=9)[0] for fmt in ("bf16", "q8_0")}
    with da.recording() as log:
        for fmt, c in caches.items():
            decode_attention(q, c.k, c.v, fmt, n, D ** -0.5, Hkv)
        monkeypatch.setenv("KVBENCH_DECODE_BLOCK_N", "16")
        monkeypatch.setenv("KVBENCH_DECODE_Q8_IMPL", "batched")
        decode_attention(q, caches["q8_0"].k, caches["q8_0"].v, "q8_0", n, D ** -0.5, Hkv)
    # bf16 at 3 query heads a KV head: the stacked kernel by default ("auto": a 16-row operand)
    assert [x["kernel"] for x in log] == ["_decode_bf16_stacked_kernel", "_decode_q8_rows_kernel", "_decode_q8_kernel"]
    assert log[0]["block_n"] == da.FORMAT_CONFIG["bf16"]["block_n"]
    assert log[1]["block_n"] == da.HEAD_DIM_CONFIG[("q8_0", 64)]["block_n"] and log[2]["block_n"] == 16
    assert log[2]["keys_per_split"] % 16 == 0 and log[2]["splits"] * log[2]["keys_per_split"] >= n
    # the rows kernel's one-s guards as the launch applied them (the batched kernel has none)
    assert log[1]["q8_guards"] == [bool(x) for x in da.CONFIG["q8_guards"]] and "q8_guards" not in log[2]
    monkeypatch.setenv("KVBENCH_DECODE_Q8_IMPL", "rows")
    ref = decode_attention_ref(q, caches["q8_0"].k, caches["q8_0"].v, "q8_0", n, D ** -0.5, Hkv)
    with da.recording() as log_rows:
        decode_attention(q, caches["q8_0"].k, caches["q8_0"].v, "q8_0", n, D ** -0.5, Hkv)
    with da.recording() as log:
        for guards in ((False, False), (True, False), (False, True)):
            out = decode_attention(q, caches["q8_0"].k, caches["q8_0"].v, "q8_0", n, D ** -0.5, Hkv,
                                   cfg={"q8_guards": guards})
            assert_close(f"q8_0 rows guards {guards}", ref, out, TOL["q8_0"])
    assert [x["q8_guards"] for x in log] == [[False, False], [True, False], [False, True]]
    # K and V read as int16 words (float16 where they land): the same float16 values into the same
    # dots, so the same output as the int8 tiles; recorded as applied; refused off the rows kernel
    with da.recording() as log:
        base = decode_attention(q, caches["q8_0"].k, caches["q8_0"].v, "q8_0", n, D ** -0.5, Hkv)
        for words in ("k", "v", "kv"):
            out = decode_attention(q, caches["q8_0"].k, caches["q8_0"].v, "q8_0", n, D ** -0.5, Hkv,
                                   cfg={"q8_words": words})
            assert torch.equal(out, base), words
        monkeypatch.setenv("KVBENCH_DECODE_Q8_WORDS", "kv")      # the setting, read at the launch
        decode_attention(q, caches["q8_0"].k, caches["q8_0"].v, "q8_0", n, D ** -0.5, Hkv)
        monkeypatch.delenv("KVBENCH_DECODE_Q8_WORDS")
    assert [x["q8_words"] for x in log] == ["none", "k", "v", "kv", "kv"]
    # the V-scale normalisation from the split's largest scale: the reference's result, recorded
    # as applied (setting or cfg), refused off the rows kernel and for an unknown name
    with da.recording() as log:
        out = decode_attention(q, caches["q8_0"].k, caches["q8_0"].v, "q8_0", n, D ** -0.5, Hkv,
                               cfg={"q8_vnorm": "split"})
        assert_close("q8_0 rows vnorm split", ref, out, TOL["q8_0"])
        monkeypatch.setenv("KVBENCH_DECODE_Q8_VNORM", "split")
        decode_attention(q, caches["q8_0"].k, caches["q8_0"].v, "q8_0", n, D ** -0.5, Hkv)
        monkeypatch.delenv("KVBENCH_DECODE_Q8_VNORM")
        decode_attention(q, caches["q8_0"].k, caches["q8_0"].v, "q8_0", n, D ** -0.5, Hkv)
    assert [x["q8_vnorm"] for x in log] == ["split", "split", da.CONFIG["q8_vnorm"]]
    for bad_cfg in ({"q8_vnorm": "key"}, {"q8_vnorm": "split", "q8_impl": "batched"}):
        with pytest.raises(ValueError, match="q8_vnorm"):
            decode_attention(q, caches["q8_0"].k, caches["q8_0"].v, "q8_0", n, D ** -0.5, Hkv, cfg=bad_cfg)
    from engine.kernels import interpreted
    if interpreted():      # the PTX byte permutes: refused by the interpreter, not run another way
        with pytest.raises(ValueError, match="kv_prmt.*interpreter cannot run"):
            decode_attention(q, caches["q8_0"].k, caches["q8_0"].v, "q8_0", n, D ** -0.5, Hkv, cfg={"q8_words": "kv_prmt"})
    else:
        out = decode_attention(q, caches["q8_0"].k, caches["q8_0"].v, "q8_0", n, D ** -0.5, Hkv,
                               cfg={"q8_words": "kv_prmt"})
        assert torch.equal(out, base)
    with pytest.raises(ValueError, match="q8_words"):
        decode_attention(q, caches["q8_0"].k, caches["q8_0"].v, "q8_0", n, D ** -0.5, Hkv, cfg={"q8_words": "q"})
    with pytest.raises(ValueError, match="rows kernel only"):
        decode_attention(q, caches["q8_0"].k, caches["q8_0"].v, "q8_0", n, D ** -0.5, Hkv,
                         cfg={"q8_words": "kv", "q8_impl": "blocks"})
    # the ablations (timing only) run, change the result, are recorded, and refuse what they are not
    with da.recording() as log:
        for a in ("qk", "pv", "qk,pv"):
            out = decode_attention(q, caches["q8_0"].k, caches["q8_0"].v, "q8_0", n, D ** -0.5, Hkv,
                                   cfg={"q8_ablate": a})
            assert out.shape == ref.shape and (out - ref).abs().max().item() > 1e-3
    assert [x["q8_ablate"] for x in log] == [["qk"], ["pv"], ["pv", "qk"]] and "q8_ablate" not in log_rows[0]
    with pytest.raises(ValueError, match="q8_ablate"):
        decode_attention(q, caches["q8_0"].k, caches["q8_0"].v, "q8_0", n, D ** -0.5, Hkv, cfg={"q8_ablate": "v"})
    with pytest.raises(ValueError, match="rows kernel only"):
        decode_attention(q, caches["q8_0"].k, caches["q8_0"].v, "q8_0", n, D ** -0.5, Hkv,
                         cfg={"q8_ablate": "qk", "q8_impl": "batched"})
    # the blocks form: its own kernel, as the launch names it; a head of 8 blocks it refuses
    with da.recording() as log:
        out = decode_attention(q, caches["q8_0"].k, caches["q8_0"].v, "q8_0", n, D ** -0.5, Hkv,
                               cfg={"q8_impl": "blocks"})
    assert [x["kernel"] for x in log] == ["_decode_q8_blocks_kernel"]
    # the compiled kernel's registers and spills where the backend compiled it; none interpreted
    from engine.kernels import interpreted
    assert ("n_regs" not in log[0]) if interpreted() else (log[0]["n_regs"] > 0 and log[0]["n_spills"] >= 0)
    assert_close("q8_0 blocks", ref, out, TOL["q8_0"])
    wide = filled("q8_0", Hkv, 256, n, seed=10)[0]
    with pytest.raises(ValueError, match="'blocks' serves head_dim 32, 64 or 128"):
        decode_attention(torch.randn(Hq, 256, device=DEV), wide.k, wide.v, "q8_0", n, 256 ** -0.5, Hkv,
                         cfg={"q8_impl": "blocks"})
    with da.recording() as outside:
        pass
    decode_attention(q, caches["bf16"].k, caches["bf16"].v, "bf16", n, D ** -0.5, Hkv)
    assert outside == [] and da.LAUNCHES.active is None   # nothing recorded outside a block


import triton  # noqa: E402 (after TRITON_INTERPRET is set above)
import triton.language as tl  # noqa: E402

from engine.kernels.decode_attention import _pow2_at_least  # noqa: E402


@triton.jit
def _pow2_probe(X, OUT, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(OUT + i, _pow2_at_least(tl.load(X + i)))


def test_pow2_at_least_is_the_exact_power_of_two(triton_backend):
    """The q8_0 kernels' normaliser: the smallest power of two >= x, exactly (bits, not the GPU's
    approximate lg2/ex2), at powers of two, one ulp either side of them, and in between; against
    float64 maths."""
    p = torch.tensor([2.0 ** e for e in range(-100, 120, 7)])
    vals = torch.cat([p, torch.nextafter(p, p * 2), torch.nextafter(p, p / 2), p * 1.37, torch.tensor([1e-30, 3.0, 8192.0])])
    n = triton.next_power_of_2(vals.numel())
    x = torch.ones(n)
    x[:vals.numel()] = vals
    out = torch.empty(n)
    x, out = x.to(DEV), out.to(DEV)
    _pow2_probe[(1,)](x, out, N=n)
    # the reference from frexp (exact), not exp2(ceil(log2 x)): CUDA's float64 log2 of 2^110 is not
    # exactly 110 (the compiled run of reports/h100-2026-12-06e wanted 2^111 there)
    m, e = torch.frexp(x.double().cpu())
    want = torch.ldexp(torch.ones_like(m), torch.where(m == 0.5, e - 1, e)).float().to(DEV)
    assert torch.equal(out, want), (x[out != want], out[out != want], want[out != want])
