"""What Triton's int8 -> float16 dot operand costs, alone: the two dots of decode attention over
int8 quants (q8_0's) against the same dots over float16 (bf16's path), nothing else.

Why (twenty-fifth session): nine q8_0 decode forms (rows, batched, fma, int8, deq, blocks, imma,
words, batched at 4-7 programs a SM) all sit at 20-21 us a launch in the captured coder30b step
at depth 16384 against bf16's 15.5, reading half the bytes. Offline, a probe of one dot each
showed the int8 operand's lowering: at a 64-key tile and 32 rows (the rows form's M), the score
dot's loop issues 455 SASS instructions a warp over int8 against 167 over float16 (PRMT 112,
LDS 39: the bytes gathered into k-pairs, no ldmatrix), and the value dot 333 against 194. This
times the same kernels on the GPU, so the instruction counts become microseconds.

Contract: each kernel is one decode launch's shape (grid: KV heads x splits, each program walking
its split's keys in ``--block-n`` tiles of a [rows, HKV, D] cache, 4 warps, 3 stages):
  ``qk``  s = q @ k^T per tile, a running max kept (q [M, D] float16 per head);
  ``pv``  acc += p @ v per tile (p [M, BLOCK_N] float16 per program);
  ``both`` the two, p = exp2(s - running max) (softmax without its rescale);
  ``both+2terms`` with q and p as two float16 terms each (two dots each, as every q8_0 form);
  ``both+2stacked`` the same two terms stacked along M (one dot of 2M rows each: the int8
  operand converted once; the halves summed after);
  ``both+blocks4`` the rows form's block bookkeeping: rows (head, block), the scores' block sum
  with the K scales, p broadcast to the rows times the V scales, the accumulator's rescale;
  ``+pn`` / ``+rowl`` the production rows form's per-tile V-scale normalisation and row-wise l.
The cache holds int8 (``i8``, turned into float16 by the engine's ``_i8_to_f16``) or float16
(``f16``). ``--check`` runs each once at a small size (interpreted on the CPU) against torch
and exits non-zero on a mismatch; ``--time`` (CUDA) times each as a step pays it
(``bench_attention.layered_time``: back-to-back launches over >= 4x the L2 of distinct copies)
and prints us a launch and GB/s; ``--offline`` compiles each for sm_90 and counts the loop's
SASS (``q8_regs_offline.compile_one``; run it through ``with_device_triton.sh``). JSON to --out.

    TRITON_INTERPRET=1 python benchmarks/oneoff/q8_operand_probe.py --check   # CPU
    python benchmarks/oneoff/q8_operand_probe.py --time --out probe.json      # GPU
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "oneoff"))

from engine.kernels.decode_attention import _i8_to_f16, _pow2_at_least  # noqa: E402

MODES = ("qk", "pv", "both")


def cases(nb: int) -> list[tuple[str, int, int, int]]:
    """(mode, terms, blocks, extra) timed and checked: extra bit 0 the per-tile V-scale
    normalisation (the production rows form's: a max over the tile), bit 1 the row-wise l (the
    production form's two remaining parts), bit 2 the normalisation from the tile's first key
    (no reduction) instead of bit 0's."""
    return ([(mode, 1, 0, 0) for mode in MODES] + [("both", 2, 0, 0), ("both", 3, 0, 0), ("both", 1, nb, 0)]
            + [("both", 2, nb, extra) for extra in (0, 1, 2, 3, 4, 6)])


def case_name(mode: str, terms: int, blocks: int, extra: int) -> str:
    return (mode + {1: "", 2: "+2terms", 3: "+2stacked"}[terms] + (f"+blocks{blocks}" if blocks else "")
            + ("+pn" if extra & 1 else "") + ("+pnfirst" if extra & 4 else "") + ("+rowl" if extra & 2 else ""))


@triton.jit
def _probe_kernel(Q, K, V, P, OUT, keys_per_split, n_keys, KS, VS,
                  HKV: tl.constexpr, M: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                  MODE: tl.constexpr, I8: tl.constexpr, TERMS: tl.constexpr = 1, NB: tl.constexpr = 0,
                  PN: tl.constexpr = 0, ROWL: tl.constexpr = False):
    # MODE 0: qk (reads K), 1: pv (reads V), 2: both. K, V: [rows, HKV, D], int8 (I8) or float16.
    h = tl.program_id(0)
    sp = tl.program_id(1)
    om = tl.arange(0, M)
    od = tl.arange(0, D)
    ob = tl.arange(0, BLOCK_N)
    q = tl.load(Q + (h * M + om)[:, None] * D + od[None, :])                       # [M, D] f16
    p0 = tl.load(P + (h * M + om)[:, None] * BLOCK_N + ob[None, :])                # [M, BN] f16
    m = tl.full([M], -1e30, tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    lo = sp * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_keys)
    if NB > 0:      # the rows form's block bookkeeping (MODE 2 only, TERMS 1 or 2): row r = g * NB + b
        GR: tl.constexpr = M // NB
        mg = tl.full([GR], -1e30, tl.float32)
        l_r = tl.zeros([M], tl.float32)
        ql = (q.to(tl.float32) * 0.5).to(tl.float16)      # a second term's operand (timing shape)
        for n0 in range(lo, hi, BLOCK_N):
            rows = (n0 + ob).to(tl.int64)
            mask = (n0 + ob) < hi
            offs = rows[:, None] * (HKV * D) + (h * D + od)[None, :]
            scol = h * NB + tl.arange(0, NB)
            k = tl.load(K + offs, mask=mask[:, None], other=0)
            kf = _i8_to_f16(k) if I8 else k
            sb = tl.dot(q, tl.trans(kf), out_dtype=tl.float32)                          # [M, BN]
            if TERMS == 2:
                sb += tl.dot(ql, tl.trans(kf), out_dtype=tl.float32) * (1.0 / 2048.0)
            dk = tl.load(KS + rows[None, :] * (HKV * NB) + scol[:, None], mask=mask[None, :], other=0.0)
            sg = tl.sum(tl.reshape(sb, [GR, NB, BLOCK_N]) * dk.to(tl.float32)[None, :, :], axis=1)
            sg = tl.where(mask[None, :], sg, -1e30)                                       # [GR, BN]
            m_new = tl.maximum(mg, tl.max(sg, axis=1))
            alpha = tl.exp2(mg - m_new)
            pg = tl.exp2(sg - m_new[:, None])
            p_r = tl.reshape(tl.broadcast_to(pg[:, None, :], [GR, NB, BLOCK_N]), [M, BLOCK_N])
            dv = tl.load(VS + rows[None, :] * (HKV * NB) + scol[:, None], mask=mask[None, :], other=0.0)
            dvf = dv.to(tl.float32)
            if PN == 1:     # the production form's per-tile power-of-two normalisation of the V scales
                pn = _pow2_at_least(tl.maximum(tl.max(dvf, axis=1), 1e-30)) / 8192.0          # [NB]
                dvf = dvf / pn[:, None]
            elif PN == 2:   # no reduction: the power of two from the tile's first key's scales
                dv0 = tl.load(VS + (n0 * (HKV * NB) + scol).to(tl.int64)).to(tl.float32)      # [NB]
                pn = _pow2_at_least(tl.maximum(dv0, 1e-30)) / 1024.0
                dvf = dvf / pn[:, None]
            dv_r = tl.reshape(tl.broadcast_to(dvf[None, :, :], [GR, NB, BLOCK_N]), [M, BLOCK_N])
            pw = p_r * dv_r
            ph = pw.to(tl.float16)
            v = tl.load(V + offs, mask=mask[:, None], other=0)
            vf = _i8_to_f16(v) if I8 else v
            pv = tl.dot(ph, vf, out_dtype=tl.float32)
            if TERMS == 2:
                pl = ((pw - ph.to(tl.float32)) * 2048.0).to(tl.float16)
                pv += tl.dot(pl, vf, out_dtype=tl.float32) * (1.0 / 2048.0)
            alpha_r = tl.reshape(tl.broadcast_to(alpha[:, None], [GR, NB]), [M])
            if PN > 0:
                pv = pv * tl.reshape(tl.broadcast_to(pn[None, :], [GR, NB]), [M])[:, None]
            if ROWL:    # the production form's row-wise l (its precision guard)
                l_r = l_r * alpha_r + tl.sum(p_r, axis=1)
            acc = acc * alpha_r[:, None] + pv
            mg = m_new
        m = tl.reshape(tl.broadcast_to(mg[:, None], [GR, NB]), [M])
        if ROWL:    # l_r stored in the max's column (what the production form writes as l)
            m = l_r
        hi = lo         # the loop below runs no tile
    elif TERMS >= 2:
        ql = (q.to(tl.float32) * 0.5).to(tl.float16)
    for n0 in range(lo, hi, BLOCK_N):
        rows = (n0 + ob).to(tl.int64)
        mask = (n0 + ob) < hi
        offs = rows[:, None] * (HKV * D) + (h * D + od)[None, :]
        if MODE == 1:
            v = tl.load(V + offs, mask=mask[:, None], other=0)
            acc += tl.dot(p0, _i8_to_f16(v) if I8 else v, out_dtype=tl.float32)
        else:
            k = tl.load(K + offs, mask=mask[:, None], other=0)
            kf = _i8_to_f16(k) if I8 else k
            if TERMS == 3:      # the two terms stacked along M: one dot, the operand converted once
                w2 = tl.where(tl.arange(0, 2) == 0, 1.0, 1.0 / 2048.0)
                q2 = tl.reshape(tl.permute(tl.join(q, ql), (2, 0, 1)), [2 * M, D])
                s2 = tl.dot(q2, tl.trans(kf), out_dtype=tl.float32)                     # [2M, BN]
                s = tl.sum(tl.reshape(s2, [2, M, BLOCK_N]) * w2[:, None, None], axis=0)
            else:
                s = tl.dot(q, tl.trans(kf), out_dtype=tl.float32)                       # [M, BN]
            if TERMS == 2:      # the second term of a two-term q (timing shape: q / 2)
                s += tl.dot(ql, tl.trans(kf), out_dtype=tl.float32) * (1.0 / 2048.0)
            s = tl.where(mask[None, :], s, -1e30)
            m = tl.maximum(m, tl.max(s, axis=1))
            if MODE == 2:
                v = tl.load(V + offs, mask=mask[:, None], other=0)
                vf = _i8_to_f16(v) if I8 else v
                pw = tl.exp2(s - m[:, None])
                p = pw.to(tl.float16)
                if TERMS == 3:
                    pl = ((pw - p.to(tl.float32)) * 2048.0).to(tl.float16)
                    p2 = tl.reshape(tl.permute(tl.join(p, pl), (2, 0, 1)), [2 * M, BLOCK_N])
                    pv2 = tl.dot(p2, vf, out_dtype=tl.float32)                          # [2M, D]
                    acc += tl.sum(tl.reshape(pv2, [2, M, D]) * w2[:, None, None], axis=0)
                else:
                    acc += tl.dot(p, vf, out_dtype=tl.float32)
                if TERMS == 2:
                    pl = ((pw - p.to(tl.float32)) * 2048.0).to(tl.float16)
                    acc += tl.dot(pl, vf, out_dtype=tl.float32) * (1.0 / 2048.0)
    o = h * tl.num_programs(1) + sp
    tl.store(OUT + (o * M + om)[:, None] * (D + 1) + od[None, :], acc)
    tl.store(OUT + (o * M + om) * (D + 1) + D, m)


def launch(q, k, v, p, out, keys_per_split, n_keys, splits, hkv, m, d, bn, mode, i8, warps=4, stages=3,
           terms=1, nb=0, ks=None, vs=None, pn=0, rowl=False):
    if nb and (mode != "both" or terms == 3):
        raise ValueError("the block bookkeeping (nb) is timed in mode 'both' with 1 or 2 terms only")
    _probe_kernel[(hkv, splits)](q, k, v, p, out, keys_per_split, n_keys, q if ks is None else ks,
                                 q if vs is None else vs, HKV=hkv, M=m, D=d, BLOCK_N=bn,
                                 MODE=MODES.index(mode), I8=i8, TERMS=terms, NB=nb, PN=pn, ROWL=rowl, num_warps=warps,
                                 num_stages=stages)


def reference(q, k, v, p, keys_per_split, n_keys, splits, hkv, m, d, bn, mode, terms=1, nb=0, ks=None, vs=None,
              rowl=False):
    """float64 torch: per program the same sums (the running max over its keys). ``terms`` 2 adds
    the second term's dot as the kernel forms it (q / 2, scaled by 2^-11; p's remainder: p exact);
    ``nb`` > 0: rows (g, b) = g * nb + b, scores summed over b with the K scales, weights
    exp2(s - final max) times the V scales (the kernel rescales its accumulator as it goes);
    ``rowl``: the max's column holds each row's l (the sum of those weights) instead."""
    out = torch.zeros(hkv * splits * m, d + 1, dtype=torch.float64)
    kf, vf = k.double(), v.double()
    qk_gain = 1.0 + (0.5 / 2048.0 if terms >= 2 else 0.0)     # 3: the same two terms, stacked
    for h in range(hkv):
        qh, ph = q[h * m:(h + 1) * m].double(), p[h * m:(h + 1) * m].double()
        for sp in range(splits):
            lo, hi = sp * keys_per_split, min((sp + 1) * keys_per_split, n_keys)
            o = (h * splits + sp) * m
            if lo >= hi:
                out[o:o + m, d] = -1e30
                continue
            if nb:
                gr = m // nb
                sb = (qh @ kf[lo:hi, h].T) * qk_gain                                   # [M, n]
                dk, dv = ks[lo:hi, h].double(), vs[lo:hi, h].double()                  # [n, nb]
                sg = (sb.reshape(gr, nb, -1) * dk.T[None]).sum(1)                     # [gr, n]
                mx = sg.max(dim=1).values
                w = torch.exp2(sg - mx[:, None])                                       # [gr, n]
                wr = (w[:, None, :] * dv.T[None]).reshape(m, -1)                       # [M, n]
                out[o:o + m, :d] = wr @ vf[lo:hi, h]
                out[o:o + m, d] = (w.sum(1) if rowl else mx).repeat_interleave(nb)
                continue
            if mode == "pv":
                acc = torch.zeros(m, d, dtype=torch.float64)
                for n0 in range(lo, hi, bn):
                    vt = vf[n0:min(n0 + bn, hi), h]
                    acc += ph[:, :vt.shape[0]] @ vt
                out[o:o + m, :d] = acc
                out[o:o + m, d] = -1e30
                continue
            s = (qh @ kf[lo:hi, h].T) * qk_gain                                        # [M, n]
            out[o:o + m, d] = s.max(dim=1).values
            if mode == "both":        # p from the running max at each tile, as the kernel forms it
                acc, run = torch.zeros(m, d, dtype=torch.float64), torch.full((m,), -1e30, dtype=torch.float64)
                for n0 in range(lo, hi, bn):
                    st = s[:, n0 - lo:min(n0 + bn, hi) - lo]
                    run = torch.maximum(run, st.max(dim=1).values)
                    pt = torch.exp2(st - run[:, None])
                    pt = pt if terms >= 2 else pt.half().double()
                    acc += pt @ vf[n0:n0 + st.shape[1], h]
                out[o:o + m, :d] = acc
    return out


def make(n_keys, hkv, m, d, bn, i8, device, gen):
    q = (torch.randn(hkv * m, d, generator=gen) * 0.05).half().to(device)
    p = torch.rand(hkv * m, bn, generator=gen).half().to(device)
    def cache():
        t = torch.randint(-127, 128, (n_keys, hkv, d), generator=gen, dtype=torch.int8)
        return (t if i8 else t.half()).to(device)
    return q, p, cache(), cache()


def scales(n_keys, hkv, nb, device, gen):
    return (torch.rand(n_keys, hkv, nb, generator=gen) * 0.01 + 0.001).half().to(device)


def check(args) -> int:
    gen = torch.Generator().manual_seed(0)
    hkv, m, d, bn, n_keys, per = 2, 16, 32, 16, 80, 32
    splits = -(-n_keys // per)
    bad = 0
    for mode, terms, nb, extra in cases(4):
        for i8 in (True, False):
            q, p, k, v = make(n_keys, hkv, m, d, bn, i8, "cpu", gen)
            ks, vs = (scales(n_keys, hkv, nb, "cpu", gen) for _ in range(2)) if nb else (None, None)
            out = torch.empty(hkv * splits * m, d + 1, dtype=torch.float32)
            launch(q, k, v, p, out, per, n_keys, splits, hkv, m, d, bn, mode, i8, terms=terms, nb=nb, ks=ks, vs=vs,
                   pn=1 if extra & 1 else (2 if extra & 4 else 0), rowl=bool(extra & 2))
            ref = reference(q.float(), k.float(), v.float(), p.float(), per, n_keys, splits, hkv, m, d, bn, mode,
                            terms=terms, nb=nb, ks=ks, vs=vs, rowl=bool(extra & 2))
            err = ((out.double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
            ok = err < 2e-3
            bad += not ok
            print(f"check {case_name(mode, terms, nb, extra):26} {'i8' if i8 else 'f16'}: max rel err {err:.2e} "
                  f"{'ok' if ok else 'MISMATCH'}")
    return 1 if bad else 0


def time_all(args) -> dict:
    from bench_attention import layered_time      # noqa: E402 - the GPU benchmark's step-like timing
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    hkv, m, d, bn = args.hkv, args.m, args.d, args.block_n
    n_keys = args.ctx
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    splits = max(1, min(args.programs_per_sm * sms // hkv, -(-n_keys // bn)))
    per = -(-(-(-n_keys // splits)) // bn) * bn
    splits = -(-n_keys // per)
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    rows = []
    for i8 in (True, False):
        q, p, k, v = make(n_keys, hkv, m, d, bn, i8, dev, gen)
        nbytes = k.numel() * k.element_size()                 # one tensor (K or V)
        copies = max(2, -(-4 * l2 // nbytes))
        bufs = [(k.clone(), v.clone()) for _ in range(copies)]
        out = torch.empty(hkv * splits * m, d + 1, dtype=torch.float32, device=dev)
        nb = d // 32
        ks, vs = scales(n_keys, hkv, nb, dev, gen), scales(n_keys, hkv, nb, dev, gen)
        for mode, terms, blocks, extra in cases(nb):
            bytes_read = nbytes * (2 if mode == "both" else 1)
            us, _ = layered_time(bufs, lambda kb, vb: launch(q, kb, vb, p, out, per, n_keys, splits, hkv, m, d,
                                                             bn, mode, i8, terms=terms, nb=blocks, ks=ks, vs=vs,
                                                             pn=1 if extra & 1 else (2 if extra & 4 else 0), rowl=bool(extra & 2)),
                                 args.reps)
            mode = case_name(mode, terms, blocks, extra)
            r = {"mode": mode, "cache": "i8" if i8 else "f16", "us": round(us, 2), "bytes_read": bytes_read,
                 "GBps": round(bytes_read / (us * 1e-6) / 1e9, 1), "copies": copies,
                 "splits": splits, "keys_per_split": per, "M": m, "block_n": bn, "ctx": n_keys, "hkv": hkv}
            rows.append(r)
            print(f"{mode:26} {r['cache']:3}: {us:7.2f} us a launch, {r['GBps']:7.1f} GB/s "
                  f"({bytes_read / 1e6:.1f} MB; {splits} splits x {per} keys, M {m}, {bn}-key tiles)", flush=True)
        del bufs
    return {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
            "rows": rows}


def offline(args) -> dict:
    import q8_regs_offline as R     # noqa: E402
    R.PTR.update({"P": "*fp16", "OUT": "*fp32", "keys_per_split": "i32", "n_keys": "i32", "Q": "*fp16"})
    rows = []
    for i8 in (True, False):
        R.PTR["K"] = R.PTR["V"] = "*i8" if i8 else "*fp16"
        R.PTR["KS"] = R.PTR["VS"] = "*fp16"
        for mode, terms, nb, extra in cases(args.d // 32):
            r = R.compile_one(_probe_kernel, dict(HKV=args.hkv, M=args.m, D=args.d, BLOCK_N=args.block_n,
                                                   MODE=MODES.index(mode), I8=i8, TERMS=terms, NB=nb,
                                                   PN=1 if extra & 1 else (2 if extra & 4 else 0),
                                                   ROWL=bool(extra & 2)), 4, 3, 90)
            mode = case_name(mode, terms, nb, extra)
            lt = r["loop_top"]
            row = {"mode": mode, "cache": "i8" if i8 else "f16", "regs": r["regs"], "loop_sass": r["loop_sass"],
                   **{k: lt.get(k, 0) for k in ("LDS", "LDSM", "PRMT", "HADD2", "HMMA", "LDGSTS", "BAR")}}
            rows.append(row)
            print(json.dumps(row))
    return {"triton": triton.__version__, "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--offline", action="store_true")
    ap.add_argument("--ctx", type=int, default=16384)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--m", type=int, default=32, help="rows of q / p a program (the rows form: 8 heads x 4 blocks)")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--programs-per-sm", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    doc = {}
    rc = 0
    if args.check:
        if torch.cuda.is_available() is False and os.environ.get("TRITON_INTERPRET") != "1":
            print("error: --check on a machine without CUDA needs TRITON_INTERPRET=1 in the environment "
                  "(Triton reads it at import)", file=sys.stderr)
            return 2
        rc = check(args)
        doc["check"] = "fail" if rc else "pass"
    if args.offline:
        doc["offline"] = offline(args)
    if args.time:
        doc["time"] = time_all(args)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
