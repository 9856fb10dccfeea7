"""Test-only speed-up of Triton's interpreter: patch ``triton.language`` once per launch.

Contract. Under ``TRITON_INTERPRET=1`` Triton's ``GridExecutor`` patches ``triton.language``
(its builtins rebound to the interpreter's semantics) before running a launch's programs and
restores it after; and every call of a nested ``@triton.jit`` function (``pdl_enter``,
``_combine_head``, ``_down_step``, ...) patches it again, for every program, with nothing to
restore: ``inspect.getmembers`` over ``tl``, ``tl.tensor`` and ``tl.math`` each time, ~2 ms a
call. On a 2-core AVX2 box that was 37% of an interpreted MoE decode test (32 of 87 s).

``install()`` wraps ``triton.runtime.interpreter._patch_lang`` so that a nested call whose
function sees only language modules the enclosing launch has already patched returns an empty
scope instead of patching them again; the launch's own patch and its ``restore()`` are
Triton's, unchanged. What the interpreter computes is unchanged (the same patched attributes
are in force), which ``tests/test_interp_patch.py`` checks against torch and by the restore.
If Triton's interpreter lacks the names it wraps (another version), it installs nothing and
says so through its return value; the tests then run at Triton's own speed.
"""
from __future__ import annotations

import inspect


def install() -> bool:
    """Wrap the interpreter's ``_patch_lang`` once; True when the wrapper is (now) in place."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except Exception:                                  # no triton: nothing to speed up
        return False
    orig = getattr(interp, "_patch_lang", None)
    scope_cls = getattr(interp, "_LangPatchScope", None)
    if orig is None or scope_cls is None:
        return False
    if getattr(orig, "_kvbench_once", False):
        return True
    langs_of = {}
    active: dict = {"depth": 0, "langs": frozenset()}

    def _langs(fn) -> frozenset:
        key = id(fn)
        got = langs_of.get(key)
        if got is None:
            got = langs_of[key] = frozenset(id(v) for v in fn.__globals__.values()
                                            if inspect.ismodule(v) and v in (tl, tl.core))
        return got

    def patch_lang(fn):
        langs = _langs(fn)
        if active["depth"] and langs <= active["langs"]:
            return scope_cls()                         # already in force for this launch
        scope = orig(fn)
        if active["depth"]:                            # nested, a module not yet patched: Triton's
            active["langs"] = active["langs"] | langs  # own call leaks it the same way
            return scope
        active["depth"], active["langs"] = 1, langs
        restore = scope.restore

        def restore_and_close():
            try:
                restore()
            finally:
                active["depth"], active["langs"] = 0, frozenset()
        scope.restore = restore_and_close
        return scope

    patch_lang._kvbench_once = True
    interp._patch_lang = patch_lang
    return True
