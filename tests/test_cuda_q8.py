"""q8_0 decode attention in CUDA C++ (``q8_impl="cuda_mma"``, engine/kernels/cuda_q8.py), and ``"auto"``.

Independent reference: ``decode_attention_ref`` (the blocked torch attention over the
dequantized cache) on the GPU, at GQA groups 1-8, head_dim 64 and 128, contexts shorter than
one tile and longer than a split, 2, 3 and 4 stages, the packed-terms form (G <= 4), the
position read from the device (int64 and int32), the launch captured in a CUDA graph, and under
programmatic dependent launch behind the append of the newest key, waiting first or with its first
tiles' loads before the wait (q8_early). Off the GPU: the form refuses to run where it
cannot (CPU, the Triton interpreter), the removed FMA form's name is one clear error, where nvcc
is installed the source builds for sm_90 with every entry point the launcher looks up, and
``"auto"`` (the default) records the rows kernel and why. On the GPU, ``"auto"`` takes cuda_mma
and keeps rows where a launch asks for what only rows has."""
from __future__ import annotations

import pytest
import torch

from engine import kernels
from engine.kernels import cuda_q8
from engine.kernels import decode_attention as da
from engine.kernels.decode_attention import decode_attention, decode_attention_ref
from test_kernels import filled, triton_backend  # noqa: F401  (the cache of random K / V written through
# the torch path; the fixture that runs a test on the Triton backend)

CUDA = torch.cuda.is_available()


@pytest.mark.usefixtures("triton_backend")
def test_the_cuda_form_refuses_where_it_cannot_run(monkeypatch):
    if CUDA and not kernels.interpreted():
        pytest.skip("on a CUDA device the form runs (test_gpu_* below)")
    cache, gen = filled("q8_0", 2, 64, 40, seed=3)
    q = torch.randn(8, 64, generator=gen, device=cache.k.device)
    with pytest.raises(ValueError, match="q8_impl 'cuda_mma' is a CUDA C.. kernel: it runs compiled on a "
                                         "CUDA device only"):
        decode_attention(q, cache.k, cache.v, "q8_0", 40, 0.125, 2, cfg={"q8_impl": "cuda_mma"})
    # the default picks rows here, and says so in the launch record
    with da.recording() as rec:
        out = decode_attention(q, cache.k, cache.v, "q8_0", 40, 0.125, 2)
    assert rec[0]["q8_impl"] == "rows" and rec[0]["kernel"] == "_decode_q8_rows_kernel"
    assert rec[0]["q8_impl_why"] == "auto: rows (cuda_mma runs compiled on a CUDA device only)"
    ref = decode_attention_ref(q, cache.k, cache.v, "q8_0", 40, 0.125, 2)
    assert (out - ref).abs().max().item() < 2e-5 * max(1.0, ref.abs().max().item())


def test_the_source_builds_with_every_entry_point(tmp_path):
    nvcc = cuda_q8.nvcc_path()
    if nvcc is None:
        pytest.skip("no nvcc here (the GPU machine builds it on first use)")
    cubin = cuda_q8.build("sm_90", nvcc=nvcc, out_dir=tmp_path).read_bytes()
    for g in cuda_q8.GROUPS:
        for d in cuda_q8.HEAD_DIMS:
            for st in cuda_q8.STAGE_CHOICES:
                assert cuda_q8.kernel_name(g, d, st).encode() in cubin
                assert f"kvbench_q8_mma_smem_g{g}_d{d}_s{st}".encode() in cubin
            assert (cuda_q8.kernel_name(g, d, cuda_q8.PACK_STAGES, pack=True).encode() in cubin) == \
                (g in cuda_q8.PACK_GROUPS)
            for pk in (False, True):    # the warp-softmax form: at its geometries only
                assert (cuda_q8.kernel_name(g, d, 3, pack=pk, wsm=True).encode() in cubin) == \
                    ((g, d) in cuda_q8.WSM_GEOMETRIES and (not pk or g in cuda_q8.PACK_GROUPS))
    assert b"kvbench_q8_decode_" not in cubin       # the FMA form is gone
    # cached: the second call compiles nothing and returns the same file
    assert cuda_q8.build("sm_90", nvcc=nvcc, out_dir=tmp_path).read_bytes() == cubin


def test_no_nvcc_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("KVBENCH_NVCC", str(tmp_path / "missing"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(cuda_q8, "FALLBACK_NVCC", str(tmp_path / "nvcc"))
    with pytest.raises(cuda_q8.CudaKernelError, match="needs the CUDA toolkit's nvcc"):
        cuda_q8.build("sm_90", out_dir=tmp_path)


GEOS = [(16384, 32, 8, 128), (1000, 32, 8, 128), (4096, 32, 4, 128), (77, 32, 4, 128), (5, 8, 8, 128),
        (300, 9, 3, 64), (129, 8, 1, 64), (2000, 16, 8, 64)]


# (geometry, stages, packed terms, softmax): every geometry at the default 3 stages, two at 2 and 4, each
# geometry of at most 4 query heads a KV head packed, and the warp softmax at its geometries, packed and not
CASES = ([(g, 3, False, "tile") for g in GEOS] + [(g, st, False, "tile") for g in (GEOS[1], GEOS[5]) for st in (2, 4)]
         + [(g, 3, True, "tile") for g in GEOS if g[1] // g[2] in cuda_q8.PACK_GROUPS]
         + [(g, 3, pk, "warp") for g in GEOS if (g[1] // g[2], g[3]) in cuda_q8.WSM_GEOMETRIES
            for pk in (False, True) if not pk or g[1] // g[2] in cuda_q8.PACK_GROUPS])


@pytest.mark.usefixtures("triton_backend")
def test_the_removed_form_and_options_where_they_do_not_apply_are_one_clear_error():
    cache, gen = filled("q8_0", 2, 64, 40, seed=3)
    q = torch.randn(8, 64, generator=gen, device=cache.k.device)
    with pytest.raises(ValueError, match="q8_impl 'cuda' .the CUDA C.. form on float32 FMAs. was removed: "
                                         "'cuda_mma'"):
        decode_attention(q, cache.k, cache.v, "q8_0", 40, 0.125, 2, cfg={"q8_impl": "cuda"})
    with pytest.raises(ValueError, match="q8_pack .KVBENCH_DECODE_Q8_PACK. is cuda_mma's.*q8_impl 'rows' .asked."):
        decode_attention(q, cache.k, cache.v, "q8_0", 40, 0.125, 2, cfg={"q8_impl": "rows", "q8_pack": True})
    with pytest.raises(ValueError, match="q8_softmax 'warp' .KVBENCH_DECODE_Q8_SOFTMAX. is cuda_mma's.*'rows'"):
        decode_attention(q, cache.k, cache.v, "q8_0", 40, 0.125, 2, cfg={"q8_impl": "rows", "q8_softmax": "warp"})
    # early loads are cuda_mma's under PDL: asked by name elsewhere (rows, no PDL) it is refused, never ignored
    with pytest.raises(ValueError, match=r"q8_early .KVBENCH_DECODE_Q8_EARLY. is cuda_mma's under programmatic "
                                         r"dependent launch; this launch: q8_impl 'rows' .asked., pdl (True|False)"):
        decode_attention(q, cache.k, cache.v, "q8_0", 40, 0.125, 2, cfg={"q8_impl": "rows", "q8_early": "1"})
    with pytest.raises(ValueError, match="q8_early 'soon': 'auto', '1' .on. or '0' .off."):
        decode_attention(q, cache.k, cache.v, "q8_0", 40, 0.125, 2, cfg={"q8_impl": "rows", "q8_early": "soon"})
    if not CUDA or kernels.interpreted():     # auto keeps rows here, and says why in the refusal
        with pytest.raises(ValueError, match="q8_pack .* .auto: rows .cuda_mma runs compiled on a CUDA device only.."):
            decode_attention(q, cache.k, cache.v, "q8_0", 40, 0.125, 2, cfg={"q8_pack": True})


@pytest.mark.gpu
@pytest.mark.parametrize("geo,stages,pack,softmax", CASES,
                         ids=lambda c: "ctx{}-hq{}-hkv{}-d{}".format(*c) if isinstance(c, tuple)
                         else (("packed" if c else "two-mma") if isinstance(c, bool)
                               else (f"{c}-softmax" if isinstance(c, str) else f"s{c}")))
@pytest.mark.usefixtures("triton_backend")
def test_gpu_cuda_form_matches_the_reference(geo, stages, pack, softmax):
    impl = "cuda_mma"
    cfg = {"q8_impl": impl, "num_stages": stages, "q8_pack": pack, "q8_softmax": softmax}
    if not CUDA:
        pytest.skip("needs CUDA (run on the GPU machine)")
    ctx, Hq, Hkv, D = geo
    cache, gen = filled("q8_0", Hkv, D, ctx, seed=ctx + Hq)
    q = torch.randn(Hq, D, device="cuda", generator=gen)
    ref = decode_attention_ref(q, cache.k, cache.v, "q8_0", ctx, D ** -0.5, Hkv)
    with da.recording() as rec:
        out = decode_attention(q, cache.k, cache.v, "q8_0", ctx, D ** -0.5, Hkv, cfg=cfg)
    for dtype in (torch.int64, torch.int32):
        pos = torch.tensor([ctx - 1], dtype=dtype, device="cuda")
        at = decode_attention(q, cache.k, cache.v, "q8_0", None, D ** -0.5, Hkv, cfg=cfg, pos=pos)
        err = (at - ref).abs().max().item()
        assert err < 2e-5 * max(1.0, ref.abs().max().item()), (dtype, err)
    assert rec[0]["kernel"] == cuda_q8.kernel_name(Hq // Hkv, D, stages, pack, softmax == "warp")
    assert rec[0]["num_stages"] == stages and rec[0]["q8_impl_why"] == "asked" and rec[0]["q8_pack"] == pack
    assert rec[0]["q8_impl"] == impl and rec[0]["q8_softmax"] == softmax
    err = (out - ref).abs().max().item()
    print(f"{impl} s{stages}{' packed' if pack else ''} {softmax}-softmax q8_0 {geo}: max-abs {err:.2e} (|ref| max {ref.abs().max().item():.2f})")
    assert err < 2e-5 * max(1.0, ref.abs().max().item())


def replays_match(g, out, q, cache, pos, Hkv: int, ns, before=None) -> None:
    """Replay the captured graph ``g`` at each key count n of ``ns`` (position n - 1 in ``pos``; ``before(n)``
    first, if given) and check its output ``out`` against the reference over the cache as it then is."""
    D = q.shape[1]
    for n in ns:
        if before is not None:
            before(n)
        pos.fill_(n - 1)
        torch.cuda.synchronize()
        g.replay()
        torch.cuda.synchronize()
        ref = decode_attention_ref(q, cache.k, cache.v, "q8_0", n, D ** -0.5, Hkv)
        err = (out - ref).abs().max().item()
        assert err < 2e-5 * max(1.0, ref.abs().max().item()), (n, err)


@pytest.mark.gpu
@pytest.mark.usefixtures("triton_backend")
def test_gpu_cuda_form_in_a_cuda_graph_follows_the_device_position():
    impl = "cuda_mma"
    if not CUDA:
        pytest.skip("needs CUDA (run on the GPU machine)")
    Hq, Hkv, D, cap = 32, 4, 128, 3000
    cache, gen = filled("q8_0", Hkv, D, cap, seed=7)
    q = torch.randn(Hq, D, device="cuda", generator=gen)
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    decode_attention(q, cache.k, cache.v, "q8_0", None, D ** -0.5, Hkv, cfg={"q8_impl": impl}, pos=pos)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = decode_attention(q, cache.k, cache.v, "q8_0", None, D ** -0.5, Hkv, cfg={"q8_impl": impl}, pos=pos)
    replays_match(g, out, q, cache, pos, Hkv, (1, 64, 65, 1999, 3000))


@pytest.mark.gpu
@pytest.mark.usefixtures("triton_backend")
def test_gpu_auto_takes_cuda_mma_and_keeps_rows_for_what_only_rows_has():
    """The default form on a CUDA device with nvcc: cuda_mma, recorded as auto's choice; rows where the
    launch's tiles are not cuda_mma's or a rows-only option is asked (recorded with the reason);
    cuda_mma asked by name with tiles it does not run is refused."""
    if not CUDA:
        pytest.skip("needs CUDA (run on the GPU machine)")
    if cuda_q8.nvcc_path() is None:
        pytest.skip("no nvcc on this GPU machine: auto keeps rows (test_the_cuda_form_refuses... covers the record)")
    Hq, Hkv, D, ctx = 32, 4, 128, 700
    cache, gen = filled("q8_0", Hkv, D, ctx, seed=11)
    q = torch.randn(Hq, D, device="cuda", generator=gen)
    ref = decode_attention_ref(q, cache.k, cache.v, "q8_0", ctx, D ** -0.5, Hkv)
    with da.recording() as rec:
        for cfg in ({}, {"block_n": 32}, {"q8_words": "kv"}, {"num_stages": 2}):
            out = decode_attention(q, cache.k, cache.v, "q8_0", ctx, D ** -0.5, Hkv, cfg=cfg)
            assert (out - ref).abs().max().item() < 2e-5 * max(1.0, ref.abs().max().item()), cfg
    with pytest.raises(ValueError, match="q8_impl 'cuda_mma' runs 64-key tiles on 4 warps"):
        decode_attention(q, cache.k, cache.v, "q8_0", ctx, D ** -0.5, Hkv, cfg={"q8_impl": "cuda_mma", "block_n": 32})
    # at 4 query heads a KV head (3 stages) auto packs the two float16 terms into the mma's columns
    q4 = torch.randn(16, D, device="cuda", generator=gen)
    ref4 = decode_attention_ref(q4, cache.k, cache.v, "q8_0", ctx, D ** -0.5, Hkv)
    with da.recording() as rec4:
        out4 = decode_attention(q4, cache.k, cache.v, "q8_0", ctx, D ** -0.5, Hkv)
    assert (out4 - ref4).abs().max().item() < 2e-5 * max(1.0, ref4.abs().max().item())
    assert (rec4[0]["kernel"], rec4[0]["q8_pack"]) == (cuda_q8.kernel_name(4, D, 3, pack=True), True)
    got = [(r["q8_impl"], r["kernel"], r["q8_impl_why"]) for r in rec]
    assert got[0] == ("cuda_mma", cuda_q8.kernel_name(8, D, 3), "auto: cuda_mma")
    assert got[1][:2] == ("rows", "_decode_q8_rows_kernel") and "tiles 32x3st 4w" in got[1][2]
    assert got[2][:2] == ("rows", "_decode_q8_rows_kernel") and got[2][2] == "auto: rows (q8_words asked: the rows kernel's options)"
    assert got[3] == ("cuda_mma", cuda_q8.kernel_name(8, D, 2), "auto: cuda_mma")


@pytest.mark.gpu
@pytest.mark.usefixtures("triton_backend")
def test_gpu_cuda_form_under_programmatic_dependent_launch_matches_without(monkeypatch):
    """cuda_mma launched with programmatic stream serialization (it waits for the grid before it, then
    lets the combine start early) gives the same output as a plain launch, eager and in a CUDA graph
    replayed at moving positions, and the record says which launch ran."""
    if not CUDA:
        pytest.skip("needs CUDA (run on the GPU machine)")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    monkeypatch.setenv("KVBENCH_STEP_PDL", "0")     # PDL only where the launch asks for it (cfg "pdl")
    Hq, Hkv, D, cap = 32, 8, 128, 2500
    cache, gen = filled("q8_0", Hkv, D, cap, seed=5)
    q = torch.randn(Hq, D, device="cuda", generator=gen)
    pos = torch.tensor([cap - 1], dtype=torch.long, device="cuda")
    outs = {}
    for pdl, early in ((False, "auto"), (True, "0"), (True, "auto")):
        cfg = {"q8_impl": "cuda_mma", "pdl": pdl, "q8_early": early}
        with da.recording() as rec:
            outs[pdl, early] = decode_attention(q, cache.k, cache.v, "q8_0", None, D ** -0.5, Hkv, cfg=cfg, pos=pos)
        assert rec[0]["pdl"] is pdl and rec[0]["q8_impl"] == "cuda_mma"
        assert rec[0]["q8_early"] is (pdl and early == "auto")      # auto: early loads wherever PDL is on
    assert torch.equal(outs[False, "auto"], outs[True, "0"]) and torch.equal(outs[False, "auto"], outs[True, "auto"])
    with pytest.raises(ValueError, match="q8_early .KVBENCH_DECODE_Q8_EARLY. is cuda_mma's under programmatic"):
        decode_attention(q, cache.k, cache.v, "q8_0", None, D ** -0.5, Hkv, pos=pos,
                         cfg={"q8_impl": "cuda_mma", "pdl": False, "q8_early": "1"})
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = decode_attention(q, cache.k, cache.v, "q8_0", None, D ** -0.5, Hkv,
                               cfg={"q8_impl": "cuda_mma", "pdl": True}, pos=pos)
    replays_match(g, out, q, cache, pos, Hkv, (1, 700, 2500))


@pytest.mark.gpu
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("early", ["0", "1"])
def test_gpu_early_loads_still_read_the_key_the_append_ahead_just_wrote(monkeypatch, early):
    """The decode step's order in a CUDA graph: the K/V append of the newest key (a Triton kernel under
    programmatic dependent launch, so the attention may start while it runs), then cuda_mma under PDL,
    waiting first ("0") or with its first tiles' loads before the wait ("1"). Before each replay the
    newest row holds stale K/V and the append's input is new: the output must be the reference over the
    new row (at n = 1 it is the only key; at 64 / 65 it sits at a tile's end / start; at 130 a split's
    second tile), never over the stale one."""
    if not CUDA:
        pytest.skip("needs CUDA (run on the GPU machine)")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    from engine.kernels.kv_append import kv_append_pair
    monkeypatch.setenv("KVBENCH_STEP_PDL", "1")     # the append under PDL too, as in the captured step
    Hq, Hkv, D, cap = 32, 8, 128, 3000
    cache, gen = filled("q8_0", Hkv, D, cap, seed=13)
    q = torch.randn(Hq, D, device="cuda", generator=gen)
    k_new = torch.randn(1, Hkv, D, device="cuda", generator=gen)    # the warm-up step writes them to row 0
    v_new = torch.randn(1, Hkv, D, device="cuda", generator=gen)
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    cfg = {"q8_impl": "cuda_mma", "pdl": True, "q8_early": early}

    def step():
        kv_append_pair(cache.k, cache.v, k_new, v_new, "q8_0", "q8_0", pos)
        return decode_attention(q, cache.k, cache.v, "q8_0", None, D ** -0.5, Hkv, cfg=cfg, pos=pos)

    with da.recording() as rec:
        step()
    assert rec[0]["pdl"] is True and rec[0]["q8_early"] is (early == "1")
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()

    def stale_row_and_new_inputs(n):
        stale = torch.randn(1, Hkv, D, device="cuda", generator=gen) * 4
        kv_append_pair(cache.k, cache.v, stale, -stale, "q8_0", "q8_0", torch.tensor([n - 1], device="cuda"))
        k_new.copy_(torch.randn(1, Hkv, D, device="cuda", generator=gen))
        v_new.copy_(torch.randn(1, Hkv, D, device="cuda", generator=gen) * 2)

    # the reference reads the cache as the replay appended it
    replays_match(g, out, q, cache, pos, Hkv, (1, 64, 65, 130, 2999), before=stale_row_and_new_inputs)
