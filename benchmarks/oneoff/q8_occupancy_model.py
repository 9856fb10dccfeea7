"""Does occupancy explain the q8_0 decode kernel's timings? For every q8_0 row of an attention
sweep measured on the GPU (``bench_attention.py --sweep`` JSON), compile the same launch offline
(the device's Triton, through ``benchmarks/oneoff/with_device_triton.sh``) and set the measured
time beside what the compile says: registers, shared memory a launch asks for, programs an SM
holds at once, warps resident a SM (``min(programs_per_sm, fit) * num_warps``, the launch's
programs spread over the SMs), SASS instructions a key (the main loop's, per program), and
whether the launch runs in more than one wave. Then a one-parameter model,
``us ~ a * instructions_per_key / min(warps_per_scheduler, 4) ** b`` fitted in log space, and its
rank correlation with the measurements.

Contract: reads the JSON named on the command line, writes the joined rows and the fit as JSON to
``--out`` and prints a table. Geometry from ``--geometry`` (coder30b: 4 KV heads x 128, 32 query
heads; the sweep's own). Rows of the generic kernel (``q8_kernel`` false) and ablations are
skipped: they are not the kernels in question.

    bash benchmarks/oneoff/with_device_triton.sh python benchmarks/oneoff/q8_occupancy_model.py \
        reports/h100-2026-12-05f/call3/attention.json --guards 1,1 --out model.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import q8_regs_offline as off  # noqa: E402
from engine.kernels import decode_attention as da  # noqa: E402

GEOMETRY = {"coder30b": (4, 128, 32), "bench": (8, 128, 32)}
SMS, SCHEDULERS = 132, 4


def launch_consts(cfg: dict, hkv: int, d: int, hq: int, guards: tuple[bool, bool]):
    """(kernel, constexprs) of a sweep row's q8_0 launch, as decode_attention builds them."""
    g, nb = hq // hkv, d // 32
    impl = cfg.get("q8_impl", "rows")
    terms = cfg.get("q8_terms", (2, 2))
    base = dict(HKV=hkv, G=g, D=d, NB=nb, BLOCK_N=cfg["block_n"], Q_TERMS=terms[0], P_TERMS=terms[1],
                FUSE=bool(cfg.get("fuse_combine", False)), S_PAD=128, BLOCK_S=128, DEV_POS=cfg.get("depth") is not None)
    if impl == "rows":
        gd = cfg.get("q8_guards", guards)
        words = cfg.get("q8_words", "none")
        return da._decode_q8_rows_kernel, dict(base, G_PAD=max(1 << (g - 1).bit_length(), 16 // nb), QN=8192.0,
                                               PN=8192.0, ROW_L=bool(gd[0]), S64=bool(gd[1]), SKIP_QK=False,
                                               SKIP_PV=False, K16="k" in words, V16="v" in words,
                                               PRMT=words == "kv_prmt")
    g_pad = max(16, 1 << (g - 1).bit_length())
    if impl == "batched":
        return da._decode_q8_kernel, dict(base, G_PAD=g_pad)
    if impl == "blocks":
        return da._decode_q8_blocks_kernel, dict(base, G_PAD=g_pad, QN=8192.0, PN=8192.0)
    raise ValueError(f"no offline launch for q8_impl {impl!r}")


def candidates(fit: dict, hkv: int, d: int, hq: int, guards) -> list[dict]:
    """Every (form, tile, warps, stages) compiled offline and every programs_per_sm up to what an
    SM holds, ranked by the fitted model. ``loop_ldg``: global loads left in the main loop (not
    pipelined through shared memory), which the model does not price: the blocks form had 36 and
    ran 40.3 us where its instructions alone said ~27."""
    out = []
    for impl in ("rows", "batched", "blocks"):
        for bn in (16, 32, 64):
            for w in (2, 4, 8):
                for st in (2, 3):
                    cfg = {"q8_impl": impl, "block_n": bn, "num_warps": w, "num_stages": st}
                    try:
                        fn, consts = launch_consts(cfg, hkv, d, hq, guards)
                        c = off.compile_one(fn, consts, w, st, 90)
                    except Exception:      # a launch that does not compile (shared memory, shapes) is no candidate
                        continue
                    ipk = c["loop_sass"] * w / bn
                    for pps in sorted({1, 2, 3, 4, 5, 6, 8, c["ctas_per_sm"]}):
                        ws = min(pps, c["ctas_per_sm"]) * w / SCHEDULERS
                        waves = math.ceil(pps / c["ctas_per_sm"])
                        us = fit["a"] * ipk / min(ws, 4.0) ** fit["b_warps_exponent"] * (
                            math.exp(fit["c_extra_wave"]) if waves > 1 else 1.0)
                        out.append({"q8_impl": impl, "block_n": bn, "num_warps": w, "num_stages": st,
                                    "programs_per_sm": pps, "model_us": round(us, 2), "regs": c["regs"],
                                    "ctas_per_sm": c["ctas_per_sm"], "warps_per_scheduler": ws,
                                    "instr_per_key": round(ipk, 1), "loop_ldg": c["loop_top"].get("LDG", 0)})
    return sorted(out, key=lambda o: o["model_us"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_json")
    ap.add_argument("--geometry", default="coder30b", choices=sorted(GEOMETRY))
    ap.add_argument("--guards", default="1,0", help="the rows kernel's default guards when the sweep ran "
                    "(ROW_L,S64): 1,1 before 31a2c63's sessions, 1,0 after")
    ap.add_argument("--key", default="sweep", help="the sweep list's key under decode.q8_0 (sweep, sweep_depth16384)")
    ap.add_argument("--candidates", type=int, default=0, help="also rank this many untimed launches by the fit")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    hkv, d, hq = GEOMETRY[args.geometry]
    guards = tuple(bool(int(x)) for x in args.guards.split(","))
    doc = json.loads(Path(args.sweep_json).read_text())
    rows = doc["decode"]["q8_0"][args.key]
    seen: dict = {}
    out = []
    for r in rows:
        if r.get("q8_kernel") is False or r.get("q8_ablate"):
            continue
        try:
            fn, consts = launch_consts(r, hkv, d, hq, guards)
        except ValueError as e:
            print(f"skip {r}: {e}", file=sys.stderr)
            continue
        key = (fn.__name__, tuple(sorted(consts.items())), r["num_warps"], r["num_stages"])
        if key not in seen:
            seen[key] = off.compile_one(fn, consts, r["num_warps"], r["num_stages"], 90)
        c = seen[key]
        pps = r["programs_per_sm"]
        resident = min(pps, c["ctas_per_sm"])
        warps_sched = resident * r["num_warps"] / SCHEDULERS
        ipk = c["loop_sass"] * r["num_warps"] / r["block_n"]
        out.append({**{k: v for k, v in r.items() if k not in ("GBps",)}, "regs_offline": c["regs"],
                    "smem_launch": c["smem_launch"], "ctas_per_sm": c["ctas_per_sm"], "resident": resident,
                    "waves": math.ceil(pps / c["ctas_per_sm"]), "warps_per_scheduler": warps_sched,
                    "instr_per_key": round(ipk, 1)})
    # fit log(us) = log(a) + log(ipk) - b * log(min(warps_sched, 4)) + c * (waves > 1), least squares on (a, b, c)
    import numpy as np
    y = np.log([o["us"] for o in out])
    x1 = np.log([min(o["warps_per_scheduler"], 4.0) for o in out])
    x2 = np.array([1.0 if o["waves"] > 1 else 0.0 for o in out])
    base = np.log([o["instr_per_key"] for o in out])
    a_mat = np.stack([np.ones_like(y), -x1, x2], axis=1)
    coef, *_ = np.linalg.lstsq(a_mat, y - base, rcond=None)
    pred = np.exp(a_mat @ coef + base)
    for o, p in zip(out, pred):
        o["model_us"] = round(float(p), 2)

    def ranks(v):
        order = np.argsort(v)
        rk = np.empty(len(v))
        rk[order] = np.arange(len(v))
        return rk
    meas = np.array([o["us"] for o in out])
    rho = float(np.corrcoef(ranks(meas), ranks(pred))[0, 1])
    rho_ipk = float(np.corrcoef(ranks(meas), ranks(np.exp(base)))[0, 1])
    out.sort(key=lambda o: o["us"])
    print(f"{'impl':8} {'bn':>4} {'pps':>3} {'w':>2} {'st':>2} {'terms':>6} {'regs':>4} {'fit':>3} {'waves':>5} "
          f"{'w/sch':>5} {'ins/key':>7} {'us':>7} {'model':>7}")
    for o in out:
        print(f"{o.get('q8_impl', 'rows'):8} {o['block_n']:4d} {o['programs_per_sm']:3d} {o['num_warps']:2d} "
              f"{o['num_stages']:2d} {str(tuple(o.get('q8_terms', (2, 2)))):>6} {o['regs_offline']:4d} "
              f"{o['ctas_per_sm']:3d} {o['waves']:5d} {o['warps_per_scheduler']:5.1f} {o['instr_per_key']:7.1f} "
              f"{o['us']:7.2f} {o['model_us']:7.2f}")
    fit = {"a": float(math.exp(coef[0])), "b_warps_exponent": float(coef[1]), "c_extra_wave": float(coef[2]),
           "spearman_model": round(rho, 3), "spearman_instr_only": round(rho_ipk, 3), "n": len(out)}
    print(json.dumps(fit))
    cands = candidates(fit, hkv, d, hq, guards) if args.candidates else []
    for c in cands[:args.candidates]:
        print("candidate " + json.dumps(c))
    if args.out:
        Path(args.out).write_text(json.dumps({"source": args.sweep_json, "geometry": args.geometry,
                                              "fit": fit, "rows": out, "candidates": cands}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
