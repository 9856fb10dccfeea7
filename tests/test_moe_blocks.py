"""Routed experts kept in GGUF blocks: the split layout and the one-token MoE kernel over it.

References: ``gguf.quants`` (the GGUF package's own quantize/dequantize) for the layout: the
split arrays give back ggml's bytes exactly and dequantise to ``gguf.quants.dequantize``'s
values; ``moe_decode_ref`` (plain torch, float32, one expert at a time) over those values
for the kernel. On CPU the kernel runs in Triton's interpreter.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants

from engine import settings
from engine.errors import ConfigError
from engine.kernels.moe import moe_decode_ref
from engine.kernels.moe_blocks import BlockStack, moe_decode_blocks, moe_decode_blocks_ref

QTYPES = {"q4_0": QT.Q4_0, "q8_0": QT.Q8_0}


def ggml_stack(fmt, S, N, K, seed):
    """(raw ggml bytes [S, N*K/32*bytes] as torch uint8, gguf.quants' float values [S, N, K])."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((S * N, K)) / K ** 0.5).astype(np.float32)
    w[0, :32] *= 1e-3                                # a block of small values
    raw = quants.quantize(w, QTYPES[fmt])            # [S*N, K/32*bytes] uint8
    ref = quants.dequantize(raw, QTYPES[fmt]).reshape(S, N, K)
    return torch.from_numpy(raw.reshape(S, N, -1).copy()), torch.from_numpy(ref.copy())


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_split_layout_round_trips_ggml_bytes_and_values(fmt):
    raw, ref = ggml_stack(fmt, 3, 5, 96, seed=1)
    st = BlockStack.from_ggml(raw, fmt, (3, 5, 96))
    assert st.shape == (3, 5, 96) and st.d.dtype == torch.float16
    assert torch.equal(st.to_ggml(), raw), "split arrays do not give back ggml's bytes"
    assert torch.equal(st.dequantize(), ref), "values differ from gguf.quants.dequantize"
    assert torch.equal(st.rows(2), ref[2])
    assert st.nbytes == raw.numel()                  # the same bytes, only rearranged
    assert torch.equal(st[1].dequantize()[0], ref[1])


def test_layout_rejects_what_is_not_a_stack():
    raw, _ = ggml_stack("q4_0", 2, 3, 64, seed=2)
    with pytest.raises(ValueError, match="not q4_0 blocks"):
        BlockStack.from_ggml(raw[:, :, :-1].contiguous(), "q4_0", (2, 3, 64))
    with pytest.raises(ValueError, match="not one of"):
        BlockStack.from_ggml(raw, "q5_k", (2, 3, 64))
    with pytest.raises(ValueError, match="multiple of 32"):
        BlockStack.empty("q8_0", (1, 2, 48))


CASES = [pytest.param("q4_0", 6, 64, 96, 3, False, False, id="q4_0-S6-ff64-d96-k3"),
         pytest.param("q4_0", 8, 96, 320, 2, True, True, id="q4_0-S8-ff96-d320-k2-table-res"),
         pytest.param("q8_0", 5, 96, 288, 4, True, False, id="q8_0-S5-ff96-d288-k4-table"),
         pytest.param("q8_0", 4, 160, 64, 2, False, True, id="q8_0-S4-ff160-d64-k2-res")]


def assert_close(name, ref, out, tol):
    err = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"{name}: max-abs {err:.3e} of {scale:.3e}")
    assert scale > 0 and torch.isfinite(out).all() and err <= tol * scale, f"{name}: {err} > {tol} x {scale}"


@pytest.mark.parametrize("unroll,form", [(True, "blocks"), (False, "gather"), (True, "gather"), (False, "blocks")],
                         ids=["unrolled-blocks", "loop-gather", "unrolled-gather", "loop-blocks"])
@pytest.mark.parametrize("fmt,S,ff,d,k,use_table,use_res", CASES)
def test_kernel_matches_reference_over_gguf_values(fmt, S, ff, d, k, use_table, use_res, unroll, form, monkeypatch):
    """Both sum forms (per-block sums times the scale; per-value scales) in both loop forms."""
    monkeypatch.setenv("KVBENCH_MOE_UNROLL", "1" if unroll else "0")
    monkeypatch.setenv("KVBENCH_MOE_BLOCKS_FORM", form)
    monkeypatch.setenv("KVBENCH_MOE_BLOCKS_GU_BLOCK_K", "64")     # several steps, a ragged last one
    monkeypatch.setenv("KVBENCH_MOE_BLOCKS_DOWN_BLOCK_K", "64")
    monkeypatch.setenv("KVBENCH_MOE_BLOCKS_DOWN_BLOCK_D", "8")
    stacks = []
    for i, shape in enumerate(((S, ff, d), (S, ff, d), (S, d, ff))):
        raw, ref = ggml_stack(fmt, *shape, seed=10 + i)
        stacks.append((BlockStack.from_ggml(raw, fmt, shape), ref))
    (gate, g_ref), (up, u_ref), (down, d_ref) = stacks
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, d, generator=g)
    table = torch.randperm(S, generator=g).to(torch.int32) if use_table else None
    ids = torch.randperm(S, generator=g)[:k]
    w = torch.rand(k, generator=g)
    res = torch.randn(1, d, generator=g) if use_res else None
    ref = moe_decode_ref(x, g_ref, u_ref, d_ref, ids, w, table=table, residual=res)   # gguf.quants' values
    out = moe_decode_blocks(x, gate, up, down, ids, w, table=table, residual=res)
    assert out.shape == (1, d) and out.dtype == torch.float32
    assert_close(f"moe_decode_blocks {fmt}", ref, out, 1e-5)
    assert_close("moe_decode_blocks_ref", ref, moe_decode_blocks_ref(x, gate, up, down, ids, w, table, res), 1e-6)


def test_kernel_reads_only_the_selected_experts():
    """Scales of experts not selected are NaN: a kernel that touched them would return NaN."""
    shapes = ((5, 64, 64), (5, 64, 64), (5, 64, 64))
    stacks = [BlockStack.from_ggml(ggml_stack("q4_0", *s, seed=20 + i)[0], "q4_0", s) for i, s in enumerate(shapes)]
    ids = torch.tensor([3, 1])
    clean = [st.dequantize() for st in stacks]
    for st in stacks:
        keep = st.d[ids].clone()
        st.d.fill_(float("nan"))
        st.d[ids] = keep
    x, w = torch.randn(1, 64), torch.tensor([0.6, 0.4])
    out = moe_decode_blocks(x, *stacks, ids, w)
    assert_close("selected experts only", moe_decode_ref(x, *clean, ids, w), out, 1e-5)


def test_tile_settings_are_read_at_each_launch_and_checked(monkeypatch):
    """A tile size set after import reaches the launch: one the kernel cannot take (not a power
    of two) is refused there, naming the setting; below 32 the setting's own range refuses it."""
    raw, _ = ggml_stack("q4_0", 2, 64, 64, seed=4)
    st = BlockStack.from_ggml(raw, "q4_0", (2, 64, 64))
    args = (torch.randn(1, 64), st, st, st, torch.tensor([1]), torch.tensor([1.0]))
    moe_decode_blocks(*args)                                        # the defaults run
    monkeypatch.setenv("KVBENCH_MOE_BLOCKS_DOWN_BLOCK_K", "96")
    with pytest.raises(ConfigError, match="KVBENCH_MOE_BLOCKS_DOWN_BLOCK_K=96 is not a power of two"):
        moe_decode_blocks(*args)
    monkeypatch.setenv("KVBENCH_MOE_BLOCKS_GU_BLOCK_K", "16")
    with pytest.raises(ConfigError, match="KVBENCH_MOE_BLOCKS_GU_BLOCK_K"):
        settings.validate()



def test_each_part_takes_its_form_and_the_form_setting_overrides_both(monkeypatch):
    """The sum form is per part (CONFIG's SUMS, or the part's _SUMS setting); FORM=blocks|gather
    sets both; what each launch ran is in the launch log, not only in the configuration."""
    from engine.kernels import moe_blocks as mb
    raw, _ = ggml_stack("q4_0", 2, 64, 64, seed=5)
    st = BlockStack.from_ggml(raw, "q4_0", (2, 64, 64))
    args = (torch.randn(1, 64), st, st, st, torch.tensor([1]), torch.tensor([1.0]))

    def ran():
        with mb.recording() as log:
            moe_decode_blocks(*args)
        return {r["part"]: r["form"] for r in log}

    monkeypatch.setenv("KVBENCH_MOE_BLOCKS_GU_SUMS", "1")
    monkeypatch.setenv("KVBENCH_MOE_BLOCKS_DOWN_SUMS", "0")
    assert ran() == {"gate_up": "blocks", "down": "gather"}
    monkeypatch.setenv("KVBENCH_MOE_BLOCKS_FORM", "gather")
    assert ran() == {"gate_up": "gather", "down": "gather"}
    monkeypatch.setenv("KVBENCH_MOE_BLOCKS_FORM", "blocks")
    assert ran() == {"gate_up": "blocks", "down": "blocks"}

def test_stacks_in_host_memory_take_the_host_tiles_and_the_settings_override_both(monkeypatch):
    """A CUDA launch over stacks in host memory (read over PCIe) applies HOST_CONFIG, over stacks
    on the device CONFIG; the tile settings override either; a launch on the CPU is "device"
    (one memory); an unknown placement is refused, never replaced by a default."""
    from engine.kernels import moe_blocks as mb
    monkeypatch.setattr("engine.kernels.interpreted", lambda: False)
    st = BlockStack.empty("q4_0", (2, 64, 64))
    assert mb.placement_of(st, torch.device("cuda")) == "host"
    assert mb.placement_of(st, torch.device("cpu")) == "device"
    for part in ("gate_up", "down"):
        host, dev = mb.launch_config(part, "host"), mb.launch_config(part, "device")
        assert {k: host[k] for k in mb.HOST_CONFIG[part]} == {**mb.HOST_CONFIG[part], "SUMS": bool(mb.HOST_CONFIG[part]["SUMS"])}
        assert {k: dev[k] for k in mb.CONFIG[part]} == {**mb.CONFIG[part], "SUMS": bool(mb.CONFIG[part]["SUMS"])}
    assert mb.HOST_CONFIG != mb.CONFIG          # else the placement would select nothing
    monkeypatch.setenv("KVBENCH_MOE_BLOCKS_GU_BLOCK_K", "64")
    assert mb.launch_config("gate_up", "host")["BLOCK_K"] == mb.launch_config("gate_up", "device")["BLOCK_K"] == 64
    with pytest.raises(ValueError, match="placement 'pcie'"):
        mb.launch_config("down", "pcie")
    raw, _ = ggml_stack("q4_0", 2, 64, 64, seed=5)
    st = BlockStack.from_ggml(raw, "q4_0", (2, 64, 64))
    monkeypatch.undo()
    with mb.recording() as log:
        moe_decode_blocks(torch.randn(1, 64), st, st, st, torch.tensor([1]), torch.tensor([1.0]))
    assert [r["placement"] for r in log] == ["device", "device"]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_compiled_kernel_reads_pinned_host_stacks_over_pcie(fmt):
    """The kernels compiled for the GPU reading stacks in page-locked host memory in place (the
    hybrid's "pcie" tier) at their host tiles, against moe_decode_ref over gguf.quants' values."""
    from engine.kernels import moe_blocks as mb
    E, ff, d, k = 16, 768, 2048, 8
    shapes = ((E, ff, d), (E, ff, d), (E, d, ff))
    raws = [ggml_stack(fmt, *shape, seed=40 + i) for i, shape in enumerate(shapes)]
    stacks = []
    for (r, _), shape in zip(raws, shapes):
        src = BlockStack.from_ggml(r, fmt, shape)
        dst = BlockStack.empty(fmt, shape, pinned=True)
        dst.qs.copy_(src.qs)
        dst.d.copy_(src.d)
        stacks.append(dst)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, d, generator=g)
    ids = torch.randperm(E, generator=g)[:k]
    w = torch.rand(k, generator=g)
    ref = moe_decode_ref(x, raws[0][1], raws[1][1], raws[2][1], ids, w)
    with mb.recording() as log:
        out = moe_decode_blocks(x.cuda(), *stacks, ids.cuda(), w.cuda())
    assert {r["placement"] for r in log} == {"host"}
    assert_close(f"compiled moe_decode_blocks {fmt} over pinned host stacks", ref, out.cpu(), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["blocks", "gather"])
@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_compiled_kernel_matches_reference_at_coder30b_geometry(fmt, form, monkeypatch):
    """The kernel compiled for the GPU at the geometry that matters (coder30b: d 2048, ff 768,
    8 experts, through a slot table; 16 experts in the stack keep the numpy quantisation short),
    against moe_decode_ref over gguf.quants' values."""
    monkeypatch.setenv("KVBENCH_MOE_BLOCKS_FORM", form)
    E, ff, d, k = 16, 768, 2048, 8
    raws = [ggml_stack(fmt, *shape, seed=30 + i) for i, shape in enumerate(((E, ff, d), (E, ff, d), (E, d, ff)))]
    stacks = [BlockStack.from_ggml(r, fmt, shape).to("cuda")
              for (r, _), shape in zip(raws, ((E, ff, d), (E, ff, d), (E, d, ff)))]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, d, generator=g)
    table = torch.randperm(E, generator=g).to(torch.int32)
    ids = torch.randperm(E, generator=g)[:k]
    w = torch.rand(k, generator=g)
    res = torch.randn(1, d, generator=g)
    ref = moe_decode_ref(x, raws[0][1], raws[1][1], raws[2][1], ids, w, table=table, residual=res)
    out = moe_decode_blocks(x.cuda(), *stacks, ids.cuda(), w.cuda(), table=table.cuda(), residual=res.cuda())
    assert_close(f"compiled moe_decode_blocks {fmt}", ref, out.cpu(), 1e-5)
