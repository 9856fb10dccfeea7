"""ModelSpec: the single source of truth for a model's shapes, read from GGUF metadata.

Contract: ``ModelSpec.from_gguf(g)`` reads ``{arch}.*`` keys (llama.cpp names) and the
tensor table of an open ``GGUFFile`` and returns a frozen dataclass; any contradiction
between metadata and tensor shapes, or an unknown architecture, raises ``ModelFileError``
/ ``UnsupportedModelError`` naming the file and the key. Every numeric hyperparameter it
reads is validated before use: its type (an integer key holds an integer, a float key a
number, never a string or a bool), finiteness (no NaN/inf) and range (``rms_eps`` in (0, 1),
``rope_base`` > 0, counts >= 1, ...); a bad value is a ``ModelFileError`` naming the file,
the key, the value, what is allowed and the fix, never garbage logits or a ``ValueError``.

    spec = ModelSpec.from_gguf(open_gguf(path))
    spec.n_layers, spec.kv_dim, spec.is_moe
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, asdict

from .errors import ModelFileError, UnsupportedModelError

ARCHS = ("llama", "qwen3", "qwen3moe", "olmoe", "gemma3")
# llama.cpp's rope mode per arch: "norm" rotates adjacent pairs (llama's converter permutes
# q/k for it), "neox" rotates the two halves of each head.
ROPE_TYPE = {"llama": "norm", "qwen3": "neox", "qwen3moe": "neox", "olmoe": "neox", "gemma3": "neox"}
# q/k normalisation: per head (Qwen3) or over the whole projection (OLMoE).
QK_NORM = {"llama": "none", "qwen3": "head", "qwen3moe": "head", "olmoe": "full", "gemma3": "head"}
# Gemma 3: every SWA_PATTERN-th layer (i + 1) % 6 == 0 attends globally, the others to a
# sliding window; local layers use their own RoPE base (HF rope_local_base_freq default).
GEMMA3_SWA_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10000.0
# whether top-k router weights are renormalised to sum to 1
MOE_NORM_TOPK = {"llama": True, "qwen3moe": True, "olmoe": False}


INT_MAX = 2**31 - 1        # no hyperparameter of a real model comes near; larger is corruption
FIX_METADATA = ("the file's metadata is corrupt or hand-edited: re-convert the model with llama.cpp's "
                "convert_hf_to_gguf.py, or correct the value with gguf-set-metadata")


def _bad(path, key: str, value, allowed: str) -> ModelFileError:
    shown = repr(value) if not isinstance(value, (list, tuple)) else f"an array {list(value[:4])!r}"
    return ModelFileError(path, f"metadata {key} = {shown[:80]} is not {allowed}", FIX_METADATA)


def meta_int(path, key: str, value, lo: int = 1, hi: int = INT_MAX) -> int:
    """``value`` of metadata ``key`` as an int in [lo, hi]; a per-layer array must be uniform.
    Strings, bools and floats are refused (GGUF stores these keys as integers)."""
    allowed = f"an integer in [{lo}, {hi}]" if hi != INT_MAX else f"an integer >= {lo}"
    if isinstance(value, (list, tuple)):   # per-layer arrays: we need them uniform
        if not value:
            raise _bad(path, key, value, allowed)
        if len(set(map(repr, value))) != 1:
            raise UnsupportedModelError(path, f"{key} varies per layer ({list(value[:4])}...)",
                                        "per-layer geometry is not supported")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(path, key, value, allowed)
    return value


def meta_float(path, key: str, value, lo: float = 0.0, hi: float = math.inf, lo_open: bool = True,
               hi_open: bool = False) -> float:
    """``value`` of metadata ``key`` as a finite float in the range (lo, hi] (open or closed
    ends as given). Strings, bools, arrays, NaN and infinities are refused."""
    allowed = (f"a finite number {'>' if lo_open else '>='} {lo:g}"
               + (f" and {'<' if hi_open else '<='} {hi:g}" if hi != math.inf else ""))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(path, key, value, allowed)
    f = float(value)
    if (not math.isfinite(f) or (f <= lo if lo_open else f < lo)
            or (f >= hi if hi_open else f > hi)):
        raise _bad(path, key, value, allowed)
    return f


def meta_bool(path, key: str, value) -> bool:
    """A GGUF bool (an int 0/1 is accepted, as some converters write one)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _bad(path, key, value, "a bool")


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int                       # dense FFN width (0 when every layer is MoE)
    vocab_size: int
    ctx_train: int
    rope_base: float
    rope_type: str                  # "norm" | "neox"
    rms_eps: float
    qk_norm: str                    # "none" | "head" | "full"
    n_experts: int = 0
    n_experts_used: int = 0
    d_ff_expert: int = 0
    moe_norm_topk: bool = True
    moe_layers: tuple[int, ...] = ()  # layers whose FFN is routed experts
    tied_output: bool = False
    # Gemma-style extras (defaults are the llama family's behaviour)
    embed_scale: bool = False        # token embeddings times sqrt(d_model)
    post_norms: bool = False         # RMSNorm on the attention and FFN outputs before the residual
    ffn_act: str = "silu"            # "silu" | "gelu_tanh" (gated FFN activation)
    attn_scale: float | None = None  # softmax scale; None: head_dim ** -0.5
    sliding_window: int = 0          # keys with pos <= qpos - window are masked on swa_layers
    swa_layers: tuple[int, ...] = ()
    rope_base_local: float | None = None   # RoPE base of the swa_layers (None: rope_base)
    final_softcap: float | None = None     # logits = c * tanh(logits / c)
    bos_id: int | None = None
    eos_id: int | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (None for a global-attention layer)."""
        return self.sliding_window if layer in self.swa_layers else None

    def rope_base_of(self, layer: int) -> float:
        if layer in self.swa_layers and self.rope_base_local is not None:
            return self.rope_base_local
        return self.rope_base

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def gqa(self) -> int:
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d["moe_layers"] = list(self.moe_layers)
        d["swa_layers"] = list(self.swa_layers)
        return d

    @classmethod
    def from_gguf(cls, g) -> "ModelSpec":
        """Build from an open ``engine.gguf_io.GGUFFile`` (metadata + tensor shapes)."""
        path = g.path
        arch = g.arch
        if arch not in ARCHS:
            raise UnsupportedModelError(path, f"unknown architecture {arch!r} "
                                        f"(supported: {', '.join(ARCHS)})",
                                        "use a model of a supported architecture")

        def key(k, default=None, required=False):
            full = f"{arch}.{k}"
            if required:
                return g.require(full)
            return g.get(full, default)

        def as_int(k, value, lo=1, hi=INT_MAX):
            return meta_int(path, f"{arch}.{k}", value, lo, hi)

        def as_float(k, value, **kw):
            return meta_float(path, f"{arch}.{k}", value, **kw)

        n_layers = as_int("block_count", key("block_count", required=True))
        d_model = as_int("embedding_length", key("embedding_length", required=True))
        n_heads = as_int("attention.head_count", key("attention.head_count", required=True))
        n_kv = as_int("attention.head_count_kv", key("attention.head_count_kv", n_heads))
        if n_heads % n_kv:
            raise ModelFileError(path, f"head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
        head_dim = as_int("attention.key_length", key("attention.key_length", max(d_model // n_heads, 1)))
        v_dim = as_int("attention.value_length", key("attention.value_length", head_dim))
        if v_dim != head_dim:
            raise UnsupportedModelError(path, f"key_length {head_dim} != value_length {v_dim}")
        if head_dim <= 0 or head_dim % 2:
            raise ModelFileError(path, f"head dim {head_dim} must be positive and even")

        # Shapes implied by metadata must agree with the tensors (catches contradictions).
        q_shape = g.shape("blk.0.attn_q.weight")
        k_shape = g.shape("blk.0.attn_k.weight")
        if q_shape != (n_heads * head_dim, d_model) or k_shape != (n_kv * head_dim, d_model):
            raise ModelFileError(path, f"metadata says {n_heads} heads / {n_kv} kv heads x "
                                 f"{head_dim} over d_model {d_model}, but attn_q is {list(q_shape)} "
                                 f"and attn_k is {list(k_shape)}",
                                 "the file's metadata contradicts its tensors")
        emb = g.shape("token_embd.weight")
        if emb[1] != d_model:
            raise ModelFileError(path, f"token_embd width {emb[1]} != embedding_length {d_model}")
        vocab = emb[0]

        n_exp = as_int("expert_count", key("expert_count", 0), lo=0)
        n_used = as_int("expert_used_count", key("expert_used_count", 0), lo=0)
        moe_layers = tuple(i for i in range(n_layers) if g.has(f"blk.{i}.ffn_gate_inp.weight"))
        if moe_layers and (n_exp <= 0 or not 0 < n_used <= n_exp):
            raise ModelFileError(path, f"MoE tensors present but expert_count={n_exp}, "
                                 f"expert_used_count={n_used}")
        d_ff_expert = 0
        if moe_layers:
            e_shape = g.shape(f"blk.{moe_layers[0]}.ffn_gate_exps.weight")  # [E, ff, d]
            if e_shape[0] != n_exp or e_shape[2] != d_model:
                raise ModelFileError(path, f"ffn_gate_exps shape {list(e_shape)} does not match "
                                     f"expert_count {n_exp} x embedding_length {d_model}")
            d_ff_expert = e_shape[1]
            meta_ff = key("expert_feed_forward_length")
            if meta_ff is not None and as_int("expert_feed_forward_length", meta_ff) != d_ff_expert:
                raise ModelFileError(path, f"expert_feed_forward_length {meta_ff} != tensor width {d_ff_expert}")
        d_ff = 0
        dense = [i for i in range(n_layers) if i not in moe_layers]
        if dense:
            d_ff = g.shape(f"blk.{dense[0]}.ffn_gate.weight")[0]
        elif arch not in MOE_NORM_TOPK:
            raise ModelFileError(path, f"architecture {arch} has no dense FFN tensors")
        if moe_layers and arch == "qwen3":
            raise ModelFileError(path, "qwen3 (dense) file carries MoE tensors; expected qwen3moe")
        norm_topk = meta_bool(path, f"{arch}.expert_weights_norm",
                              key("expert_weights_norm", MOE_NORM_TOPK.get(arch, True)))
        rope_dim = key("rope.dimension_count")
        if rope_dim is not None and as_int("rope.dimension_count", rope_dim) != head_dim:
            raise UnsupportedModelError(path, f"partial rotary (rope.dimension_count={rope_dim}, head dim {head_dim})")
        # RMSNorm divides by sqrt(mean(x^2) + eps): NaN/inf/<= 0 gives NaN logits, not an error
        eps = as_float("attention.layer_norm_rms_epsilon", key("attention.layer_norm_rms_epsilon", 1e-6),
                       lo=0.0, hi=1.0, hi_open=True)
        rope_base = as_float("rope.freq_base", key("rope.freq_base", 10000.0), lo=0.0)
        ctx_train = as_int("context_length", key("context_length", 4096))

        def token_id(which: str) -> int | None:
            k = f"tokenizer.ggml.{which}_token_id"
            v = g.get(k)
            return None if v is None else meta_int(path, k, v, lo=0, hi=max(vocab - 1, 0))

        gemma: dict = {}
        if arch == "gemma3":
            window = as_int("attention.sliding_window", key("attention.sliding_window", 0), lo=0)
            pre = key("attention.query_pre_attn_scalar")
            if pre is not None:
                pre = as_float("attention.query_pre_attn_scalar", pre, lo=0.0)
            cap = key("final_logit_softcapping")      # 0 (or absent): no soft-capping
            if cap is not None:
                cap = as_float("final_logit_softcapping", cap, lo=0.0, lo_open=False)
            rope_local = as_float("rope.freq_base_swa", key("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE),
                                  lo=0.0)
            for name in ("post_attention_norm", "post_ffw_norm"):
                if not g.has(f"blk.0.{name}.weight"):
                    raise ModelFileError(path, f"gemma3 file lacks blk.0.{name}.weight",
                                         "convert the model with a current llama.cpp")
            gemma = dict(
                embed_scale=True, post_norms=True, ffn_act="gelu_tanh",
                attn_scale=pre ** -0.5 if pre is not None else None,
                sliding_window=window,
                swa_layers=tuple(i for i in range(n_layers) if (i + 1) % GEMMA3_SWA_PATTERN)
                if window else (),
                rope_base_local=rope_local,
                final_softcap=cap if cap else None)
        return cls(
            arch=arch,
            name=str(g.get("general.name", path.stem)),
            n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv,
            head_dim=head_dim, d_ff=d_ff, vocab_size=vocab,
            ctx_train=ctx_train, rope_base=rope_base,
            rope_type=ROPE_TYPE[arch], rms_eps=eps, qk_norm=QK_NORM[arch],
            n_experts=n_exp if moe_layers else 0, n_experts_used=n_used if moe_layers else 0,
            d_ff_expert=d_ff_expert, moe_norm_topk=norm_topk, moe_layers=moe_layers,
            tied_output=not g.has("output.weight"),
            bos_id=token_id("bos"), eos_id=token_id("eos"),
            **gemma,
        )
