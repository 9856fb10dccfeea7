"""tests/_interp_patch.py (the interpreter patched once a launch): kernels with nested
``@triton.jit`` calls compute what torch computes, and a launch leaves ``triton.language``
as it found it."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from engine.kernels import interpreted

pytestmark = pytest.mark.skipif(not interpreted(), reason="the interpreter's patch (CPU runs only)")


@triton.jit
def _inner_scale(x, s):
    return x * s


@triton.jit
def _inner_sum(x):
    return tl.sum(_inner_scale(x, 2.0), axis=0)       # a nested call inside a nested call


@triton.jit
def _rowsum_kernel(X, Y, N: tl.constexpr):
    r = tl.program_id(0)
    x = tl.load(X + r * N + tl.arange(0, N))
    tl.store(Y + r, _inner_sum(x) + tl.max(_inner_scale(x, 1.0), axis=0))


def test_installed_when_the_interpreter_has_its_hook():
    from triton.runtime import interpreter as interp
    from _interp_patch import install
    if not hasattr(interp, "_patch_lang"):
        pytest.skip("this Triton's interpreter has no _patch_lang: tests run at its own speed")
    assert install() and getattr(interp._patch_lang, "_kvbench_once", False)


def test_nested_jit_calls_match_torch_and_the_launch_restores_the_language():
    before = tl.load
    x = torch.randn(37, 64)
    y = torch.empty(37)
    _rowsum_kernel[(37,)](x, y, N=64)
    torch.testing.assert_close(y, 2 * x.sum(1) + x.max(1).values, rtol=1e-5, atol=1e-5)
    assert tl.load is before and tl.core.is_builtin(tl.load)        # nothing left patched
    y2 = torch.empty(37)
    _rowsum_kernel[(37,)](x * -1, y2, N=64)                          # a second launch patches again
    torch.testing.assert_close(y2, -2 * x.sum(1) + (-x).max(1).values, rtol=1e-5, atol=1e-5)
