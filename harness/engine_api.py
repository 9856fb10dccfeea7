"""The one interface checks may use to talk to an engine, with declared capabilities.

Contract: an engine handed to a check satisfies ``EngineAPI`` for the capabilities it
declares in ``capabilities`` (a frozenset of the ``CAP_*`` names below; the class attribute,
so the runner knows them before loading anything). A check declares what it needs
(``Check.requires``); the runner records a case whose engine lacks one as ``n/a`` with the
reason ("engine X does not provide Y: ..."), before it runs: never a pass, never a crash.
Checks call only what the capabilities promise: no ``getattr`` probing, no fallbacks on
``TypeError``. kvbench's own engine (``engine.Engine``) declares every capability.

Capabilities:
- ``logits``: ``logits(tokens) -> Tensor[T, V]`` float32, teacher-forced, full vocabulary;
- ``chunked_logits``: ``logits(tokens, chunk=N)``, the same maths prefilled in chunks (the
  noise floor);
- ``generate``: ``generate(tokens, max_new_tokens, stop_at_eos=True) -> list[int]`` greedy,
  and ``last_stop_reason`` ("eos" | "length");
- ``generate_batch``: ``generate_batch(prompts, max_new_tokens, stop_at_eos=True) -> list[list[int]]``,
  ``generate`` for each prompt (each answer as ``generate`` gives it, up to the accumulation
  order of a batched matmul), ``last_stop_reasons`` (one per prompt) and ``last_generate_batch``
  (a dict: ``path`` "batched" | "sequential", ``sequences``, ``batches`` (their sizes), ...);
- ``chat``: ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``,
  ``tokenizer.encode/decode``, ``tokenizer.eos_ids``;
- ``prefill``: ``prefill(tokens) -> Tensor[V]`` (last position's logits) for timing;
- ``kv_applied``: ``kv_dtypes`` (the dtype each layer's cache holds, read from the cache: ``q8_0``,
  or ``k-q8_0.v-bf16`` when its K and V differ), and where the engine has it ``kv_spec`` (the
  applied per-layer K/V formats as one canonical KV spec, ``engine.kv_spec``);
- ``kv_bytes``: ``kv_bytes`` (runtime bytes of every KV buffer);
- ``plan``: ``plan`` (``engine.planner.Plan``) and ``ledger`` (``engine.ledger.Ledger``);
- ``prefill_stats``: ``last_prefill_stats`` (waves, peak scratch, wave rows),
  ``wave_budget_bytes``, and ``logits(tokens, first=N)``: positions N.. only (the prefill runs
  every token; the output head only those rows);
- ``caches``: ``caches`` (per-layer cache objects with ``nbytes``) for per-layer-kind KV;
- ``topk_logprobs``: ``topk_logprobs(tokens, k) -> harness.adapters.topk.TopK``, teacher-forced:
  at each position the k most likely next tokens with their log-probabilities (the rest of
  the vocabulary is one tail bucket) and the exact log-probability of the token that follows
  (what an OpenAI-compatible completions server gives with ``echo`` and ``logprobs``);
- ``attn_math``: ``attn_math`` and ``set_attn_math(mode)`` (``engine.attn_math``: the attention
  kernel's precision, ``exact`` or ``ggml-cpu``), so a check can attribute KLD to storage and maths;
- ``prefill_path``: ``prefill_path`` and ``set_prefill_path(path)`` (``exact`` or ``fast``:
  bfloat16 SDPA over the stored KV rows), so a throughput check can time the fast path and
  record which path produced its number;
- ``decode_at``: ``rewind(pos)`` (forget positions ``pos..``; raises where the caches cannot) and
  ``decode_greedy(token, n) -> list[int]`` (feed ``token`` at the current position, then ``n``
  greedy decode steps in all, no EOS stop), so a throughput check can time decode at a depth
  (llama-bench's ``tg N @ d D``) from one prefill;
- ``routes``: ``routed_logits(tokens, chunk=None, routes=None) -> (logits [T, V], routes [L_moe, T, k]
  long)``: ``logits`` plus the experts each MoE layer chose at each position (ids ascending;
  [0, T, 0] on a dense model); ``routes=`` forces those experts (weighted by the engine's own
  router), so a check can separate an expert-routing flip from the rest of a logit change.

    from harness.engine_api import missing, CAP_PLAN
    why = missing(type(eng), {CAP_PLAN})      # None when every capability is there
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

CAP_LOGITS = "logits"
CAP_CHUNKED_LOGITS = "chunked_logits"
CAP_GENERATE = "generate"
CAP_CHAT = "chat"
CAP_PREFILL = "prefill"
CAP_KV_APPLIED = "kv_applied"
CAP_KV_BYTES = "kv_bytes"
CAP_PLAN = "plan"
CAP_PREFILL_STATS = "prefill_stats"
CAP_CACHES = "caches"
CAP_TOPK_LOGPROBS = "topk_logprobs"
CAP_ATTN_MATH = "attn_math"
CAP_ROUTES = "routes"
CAP_PREFILL_PATH = "prefill_path"
CAP_GENERATE_BATCH = "generate_batch"
CAP_DECODE_AT = "decode_at"
CAPABILITIES = (CAP_LOGITS, CAP_CHUNKED_LOGITS, CAP_GENERATE, CAP_CHAT, CAP_PREFILL, CAP_KV_APPLIED,
                CAP_KV_BYTES, CAP_PLAN, CAP_PREFILL_STATS, CAP_CACHES, CAP_TOPK_LOGPROBS, CAP_ATTN_MATH,
                CAP_ROUTES, CAP_PREFILL_PATH, CAP_GENERATE_BATCH, CAP_DECODE_AT)


@runtime_checkable
class EngineAPI(Protocol):
    name: str                         # "kvbench", "llama.cpp", "hf", "openai", ...
    capabilities: frozenset[str]
    spec: Any                         # engine.spec.ModelSpec (geometry)
    tokenizer: Any

    def logits(self, tokens: list[int], chunk: int | None = None) -> Any: ...

    def generate(self, tokens: list[int], max_new_tokens: int, stop_at_eos: bool = True) -> list[int]: ...


def capabilities_of(engine_or_class) -> frozenset[str]:
    caps = getattr(engine_or_class, "capabilities", None)
    if not isinstance(caps, frozenset):
        raise TypeError(f"{engine_or_class!r} declares no capabilities (a frozenset of harness.engine_api names)")
    unknown = caps - set(CAPABILITIES)
    if unknown:
        raise TypeError(f"{engine_or_class!r} declares unknown capabilities {sorted(unknown)}")
    return caps


def missing(engine_or_class, needed) -> str | None:
    """None when the engine provides every capability in ``needed``; else the reason."""
    lack = sorted(set(needed) - capabilities_of(engine_or_class))
    if not lack:
        return None
    name = getattr(engine_or_class, "name", getattr(engine_or_class, "__name__", "engine"))
    return f"engine {name} does not provide {', '.join(lack)}"
