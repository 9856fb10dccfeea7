"""Is the q8_0 block-rows kernel's GPU error in its scores or in its P.V sum? (one-off diagnostic)

q8_rows_precision.py (reports/h200-2026-12-05 call 2) found the rows form 8.47e-5 from the
float64 oracle at head_dim 128 only when both the query heads' magnitudes (1e-3..1e2) and the
keys' (1e-3..10) spread, with every tile, and unchanged by normalising q per row. This reads
the kernel's softmax weights directly: V is one-hot per key (V[n] = e_n, exact in q8_0: scale
1/127, quant 127), so output column n of query head g is p[g, n] times that stored one. Against float64 softmax over
the same dequantised keys it prints, per query head, the worst relative error of p and the
score error it implies (log2 of the ratio, in the kernel's log2 units), for the rows and the
batched forms, and the same with a second V (all ones: the output is sum p / l = 1) for the
normaliser alone. Run on the GPU machine: ``python benchmarks/oneoff/q8_rows_scores.py``.
"""
from __future__ import annotations

import math
import sys

import torch

sys.path.insert(0, ".")
from engine.kernels.decode_attention import decode_attention  # noqa: E402
from engine.kv import LayerKV, dequantize_q8_0  # noqa: E402


def main() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    D, Hq, Hkv, n, cap = 128, 8, 2, 90, 200
    gen = torch.Generator(device=dev).manual_seed(D)
    k = torch.randn(n, Hkv, D, device=dev, generator=gen) * torch.logspace(-3, 1, n, device=dev)[:, None, None]
    q = torch.randn(Hq, D, device=dev, generator=gen) * torch.logspace(-3, 2, Hq, device=dev)[:, None]
    scale = D ** -0.5
    onehot = torch.zeros(n, Hkv, D, device=dev)
    onehot[torch.arange(n), :, torch.arange(n)] = 1.0
    for vname, v in (("one-hot V (out = p)", onehot), ("all-ones V (out = 1)", torch.ones(n, Hkv, D, device=dev))):
        cache = LayerKV(0, Hkv, D, cap, "q8_0", device=dev)
        cache.write(0, k, v)
        kd, vd = (dequantize_q8_0(b, (cap, Hkv, D)).to(dev) for b in cache.to_ggml_blocks())
        g = Hq // Hkv
        s = torch.einsum("hd,nhd->hn", q.double(), kd[:n].double().repeat_interleave(g, 1)) * scale
        p = s.softmax(-1)                                                     # [Hq, n] float64
        want = torch.einsum("hn,nhd->hd", p, vd[:n].double().repeat_interleave(g, 1))
        print(f"{vname}, {dev}", flush=True)
        for name, cfg in (("rows", {"block_n": 64}), ("rows bn16", {"block_n": 16}),
                          ("batched", {"block_n": 16, "q8_impl": "batched"})):
            out = decode_attention(q, cache.k, cache.v, "q8_0", n, scale, Hkv, cfg=cfg).double()
            if v is onehot:
                # the one stored as q 127 times the fp16 scale of 1/127 (not exactly 1): divided out
                diag = vd[torch.arange(n), :, torch.arange(n)].double().repeat_interleave(g, 1).T    # [Hq, n]
                got = out[:, :n] / diag
                rel = ((got - p).abs() / p.clamp_min(1e-300))
                big = p > 1e-6 * p.amax(1, keepdim=True)                        # keys that carry weight
                for h in range(Hq):
                    r = rel[h][big[h]]
                    i = int(r.argmax())
                    key = int(big[h].nonzero()[i])
                    ds = math.log2(max(got[h, key].item(), 1e-300) / p[h, key].item())
                    print(f"  {name:9} head {h}: max rel err of p {r.max().item():.2e} at key {key} "
                          f"(p {p[h, key].item():.2e}, implied score error {ds:+.2e} log2 units; "
                          f"score span {(s[h].max() - s[h].min()).item() / math.log(2):.1f})", flush=True)
            else:
                print(f"  {name:9} max |out - 1| {(out - want).abs().max().item():.2e}", flush=True)


if __name__ == "__main__":
    main()
