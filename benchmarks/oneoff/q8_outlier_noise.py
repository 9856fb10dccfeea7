"""One-off (GPU), after q8_outlier.py: is coder30b-synth's q8_0 outlier (sequence 2, token 13)
the stand-in's own sensitivity, or something of our q8_0 path? fp32 KV everywhere, and layer 0's
V replaced before it is stored by (a) its q8_0 round trip through the torch reference
(``q8_layout.quantize``: no Triton kernel involved), (b) its bf16 rounding, (c) Gaussian noise of
q8_0's measured size (0.55% of each row's norm), three seeds. Prints max-abs at token 13 and
elsewhere against the unperturbed fp32 run; JSON under $OUT.

    python benchmarks/oneoff/q8_outlier_noise.py
"""
import json, os, time
from pathlib import Path
import torch
import engine.kv as kv
from engine import load, synth
from engine.kernels import q8_layout

OUT = Path(os.environ.get("OUT", "/tmp/out"))
seq = json.load(open(Path(__file__).with_name("coder_argmax_seqs.json")))[2]
POS = 13
t0 = time.time()
synth.ensure("coder30b-synth")
eng = load("coder30b-synth", kv_dtype="fp32", device="cuda", ctx=1024, weight_format="bf16")
base = eng.logits(seq)
real_write = kv.LayerKV.write
perturb = {"f": None}


def write(self, start, k, v):
    if self.layer == 0 and perturb["f"] is not None:
        v = perturb["f"](v)
    return real_write(self, start, k, v)


kv.LayerKV.write = write


def q8_torch(v):
    qs, ds = q8_layout.quantize(v.float().cpu().reshape(v.shape[0], -1))
    return (qs.float().reshape(-1, 32) * ds.float().reshape(-1, 1)).reshape(v.shape).to(v.device)


def noise(seed):
    def f(v):
        g = torch.Generator(device="cpu").manual_seed(seed)
        n = torch.randn(v.shape, generator=g).to(v.device)
        return v + n * (0.0055 * v.norm(dim=-1, keepdim=True) / n.norm(dim=-1, keepdim=True))
    return f


res = []
for name, f in [("none", None), ("v0-q8_0-torch-ref", q8_torch), ("v0-bf16", lambda v: v.to(torch.bfloat16).float()),
                ("v0-noise-s1", noise(1)), ("v0-noise-s2", noise(2)), ("v0-noise-s3", noise(3))]:
    perturb["f"] = f
    d = (eng.logits(seq) - base).abs().amax(-1)
    r = {"perturbation": name, "max_abs_at_13": float(d[POS]),
         "max_abs_elsewhere": float(torch.cat([d[:POS], d[POS + 1:]]).max()),
         "top": [(int(p), float(d[p])) for p in d.topk(3).indices], "t": round(time.time() - t0, 1)}
    res.append(r)
    print(r, flush=True)
    json.dump(res, open(OUT / "q8_outlier_noise.json", "w"), indent=1)
