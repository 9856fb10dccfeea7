"""Kernels compile for the GPU, checked on a machine without one.

Triton's interpreter (how ``make test`` runs every kernel on the CPU) accepts programs its
compiler refuses: a ``@triton.jit`` function whose return statements give different shapes
under different constexpr branches ran interpreted and failed to compile on the H100
(reports/h200-2026-12-05 call 2, "Return type mismatch"). Triton's compiler itself runs
without a GPU, so each configuration a launch can take is compiled here for sm_90 (the
H100/H200) in a subprocess (the interpreter knob is read at import, and this session's is on),
through to the GPU binary.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import inspect, itertools, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from engine.kernels import moe_blocks as mb

    def compile_for_sm90(fn, ptrs, constexprs):
        names = list(inspect.signature(fn.fn).parameters)
        sig = {n: ptrs.get(n, "constexpr" if n in constexprs else "i32") for n in names}
        src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
        triton.compile(src, target=GPUTarget("cuda", 90, 32))

    failed = []
    common = {"IDS": "*i32", "TABLE": "*i32"}
    for qbits, sums, unroll in itertools.product((4, 8), (True, False), (True, False)):
        qdt = "*u8" if qbits == 4 else "*i8"
        cases = [
            ("gate_up", mb._blocks_gate_up_kernel,
             {**common, "X": "*fp32", "GQ": qdt, "GD": "*fp16", "UQ": qdt, "UD": "*fp16", "H": "*fp32"},
             {"D": 2048, "USE_TABLE": True, "QBITS": qbits, "UNROLL": unroll, "SUMS": sums,
              "BLOCK_F": mb.CONFIG["gate_up"]["BLOCK_F"], "BLOCK_K": mb.CONFIG["gate_up"]["BLOCK_K"]}),
            ("down", mb._blocks_down_kernel,
             {**common, "H": "*fp32", "WQ": qdt, "WD": "*fp16", "P": "*fp32", "R": "*fp32", "OUT": "*fp32"},
             {"FF": 768, "K": 8, "USE_TABLE": False, "HAS_RES": True, "QBITS": qbits, "UNROLL": unroll,
              "SUMS": sums, "BLOCK_D": mb.CONFIG["down"]["BLOCK_D"], "BLOCK_K": mb.CONFIG["down"]["BLOCK_K"]}),
        ]
        for part, fn, ptrs, const in cases:
            try:
                compile_for_sm90(fn, ptrs, const)
            except Exception as e:
                root = e
                while root.__cause__ is not None:
                    root = root.__cause__
                failed.append(f"{part} q{qbits} sums={sums} unroll={unroll}: {type(root).__name__}: "
                              + str(root).strip().splitlines()[-1][:300])
    print("\\n".join(failed) or "all compiled")
    sys.exit(1 if failed else 0)
''')


@pytest.mark.slow(seconds=60)
def test_moe_blocks_kernels_compile_for_sm90():
    """Both MoE-blocks launches at the GPU's default tiles, Q4_0 and Q8_0, both sum forms,
    unrolled or not."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, f"compile for sm_90 failed:\n{r.stdout}\n{r.stderr[-3000:]}"
