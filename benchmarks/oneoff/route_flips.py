"""One-off: on a random-weight MoE, do the large per-position logit diffs of a narrowed KV cache
coincide with expert-routing flips? Teacher-forces 512 seeded tokens through coder30b-mini-synth
(CPU, f32 weights) at fp32 / bf16 / q8_0 KV, records every MoE layer's top-k experts per position
(a spy on ``engine.model.moe_route``) and prints, per narrowed dtype, how many positions with
max-abs > 1 had a routing flip there. Output of 2026-12-04 in reports/h200-2026-12-04/README.md.
On the full coder30b-synth geometry the q8_0 outlier turned out not to be a flip (forcing the
baseline's experts leaves it): reports/h200-2026-12-04b/README.md, oneoff/q8_outlier*.py.

    python benchmarks/oneoff/route_flips.py
"""
import torch, engine.model as M
from engine import load
rec = []
orig = M.moe_route
def spy(s, h, router):
    p, e = orig(s, h, router)
    rec.append(e.detach().sort(-1).values.cpu())
    return p, e
M.moe_route = spy
g = torch.Generator().manual_seed(0)
toks = torch.randint(5, 30000, (512,), generator=g).tolist()
out = {}
for kv in ("fp32", "bf16", "q8_0"):
    rec.clear()
    eng = load("coder30b-mini-synth", kv_dtype=kv, device="cpu", ctx=2048, weight_format="f32")
    out[kv] = (eng.logits(toks).float(), [r.clone() for r in rec])
    del eng
for kv in ("bf16", "q8_0"):
    d = (out[kv][0] - out["fp32"][0]).abs().max(-1).values
    layers = len(out[kv][1])
    flip_first = torch.full((512,), -1)
    for L in range(layers):
        diff = (out[kv][1][L] != out["fp32"][1][L]).any(-1)
        flip_first[(flip_first < 0) & diff] = L
    big = d > 1.0
    first_flip_pos = [int(i) for i in torch.nonzero(flip_first >= 0).flatten()[:10]]
    print(kv, "positions with max-abs > 1:", int(big.sum()), " with a routing flip at that position:",
          int((big & (flip_first >= 0)).sum()), " positions with a flip:", int((flip_first >= 0).sum()),
          " max-abs at flipped positions median", float(d[flip_first >= 0].median()) if (flip_first >= 0).any() else None,
          " max-abs at unflipped positions max", float(d[flip_first < 0].max()))
    print("   first flips at", first_flip_pos, " first big at", [int(i) for i in torch.nonzero(big).flatten()[:10]])
