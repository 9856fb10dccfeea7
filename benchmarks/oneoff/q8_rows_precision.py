"""Where the q8_0 block-row decode kernel loses precision compiled on a GPU (one-off diagnostic).

tests/test_kernels.py::test_q8_decode_kernel_across_magnitudes_and_at_a_device_position[128] failed
on the H200 for the rows (5.4e-6) and int8 (2.1e-5, a form since removed) forms, bound 2e-6,
while the batched form (2.4e-7) and every form interpreted passed. This prints, for head_dim 64 and 128, each form's
error against a float64 oracle per (query head, 32-value block), on the test's data and with one
of its magnitude spreads removed at a time (q heads, K tokens, V blocks), so the spread that
triggers it is named. Run on the GPU machine: ``python benchmarks/oneoff/q8_rows_precision.py``.
"""
from __future__ import annotations

import sys

import torch

sys.path.insert(0, ".")
from engine.kernels.decode_attention import decode_attention, decode_attention_ref  # noqa: E402
from engine.kv import LayerKV, dequantize_q8_0  # noqa: E402


def oracle(q, k, v, n, scale):
    g = q.shape[0] // k.shape[1]
    k = k[:n].double().repeat_interleave(g, 1)
    v = v[:n].double().repeat_interleave(g, 1)
    s = torch.einsum("hd,nhd->hn", q.double(), k) * scale
    return torch.einsum("hn,nhd->hd", s.softmax(-1), v)


def case(D, spread, dev):
    Hq, Hkv, n, cap = 8, 2, 90, 200
    gen = torch.Generator(device=dev).manual_seed(D)
    kmag = torch.logspace(-3, 1, n, device=dev)[:, None, None] if "k" in spread else 1.0
    k = torch.randn(n, Hkv, D, device=dev, generator=gen) * kmag
    vmag = torch.logspace(-2, 4, Hkv * D // 32, device=dev)
    vmag = vmag[torch.randperm(len(vmag), generator=gen, device=dev)].repeat_interleave(32).view(Hkv, D)
    v = torch.randn(n, Hkv, D, device=dev, generator=gen) * (vmag if "v" in spread else 1.0)
    v[7, 0, :32] = 0.0
    cache = LayerKV(0, Hkv, D, cap, "q8_0", device=dev)
    cache.write(0, k, v)
    qmag = torch.logspace(-3, 2, Hq, device=dev)[:, None] if "q" in spread else 1.0
    q = torch.randn(Hq, D, device=dev, generator=gen) * qmag
    shape = (cap, Hkv, D)
    kd, vd = (dequantize_q8_0(b, shape) for b in cache.to_ggml_blocks())
    scale = D ** -0.5
    want = oracle(q, kd.to(dev), vd.to(dev), n, scale)
    size = oracle(q, kd.to(dev), vd.abs().to(dev), n, scale)
    blk = lambda t: t.reshape(Hq, D // 32, 32).abs().amax(2)
    rows = []
    outs = {"reference": decode_attention_ref(q, cache.k, cache.v, "q8_0", n, scale, Hkv)}
    for name, cfg in (("rows", {"block_n": 64}), ("batched", {"block_n": 16, "q8_impl": "batched"}),
                      ("rows-1term", {"block_n": 64, "q8_terms": (1, 1)}),
                      ("rows-q1", {"block_n": 64, "q8_terms": (1, 2)}), ("rows-p1", {"block_n": 64, "q8_terms": (2, 1)})):
        outs[name] = decode_attention(q, cache.k, cache.v, "q8_0", n, scale, Hkv, cfg=cfg)
    for name, out in outs.items():
        rel = blk(out.double() - want) / blk(size)
        i = int(rel.argmax())
        rows.append(f"  {name:11} max rel {rel.max().item():.2e} at head {i // (D // 32)} block {i % (D // 32)}")
    return rows


if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for D in (64, 128):
        for spread in ("qkv", "kv", "qv", "qk"):
            print(f"D={D} spreads={spread}", flush=True)
            print("\n".join(case(D, spread, dev)), flush=True)
