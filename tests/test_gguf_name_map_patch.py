"""tests/_gguf_name_map_patch.py (gguf.get_tensor_name_map memoized for HF transformers' GGUF
loads): a memoized map is the map gguf builds afresh, and architectures whose maps change gguf's
shared tables are built afresh and empty the memo."""
from __future__ import annotations

import gguf
import pytest
from gguf import MODEL_ARCH, tensor_mapping

from _gguf_name_map_patch import install


def test_installed_and_gguf_names_the_memo():
    assert install()
    f = gguf.get_tensor_name_map
    assert f is tensor_mapping.get_tensor_name_map and getattr(f, "_kvbench_patched", False)


@pytest.mark.parametrize("arch,n", [(MODEL_ARCH.GEMMA3, 18), (MODEL_ARCH.LLAMA, 30),
                                    (MODEL_ARCH.QWEN3MOE, 4), (MODEL_ARCH.OLMOE, 2)])
def test_a_memoized_map_is_the_map_gguf_builds(arch, n):
    assert install()
    a = gguf.get_tensor_name_map(arch, n)
    assert gguf.get_tensor_name_map(arch, n) is a
    fresh = gguf.TensorNameMap(arch, n)
    assert a.mapping == fresh.mapping and len(a.mapping) > 10 * n
    assert gguf.get_tensor_name_map(arch, n + 1).mapping == gguf.TensorNameMap(arch, n + 1).mapping


def test_an_arch_that_changes_ggufs_tables_is_built_afresh_and_empties_the_memo(monkeypatch):
    """Without building gguf 0.19's ARCTIC map (it changes the class's tables for the rest of
    the process): LLAMA listed there with no mappings of its own goes the same way, harmlessly."""
    assert install()
    f = gguf.get_tensor_name_map
    kept = f(MODEL_ARCH.GEMMA3, 18)
    assert f(MODEL_ARCH.GEMMA3, 18) is kept
    monkeypatch.setitem(gguf.TensorNameMap.arch_block_mappings_cfg, MODEL_ARCH.LLAMA, {})
    a = f(MODEL_ARCH.LLAMA, 3)
    assert f(MODEL_ARCH.LLAMA, 3) is not a and a.mapping == gguf.TensorNameMap(MODEL_ARCH.LLAMA, 3).mapping
    assert f(MODEL_ARCH.GEMMA3, 18) is not kept         # the memo was emptied
