"""Does a float16 tensor-core dot with float32 accumulation keep float32's precision? (one-off)

The q8_0 block-rows decode kernel is 8.47e-5 from the float64 oracle on the GPU in
tests/test_kernels.py's magnitude test, and only when the query heads and the keys both span
decades, which gives the scores their largest magnitudes. Its softmax weights for another instance
were within 4e-6 (reports/h100-2026-12-05c call 1, q8_rows_scores.py). One candidate: the
tensor cores' float32 accumulation is not float32 addition. Products aligned to the largest in
a group may be truncated, not rounded. Then the error of a score is a few float32 steps of the
largest *product*, not of the sum, biased and growing with the dot's length.

This times nothing. It measures ``tl.dot(a, b, out_dtype=float32)`` on float16 operands against
float64 over operands shaped like the kernel's:
- a: rows zero outside one 32-value block, values up to 2^13;
- b: int8 quants, exact in float16.

It prints, per case, the worst |error| over sum |a||b| (float32's rounding alone is about
2^-24 x log2(K)). It also prints the same dot done by float32 multiply-adds on CUDA cores
(``tl.sum`` of products), which rounds as float32 does. Interpreted on the CPU both are exact
products, so the error is ~1e-8.

Run on the GPU machine: ``python benchmarks/oneoff/tc_accum.py``.
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, ".")


@triton.jit
def _dots(A, B, C_TC, C_FMA, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    om, ok, on = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(A + om[:, None] * K + ok[None, :])                  # float16 [M, K]
    b = tl.load(B + ok[:, None] * N + on[None, :])                  # float16 [K, N]
    tl.store(C_TC + om[:, None] * N + on[None, :], tl.dot(a, b, out_dtype=tl.float32))
    fma = tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    tl.store(C_FMA + om[:, None] * N + on[None, :], fma)


def case(dev, gen, M, K, N, block_rows: bool, spread: float):
    a = torch.randn(M, K, generator=gen, device=dev) * torch.logspace(0, spread, K, device=dev)[
        torch.randperm(K, generator=gen, device=dev)]
    if block_rows:                                   # row r: one 32-value block, as the kernel's
        blk = (torch.arange(K, device=dev)[None, :] // 32) == (torch.arange(M, device=dev)[:, None] % (K // 32))
        a = a * blk
    a = (a / a.abs().amax(1, keepdim=True).clamp_min(1e-30) * 8192).to(torch.float16)
    b = torch.randint(-127, 128, (K, N), generator=gen, device=dev).to(torch.float16)
    c_tc = torch.empty(M, N, device=dev)
    c_fma = torch.empty(M, N, device=dev)
    _dots[(1,)](a, b, c_tc, c_fma, M=M, K=K, N=N)
    exact = a.double() @ b.double()
    size = a.double().abs() @ b.double().abs()
    rel = lambda c: ((c.double() - exact).abs() / size.clamp_min(1e-300)).max().item()   # noqa: E731
    return rel(c_tc), rel(c_fma)


def main() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    print(f"device {dev}: max |dot - float64| / sum |a||b| (float32 rounding alone ~ {2.0 ** -24 * 7:.1e})")
    for M, K, N, rows, spread in ((32, 128, 64, True, 0.0), (32, 128, 64, True, 3.0), (16, 128, 64, False, 0.0),
                                  (16, 128, 64, False, 3.0), (16, 32, 64, False, 0.0), (64, 128, 64, True, 3.0)):
        tc, fma = case(dev, gen, M, K, N, rows, spread)
        print(f"  M {M:3d} K {K:3d} N {N:3d} {'block rows' if rows else 'dense rows'} spread 1e{spread:.0f}: "
              f"tensor cores {tc:.2e}, float32 FMA {fma:.2e}")


if __name__ == "__main__":
    main()
