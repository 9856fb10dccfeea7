"""One-off (GPU): where does q8_0 KV's one-position outlier on coder30b-synth come from?

The nightly argmax check (reports/h200-2026-12-04b) fails q8_0 at one position of 1536
(sequence 2, token 13: Max abs 15.97) and the failure stays the same with the baseline's experts
forced, so it is not an expert-routing flip. This script reruns that sequence (ids saved from the
run's records in coder_argmax_seqs.json) at fp32 KV and at KV specs that narrow K or V alone and
halves of the layers (bisecting down to one layer), records every layer's attention output at the
outlier position, and the fp32 K/V rows of the guilty layer (amax / rms per row and head, q8_0
round-trip error), as JSON under $OUT.

    python benchmarks/oneoff/q8_outlier.py     # on the GPU machine, after synth.ensure
"""
import json, os, time
from pathlib import Path
import torch
import engine.model as M
from engine import load, synth
from engine.kernels import q8_layout

OUT = Path(os.environ.get("OUT", "/tmp/out"))
MODEL = os.environ.get("Q8_MODEL", "coder30b-synth")
DEV = os.environ.get("Q8_DEVICE", "cuda")
seq = json.load(open(Path(__file__).with_name("coder_argmax_seqs.json")))[2]
POS = 13
t0 = time.time()
synth.ensure(MODEL)
res = {"pos": POS, "steps": []}
rec = {}
real_attn = M.Transformer.attention


def attn(self, i, x, start, cache):
    o = real_attn(self, i, x, start, cache)
    if start <= POS < start + x.shape[0]:
        rec[i] = o[POS - start].float().cpu()
    return o


M.Transformer.attention = attn
eng = load(MODEL, kv_dtype="fp32", device=DEV, ctx=1024, weight_format="bf16")
print("loaded", time.time() - t0, flush=True)
base = eng.logits(seq)
base_attn = dict(rec)
L = eng.spec.n_layers
k32 = {i: eng.caches[i].k[:POS + 1].float().cpu().clone() for i in range(L)}
v32 = {i: eng.caches[i].v[:POS + 1].float().cpu().clone() for i in range(L)}


def run(spec):
    global eng
    rec.clear()
    eng = load(MODEL, kv_dtype=spec, device=DEV, ctx=1024, weight_format="bf16", weights_from=eng)
    lg = eng.logits(seq)
    d = (lg - base).abs().amax(-1)
    rel = {i: float((rec[i] - base_attn[i]).norm() / base_attn[i].norm().clamp_min(1e-30)) for i in sorted(rec)}
    step = {"spec": spec, "max_abs_at_pos": float(d[POS]), "max_abs_elsewhere": float(torch.cat([d[:POS], d[POS + 1:]]).max()),
            "top_positions": [(int(p), float(d[p])) for p in d.topk(3).indices], "attn_rel_err_at_pos": rel,
            "t": round(time.time() - t0, 1)}
    res["steps"].append(step)
    print(spec, step["max_abs_at_pos"], step["max_abs_elsewhere"], step["t"], flush=True)
    json.dump(res, open(OUT / "q8_outlier.json", "w"), indent=1)
    return step["max_abs_at_pos"]


def layers(a, b):
    return f"{a}-{b}" if b > a else f"{a}"


bad = 3.5
run("q8_0")
comp = None
for c in ("k-q8_0", "v-q8_0"):
    if run(c) > bad:
        comp = c
        break
res["component"] = comp
if comp is None:
    comp = "q8_0"
lo, hi = 0, L - 1
while lo < hi and time.time() - t0 < 420:
    mid = (lo + hi) // 2
    if run(f"{comp}@{layers(lo, mid)}") > bad:
        hi = mid
    elif run(f"{comp}@{layers(mid + 1, hi)}") > bad:
        lo = mid + 1
    else:
        res["bisect"] = f"neither half of {lo}-{hi} alone reproduces it: an interaction of layers"
        break
if lo == hi:
    res["layer"] = lo
    k, v = k32[lo], v32[lo]                     # [POS+1, Hkv, D]
    rows = []
    for name, t in (("k", k), ("v", v)):
        qs, ds = q8_layout.quantize(t.reshape(t.shape[0], -1))
        back = (qs.float().reshape(-1, 32) * ds.float().reshape(-1, 1)).reshape(t.shape)
        err = (back - t).norm(dim=-1) / t.norm(dim=-1).clamp_min(1e-30)       # [rows, Hkv]
        amax_rms = t.abs().amax(-1) / t.pow(2).mean(-1).sqrt().clamp_min(1e-30)
        rows.append({"part": name, "rel_q8_err": err.tolist(), "amax_over_rms": amax_rms.tolist(),
                     "norm": t.norm(dim=-1).tolist()})
    res["layer_rows"] = rows
json.dump(res, open(OUT / "q8_outlier.json", "w"), indent=1)
print("done", time.time() - t0, res.get("component"), res.get("layer"), res.get("bisect"))
