"""Experts kept in their GGUF blocks, and llama.cpp's placement (``--n-cpu-moe N``).

References: the engine with experts dequantised at load (float32 weights: the file's exact
values), for the blocks on the trunk (same values, float32 maths: summation order only) and,
within the bf16 speed path's bound, for the experts computed on the host CPU; the GGUF's own
tensor byte counts for what the planner prices; the eager step for the static one. The
per-expert maths are tests/test_moe_blocks.py and tests/test_cpu_experts.py (gguf.quants).
"""
from __future__ import annotations

import re

import pytest
import torch

import engine
from engine import kernels, planner, synth
from engine.cuda_graph import host_layers
from engine.errors import ConfigError, OutOfMemoryError
from engine.models import spec_for

PROMPT = [5, 17, 29, 41, 53, 65, 77, 89]


@pytest.fixture(scope="module")
def mini():
    return synth.ensure("coder30b-mini-synth")         # Q4_0 experts, Q8_0 attention


def load(path, **kw):
    return engine.load(path, kv_dtype="fp32", device="cpu", ctx=48, weight_format="f32", **kw)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_blocks_on_the_trunk_compute_the_files_values(mini):
    ref, blk = load(mini), load(mini, expert_format="blocks", cpu_moe=0)
    spec = blk.spec
    assert blk.plan.expert_format == "q4_0" and blk.plan.cpu_moe == 0 and blk.plan.cpu_moe_requested == "0"
    assert blk.plan.layer_expert_tiers == ["trunk" if i in spec.moe_layers else "" for i in range(spec.n_layers)]
    assert blk.expert_cache is None and blk.cpu_expert_math is None
    assert all(r.diff == 0 for r in blk.ledger.compare(blk.plan))
    # the experts take the file's bytes: Q4_0 blocks split into quants and scales, nothing added
    g = blk.gguf
    file_bytes = sum(g.tensors[f"blk.{i}.{n}.weight"].n_bytes for i in spec.moe_layers
                     for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))
    assert sum(blk.plan.layer_expert_bytes) == file_bytes
    # against float32 experts (the default engine caches every one of them on the trunk): 4 bytes a value
    assert blk.plan.trunk.weights - ref.plan.trunk.weights == file_bytes
    assert ref.plan.trunk.expert_cache == 4 * file_bytes * 32 // 18 and blk.plan.trunk.expert_cache == 0
    lr, lb = ref.prefill(PROMPT), blk.prefill(PROMPT)
    assert rel(lb, lr) < 1e-5
    for t in (3, 11, 19):
        assert rel(blk.decode(t), ref.decode(t)) < 1e-4


def test_blocks_refuse_what_they_cannot_apply(mini, tmp_path):
    with pytest.raises(ConfigError, match="expert_format 'bogus'"):
        load(mini, expert_format="bogus")
    with pytest.raises(ConfigError, match="F32"):            # float experts are not blocks
        load(synth.ensure("tiny-qwen3moe"), expert_format="blocks")
    with pytest.raises(ConfigError, match="no routed experts"):
        load(synth.ensure("tiny-llama"), expert_format="blocks")
    with pytest.raises(ConfigError, match="expert_format='blocks'"):
        load(mini, cpu_moe=2)                                   # host experts need the blocks
    with pytest.raises(ConfigError, match="Q4_0"):
        load(synth.ensure("tiny-qwen3moe-q8_0"), expert_format="blocks", cpu_moe=1)
    first = load(mini)
    with pytest.raises(ConfigError, match="weights_from: this plan keeps experts as q4_0"):
        engine.load(mini, kv_dtype="fp32", device="cpu", ctx=48, weight_format="f32",
                    expert_format="blocks", weights_from=first)
    assert first.model is not None                      # refused before anything was taken


def test_weights_from_takes_over_blocks_with_the_same_placement(mini):
    a = load(mini, expert_format="blocks", cpu_moe=2)
    la = a.prefill(PROMPT)
    b = engine.load(mini, kv_dtype="bf16", device="cpu", ctx=64, weight_format="f32", expert_format="blocks",
                    cpu_moe=2, weights_from=a)
    assert a.model is None and b.plan.cpu_moe == 2 and b.kv_spec == "bf16"
    assert all(r.diff == 0 for r in b.ledger.compare(b.plan))
    assert rel(b.prefill(PROMPT), la) < 2e-2          # bf16 KV now; the same weights
    with pytest.raises(ConfigError, match="with 1 MoE layers on the CPU, the loaded weights as q4_0 with 2"):
        engine.load(mini, kv_dtype="fp32", device="cpu", ctx=48, weight_format="f32", expert_format="blocks",
                    cpu_moe=1, weights_from=b)


def test_cpu_moe_runs_the_first_layers_experts_on_the_host(mini):
    ref, cpu = load(mini), load(mini, expert_format="blocks", cpu_moe=2)
    spec = cpu.spec
    moe = sorted(spec.moe_layers)
    assert cpu.plan.cpu_moe == 2
    assert [cpu.plan.layer_expert_tiers[i] for i in moe] == ["cpu", "cpu"] + ["trunk"] * (len(moe) - 2)
    assert "bf16" in cpu.cpu_expert_math
    assert cpu.model.host_expert_layers() == moe[:2]
    assert all(r.diff == 0 for r in cpu.ledger.compare(cpu.plan))
    host = [r for r in cpu.ledger.compare(cpu.plan) if (r.category, r.tier) == ("weights", "host")][0]
    assert host.planned == cpu.plan.host.weights > 2 * planner.cpu_expert_bytes(spec)
    lr, lc = ref.prefill(PROMPT), cpu.prefill(PROMPT)
    err = rel(lc, lr)
    print(f"cpu_moe=2 prefill logits vs the exact engine: {err:.2e} of max |logit|")
    assert 0 < err < 2e-2           # bf16 activations and scales in two layers, nothing else
    assert rel(cpu.decode(3), ref.decode(3)) < 2e-2


@pytest.mark.parametrize("host", ["pcie", "dma"])
def test_pcie_host_experts_compute_what_resident_blocks_do(mini, host):
    """host_experts="pcie"/"dma": the cpu_moe layers' experts stay on the host as their blocks
    alone (the planner prices no int4 packing) and the layer's device reads them in place
    (pcie) or from a staging copy of the k chosen (dma: one trunk scratch stack, shared), with
    the resident blocks' maths, so every logit equals an all-trunk load's (on a CPU device
    host and trunk are one memory: the GPU's reads are test_pcie_experts_on_the_gpu_...)."""
    trunk = load(mini, expert_format="blocks", cpu_moe=0)
    eng = load(mini, expert_format="blocks", cpu_moe=2, host_experts=host)
    cpu = load(mini, expert_format="blocks", cpu_moe=2)
    moe = sorted(eng.spec.moe_layers)
    assert [eng.plan.layer_expert_tiers[i] for i in moe] == [host, host] + ["trunk"] * (len(moe) - 2)
    assert eng.plan.host_experts == host
    assert eng.model.host_expert_layers() == ([] if host == "pcie" else moe[:2])   # dma: a routing sync
    assert ("over PCIe" if host == "pcie" else "DMA") in eng.cpu_expert_math
    assert all(r.diff == 0 for r in eng.ledger.compare(eng.plan))
    blocks = sum(planner.expert_block_buffers(eng.spec, "q4_0"))
    assert eng.plan.host.weights - trunk.plan.host.weights == 2 * blocks          # the blocks alone
    assert cpu.plan.host.weights - eng.plan.host.weights == 2 * (planner.cpu_expert_bytes(eng.spec) - blocks)
    staging = eng.plan.scratch_items.get("expert_staging", 0)
    k, E = eng.spec.n_experts_used, eng.spec.n_experts
    assert (staging >= k * blocks // E) if host == "dma" else staging == 0       # k experts' blocks
    toks = PROMPT + [3, 11, 19]
    assert torch.equal(eng.logits(toks), trunk.logits(toks))
    eng.prefill(PROMPT)
    trunk.prefill(PROMPT)
    for t in (3, 11):                        # one-token steps: in place, or through the staging copy
        assert torch.equal(eng.decode(t), trunk.decode(t))
    with pytest.raises(ConfigError, match="host_experts 'gpu' is not one of cpu, pcie, dma"):
        load(mini, expert_format="blocks", cpu_moe=2, host_experts="gpu")
    with pytest.raises(ConfigError, match="needs them in the file's blocks"):
        load(mini, cpu_moe=None, host_experts=host)


def test_native_cpu_experts_decode_as_the_exact_engine_does(mini, monkeypatch):
    """KVBENCH_CPU_MOE_NATIVE: the cpu-tier layers' one-token steps go through engine.native (Q4_0
    blocks x 8-bit activations), named in the layer's maths; a decode stays within the 8-bit
    rounding of the exact engine's, and differs from the int4 path's (it is not that path).
    Unset, the layer takes native exactly where engine.native built its AVX2 path."""
    from engine import native
    ok, why = native.available()
    if not ok:
        pytest.skip(f"native kernels unavailable: {why}")
    ref, cpu = load(mini), load(mini, expert_format="blocks", cpu_moe=2)
    ref.prefill(PROMPT)
    want = ref.decode(3)
    monkeypatch.setenv("KVBENCH_CPU_MOE_NATIVE", "0")
    assert native.MATH not in cpu.cpu_expert_math
    cpu.prefill(PROMPT)
    int4 = cpu.decode(3)
    monkeypatch.setenv("KVBENCH_CPU_MOE_NATIVE", "1")
    assert native.MATH in cpu.cpu_expert_math and "batches:" in cpu.cpu_expert_math
    cpu.prefill(PROMPT)
    got = cpu.decode(3)
    print(f"native decode vs exact {rel(got, want):.2e}, int4 path vs exact {rel(int4, want):.2e}")
    assert rel(got, want) < 2e-2 and not torch.equal(got, int4)
    # unset: the AVX2 build is the default, the portable one is not; the maths says which ran
    monkeypatch.delenv("KVBENCH_CPU_MOE_NATIVE")
    on, why = native.default_on()
    assert on == (native.simd() >= 2), why
    assert (native.MATH in cpu.cpu_expert_math) == on
    cpu.prefill(PROMPT)
    assert torch.equal(cpu.decode(3), got if on else int4)


def test_host_nodes_ask_for_nothing_off_cuda(mini, monkeypatch):
    """KVBENCH_HOST_NODES on a CPU engine: no step is captured, so no layer becomes a host node,
    and the decode path's reason claims none."""
    from engine.cuda_graph import StaticDecode, node_layers
    monkeypatch.setenv("KVBENCH_HOST_NODES", "1")
    monkeypatch.setenv("KVBENCH_CPU_MOE_NATIVE", "1")
    prev = kernels.set_backend("triton")
    try:
        eng = load(mini, expert_format="blocks", cpu_moe=2)
        eng.set_decode_mode("static")
        assert node_layers(eng) == [] and "host nodes" not in eng.decode_path_reason
        assert StaticDecode(eng).node_layers == []
    finally:
        kernels.set_backend(prev)


@pytest.mark.gpu
def test_host_nodes_make_the_hybrid_step_one_graph(monkeypatch):
    """KVBENCH_HOST_NODES: the cpu-tier layers (engine.native) run as host nodes inside one CUDA
    graph (copy in, native host function, copy back) instead of one graph per stretch between
    them; the tokens and logits are those of the split graphs (the same C function over the
    same bytes), the reason says so, and each layer's job ran once per step without error."""
    from engine import native
    if native.simd() < 2:
        pytest.skip("engine.native without AVX2 is not the cpu tier's path here")
    monkeypatch.setenv("KVBENCH_CPU_MOE_NATIVE", "1")
    kw = dict(kv_dtype="bf16", device="cuda", ctx=64, weight_format="q8_0", expert_format="blocks")
    eng = engine.load(synth.ensure("coder30b-mini-synth"), cpu_moe=3, **kw)
    host = host_layers(eng)
    # the default: host nodes, rung by the doorbell
    assert "3 as host nodes" in eng.decode_path_reason and "host thread at each layer's doorbell" in eng.decode_path_reason
    default = eng.generate(PROMPT, 12, stop_at_eos=False)
    assert eng._static.node_run == "doorbell" and len(eng._static.graphs) == 1
    assert eng._static.compile_workers_stopped           # the host's cores left to the cpu tier
    monkeypatch.setenv("KVBENCH_HOST_NODES", "0")          # the step split at each host layer
    eng.set_decode_mode("auto")
    assert len(host) == 3 and eng.decode_path == "cuda_graph" and "4 graphs" in eng.decode_path_reason
    want = eng.generate(PROMPT, 12, stop_at_eos=False)
    assert default == want
    eng.prefill(PROMPT)
    ref = eng.decode(3)
    monkeypatch.setenv("KVBENCH_HOST_NODES", "1")
    monkeypatch.setenv("KVBENCH_HOST_NODES_RUN", "callback")
    eng.set_decode_mode("auto")
    assert "3 as host nodes" in eng.decode_path_reason and "captured as 1 graph" in eng.decode_path_reason
    assert eng.generate(PROMPT, 12, stop_at_eos=False) == want
    assert len(eng._static.graphs) == 1 and eng._static.node_layers == host
    assert eng._static.host_wait == "sleep" and "sleeping on a blocking event" in eng.decode_path_reason
    eng.prefill(PROMPT)
    assert torch.equal(eng.decode(3), ref)
    monkeypatch.setenv("KVBENCH_HOST_NODES_WAIT", "spin")  # CUDA's spinning wait: the same step
    eng.set_decode_mode("auto")
    assert eng.generate(PROMPT, 12, stop_at_eos=False) == want
    assert eng._static.host_wait == "spin" and "by spinning" in eng.decode_path_reason
    monkeypatch.delenv("KVBENCH_HOST_NODES_WAIT")
    # the doorbell: the graph rings a page-locked flag at each node layer and this thread runs the
    # job (engine.native.Doorbell): the same tokens and logits, every job run once a step
    monkeypatch.setenv("KVBENCH_HOST_NODES_RUN", "doorbell")
    eng.set_decode_mode("auto")
    assert "host thread at each layer's doorbell" in eng.decode_path_reason
    runs = [eng.model.layers[i].experts._job.runs for i in host]
    assert eng.generate(PROMPT, 12, stop_at_eos=False) == want
    assert eng._static.node_run == "doorbell" and len(eng._static.graphs) == 1
    assert eng._static._bells == [[0, 1, 2]]
    eng.prefill(PROMPT)
    assert torch.equal(eng.decode(3), ref)
    jobs = [eng.model.layers[i].experts._job for i in host]
    assert all(j.rc == 0 and j.runs - r >= 12 for j, r in zip(jobs, runs)), [(j.rc, j.runs, r) for j, r in zip(jobs, runs)]
    monkeypatch.setenv("KVBENCH_HOST_NODES_RUN", "callback")
    eng.set_decode_mode("auto")
    eng.prefill(PROMPT)
    assert torch.equal(eng.decode(3), ref)                 # the step is built (sleeping wait)
    torch.cuda.synchronize()
    jobs = [eng.model.layers[i].experts._job for i in host]
    assert all(j.rc == 0 and j.runs >= 12 for j in jobs), [(j.rc, j.runs) for j in jobs]
    monkeypatch.setenv("KVBENCH_CPU_MOE_GPU_SHARE", "2")   # baked into the graph: refused, not ignored
    with pytest.raises(ConfigError, match="changed after this step was captured"):
        eng.decode(5)
    monkeypatch.delenv("KVBENCH_CPU_MOE_GPU_SHARE")
    monkeypatch.setenv("KVBENCH_CPU_MOE_NATIVE", "0")      # torch's int4 path: no host node can run it
    eng.set_decode_mode("auto")
    assert "4 graphs" in eng.decode_path_reason and "HOST_NODES applied to 0 of them" in eng.decode_path_reason


@pytest.mark.gpu
@pytest.mark.parametrize("host", ["pcie", "dma"])
def test_pcie_experts_on_the_gpu_read_pinned_host_blocks_in_one_graph(host):
    """On CUDA the host layers' blocks are pinned host memory that the blocks kernel reads in
    place (pcie: no copy, no host sync, the captured step stays one graph) or that DMA copies
    into the staging stack (dma: one graph per stretch between the layers). Tokens and logits
    equal an all-on-the-GPU load's (the same kernel over the same bytes)."""
    kw = dict(kv_dtype="bf16", device="cuda", ctx=64, weight_format="q8_0", expert_format="blocks")
    path = synth.ensure("coder30b-mini-synth")
    ref = engine.load(path, cpu_moe=0, **kw)
    eng = engine.load(path, cpu_moe=3, host_experts=host, **kw)
    ex = eng.model.layers[sorted(eng.spec.moe_layers)[0]].experts
    from engine.hostmem import is_registered
    assert ex.gate.qs.device.type == "cpu" and is_registered(ex.gate.qs)
    graphs = 1 if host == "pcie" else 4                 # dma: a routing sync at each of the 3 layers
    assert eng.decode_path == "cuda_graph" and ("graphs" not in eng.decode_path_reason) == (graphs == 1)
    want = ref.generate(PROMPT, 12, stop_at_eos=False)
    assert eng.generate(PROMPT, 12, stop_at_eos=False) == want
    assert len(eng._static.graphs) == graphs
    ref.prefill(PROMPT)
    eng.prefill(PROMPT)
    assert rel(eng.decode(3), ref.decode(3)) < 1e-5


@pytest.mark.slow(seconds=15)
@pytest.mark.parametrize("model,cpu_moe", [("coder30b-mini-synth", 0), ("coder30b-mini-synth", 2),
                                           ("tiny-qwen3moe-q8_0", 0)])
def test_static_step_over_blocks_matches_eager(model, cpu_moe):
    """The static step (route kernel, moe_decode_blocks over resident blocks, the host round
    trip of cpu_moe layers) against the eager step, interpreted on CPU."""
    prev = kernels.set_backend("triton")
    try:
        eng = load(synth.ensure(model), expert_format="blocks", cpu_moe=cpu_moe)
        eng.set_decode_mode("eager")
        eng.prefill(PROMPT)
        ref = torch.stack([eng.decode(t) for t in (3, 11)])
        assert host_layers(eng) == sorted(eng.spec.moe_layers)[:cpu_moe]
        # the step's generator stops at exactly those layers (a captured step: one graph per stretch)
        stops = [i for i, *_ in _generator_stops(eng)]
        assert stops == host_layers(eng)
        eng.set_decode_mode("static")
        eng.prefill(PROMPT)
        got = torch.stack([eng.decode(t) for t in (3, 11)])
    finally:
        kernels.set_backend(prev)
    err = rel(got, ref)
    print(f"{model} cpu_moe={cpu_moe}: static vs eager {err:.2e}")
    assert err < 1e-4


@pytest.mark.slow(seconds=15)
def test_static_step_records_the_moe_blocks_launches_it_made(monkeypatch):
    """What the step ran is observable (``StaticDecode.moe_launches``): every MoE layer's two
    launches over blocks, in the form the setting asked; changing the setting changes the
    record, and the logits only by float32 summation order."""
    prev = kernels.set_backend("triton")
    out = {}
    try:
        eng = load(synth.ensure("coder30b-mini-synth"), expert_format="blocks", cpu_moe=0)
        n = len(eng.spec.moe_layers)
        for form in ("blocks", "gather"):
            monkeypatch.setenv("KVBENCH_MOE_BLOCKS_FORM", form)
            eng.set_decode_mode("static")
            eng.prefill(PROMPT)
            out[form] = eng.decode(3)
            got = {(x["part"], x["fmt"], x["form"], x["layers"]) for x in eng._static.moe_launches}
            assert got == {("gate_up", "q4_0", form, n), ("down", "q4_0", form, n)}, got
    finally:
        kernels.set_backend(prev)
    err = rel(out["blocks"], out["gather"])
    print(f"moe_blocks forms: blocks vs gather logits {err:.2e}")
    assert 0 < n and err < 1e-5


def _generator_stops(eng):
    """Drive ``Transformer.decode_steps`` once (at position 0 of a scratch prefill), collecting
    what it yields; the host experts answer each stop."""
    eng.prefill(PROMPT[:2])
    x = eng.model.embed_tokens(torch.tensor([PROMPT[2]]))
    steps = eng.model.decode_steps(x, torch.tensor([2]), eng.caches)
    stops, y = [], None
    while True:
        try:
            stop = steps.send(y)
        except StopIteration:
            return stops
        stops.append(stop)
        y = eng.model.layers[stop[0]].experts.run(*stop[1:])


@pytest.mark.gpu
def test_cuda_graph_around_host_experts_matches_eager(monkeypatch):
    """A captured step with cpu_moe layers: one graph per stretch between them, the host
    experts run in between; against the eager step (tokens equal, logits to summation order)."""
    monkeypatch.setenv("KVBENCH_EMBED_MAPPED", "1")
    monkeypatch.setenv("KVBENCH_HOST_NODES", "0")          # split at each host layer (the nodes: above)
    eng = engine.load(synth.ensure("coder30b-mini-synth"), kv_dtype="bf16", device="cuda", ctx=64,
                      weight_format="f32", expert_format="blocks", cpu_moe=2)
    assert eng.decode_path == "cuda_graph" and "3 graphs" in eng.decode_path_reason
    # the token's row read from the page-locked host table inside the graph (no trunk copy)
    assert eng.plan.embed_tier == "mapped" and eng._static_decoder().device_embed
    graph = eng.generate(PROMPT, 12, stop_at_eos=False)
    assert len(eng._static.graphs) == 3
    eng.set_decode_mode("eager")
    assert eng.generate(PROMPT, 12, stop_at_eos=False) == graph
    eng.prefill(PROMPT)
    ref = torch.stack([eng.decode(t) for t in (3, 11, 19)])
    eng.set_decode_mode("cuda_graph")
    eng.prefill(PROMPT)
    got = torch.stack([eng.decode(t) for t in (3, 11, 19)])
    assert rel(got, ref) < 1e-3


CODER = spec_for("coder30b-synth")


def coder_plan(**kw):
    return planner.plan(CODER, kv_dtype="bf16", ctx=4096, weight_format="bf16", device="cpu",
                        host_ram=200 << 30, expert_blocks="q4_0", **kw)


def test_planner_takes_the_fewest_cpu_layers_that_fit():
    p = coder_plan(vram_budget=12 << 30)
    n = p.cpu_moe
    assert 0 < n < 48 and p.cpu_moe_requested == "auto" and p.n_gpu_layers == 48 and p.head_tier == "trunk"
    assert p.trunk.total <= p.budget_bytes and p.expert_slots == 0
    with pytest.raises(OutOfMemoryError, match=f"cpu_moe={n}"):          # one fewer does not fit
        coder_plan(vram_budget=12 << 30, cpu_moe=n - 1)
    q = coder_plan(vram_budget=12 << 30, cpu_moe=n + 5)
    # five more layers on the host: their blocks leave the trunk, their packed form joins the host
    blocks = sum(planner.expert_block_buffers(CODER, "q4_0"))
    assert p.trunk.total - q.trunk.total == 5 * blocks
    assert q.host.weights - p.host.weights == 5 * planner.cpu_expert_bytes(CODER)
    assert blocks == 3 * 128 * 768 * 2048 * 18 // 32            # ggml Q4_0: 18 bytes per 32 values
    assert q.host_ram.experts == (n + 5) * planner.cpu_expert_bytes(CODER)
    assert coder_plan(vram_budget=40 << 30).cpu_moe == 0


def test_with_host_experts_the_embedding_is_read_from_the_host_not_copied(monkeypatch):
    """llama.cpp keeps token_embd on the host. With experts on the host (cpu_moe > 0) on CUDA, the
    plan prices no trunk copy of the table (embed_tier "mapped": page-locked, read in place by the
    step), so the step gathers its token on the device at no VRAM cost. Without it, the copy takes
    trunk bytes where it fits, and where it does not (llama.cpp's footprint: 11468 MiB, 20 host
    layers) the step stages each token's row from the host (a sync per step)."""
    kw = dict(kv_dtype="bf16", ctx=1120, weight_format="q8_0", device="cuda", host_ram=200 << 30,
              expert_blocks="q4_0", host_experts="pcie", cpu_moe=20)
    table = planner.round_alloc(CODER.vocab_size * 2048 * 34 // 32, "cuda")   # Q8_0 rows of d 2048
    monkeypatch.setenv("KVBENCH_EMBED_MAPPED", "1")     # the default; set, so the test does not lean on it
    on = planner.plan(CODER, vram_budget=11468 << 20, **kw)
    monkeypatch.setenv("KVBENCH_EMBED_MAPPED", "0")
    tight = planner.plan(CODER, vram_budget=11468 << 20, **kw)
    roomy = planner.plan(CODER, vram_budget=(11468 << 20) + table, **kw)
    assert (on.embed_tier, tight.embed_tier, roomy.embed_tier) == ("mapped", "host", "trunk")
    assert on.trunk.weights == tight.trunk.weights and roomy.trunk.weights - on.trunk.weights == table
    assert on.host.weights == tight.host.weights == roomy.host.weights      # token_embd's own bytes
    monkeypatch.setenv("KVBENCH_EMBED_MAPPED", "1")
    # nothing on the host (every expert resident): a trunk copy as before; on a CPU device, none
    assert planner.plan(CODER, vram_budget=40 << 30, **{**kw, "cpu_moe": 0}).embed_tier == "trunk"
    assert planner.plan(CODER, vram_budget=11468 << 20, **{**kw, "device": "cpu"}).embed_tier == "host"


@pytest.mark.gpu
def test_mapped_embedding_gathers_the_host_rows_on_the_gpu():
    """The step's embedding row read over PCIe from the page-locked host table equals the host
    embedding of the same token, inside a captured CUDA graph too."""
    from engine import hostmem
    table = torch.randint(-127, 127, (64, 40), dtype=torch.int8)
    view = hostmem.device_view(hostmem.register(table), "cuda")
    assert view.device.type == "cuda" and view.data_ptr() == table.data_ptr()
    tok = torch.tensor([37], device="cuda")
    assert torch.equal(view.index_select(0, tok).cpu(), table[37:38])
    g = torch.cuda.CUDAGraph()
    out = torch.empty(1, 40, dtype=torch.int8, device="cuda")
    with torch.cuda.graph(g):
        out.copy_(view.index_select(0, tok))
    for t in (3, 61):
        tok.fill_(t)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), table[t:t + 1])
    table[61] += 1                      # the host's bytes, read in place: seen at the next replay
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), table[61:62])


def test_planner_refuses_placements_it_cannot_make():
    with pytest.raises(ConfigError, match="integer in"):
        coder_plan(vram_budget=12 << 30, cpu_moe=49)
    with pytest.raises(ConfigError, match="all 48 layers"):
        coder_plan(vram_budget=12 << 30, n_gpu_layers=30)
    with pytest.raises(OutOfMemoryError, match="even with every MoE layer"):
        coder_plan(vram_budget=2 << 30)
    with pytest.raises(ConfigError, match="Q4_0"):
        planner.plan(CODER, kv_dtype="bf16", ctx=4096, weight_format="bf16", device="cpu",
                     host_ram=200 << 30, expert_blocks="q8_0", cpu_moe=3, vram_budget=12 << 30)
    with pytest.raises(ConfigError, match="expert blocks 'q5_k'"):
        planner.plan(CODER, device="cpu", host_ram=200 << 30, expert_blocks="q5_k")


def test_large_batches_through_host_experts_run_from_the_blocks(mini):
    """A prefill's batch through a cpu_moe layer runs from the layer's Q4_0 blocks on the device
    (llama.cpp's offload of large batches): float32 maths on the file's values, held here to a
    float64 expert sum over the reference engine's experts (dequantised at its load)."""
    ref, cpu = load(mini), load(mini, expert_format="blocks", cpu_moe=2)
    i = sorted(cpu.spec.moe_layers)[0]
    ex = cpu.model.layers[i].experts
    assert ex.blocks is not None and "on the device from the blocks" in cpu.cpu_expert_math
    E, k, d, T = cpu.spec.n_experts, cpu.spec.n_experts_used, cpu.spec.d_model, 40
    g = torch.Generator().manual_seed(0)
    h = torch.randn(T, d, generator=g)
    top_e = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    top_p = torch.rand(T, k, generator=g)
    want = torch.zeros(T, d, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            gate, up, down = (m.double() for m in ref.model.layers[i].experts.get(i, int(top_e[t, j])))
            x = h[t].double()
            want[t] += top_p[t, j].double() * (down @ (torch.nn.functional.silu(gate @ x) * (up @ x)))
    got = ex.on_device(h, top_e, top_p)
    assert got.dtype == torch.float32 and rel(got.double(), want) < 1e-5


@pytest.mark.gpu
def test_prefill_through_host_experts_runs_on_the_gpu():
    """48 rows through cpu_moe layers on CUDA take the device path (float32 from the blocks):
    the logits equal, to summation order, an engine with every expert resident in blocks."""
    path = synth.ensure("coder30b-mini-synth")
    kw = dict(kv_dtype="fp32", device="cuda", ctx=64, weight_format="f32", expert_format="blocks")
    toks = list(range(3, 51))
    resident = engine.load(path, cpu_moe=0, **kw).logits(toks)
    hosted = engine.load(path, cpu_moe=2, **kw)
    assert all(t.is_pinned() for st in hosted.model.layers[sorted(hosted.spec.moe_layers)[0]].experts.blocks
               for t in st.tensors())
    assert rel(hosted.logits(toks), resident) < 1e-4


def test_dma_staging_is_rebound_when_weights_are_taken_over(mini):
    """The staging stack lives in the plan's scratch, which a take-over frees and allocates
    anew: the DMA layers read the new engine's (its one-token steps equal a fresh load's)."""
    kw = dict(expert_format="blocks", cpu_moe=2, host_experts="dma")
    first = load(mini, **kw)
    second = engine.load(mini, kv_dtype="bf16", device="cpu", ctx=48, weight_format="f32", weights_from=first, **kw)
    fresh = engine.load(mini, kv_dtype="bf16", device="cpu", ctx=48, weight_format="f32", **kw)
    stage = second.model.layers[sorted(second.spec.moe_layers)[0]].experts.stage
    held = second.ledger._entries["scratch.expert_staging"].tensor      # the buffer the new plan priced
    assert all(t.untyped_storage().data_ptr() == held.untyped_storage().data_ptr()
               for st in stage for t in st.tensors())
    assert all(r.diff == 0 for r in second.ledger.compare(second.plan))
    second.prefill(PROMPT)
    fresh.prefill(PROMPT)
    assert torch.equal(second.decode(3), fresh.decode(3))


def test_auto_host_experts_applies_what_fits_and_says_why(mini):
    """``host_experts="auto"``: on a CPU device the host CPU computes the host layers' experts
    (the only placement there), recorded with the request and the reason; without blocks it is
    refused, and a plan cannot be asked for it (load decides, by measuring)."""
    eng = load(mini, expert_format="blocks", cpu_moe=2, host_experts="auto")
    assert (eng.plan.host_experts, eng.plan.host_experts_requested) == ("cpu", "auto")
    assert "cpu device" in eng.plan.host_experts_reason
    assert eng.model.host_expert_layers() == sorted(eng.spec.moe_layers)[:2]
    plain = load(mini, expert_format="blocks", cpu_moe=2)
    assert (plain.plan.host_experts_requested, plain.plan.host_experts_reason) == ("", "")
    with pytest.raises(ConfigError, match="expert_format='blocks'"):
        load(mini, host_experts="auto")
    with pytest.raises(ConfigError, match="decided by engine.load"):
        planner.plan(spec_for("coder30b-mini-synth"), kv_dtype="bf16", ctx=64, device="cpu", expert_blocks="q4_0",
                     cpu_moe=2, host_experts="auto")


def test_auto_host_experts_picks_the_faster_side_with_the_round_trip():
    """``host_probe.choose``: the CPU's time, and the DMA copies' where timed, each plus a round
    trip, against the PCIe reads; a tie goes to pcie (one graph, no host sync), and the reason
    carries the numbers."""
    from engine import host_probe
    fast_cpu = {"cpu_us": 400.0, "pcie_us": 811.0, "threads": 16, "experts": 8}
    slow_cpu = {"cpu_us": 917.0, "pcie_us": 450.0, "threads": 16, "experts": 8}
    assert host_probe.choose(fast_cpu)[0] == "cpu" and host_probe.choose(slow_cpu)[0] == "pcie"
    tier, why = host_probe.choose({"cpu_us": 671.0, "pcie_us": 811.0, "threads": 8, "experts": 8}, roundtrip_us=140)
    assert tier == "pcie" and "671 us on the CPU (8 threads) + 140 us round trip = 811 us (cpu)" in why
    assert "811 us read over PCIe by the GPU (pcie)" in why and "(dma)" not in why
    tier, why = host_probe.choose({**slow_cpu, "pcie_us": 811.0, "dma_us": 400.0})      # copy engines faster
    assert tier == "dma" and "400 us copied up and computed + 140 us round trip = 540 us (dma)" in why
    with pytest.raises(ConfigError, match="CUDA device"):
        host_probe.measure(spec_for("coder30b-mini-synth"), torch.device("cpu"))


def test_auto_host_experts_prices_the_doorbell_where_the_step_would_ring_it(monkeypatch):
    """Where a captured step would run the cpu tier's layers as host nodes rung by the graph
    (native path, no GPU share, KVBENCH_HOST_NODES on, run by the doorbell: the defaults), the
    CPU pays the doorbell's hand-off, not the split graphs' round trip; any setting that splits
    the step again brings the round trip back. DMA pays its round trip either way."""
    from engine import host_probe
    for k in ("KVBENCH_HOST_NODES", "KVBENCH_HOST_NODES_RUN", "KVBENCH_CPU_MOE_GPU_SHARE"):
        monkeypatch.delenv(k, raising=False)
    assert host_probe.cpu_handoff("native") == "doorbell" and host_probe.cpu_handoff("int4") == "round trip"
    for k, v in (("KVBENCH_HOST_NODES", "0"), ("KVBENCH_HOST_NODES_RUN", "callback"), ("KVBENCH_CPU_MOE_GPU_SHARE", "2")):
        monkeypatch.setenv(k, v)
        assert host_probe.cpu_handoff("native") == "round trip", k
        monkeypatch.delenv(k)
    probe = {"cpu_us": 700.0, "pcie_us": 811.0, "dma_us": 760.0, "threads": 16, "experts": 8, "cpu_path": "native"}
    assert host_probe.DOORBELL_US < 811.0 - 700.0 < host_probe.ROUNDTRIP_US
    tier, why = host_probe.choose({**probe, "cpu_handoff": "doorbell"})
    bell = host_probe.DOORBELL_US
    assert tier == "cpu" and f"700 us on the CPU (16 threads, native path) + {bell:.0f} us doorbell hand-off = " \
        f"{700 + bell:.0f} us (cpu)" in why and "760 us copied up and computed + 140 us round trip = 900 us (dma)" in why
    tier, why = host_probe.choose({**probe, "cpu_handoff": "round trip"})
    assert tier == "pcie" and "+ 140 us round trip = 840 us (cpu)" in why


@pytest.mark.gpu
def test_auto_host_experts_measures_on_the_gpu_and_applies_its_choice():
    """On CUDA with host layers, ``auto`` times one layer's experts three ways (engine.host_probe) and
    loads the fastest placement (cpu, pcie or dma): the applied tier is the one the reason names, the probe's times are
    positive, and the engine decodes as a load that asked for that tier by name."""
    kw = dict(kv_dtype="bf16", device="cuda", ctx=64, weight_format="q8_0", expert_format="blocks", cpu_moe=3)
    path = synth.ensure("coder30b-mini-synth")
    eng = engine.load(path, host_experts="auto", **kw)
    tier = eng.plan.host_experts
    print(eng.plan.host_experts_reason)
    assert tier in ("cpu", "pcie", "dma") and eng.plan.host_experts_reason.endswith(f": {tier}")
    nums = [float(x) for x in re.findall(r"(\d+) us (?:read|on the CPU|copied)", eng.plan.host_experts_reason)]
    assert len(nums) == 3 and all(x > 0 for x in nums)
    named = engine.load(path, host_experts=tier, **kw)
    assert eng.generate(PROMPT, 8, stop_at_eos=False) == named.generate(PROMPT, 8, stop_at_eos=False)
    none = engine.load(path, **{**kw, "cpu_moe": 0}, host_experts="auto")
    assert none.plan.host_experts == "pcie" and "nothing to choose" in none.plan.host_experts_reason
    # host memory that holds the pcie placement's blocks but not the CPU tier's int4 copies beside them
    from pathlib import Path
    common = dict(kv_dtype="bf16", ctx=64, weight_format="q8_0", device=torch.device("cuda"), expert_blocks="q4_0",
                  cpu_moe=3, file_bytes=Path(path).stat().st_size, host_ram=1 << 40)
    ram = {t: planner.plan(spec_for("coder30b-mini-synth"), host_experts=t, **common).host_ram for t in ("pcie", "cpu")}
    base = {t: r.need - r.headroom for t, r in ram.items()}         # the headroom scales with what is available
    between = planner.HOST_HEADROOM_MIN + (base["pcie"] + base["cpu"]) // 2
    assert base["cpu"] > base["pcie"] and planner.HOST_HEADROOM_FRAC * between <= planner.HOST_HEADROOM_MIN
    tight = engine.load(path, host_experts="auto", host_ram=between, **kw)
    assert tight.plan.host_experts == "pcie" and "does not fit host memory" in tight.plan.host_experts_reason
