"""Registers and spills of the decode kernels compiled for a GPU that is not here: Triton compiles
to PTX and ptxas to a cubin for ``--arch`` (sm_90 by default) on any machine, and ``cuobjdump
-res-usage`` reads each kernel's registers, spills and shared memory from the cubin. The
twenty-first session's question: every q8_0 form sits at 254-255 registers on the H100 while
bf16's split kernel does not; which constexprs move that, without spending device time.

Contract: for each variant of the built-in list (``--only`` picks some by name: the rows kernel at the H100's
default tiles with 2- and 1-term splits, its ablations, the blocks form (its int8 "imma" form,
removed, is in commit b2a901c),
the bf16 split kernel) compile at coder30b's geometry (4 KV heads x 128, 32 query heads), with a launch's
specializations (16-byte aligned pointers and strides), and print registers, stack, shared
memory (static, and what a launch asks for), how many programs an SM can hold at once (registers,
shared memory, warps: with ``programs_per_sm`` above it, a launch runs in more than one wave), SASS instructions (all, and in the main loop by opcode) and whether loads are pipelined
(``cp_async``: LDGSTS); JSON to ``--out``. Registers here come from this
machine's Triton (its version printed): run it through `benchmarks/oneoff/with_device_triton.sh`
to compile with the device's (3.6.0), whose registers match the device's for every variant timed
there; the .venv's 3.9 allocated the rows kernel at 225 registers where the device has 255, and
counted the int16-word forms 19-29% lower where the device's compiler adds 2-8%
(reports/cpu-2026-12-06d). A different Triton is warned about on stderr and recorded in the JSON.

    bash benchmarks/oneoff/with_device_triton.sh python benchmarks/oneoff/q8_regs_offline.py --out q8_regs.json
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.kernels import decode_attention as da  # noqa: E402

HKV, G, D, NB = 4, 8, 128, 4
DEVICE_TRITON = "3.6.0"     # what torch 2.11+cu130 on the GPU machine brings

PTR = {"Q": "*fp32", "KQ": "*i8", "KS": "*fp16", "VQ": "*i8", "VS": "*fp16", "M_OUT": "*fp32",
       "L_OUT": "*fp32", "ACC_OUT": "*fp32", "OUT": "*fp32", "S_BUF": "*fp32", "COUNTER": "*i32", "POS": "*i64",
       "n_keys": "i32", "keys_per_split": "i32", "n_splits": "i32", "qk_scale": "fp32",
       "K": "*bf16", "V": "*bf16", "stride_k": "i32", "stride_ks": "i32", "stride_v": "i32", "stride_vs": "i32"}


def q8_variants():
    base = dict(HKV=HKV, G=G, D=D, NB=NB, BLOCK_N=64, Q_TERMS=2, P_TERMS=2, FUSE=False, S_PAD=128,
                BLOCK_S=128, DEV_POS=True)
    rows = dict(base, G_PAD=8, QN=8192.0, PN=8192.0, ROW_L=True, S64=False, SKIP_QK=False, SKIP_PV=False,
                K16=False, V16=False, PRMT=False)
    out = [("rows (2,2) bn64 w4", da._decode_q8_rows_kernel, rows, 4, 3),
           ("rows (2,2) bn64 w4 vnorm split", da._decode_q8_rows_kernel, dict(rows, VN_SPLIT=True), 4, 3),
           ("rows (2,2) bn64 w4 vnorm split no rowl", da._decode_q8_rows_kernel, dict(rows, VN_SPLIT=True, ROW_L=False), 4, 3),
           ("rows (1,1) bn64 w4", da._decode_q8_rows_kernel, dict(rows, Q_TERMS=1, P_TERMS=1), 4, 3),
           ("rows (2,2) bn64 w4 k16", da._decode_q8_rows_kernel, dict(rows, K16=True), 4, 3),
           ("rows (2,2) bn64 w4 v16", da._decode_q8_rows_kernel, dict(rows, V16=True), 4, 3),
           ("rows (2,2) bn64 w4 k16 v16", da._decode_q8_rows_kernel, dict(rows, K16=True, V16=True), 4, 3),
           ("rows (2,2) bn64 w4 k16 v16 prmt", da._decode_q8_rows_kernel, dict(rows, K16=True, V16=True, PRMT=True), 4, 3),
           ("rows (2,2) bn128 w4 k16 v16 prmt", da._decode_q8_rows_kernel,
            dict(rows, BLOCK_N=128, K16=True, V16=True, PRMT=True), 4, 3),
           ("rows (2,2) bn64 w8 k16 v16", da._decode_q8_rows_kernel, dict(rows, K16=True, V16=True), 8, 3),
           ("rows (2,2) bn32 w4 k16 v16", da._decode_q8_rows_kernel, dict(rows, BLOCK_N=32, K16=True, V16=True), 4, 3),
           ("rows (2,2) bn32 w4", da._decode_q8_rows_kernel, dict(rows, BLOCK_N=32), 4, 3),
           ("rows (2,2) bn64 w8", da._decode_q8_rows_kernel, rows, 8, 3),
           ("rows no qk", da._decode_q8_rows_kernel, dict(rows, SKIP_QK=True), 4, 3),
           ("rows no pv", da._decode_q8_rows_kernel, dict(rows, SKIP_PV=True), 4, 3),
           ("rows no qk, no pv", da._decode_q8_rows_kernel, dict(rows, SKIP_QK=True, SKIP_PV=True), 4, 3),
           ("blocks (2,2) bn64 w4", da._decode_q8_blocks_kernel, dict(base, G_PAD=16, QN=8192.0, PN=8192.0), 4, 3),
           # the batched form (the block a batch axis of 3-D dots): the H100's sweep had it level with rows
           ("batched (2,2) bn32 w2 s2", da._decode_q8_kernel, dict(base, G_PAD=16, BLOCK_N=32), 2, 2),
           ("batched (2,2) bn64 w4 s3", da._decode_q8_kernel, dict(base, G_PAD=16), 4, 3),
           ("batched (2,2) bn32 w4 s3", da._decode_q8_kernel, dict(base, G_PAD=16, BLOCK_N=32), 4, 3)]
    bf16 = dict(G=G, G_PAD=16, D=D, BLOCK_N=32, KFMT=1, VFMT=1, PREC="tf32x3", SPLIT=True, FUSE=False,
                S_PAD=128, BLOCK_S=128, DEV_POS=True, WINDOW=0, RING=0)
    out.append(("bf16 split bn32 w2", da._decode_split_kernel, bf16, 2, 3))
    out.append(("bf16 split G4 bn32 w2", da._decode_split_kernel, dict(bf16, G=4), 2, 3))
    # the three bf16 terms stacked along one operand's rows: coder30b (G 8: 32 rows) and the
    # bench geometry (8 KV heads, G 4: 16 rows)
    st = dict(G=G, GP=8, M=32, D=D, BLOCK_N=32, SPLIT=True, FUSE=False, S_PAD=128, BLOCK_S=128, DEV_POS=True)
    for bn, w in ((32, 2), (64, 4), (32, 4)):
        out.append((f"bf16 stacked G8 bn{bn} w{w}", da._decode_bf16_stacked_kernel, dict(st, BLOCK_N=bn), w, 3))
        out.append((f"bf16 stacked G4 bn{bn} w{w}", da._decode_bf16_stacked_kernel,
                    dict(st, G=4, GP=4, M=16, BLOCK_N=bn), w, 3))
    # programmatic dependent launch (griddepcontrol.wait / launch_dependents at the kernels' start)
    out.append(("rows (2,2) bn64 w4 vnorm split pdl", da._decode_q8_rows_kernel, dict(rows, VN_SPLIT=True, PDL=True), 4, 3))
    # the same default at the bench geometry (8 KV heads, G 4: a [16, 128] operand against G 8's [32, 128]):
    # the thirty-first session's question, why q8_0 beats bf16 at G 4 and only ties it at G 8
    out.append(("rows G4 (2,2) bn64 w4 vnorm split pdl", da._decode_q8_rows_kernel,
                dict(rows, HKV=8, G=4, G_PAD=4, VN_SPLIT=True, PDL=True), 4, 3))
    # the two float16 terms stacked along the rows (q8_stack; thirty-second session): at G 8 the stacked
    # operand is 64 rows, one sm_90 warpgroup MMA; at G 4 32 rows
    for g, hkv in ((8, 4), (4, 8)):
        for bn, w in ((64, 4), (32, 4), (64, 8), (128, 4)):
            out.append((f"rows stack G{g} bn{bn} w{w}", da._decode_q8_rows_kernel,
                        dict(rows, HKV=hkv, G=g, G_PAD=g, BLOCK_N=bn, VN_SPLIT=True, PDL=True, STACK=True), w, 3))
    out.append(("bf16 split bn32 w2 pdl", da._decode_split_kernel, dict(bf16, PDL=True), 2, 3))
    out.append(("bf16 stacked G4 bn32 w2 pdl", da._decode_bf16_stacked_kernel, dict(st, G=4, GP=4, M=16, PDL=True), 2, 3))
    # the streams form (float32 FMAs, R softmax streams a program): coder30b (G 8) and the bench
    # geometry (8 KV heads, G 4)
    for g, hkv in ((8, 4), (4, 8)):
        for r, w, st in ((16, 4, 2), (32, 4, 2), (32, 8, 2), (64, 8, 2), (16, 2, 2), (32, 4, 3), (32, 4, 1)):
            out.append((f"streams G{g} R{r} w{w} s{st}", da._decode_q8_streams_kernel,
                        dict(HKV=hkv, G=g, D=D, NB=NB, R=r, DEV_POS=True, PDL=True), w, st))
            out.append((f"streams2 G{g} R{r} w{w} s{st}", da._decode_q8_streams2_kernel,
                        dict(HKV=hkv, G=g, D=D, NB=NB, R=r, DEV_POS=True, PDL=True), w, st))
            for k in (da._decode_q8_streams_kernel, da._decode_q8_streams2_kernel):
                out.append((f"{k.__name__.split('_')[3]} prmt G{g} R{r} w{w} s{st}", k,
                            dict(HKV=hkv, G=g, D=D, NB=NB, R=r, DEV_POS=True, PDL=True, PRMT=True), w, st))
    return out


def compile_one(fn, consts: dict, warps: int, stages: int, arch: int) -> dict:
    names = fn.arg_names
    import inspect      # constexprs left at their defaults in the kernel's signature
    defaults = {n: p.default for n, p in inspect.signature(fn.fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    consts = {**{n: v for n, v in defaults.items() if n not in PTR}, **consts}
    sig = {n: ("constexpr" if n in consts else PTR[n]) for n in names}
    # what a launch specializes: pointers 16-byte aligned (torch's allocations), keys_per_split a
    # multiple of the tile (split_plan); without these the loads compile narrow
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in consts and (PTR[n].startswith("*") or n == "keys_per_split" or n.startswith("stride"))}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        res = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True).stdout
    # SASS instructions by opcode (the kernels are issue-bound: instructions, not bytes, set the time)
    ops: dict = {}
    instrs = []     # (address, opcode, line)
    for line in sass.splitlines():
        mm = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(?:\.[A-Z0-9_.]+)?\b", line)
        if mm:
            ops[mm.group(2)] = ops.get(mm.group(2), 0) + 1
            instrs.append((int(mm.group(1), 16), mm.group(2), line))
    # the main loop: the largest span closed by a backward branch (BRA to a lower address)
    loop = None
    for addr, op, line in instrs:
        t = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?(?:0x)?([0-9a-f]+)", line) if op == "BRA" else None
        if t and int(t.group(1), 16) < addr and (loop is None or addr - int(t.group(1), 16) > loop[1] - loop[0]):
            loop = (int(t.group(1), 16), addr)
    body: dict = {}
    if loop:
        for addr, op, _ in instrs:
            if loop[0] <= addr <= loop[1]:
                body[op] = body.get(op, 0) + 1
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)", res)
    ptx = ck.asm["ptx"]
    regs = int(m.group(1)) if m else None
    smem = int(ck.metadata.shared)      # what a launch asks for: the pipeline's stages and the dots' staging
    # programs (CTAs) an sm_90 SM holds at once: 64K registers (allocated per warp in units of 256),
    # 228 KB of shared memory (1 KB reserved a CTA), 64 warps, 32 CTAs
    per_warp = -(-(regs or 255) * 32 // 256) * 256
    fit = min(65536 // (per_warp * warps), (233472 // (smem + 1024)) if smem else 32, 64 // warps, 32)
    return {"regs": regs, "stack": int(m.group(2)) if m else None,
            "smem_launch": smem, "ctas_per_sm": fit, "warps_per_sm": fit * warps,
            "shared": int(m.group(3)) if m else None,
            "ptx_lines": ptx.count("\n"), "mma": len(re.findall(r"\bmma\.sync|wgmma\.mma_async", ptx)),
            "ld_shared": len(re.findall(r"\bld\.shared", ptx)), "st_shared": len(re.findall(r"\bst\.shared", ptx)),
            "cvt": len(re.findall(r"\bcvt\.", ptx)), "sass": sum(ops.values()),
            "cp_async": ops.get("LDGSTS", 0),     # loads pipelined through shared memory (num_stages)
            "loop_sass": sum(body.values()), "loop_top": dict(sorted(body.items(), key=lambda kv: -kv[1])[:40]),
            "sass_top": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:14])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--only", default="", help="|-separated substrings of variant names")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    print(f"triton {triton.__version__}, sm_{args.arch}")
    if triton.__version__ != DEVICE_TRITON:
        print(f"warning: triton {triton.__version__} is not the device's {DEVICE_TRITON}: registers and instruction "
              f"counts will differ from the device's (run through benchmarks/oneoff/with_device_triton.sh)", file=sys.stderr)
    for name, fn, consts, warps, stages in q8_variants():
        if args.only and not any(s in name for s in args.only.split("|")):
            continue
        try:
            r = {"variant": name, "num_warps": warps, "num_stages": stages, **compile_one(fn, consts, warps, stages, args.arch)}
        except Exception as e:     # a variant that does not compile is reported, not fatal
            r = {"variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(r)
        print(json.dumps(r))
    if args.out:
        Path(args.out).write_text(json.dumps({"triton": triton.__version__, "device_triton": DEVICE_TRITON,
                                              "arch": args.arch, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
