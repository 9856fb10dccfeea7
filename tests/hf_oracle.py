"""HF transformers oracle for GGUF models: an explicit-config HF model with the file's weights.

Contract: ``hf_model_for(path)`` reads a llama / qwen3 / qwen3moe / olmoe / gemma3 GGUF with the
upstream ``gguf`` package alone (no engine code), builds the matching transformers model
from an EXPLICIT config (LlamaConfig, MixtralConfig for llama files with experts,
Qwen3Config, Qwen3MoeConfig, OlmoeConfig, Gemma3TextConfig; eager attention, float32) and copies every
dequantized tensor in; a parameter left unassigned or a tensor left unused is an error.
Explicit configs, because transformers' own GGUF loader ignores expert_feed_forward_length
(qwen3moe) and cannot load olmoe. llama files store attn_q/attn_k permuted for llama.cpp's
adjacent-pair RoPE; they are un-permuted here (HF rotates halves). MoE experts go into the
fused 3-D ``gate_up_proj`` [E, 2*ff, d] (gate rows first) and ``down_proj`` [E, d, ff].

    model = hf_model_for(engine.synth.ensure("tiny-olmoe"))
    logits = model(torch.tensor([tokens])).logits[0]      # [T, vocab] float32
"""
from __future__ import annotations

import os

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize


_READ: dict[tuple, tuple[dict, dict[str, torch.Tensor]]] = {}


def read_gguf(path, reader: GGUFReader | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata without the tokenizer, {name: float32 tensor in PyTorch order}).

    ``reader``: an already open ``gguf.GGUFReader`` of ``path`` (parsing a 49k-token
    tokenizer costs ~5 s on the 2-core box; dequantization stays ours). Without one, a file
    read before in this process (same path, size and mtime) is not parsed again: the dicts
    are fresh, the tensors shared (nothing here writes into them)."""
    if reader is None:
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        if key not in _READ:
            _READ[key] = read_gguf(path, GGUFReader(path, "r"))
        meta, tensors = _READ[key]
        return dict(meta), dict(tensors)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        data = np.asarray(t.data)
        arr = data.astype(np.float32) if t.tensor_type == QT.F32 else dequantize(data, t.tensor_type)
        tensors[t.name] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(shape).copy())
    return meta, tensors


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp convert's q/k permute: per head, rows (pair, 2) -> (2, pair).

    In the file row 2i / 2i+1 of a head hold the i-th rotation pair (adjacent layout); HF's
    rotate_half wants row i / i + head_dim/2."""
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape).contiguous())


def config_for(meta: dict, tensors: dict):
    import transformers as tf

    arch = meta["general.architecture"]

    def k(key, default=None):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise KeyError(f"GGUF lacks {arch}.{key}")
        return v

    d, n_heads = int(k("embedding_length")), int(k("attention.head_count"))
    n_kv = int(k("attention.head_count_kv", n_heads))
    head_dim = int(k("attention.key_length", d // n_heads))
    vocab = tensors["token_embd.weight"].shape[0]
    moe = "blk.0.ffn_gate_inp.weight" in tensors
    common = dict(
        vocab_size=vocab, hidden_size=d, num_hidden_layers=int(k("block_count")),
        num_attention_heads=n_heads, num_key_value_heads=n_kv,
        max_position_embeddings=int(k("context_length")),
        rms_norm_eps=float(k("attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": float(k("rope.freq_base", 10000.0))},
        tie_word_embeddings="output.weight" not in tensors, hidden_act="silu",
        attention_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if moe:
        n_exp, n_used = int(k("expert_count")), int(k("expert_used_count"))
        eff = tensors["blk.0.ffn_gate_exps.weight"].shape[1]
    if arch == "llama" and not moe:
        cfg = tf.LlamaConfig(intermediate_size=tensors["blk.0.ffn_gate.weight"].shape[0],
                             head_dim=head_dim, mlp_bias=False, **common)
    elif arch == "llama":
        cfg = tf.MixtralConfig(intermediate_size=eff, num_local_experts=n_exp, num_experts_per_tok=n_used,
                               head_dim=head_dim, sliding_window=None, router_jitter_noise=0.0, **common)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(intermediate_size=tensors["blk.0.ffn_gate.weight"].shape[0],
                             head_dim=head_dim, use_sliding_window=False, **common)
    elif arch == "qwen3moe":
        cfg = tf.Qwen3MoeConfig(intermediate_size=int(k("feed_forward_length")), moe_intermediate_size=eff,
                                num_experts=n_exp, num_experts_per_tok=n_used,
                                norm_topk_prob=bool(k("expert_weights_norm", True)),
                                decoder_sparse_step=1, mlp_only_layers=[], head_dim=head_dim,
                                use_sliding_window=False, **common)
    elif arch == "olmoe":
        if n_heads * head_dim != d:
            raise ValueError(f"HF OLMoE needs n_heads*head_dim == hidden_size ({n_heads}*{head_dim} != {d})")
        cfg = tf.OlmoeConfig(intermediate_size=eff, num_experts=n_exp, num_experts_per_tok=n_used,
                             norm_topk_prob=bool(k("expert_weights_norm", False)), clip_qkv=None,
                             **common)
    elif arch == "gemma3":
        n_layers, window = int(k("block_count")), int(k("attention.sliding_window", 0))
        g = {key: v for key, v in common.items() if key not in ("hidden_act", "rope_parameters")}
        cfg = tf.Gemma3TextConfig(
            intermediate_size=tensors["blk.0.ffn_gate.weight"].shape[0], head_dim=head_dim,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=int(k("attention.query_pre_attn_scalar", head_dim)),
            sliding_window=window or None,
            layer_types=["sliding_attention" if window and (i + 1) % 6 else "full_attention" for i in range(n_layers)],
            rope_parameters={"sliding_attention": {"rope_type": "default",
                                                   "rope_theta": float(k("rope.freq_base_swa", 10000.0))},
                             "full_attention": {"rope_type": "default", "rope_theta": float(k("rope.freq_base"))}},
            final_logit_softcapping=None, attn_logit_softcapping=None, **g)
    else:
        raise ValueError(f"no HF oracle for architecture {arch!r}")
    return cfg


def hf_state_dict(meta: dict, tensors: dict, cfg) -> dict[str, torch.Tensor]:
    """GGUF tensors renamed / reshaped into the HF model's parameter names."""
    arch = meta["general.architecture"]
    src = dict(tensors)
    sd = {"model.embed_tokens.weight": src.pop("token_embd.weight"),
          "model.norm.weight": src.pop("output_norm.weight")}
    sd["lm_head.weight"] = src.pop("output.weight") if "output.weight" in src else sd["model.embed_tokens.weight"]
    for i in range(cfg.num_hidden_layers):
        def take(name):
            return src.pop(f"blk.{i}.{name}.weight")
        p = f"model.layers.{i}."
        q, kk = take("attn_q"), take("attn_k")
        if arch == "llama":
            q = unpermute_rope(q, cfg.num_attention_heads)
            kk = unpermute_rope(kk, cfg.num_key_value_heads)
        sd[p + "self_attn.q_proj.weight"] = q
        sd[p + "self_attn.k_proj.weight"] = kk
        sd[p + "self_attn.v_proj.weight"] = take("attn_v")
        sd[p + "self_attn.o_proj.weight"] = take("attn_output")
        if f"blk.{i}.attn_q_norm.weight" in src:
            sd[p + "self_attn.q_norm.weight"] = take("attn_q_norm")
            sd[p + "self_attn.k_norm.weight"] = take("attn_k_norm")
        if arch == "gemma3":     # llama.cpp stores gemma's RMSNorm weights as 1 + w; HF keeps w
            for hf_name in ("self_attn.q_norm", "self_attn.k_norm"):     # taken above
                sd[p + hf_name + ".weight"] = sd[p + hf_name + ".weight"] - 1.0
            for hf_name, gg in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "post_attention_norm"),
                                ("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffw_norm")):
                sd[p + hf_name + ".weight"] = take(gg) - 1.0
            sd[p + "mlp.gate_proj.weight"] = take("ffn_gate")
            sd[p + "mlp.up_proj.weight"] = take("ffn_up")
            sd[p + "mlp.down_proj.weight"] = take("ffn_down")
            continue
        sd[p + "input_layernorm.weight"] = take("attn_norm")
        sd[p + "post_attention_layernorm.weight"] = take("ffn_norm")
        if f"blk.{i}.ffn_gate_inp.weight" in src:
            sd[p + "mlp.gate.weight"] = take("ffn_gate_inp")
            sd[p + "mlp.experts.gate_up_proj"] = torch.cat([take("ffn_gate_exps"), take("ffn_up_exps")], dim=1)
            sd[p + "mlp.experts.down_proj"] = take("ffn_down_exps")
        else:
            sd[p + "mlp.gate_proj.weight"] = take("ffn_gate")
            sd[p + "mlp.up_proj.weight"] = take("ffn_up")
            sd[p + "mlp.down_proj.weight"] = take("ffn_down")
    if arch == "gemma3":
        sd["model.norm.weight"] = sd["model.norm.weight"] - 1.0
    if src:
        raise ValueError(f"GGUF tensors with no HF counterpart: {sorted(src)[:5]}")
    return sd


def hf_model_for(path, reader: GGUFReader | None = None):
    """The transformers model (eval, float32, eager attention) holding ``path``'s weights."""
    import transformers as tf

    meta, tensors = read_gguf(path, reader)
    cfg = config_for(meta, tensors)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    sd = hf_state_dict(meta, tensors, cfg)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    if missing or extra:
        raise ValueError(f"HF/GGUF name mismatch: HF params not in file {missing[:5]}, "
                         f"file tensors not in HF {extra[:5]}")
    for name, value in sd.items():
        if tuple(own[name].shape) != tuple(value.shape):
            raise ValueError(f"{name}: HF shape {list(own[name].shape)} vs file {list(value.shape)}")
    model.load_state_dict(sd, strict=True)
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr() or \
            torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    return model.eval()


@torch.no_grad()
def hf_logits(model, tokens) -> torch.Tensor:
    """Teacher-forced logits [T, vocab] float32 for one sequence."""
    ids = torch.tensor([list(tokens)], dtype=torch.long)
    return model(input_ids=ids, use_cache=False).logits[0].float()
