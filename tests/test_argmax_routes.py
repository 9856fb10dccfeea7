"""Routing flips in the argmax check (issue 13): on a MoE, a narrowed KV cache can swap the
experts a router picks at a near-tie, which moves that one position's logits by whole units.
The check counts those flips and holds its worst-case gates on a second run with the
baseline's experts forced (``Engine.routed_logits(routes=...)``).

- ``Engine.routed_logits`` reports the experts each MoE layer chose: held against HF
  transformers' own router logits on the same GGUF (tests/hf_oracle.py), exact outside
  near-ties; chunked prefill routes as one pass does (f32 weights on the CPU); a dense model
  has no routes.
- Forcing routes: with the experts a run chose itself, the forced run is bit-identical; with
  one position's experts changed in one layer, every layer runs exactly the given experts (the
  spy on ``moe_route`` sees no call: nothing is chosen), prefill chunks before it are
  bit-identical (causal) and that position moves; ``moe_route_forced`` at ``moe_route``'s own choice gives
  its weights.
- The check's flip count and its own-routing ``Max abs logit diff`` are recounted here from
  scratch: the engine's routing read through a spy on ``engine.model.moe_route`` (not the
  engine's route log), plain loops over positions; its gated value equals a forced run's.
- A planted KV fault (``KVBENCH_FAULT=q8_scale_shift``: each q8_0 block stored with its
  neighbour's scale) still fails the check on a MoE, by the forced-routing gates: forcing the
  baseline's experts does not undo a corrupted cache.
- Dense models and engines without routes: ``Routing flips`` is n/a with the reason, and the
  gates hold on every position.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import engine
import engine.model as M
import engine.synth as synth
from harness.runner import Runner
from harness.suite import load_suite

ROOT = Path(__file__).resolve().parent.parent
MOE = "coder30b-mini-synth"      # 6 layers, 32 experts, 2 KV heads x 64: four q8_0 blocks per row


def _tokens(vocab: int, n: int = 48, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist()


@pytest.mark.slow(seconds=18)
@pytest.mark.parametrize("name", ["tiny-qwen3moe", "tiny-olmoe"])
def test_routes_are_the_experts_hf_routes_to(name):
    from hf_oracle import hf_model_for
    path = synth.ensure(name)
    eng = engine.load(path)
    model = hf_model_for(path)
    toks = _tokens(model.config.vocab_size)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([toks]), use_cache=False, output_router_logits=True)
    logits, routes = eng.routed_logits(toks)
    k = eng.spec.n_experts_used
    assert routes.shape == (len(eng.spec.moe_layers), len(toks), k) and routes.dtype == torch.long
    hf = torch.stack([r.topk(k, dim=-1).indices.sort(dim=-1).values for r in out.router_logits])
    top = torch.stack([r.topk(k + 1, dim=-1).values for r in out.router_logits])
    near_tie = (top[..., k - 1] - top[..., k]) < 1e-4          # HF's k-th and (k+1)-th experts
    agree = (hf == routes).all(dim=-1)
    assert bool(agree[~near_tie].all()), f"{int((~agree & ~near_tie).sum())} routes differ from HF's"
    assert int(near_tie.sum()) <= 2
    assert torch.equal(logits, eng.logits(toks))                # the same forward pass
    _, chunked = eng.routed_logits(toks, chunk=16)
    assert torch.equal(chunked, routes)                         # f32 on the CPU: batching is exact


def test_forcing_routes():
    eng = engine.load(synth.ensure("tiny-qwen3moe"))
    toks = _tokens(eng.spec.vocab_size)
    logits, routes = eng.routed_logits(toks)
    same, got = eng.routed_logits(toks, routes=routes)
    assert torch.equal(same, logits) and torch.equal(got, routes)
    t, E = 20, eng.spec.n_experts
    other = routes.clone()
    unused = [e for e in range(E) if e not in routes[0, t].tolist()]
    other[0, t, 0] = unused[0]
    other[0, t] = other[0, t].sort().values
    calls = []
    real = M.moe_route
    M.moe_route = lambda *a: calls.append(1) or real(*a)
    try:
        moved, got = eng.routed_logits(toks, chunk=8, routes=other)
    finally:
        M.moe_route = real
    assert calls == [] and torch.equal(got, other)
    chunked = eng.routed_logits(toks, chunk=8)[0]
    assert torch.equal(moved[:16], chunked[:16])             # chunks before t's: untouched (causal)
    # t's own chunk: earlier rows share the expert matmuls whose batch changed (f32 rounding only)
    assert (moved[16:t] - chunked[16:t]).abs().max() < 1e-4
    assert (moved[t] - chunked[t]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="routes of shape"):
        eng.routed_logits(toks, routes=routes[:, :5])
    # the weights: moe_route_forced at moe_route's own choice
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, eng.spec.d_model, generator=g)
    router = eng.model.layers[eng.spec.moe_layers[0]].router
    p, e = M.moe_route(eng.spec, h, router)
    pf, ef = M.moe_route_forced(eng.spec, h, router, e.flip(-1))
    assert torch.equal(ef, e) and torch.equal(pf, p)           # topk's order and values, bit for bit


def test_a_dense_model_has_no_routes():
    eng = engine.load(synth.ensure("tiny-qwen3"))
    toks = _tokens(eng.spec.vocab_size, 16)
    logits, routes = eng.routed_logits(toks)
    assert routes.shape == (0, 16, 0) and torch.equal(logits, eng.logits(toks))


def _argmax_suite(positions: int = 48, rows=("bf16", "q8_0")):
    suite = load_suite(ROOT / "suites" / "kv_dtype.toml")
    suite.checks = [c for c in suite.checks if c.KIND == "argmax"]
    suite.kv_dtypes = list(rows)
    for c in suite.checks:
        c.positions, c.noise_chunk = positions, 16
    return suite


def _run(tmp_path, model, rows=("bf16", "q8_0")):
    out = tmp_path / "run"
    summary = Runner(_argmax_suite(rows=rows), out, models=[model], progress=False).run()
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    metrics = {(r["kv_dtype"], r["metric"]): r for r in recs if r.get("type") == "metric"}
    info = {r["kv_dtype"]: r["info"] for r in recs if r.get("type") == "info"}
    cases = {c["kv_dtype"]: c for c in summary.cases}
    return summary, cases, metrics, info


def _recount(model: str, kv: str, seqs: list[list[int]]):
    """Routes and logits of each sequence, read through a spy on moe_route (one record per MoE
    call, in layer order): nothing of the engine's route log or the check's code."""
    calls = []
    real = M.moe_route

    def spy(s, h, router):
        p, e = real(s, h, router)
        calls.append(e.sort(dim=-1).values.clone())
        return p, e

    M.moe_route = spy
    try:
        eng = engine.load(model, kv_dtype=kv)
        res = []
        for seq in seqs:
            calls.clear()
            logits = eng.logits(seq)
            res.append((logits, [c.tolist() for c in calls]))     # one pass: one call per MoE layer
        return res
    finally:
        M.moe_route = real


def test_the_flip_count_and_the_held_gate_match_an_independent_recount(tmp_path):
    summary, cases, metrics, info = _run(tmp_path, MOE, rows=("q8_0",))
    seqs = [s["ids"] for s in info["q8_0"]["segments"]]
    base = _recount(MOE, "fp32", seqs)
    for kv in ("q8_0",):
        test = _recount(MOE, kv, seqs)
        eng = engine.load(MOE, kv_dtype=kv)
        flipped, own_max, forced_max = 0, 0.0, 0.0
        for seq, (lb, rb), (lt, rt) in zip(seqs, base, test):
            forced = eng.routed_logits(seq, routes=torch.tensor(rb))[0]    # the spy's baseline routes
            for t in range(len(lb)):
                flipped += any(rb[L][t] != rt[L][t] for L in range(len(rb)))
                own_max = max(own_max, float((lt[t].double() - lb[t].double()).abs().max()))
                forced_max = max(forced_max, float((forced[t].double() - lb[t].double()).abs().max()))
        n = sum(len(s) for s in seqs)
        assert flipped > 0                   # the stand-in's routers have near-ties: the test can fail
        rate = metrics[(kv, "Routing flips")]
        assert rate["value"] == pytest.approx(100.0 * flipped / n, abs=1e-9), (kv, rate)
        assert info[kv]["routing"]["flipped_positions"] == flipped
        assert metrics[(kv, "Max abs logit diff (own routing)")]["value"] == pytest.approx(own_max, rel=1e-6)
        held = metrics[(kv, "Max abs logit diff")]
        assert held["value"] == pytest.approx(forced_max, rel=1e-6, abs=1e-6)
        assert held["detail"].startswith(f"the baseline's experts forced at all {n} positions"), held
        assert forced_max < own_max / 2      # the flips made the big differences, not the cache
    assert metrics[("fp32", "Routing flips")]["value"] == 0.0    # chunked fp32 on the CPU: bit-exact
    assert summary.exit_code == 0, {k: c.get("failures") for k, c in cases.items()}


def test_a_planted_kv_fault_still_fails_argmax_on_a_moe(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBENCH_FAULT", "q8_scale_shift")
    summary, cases, metrics, _ = _run(tmp_path, MOE, rows=("q8_0",))
    assert summary.exit_code == 1
    c = cases["q8_0"]
    assert c["status"] == "fail"
    why = "; ".join(c["failures"])
    assert "Max abs logit diff = " in why and "the baseline's experts forced" in why, why
    assert "Top-1 in top-5 = " in why and "Mean KLD = " in why, why
    assert metrics[("q8_0", "Max abs logit diff")]["value"] > 3.5
    assert cases["fp32"]["status"] == "pass", cases["fp32"].get("failures")   # q8_0's storage only


def test_a_dense_model_shows_routing_flips_as_not_applicable(tmp_path):
    summary, cases, metrics, _ = _run(tmp_path, "tiny-qwen3")
    assert summary.exit_code == 0
    for d in ("fp32", "bf16", "q8_0"):
        m = metrics[(d, "Routing flips")]
        assert m["value"] is None and m["na"] == "dense model: no expert routing"
        assert (d, "Max abs logit diff (own routing)") not in metrics
        assert metrics[(d, "Max abs logit diff")]["detail"] is None      # every position


def test_q8_scale_shift_is_planted_in_the_triton_kernel_as_in_the_torch_reference(monkeypatch):
    """The fault moves each block's scale to the next block of its row, in both paths
    (Triton in its interpreter here): the stored bytes are equal, and differ from the clean ones."""
    from engine import kernels
    from engine.kernels import kv_append as ka, q8_layout
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 64, generator=g)
    monkeypatch.setenv("KVBENCH_FAULT", "q8_scale_shift")
    bufs = {}
    for backend in ("torch", "triton"):
        prev = kernels.set_backend(backend)
        try:
            buf = q8_layout.alloc(8, 2, 64)
            ka.kv_append(buf, 1, x, "q8_0")
            bufs[backend] = buf
        finally:
            kernels.set_backend(prev)
    assert torch.equal(bufs["torch"], bufs["triton"])
    rows = q8_layout.split(bufs["torch"], 2, 64)
    qs, ds = q8_layout.quantize(x.reshape(5, -1))
    assert torch.equal(rows.quants[1:6].reshape(5, -1), qs)                  # quants untouched
    assert torch.equal(rows.scales[1:6], ds.roll(1, dims=-1))                # scales one block on
    assert not torch.equal(rows.scales[1:6], ds)
