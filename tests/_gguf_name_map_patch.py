"""Test-only memo of ``gguf.get_tensor_name_map`` (what HF transformers maps GGUF tensor names with).

Contract. HF transformers' ``get_gguf_hf_weights_map`` calls ``gguf.get_tensor_name_map(arch,
n_blocks)`` once for every module of the model it loads (gemma3-270m: 313 calls), and each call
builds a ``TensorNameMap`` afresh from gguf's static tables (every block's names formatted):
~7 s of a 15 s ``from_pretrained`` of gemma3-270m on the 2-core CI box. The map is a function of
(arch, n_blocks) and of the class-level ``block_mappings_cfg``, which gguf's constructor updates
in place for the architectures in ``TensorNameMap.arch_block_mappings_cfg`` (0.19: ARCTIC).

``install()`` wraps ``gguf.get_tensor_name_map`` (and ``gguf.tensor_mapping``'s name for it) so
that it returns the map built for the same (arch, n_blocks) before, while gguf's tables are as
they were then: asking for an architecture in ``arch_block_mappings_cfg`` calls gguf's own
function and empties the memo (what it changes reaches every map built after, as in gguf).
Callers only read the maps (HF: ``get_name``). ``tests/test_gguf_name_map_patch.py`` holds the
memoized maps to fresh ones. If gguf lacks the names it wraps, it installs nothing and returns False.
"""
from __future__ import annotations


def install() -> bool:
    """Patch ``gguf.get_tensor_name_map`` once; True when the patch is (now) in place."""
    try:
        import gguf
        from gguf import tensor_mapping
    except Exception:
        return False
    orig = getattr(tensor_mapping, "get_tensor_name_map", None)
    cls = getattr(tensor_mapping, "TensorNameMap", None)
    if orig is None or cls is None or not isinstance(getattr(cls, "arch_block_mappings_cfg", None), dict):
        return False
    if getattr(orig, "_kvbench_patched", False):
        return True
    memo: dict = {}

    def get_tensor_name_map(arch, n_blocks):
        if arch in cls.arch_block_mappings_cfg:    # changes gguf's shared tables: built afresh, memo dropped
            memo.clear()
            return orig(arch, n_blocks)
        key = (arch, n_blocks)
        if key not in memo:
            memo[key] = orig(arch, n_blocks)
        return memo[key]

    get_tensor_name_map._kvbench_patched = True
    get_tensor_name_map._kvbench_orig = orig
    get_tensor_name_map._kvbench_memo = memo
    get_tensor_name_map.__doc__ = orig.__doc__
    tensor_mapping.get_tensor_name_map = get_tensor_name_map
    gguf.get_tensor_name_map = get_tensor_name_map
    return True
