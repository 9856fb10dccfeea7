"""Shared pytest fixtures: real model files (fetched once into the cache) and GPU skips."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU machines
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from _interp_patch import install as _install_interp_patch   # tests/_interp_patch.py
    _install_interp_patch()

# gguf.GGUFReader over a plain mmap, and one reader a process for each large model file
# (tests/_gguf_reader_patch.py): HF transformers parses gemma3's 262144-token GGUF twice a load
from _gguf_reader_patch import install as _install_gguf_reader_patch  # noqa: E402
_install_gguf_reader_patch()
# gguf.get_tensor_name_map memoized (tests/_gguf_name_map_patch.py): HF transformers builds the
# same name map once per module of a model it loads from GGUF (~7 s of gemma3's load)
from _gguf_name_map_patch import install as _install_gguf_name_map_patch  # noqa: E402
_install_gguf_name_map_patch()

# Under pytest-xdist (`make test`: -n 2 on the 2-core CI box) each worker gets its share of the
# cores for torch's intra-op pool, and so do the CLI subprocesses it starts (they read
# OMP_NUM_THREADS): two workers at two threads each on two cores spin against each other.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _threads = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import pytest  # noqa: E402

# `make test` runs two pytest-xdist workers with `--dist loadfile`: a file runs whole on one
# worker, so module-scoped fixtures (a loaded model, HF's oracle, a batch of CLI runs) are built
# once. Files that also share an expensive session fixture go to the same worker: HF's gemma3
# tokenizer (~30 s) is built once per worker that asks for it.
SHARED_GROUPS = {"test_gemma3.py": "gemma3-hf-tokenizer", "test_tokenizer.py": "gemma3-hf-tokenizer"}


def _unit(nodeid: str) -> str:
    """The unit one xdist worker runs whole: the test's file, or its shared group."""
    path = nodeid.split("::", 1)[0]
    return SHARED_GROUPS.get(path.rsplit("/", 1)[-1], path)


try:
    from xdist.scheduler import LoadFileScheduling
except ImportError:            # no xdist: plain pytest, nothing to schedule
    pass
else:
    class _FileGroupScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    @pytest.hookimpl(optionalhook=True)      # -p no:xdist leaves the hook undeclared
    def pytest_xdist_make_scheduler(config, log):
        # --dist loadfile, with SHARED_GROUPS' files as one unit (xdist_group marks cannot do it
        # under pytest 9.2: xdist's loadgroup renames items through an attribute pytest no
        # longer reads, so every test became its own unit)
        if config.getvalue("dist") == "loadfile":
            return _FileGroupScheduling(config, log)
        return None


def _slow_seconds(item) -> float:
    """``@pytest.mark.slow(seconds=N)``: about N s on one core (0 when not marked)."""
    mark = item.get_closest_marker("slow")
    return float(mark.kwargs.get("seconds", 1)) if mark else 0.0


def pytest_collection_modifyitems(config, items):
    # Heaviest units first (a unit counts the slow seconds of its tests): xdist's workers each
    # take the next unit as they get free (--no-loadscope-reorder keeps this order), so they
    # finish together instead of one waiting on a slow file that started last.
    cost: dict[str, float] = {}
    for i in items:
        cost[_unit(i.nodeid)] = cost.get(_unit(i.nodeid), 0.0) + _slow_seconds(i)
    items.sort(key=lambda i: -cost[_unit(i.nodeid)])
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
