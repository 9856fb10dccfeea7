"""CPU emulation of the q8_0 rows kernel's q representation with float16 subnormals flushed (one-off).

Supports the explanation of the H200-only failure of the magnitude test (reports/h200-2026-12-04g
call 9, perf-notes): the kernel normalises q by its KV group's largest head and stores it as two
float16 terms, hi + lo. Flushing subnormal lo terms (what the tensor-core path on the H200 appears
to do; numpy keeps them) gives errors of the size measured there, and storing lo scaled by 2^11
(the fix) gives back the unflushed result. Run: ``python benchmarks/oneoff/q8_ftz_emulation.py``.
Columns: max relative error per (head, 32-value block) against a float64 oracle, for the exact
two-term q, the flushed one, and the scaled-then-flushed one.
"""
import sys, torch, math
sys.path.insert(0, ".")
import benchmarks.oneoff.q8_rows_precision as m
from engine.kv import LayerKV, dequantize_q8_0
LOG2E = 1.4426950408889634
def ftz16(x):   # float16 rounding with subnormals flushed to zero
    h = x.to(torch.float16)
    return torch.where(h.abs() < 2.0 ** -14, torch.zeros_like(h), h)
def qeff(q, G, scheme):   # the kernel's q representation: per KV group normalisation, hi + lo
    out = torch.empty_like(q, dtype=torch.float64)
    for g0 in range(0, q.shape[0], G):
        x = q[g0:g0+G].double()
        qmax = x.abs().max().item()
        qnorm = 2.0 ** math.ceil(math.log2(qmax)) / 8192
        y = (x / qnorm).float()
        hi = y.to(torch.float16)
        r = y - hi.float()
        if scheme == "exact": lo = r.to(torch.float16).double()
        elif scheme == "ftz": lo = ftz16(r).double()
        else: lo = ftz16(r * 2048).double() / 2048
        out[g0:g0+G] = (hi.double() + lo) * qnorm
    return out
for D in (64, 128):
  for seed in range(6):
    Hq, Hkv, n, cap = 8, 2, 90, 200
    gen = torch.Generator().manual_seed(1000+seed)
    k = torch.randn(n, Hkv, D, generator=gen) * torch.logspace(-3, 1, n)[:, None, None]
    vmag = torch.logspace(-2, 4, Hkv * D // 32)
    vmag = vmag[torch.randperm(len(vmag), generator=gen)].repeat_interleave(32).view(Hkv, D)
    v = torch.randn(n, Hkv, D, generator=gen) * vmag
    v[7, 0, :32] = 0.0
    cache = LayerKV(0, Hkv, D, cap, "q8_0", device="cpu"); cache.write(0, k, v)
    q = torch.randn(Hq, D, generator=gen) * torch.logspace(-3, 2, Hq)[:, None]
    kd, vd = (dequantize_q8_0(b, (cap, Hkv, D)) for b in cache.to_ggml_blocks())
    scale = D ** -0.5
    want = m.oracle(q, kd, vd, n, scale); size = m.oracle(q, kd, vd.abs(), n, scale)
    blk = lambda t: t.reshape(Hq, D // 32, 32).abs().amax(2)
    res = []
    for sch in ("exact", "ftz", "scaled-ftz"):
        qe = qeff(q * scale * LOG2E, Hq // Hkv, sch) / (scale * LOG2E)
        out = m.oracle(qe, kd, vd, n, scale)
        res.append(f"{sch} {(blk(out - want) / blk(size)).max().item():.1e}")
    print(D, seed, *res)
