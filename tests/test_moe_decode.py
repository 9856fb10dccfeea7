"""One-token MoE on the device: the Triton kernel and the engine's MoE decode paths.

References: ``moe_decode_ref`` (plain torch, float32 maths, one expert at a time) for the
kernel and for ``moe_experts_torch``; for the engine, a MoE FFN written out here from the
GGUF's host expert stacks (router softmax, top-k, renormalisation, SiLU-gated experts), and
the eager torch-backend decode for the static (device-routed) decode. HF parity of the MoE
models themselves is tests/test_hf_parity.py. On CPU the kernel runs in Triton's interpreter.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import engine
from engine import kernels, synth
from engine.kernels.moe import moe_decode, moe_decode_ref
from engine.model import moe_experts_torch


def assert_close(name, ref, out, tol):
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    rms = ((out.float() - ref.float()).pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt()).item()
    print(f"{name}: max-abs {err:.3e} (of {scale:.3e}), rms-rel {rms:.3e}")
    assert scale > 0 and err <= tol * scale, f"{name}: max-abs {err} > {tol} x {scale}"


def stacks(S, ff, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g) / d ** 0.5).to(dtype) for shape in ((S, ff, d), (S, ff, d), (S, d, ff))]


@pytest.fixture
def triton_backend():
    prev = kernels.set_backend("triton")
    yield
    kernels.set_backend(prev)


# Both sides compute in float32 from the same stored values; only summation order differs.
CASES = [pytest.param(6, 40, 72, 3, torch.float32, False, False, id="S6-ff40-d72-k3-f32"),
         pytest.param(8, 32, 64, 2, torch.float32, True, True, id="S8-ff32-d64-k2-f32-table-res"),
         pytest.param(10, 96, 300, 4, torch.bfloat16, True, False, id="S10-ff96-d300-k4-bf16-table"),
         pytest.param(5, 17, 33, 5, torch.float16, False, True, id="S5-ff17-d33-k5-f16-res")]


@pytest.mark.parametrize("unroll", [True, False], ids=["unrolled", "loop"])
@pytest.mark.parametrize("S,ff,d,k,dtype,use_table,use_res", CASES)
def test_kernel_matches_reference(S, ff, d, k, dtype, use_table, use_res, unroll, monkeypatch):
    monkeypatch.setenv("KVBENCH_MOE_UNROLL", "1" if unroll else "0")    # KVBENCH_MOE_UNROLL both ways
    gate, up, down = stacks(S, ff, d, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, d, generator=g)
    table = torch.randperm(S, generator=g).to(torch.int32) if use_table else None
    ids = torch.randperm(S, generator=g)[:k]
    w = torch.rand(k, generator=g)
    res = torch.randn(1, d, generator=g) if use_res else None
    ref = moe_decode_ref(x, gate, up, down, ids, w, table=table, residual=res)
    out = moe_decode(x, gate, up, down, ids, w, table=table, residual=res)
    assert out.shape == (1, d) and out.dtype == torch.float32
    assert_close("moe_decode", ref, out, 1e-5)
    # the engine's torch stand-in computes in the stored dtype (bf16/f16 matmuls round)
    assert_close("moe_experts_torch", ref, moe_experts_torch(x, gate, up, down, ids, w, table, res),
                 1e-5 if dtype == torch.float32 else 2e-2)


def test_kernel_reads_only_the_selected_rows():
    """Rows not selected hold NaN: a kernel that touched them would return NaN."""
    gate, up, down = stacks(7, 24, 40, torch.float32)
    ids = torch.tensor([5, 2])
    for t in (gate, up, down):
        keep = t[ids].clone()
        t.fill_(float("nan"))
        t[ids] = keep
    x, w = torch.randn(1, 40), torch.tensor([0.7, 0.3])
    out = moe_decode(x, gate, up, down, ids, w)
    assert torch.isfinite(out).all()
    assert_close("selected rows only", moe_decode_ref(x, gate, up, down, ids, w), out, 1e-5)


def test_kernel_refuses_bad_shapes():
    gate, up, down = stacks(4, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="one token"):
        moe_decode(torch.zeros(2, 16), gate, up, down, torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"\[S, ff, d\], \[S, ff, d\], \[S, d, ff\]"):
        moe_decode(torch.zeros(1, 16), gate, up, gate, torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="must be \\[k\\]"):
        moe_decode(torch.zeros(1, 16), gate, up, down, torch.tensor([0, 1]), torch.tensor([1.0]))


def reference_moe(eng, layer: int, h: torch.Tensor) -> torch.Tensor:
    """MoE FFN of one token written out from the host stacks (not through the engine's code)."""
    spec, w = eng.spec, eng.model.layers[layer]
    logits = h.float() @ w.router.float().T
    p, e = torch.softmax(logits, -1).topk(spec.n_experts_used, -1)
    if spec.moe_norm_topk:
        p = p / p.sum(-1, keepdim=True)
    gate, up, down = (t.float() for t in w.experts.tensors())
    y = torch.zeros_like(h)
    for pj, ej in zip(p[0].tolist(), e[0].tolist()):
        y += pj * ((F.silu(h @ gate[ej].T) * (h @ up[ej].T)) @ down[ej].T)
    return y


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("model", ["tiny-qwen3moe", "tiny-olmoe", "tiny-llama-moe"])
def test_engine_one_token_moe_matches_written_out_reference(model, backend):
    prev = kernels.set_backend(backend)
    try:
        eng = engine.load(synth.ensure(model), ctx=16)
        layer = eng.spec.moe_layers[-1]
        h = torch.randn(1, eng.spec.d_model, generator=torch.Generator().manual_seed(2))
        ref = reference_moe(eng, layer, h)
        assert_close(f"{model} eager MoE ({backend})", ref, eng.model.moe(layer, h), 1e-5)
        # the device-routed path: routing and the kernel through the cache's slot table
        eng.model.make_experts_resident()
        gate, up, down, table = eng.model.layers[layer].experts.resident_view()
        top_p, top_e = engine.model.moe_route(eng.spec, h, eng.model.layers[layer].router)
        run = eng.model._moe_kernel(h.device)
        assert_close(f"{model} resident MoE ({backend})", ref, run(h, gate, up, down, top_e[0], top_p[0], table=table),
                     1e-5)
    finally:
        kernels.set_backend(prev)


def test_tiny_cache_never_serves_an_evicted_expert():
    """A cache of exactly k slots: fetching a token's experts can evict one fetched for the same
    token (probationary segment of 1). The decode must run such a token in groups and still
    equal the all-resident engine bit for bit (torch backend: same sums in the same order)."""
    from engine.planner import plan, spec_for_model
    model = "tiny-qwen3moe"
    k = synth.config(model).n_used
    # one trunk layer, so its experts come back (hits fill the protected segment)
    p = plan(spec_for_model(model), kv_dtype="fp32", ctx=40, device="cpu", n_gpu_layers=1)
    budget = p.trunk.total - p.trunk.expert_cache + k * p.expert_slot_bytes
    small = engine.load(synth.ensure(model), ctx=40, vram_budget=budget, n_gpu_layers=1)
    full = engine.load(synth.ensure(model), ctx=40, n_gpu_layers=1,
                       vram_budget=budget + (p.trunk_experts - k) * p.expert_slot_bytes)
    assert small.plan.expert_slots == k and small.expert_cache.policy.protected_capacity == k - 1
    assert full.plan.expert_slots == full.plan.trunk_experts
    groups = []
    cls = type(small.model.layers[0].experts)
    orig = cls.slot_groups

    def spy(self, layer, experts):
        n = 0
        for g in orig(self, layer, experts):
            n += 1
            yield g
        groups.append(n)
    cls.slot_groups = spy
    try:
        ids = list(range(300, 340))
        small.prefill(ids[:4])
        full.prefill(ids[:4])
        for t in ids[4:]:
            assert torch.equal(small.decode(t), full.decode(t))
    finally:
        cls.slot_groups = orig
    st = small.expert_cache.stats()
    assert max(groups) > 1, groups                        # the case happened
    assert st["evictions"] > 0 and st["misses"] > 0


@pytest.mark.gpu
def test_kernel_on_cuda_with_a_stack_past_2_to_the_31_elements():
    """Slot offsets are int64: rows past 2^31 elements of a stack (a 58 GB coder30b cache)."""
    ff, d = 768, 2048
    S = (1 << 31) // (ff * d) + 4
    buf = torch.empty(S * ff * d, dtype=torch.bfloat16, device="cuda")
    gate = up = buf.view(S, ff, d)
    down = buf.view(S, d, ff)
    ids = torch.tensor([S - 1, 3, S - 2], device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    for s in ids.tolist():
        gate[s].copy_(torch.randn(ff, d, generator=g, device="cuda") / d ** 0.5)
    x = torch.randn(1, d, device="cuda", generator=g)
    w = torch.tensor([0.5, 0.3, 0.2], device="cuda")
    assert_close("2^31 offsets", moe_decode_ref(x, gate, up, down, ids, w), moe_decode(x, gate, up, down, ids, w), 1e-4)


def test_static_moe_decode_equals_torch_backend_eager():
    """The device-routed static step (Triton attention + MoE kernel through the slot table)
    against the eager step on the torch backend (torch attention, ``moe_experts_torch`` over
    host-routed slots): no kernel in common."""
    eng = engine.load(synth.ensure("tiny-qwen3moe"), ctx=32)
    prompt, feed = [5, 17, 3, 99, 42, 7, 11, 64], [64, 3, 900, 12]
    prev = kernels.set_backend("torch")
    try:
        eng.prefill(prompt)
        ref = torch.stack([eng.decode(t) for t in feed])
        kernels.set_backend("triton")
        eng.set_decode_mode("static")
        eng.prefill(prompt)
        got = torch.stack([eng.decode(t) for t in feed])
    finally:
        kernels.set_backend(prev)
    assert_close("static (triton) vs eager (torch) logits", ref, got, 1e-5)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_bench_settings_variants_parse_and_restore(monkeypatch):
    """benchmarks/bench_moe_decode.py --variants: named sets of the decode settings (each a
    declared engine setting, its value validated before the run), ad-hoc ones, and the
    environment restored after a variant's block."""
    import importlib.util
    import os
    from pathlib import Path
    from engine import settings
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_moe_decode.py"
    spec = importlib.util.spec_from_file_location("bench_moe_decode_variants", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    names = ("KVBENCH_DECODE_FUSED_QKV", "KVBENCH_DECODE_ROUTE_KERNEL", "KVBENCH_DECODE_DEVICE_EMBED",
             "KVBENCH_DECODE_FUSED_GATE_UP", "KVBENCH_DECODE_KV_PAIR", "KVBENCH_DECODE_FUSED_GEMV",
             "KVBENCH_DECODE_ROPE_APPEND")
    assert all(settings.SETTINGS[n].default is True for n in names)
    assert settings.SETTINGS["KVBENCH_DECODE_FUSED_QKV"].numerics and settings.SETTINGS["KVBENCH_DECODE_ROUTE_KERNEL"].numerics
    v = mod.parse_variants("default,baseline,no_route_kernel,only_device_embed,mine:KVBENCH_DECODE_READBACK=4")
    assert v["default"] == {} and v["baseline"] == {n: "0" for n in names}
    assert v["no_route_kernel"] == {"KVBENCH_DECODE_ROUTE_KERNEL": "0"}
    assert v["only_device_embed"] == {"KVBENCH_DECODE_FUSED_QKV": "0", "KVBENCH_DECODE_ROUTE_KERNEL": "0",
                                      "KVBENCH_DECODE_DEVICE_EMBED": "1", "KVBENCH_DECODE_FUSED_GATE_UP": "0",
                                      "KVBENCH_DECODE_KV_PAIR": "0", "KVBENCH_DECODE_FUSED_GEMV": "0",
                                      "KVBENCH_DECODE_ROPE_APPEND": "0"}
    assert v["mine"] == {"KVBENCH_DECODE_READBACK": "4"} and list(v)[0] == "default"
    for bad, msg in (("fastest", "unknown variant"), ("x:KVBENCH_NOPE=1", "not a kvbench setting")):
        with pytest.raises(SystemExit, match=msg):
            mod.parse_variants(bad)
    with pytest.raises(engine.errors.ConfigError, match="KVBENCH_DECODE_READBACK"):
        mod.parse_variants("x:KVBENCH_DECODE_READBACK=0")
    monkeypatch.setenv("KVBENCH_DECODE_FUSED_QKV", "1")
    monkeypatch.delenv("KVBENCH_DECODE_ROUTE_KERNEL", raising=False)
    with mod.applied_settings(v["baseline"]):
        assert [os.environ[n] for n in names] == ["0"] * len(names) and not settings.get("KVBENCH_DECODE_FUSED_QKV")
    assert os.environ["KVBENCH_DECODE_FUSED_QKV"] == "1" and "KVBENCH_DECODE_ROUTE_KERNEL" not in os.environ


def test_bench_flags_a_variant_whose_setting_was_not_applied():
    """A variant asking a decode setting on that the step did not apply measured the default
    step again: the bench names it (row, table, summary), it never passes for the setting."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_moe_decode.py"
    spec = importlib.util.spec_from_file_location("bench_moe_decode_applied", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    applied = {"fused_gemv": True, "rope_append": False, "device_embed": True}
    assert mod.not_applied({"KVBENCH_DECODE_ROPE_APPEND": "1"}, applied) == ["KVBENCH_DECODE_ROPE_APPEND"]
    assert mod.not_applied({"KVBENCH_DECODE_ROPE_APPEND": "0"}, applied) == []       # asked off, is off
    assert mod.not_applied({"KVBENCH_DECODE_FUSED_GEMV": "1", "KVBENCH_DECODE_READBACK": "4"}, applied) == []
    assert mod.not_applied({"KVBENCH_DECODE_ROPE_APPEND": "1"}, None) == []           # eager path: no flags
    r = {"tok_s": {"median": 1.0, "min": 1.0, "max": 1.0}, "gb_s": 1.0, "roofline_frac": 0.1,
         "not_applied": ["KVBENCH_DECODE_ROPE_APPEND"]}
    doc = {"variants": [{"kv": "bf16", "depth": 16, "paths": {}, "path_errors": {},
                         "by_variant": {"default": {"paths": {"cuda_graph": dict(r, not_applied=[])}, "path_errors": {}},
                                        "rope": {"paths": {"cuda_graph": r}, "path_errors": {}}}}],
           "model": "m", "total_s": 1.0, "ensure_s": 0.0, "bandwidth_bytes_s": {"copy": 1e12}, "skipped": [],
           "failed": []}
    assert "NOT APPLIED: KVBENCH_DECODE_ROPE_APPEND" in mod.table(doc).splitlines()[-1]
    rows = mod.summary(doc)["tok_s"]
    assert "not_applied" not in rows[0] and rows[1]["not_applied"] == ["KVBENCH_DECODE_ROPE_APPEND"]
    # call 4 of 2026-12-04: rope_append asked off, and the default had not applied it either
    on = {"cuda_graph": {"settings": dict(applied)}}
    off = {"cuda_graph": {"settings": dict(applied)}}
    mod.mark_same_step(off, on, {"KVBENCH_DECODE_ROPE_APPEND": "0"}, "default")
    assert off["cuda_graph"]["same_step_as"] == "default"
    differs = {"cuda_graph": {"settings": dict(applied, rope_append=True)}}
    mod.mark_same_step(differs, on, {"KVBENCH_DECODE_ROPE_APPEND": "1"}, "default")
    assert "same_step_as" not in differs["cuda_graph"]
    tiles = {"cuda_graph": {"settings": dict(applied)}}            # a tile variable with no launches recorded: not marked
    mod.mark_same_step(tiles, on, {"KVBENCH_DECODE_BLOCK_N": "64"}, "default")
    assert "same_step_as" not in tiles["cuda_graph"]


def test_bench_marks_a_kernel_tunable_that_changed_no_launch():
    """A variant setting only an attention-kernel tunable is compared on the step's recorded
    launches: the same launches as the first variant (the variable not taken, or resolving to
    the default) is SAME STEP; a different launch is a real variant."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_moe_decode.py"
    spec = importlib.util.spec_from_file_location("bench_moe_decode_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    launch = {"kernel": "_decode_q8_rows_kernel", "block_n": 64, "layers": 30}
    flags = {"fused_gemv": True, "rope_append": True}
    first = {"cuda_graph": {"settings": dict(flags, attn_launches=[launch])}}
    same = {"cuda_graph": {"settings": dict(flags, attn_launches=[dict(launch)])}}
    mod.mark_same_step(same, first, {"KVBENCH_DECODE_BLOCK_N": "64"}, "default")
    assert same["cuda_graph"]["same_step_as"] == "default"
    other = {"cuda_graph": {"settings": dict(flags, attn_launches=[dict(launch, block_n=32)])}}
    mod.mark_same_step(other, first, {"KVBENCH_DECODE_BLOCK_N": "32"}, "default")
    assert "same_step_as" not in other["cuda_graph"]
    unrelated = {"cuda_graph": {"settings": dict(flags, attn_launches=[dict(launch)])}}
    mod.mark_same_step(unrelated, first, {"KVBENCH_DECODE_READBACK": "4"}, "default")   # not a step setting
    assert "same_step_as" not in unrelated["cuda_graph"]
    full = dict(launch, num_stages=3, num_warps=4, splits=88)
    assert mod.launches_text({"settings": {"attn_launches": [full]}}) == \
        "; attention decode_q8_rows_kernel 64x3st 4w 88 splits (30 layers)"
    assert mod.launches_text({"settings": {}}) == ""
