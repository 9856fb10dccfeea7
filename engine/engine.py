"""Engine: load a GGUF model and run teacher-forced logits and greedy generation.

Contract (DESIGN.md "Engine contract"): ``load(model, kv_dtype=, device=, ctx=, ...)``
returns an ``Engine`` with ``spec``, ``tokenizer``, ``logits(tokens)`` ([T, vocab] float32,
teacher-forced), ``kv_dtype`` a KV spec (``engine.kv_spec``: ``q8_0``, ``k-q8_0.v-bf16``,
``q8_0.fp32@0,23``; bad ones are one-line ConfigErrors, a layer index out of range too),
``kv_formats`` ((K, V) each layer's buffers hold) and ``kv_spec`` (those, canonical: equal to
the request's canonical form when every layer holds what was asked), ``generate(tokens, max_new_tokens, stop_at_eos=True)`` (greedy, new tokens
only; on the static path with ``KVBENCH_DECODE_DEVICE_EMBED`` the steps run back to back and
tokens are read back in batches, ``decode_greedy(token, n)`` the same loop after a prefill),
``generate_batch(prompts, max_new_tokens)`` (``generate`` for several prompts; on the eager path
one decode step feeds every sequence, each in caches of its own made like the engine's:
``last_generate_batch`` says how they ran), ``kv_dtypes`` (the dtype each layer's cache *holds*, read from its buffers),
``routed_logits(tokens, chunk=None, routes=None)`` (``logits`` plus the experts each MoE layer
ran per position; ``routes=`` forces given experts). Every
call starts from an empty cache: results never depend on earlier calls.

    eng = load("smollm2-135m")
    ids = eng.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    print(eng.tokenizer.decode(eng.generate(ids, 32)))
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from . import kv as kvmod
from .errors import ConfigError, ContextOverflowError, ModelFileError, out_of_memory
from .gguf_io import GGUFFile, open_gguf
from . import formats, kv_spec as kvspec, settings
from .hybrid import WeightsPlacementError, load_weights  # noqa: F401  (re-exported)
from .model import Transformer
from .models import resolve
from .spec import ModelSpec

DEFAULT_WAVE_BUDGET = formats.DEFAULT_WAVE_BUDGET
DECODE_MODES = ("auto", "eager", "static", "cuda_graph")
# the trunk scratch a prefill may lend its transients (KVBENCH_SCRATCH_LEND; hybrid.alloc_scratch's names)
SCRATCH_LENT = ("scratch.wave", "scratch.activations")


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a torch device", "use 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available",
                          "use device='cpu' or run on a machine with a GPU")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported", "use 'cpu' or 'cuda'")
    return dev


_LIVE: "weakref.WeakSet[Engine]" = weakref.WeakSet()


def live_engines() -> int:
    """Engines of this process that still hold weights (not taken over, not closed)."""
    return sum(1 for e in list(_LIVE) if e.model is not None)


class Engine:
    # what the harness may ask of this engine (harness.engine_api names): everything
    name = "kvbench"
    capabilities = frozenset({"logits", "chunked_logits", "generate", "chat", "prefill", "kv_applied",
                              "kv_bytes", "plan", "prefill_stats", "caches", "attn_math", "routes",
                              "prefill_path", "generate_batch", "decode_at"})

    def __init__(self, path: Path, g: GGUFFile, spec: ModelSpec, model: Transformer, tokenizer,
                 kv_dtype: str, device: torch.device, ctx: int, wave_budget_bytes: int,
                 layer_kv_formats: list[tuple[str, str]] | None = None):
        self.path, self.gguf, self.spec, self.model, self.tokenizer = path, g, spec, model, tokenizer
        self.kv_dtype_requested, self.device, self.ctx = kv_dtype, device, ctx
        self.wave_budget_bytes = wave_budget_bytes
        # (K, V) format per layer: the plan's (trunk: the spec's, tail: fp32), else the spec's
        wanted = layer_kv_formats or kvspec.parse(kv_dtype).layer_formats(spec.n_layers, spec.name)
        self._wanted_formats = list(wanted)     # what generate_batch's own caches are made with
        self.caches = [kvmod.make_layer_kv(spec, i, ctx, wanted[i][0], model.layer_devices[i],
                                           wave_budget_bytes=wave_budget_bytes, v_dtype=wanted[i][1])
                       for i in range(spec.n_layers)]
        self.plan = self.ledger = self.expert_cache = None
        self.pos = 0
        self.last_prefill_stats: dict = {}
        self._static = None
        self.set_decode_mode(settings.get("KVBENCH_DECODE_MODE"))
        _LIVE.add(self)

    def _live(self) -> Transformer:
        if self.model is None:
            raise ConfigError("this engine no longer holds weights (closed, or taken over by a later "
                              "load's weights_from)", "use the engine that load returned last")
        return self.model

    def close(self) -> None:
        """Drop weights, caches and every recorded buffer now (``plan`` stays readable); the
        engine cannot run afterwards. ``engine.hostmem.release_cached()`` then gives cached
        device and pinned blocks back."""
        self.model = self.expert_cache = self._static = self.ledger = None
        self.caches = []

    # -- observables ---------------------------------------------------------------------
    @property
    def kv_dtypes(self) -> list[str]:
        """Per layer, the dtype its cache holds (read from the buffers): ``q8_0``, or
        ``k-q8_0.v-bf16`` when K and V hold different formats (``kv_spec.layer_label``)."""
        return [c.dtype for c in self.caches]

    @property
    def kv_formats(self) -> list[tuple[str, str]]:
        """Per layer, (K, V) as their buffers hold them (each qualified as ``kv_dtypes`` is when
        its write path is not the format's bytes)."""
        return [tuple(c.kv_dtypes) for c in self.caches]

    @property
    def kv_spec(self) -> str:
        """The applied KV spec, canonical (``engine.kv_spec.KVSpec.from_layers`` of ``kv_formats``):
        ``q8_0`` for a uniform cache, ``q8_0.fp32@0,23``, ``k-q8_0.v-bf16``, ...; when a buffer's
        write path is not its format's bytes, the spec followed by that reason in parentheses
        (so it never equals a request)."""
        pairs = self.kv_formats
        bad = [(i, w, x) for i, p in enumerate(pairs) for w, x in zip("KV", p) if x not in formats.KV]
        if not bad:
            return str(kvspec.KVSpec.from_layers(pairs))
        clean = [tuple(x.split(" ", 1)[0] for x in p) for p in pairs]
        i, w, x = bad[0]
        return f"{kvspec.KVSpec.from_layers(clean)} (layer {i} {w}: {x})"

    @property
    def kv_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    # -- execution -----------------------------------------------------------------------
    def reset(self) -> None:
        self.pos = 0
        for c in self.caches:
            if hasattr(c, "reset"):
                c.reset()

    def _check_ctx(self, n: int) -> None:
        if n > self.ctx:
            raise ContextOverflowError(f"{n} tokens exceed the engine's ctx of {self.ctx}",
                                       f"load the engine with ctx >= {n}")

    @torch.inference_mode()
    def _step(self, ids: list[int]) -> torch.Tensor:
        """Run ``ids`` at the current position; returns final hidden states [T, d]."""
        self._check_ctx(self.pos + len(ids))
        lend = len(ids) > 1 and self.scratch_lend
        try:
            with self.ledger.lend(SCRATCH_LENT) if lend else contextlib.nullcontext():
                h = self._live().forward(torch.tensor(ids, dtype=torch.long), self.pos, self.caches)
        except torch.OutOfMemoryError as exc:
            from .errors import out_of_memory
            T = len(ids)
            stage = f"decode at position {self.pos}" if T == 1 else f"prefill of {T} tokens at position {self.pos}"
            if T > 1 and getattr(exc, "wave_prefill", None):     # LayerKV.attend's smallest wave failed
                stage = f"wave {stage} ({exc.wave_prefill})"
            raise out_of_memory(stage, self.plan, self.device, exc) from None
        self.pos += len(ids)
        return h

    @torch.inference_mode()
    def logits(self, tokens: list[int], chunk: int | None = None, first: int = 0) -> torch.Tensor:
        """Teacher-forced logits [len(tokens) - first, vocab] float32 from an empty cache.

        ``chunk`` prefills in pieces of that many tokens (same maths, different batching).
        ``first``: only positions ``first..`` come back, and only their rows go through the
        output head (the prefill still runs every token): a long prefill compared past a
        position skips the vocabulary projection of the rows before it."""
        tokens = self._ids(tokens)
        if not 0 <= first < max(len(tokens), 1):
            raise ConfigError(f"logits(first={first}) for {len(tokens)} tokens", "pass 0 <= first < len(tokens)")
        self.reset()
        self._check_ctx(len(tokens))
        step = chunk or len(tokens)
        out = []
        t0 = time.perf_counter()
        for s in range(0, len(tokens), step):
            h = self._step(tokens[s:s + step])
            if s + h.shape[0] > first:
                out.append(self._live().head(h[max(0, first - s):]).float().cpu())
        self._prefill_stats(len(tokens), time.perf_counter() - t0)
        return out[0] if len(out) == 1 else torch.cat(out)

    @torch.inference_mode()
    def routed_logits(self, tokens: list[int], chunk: int | None = None,
                      routes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits`` and the experts every MoE layer chose at each position: (logits [T, vocab]
        float32, routes [n_moe_layers, T, k] long, each row's expert ids ascending, layers in
        ``spec.moe_layers`` order; [0, T, 0] on a dense model). Read from the routing the
        forward pass itself ran (``Transformer.moe``), not recomputed.

        ``routes`` (that shape, e.g. another run's) forces the experts: each MoE layer runs the
        given k experts at each position, weighted by its own router's probabilities of them
        (``engine.model.moe_route_forced``), so a logit change can be split into what the router's discrete
        choice did and what the rest did. The returned routes are then the forced ones."""
        tokens = self._ids(tokens)
        model = self._live()
        moe = list(self.spec.moe_layers)
        if routes is not None:
            k = self.spec.n_experts_used
            if tuple(routes.shape) != (len(moe), len(tokens), k if moe else 0):
                raise ValueError(f"routed_logits: routes of shape {tuple(routes.shape)} for "
                                 f"{len(moe)} MoE layers x {len(tokens)} tokens x {k} experts")
            if moe:
                model.route_force = {i: routes[j].to(torch.long) for j, i in enumerate(moe)}
        model.route_log = []
        try:
            logits = self.logits(tokens, chunk)
            log = model.route_log
        finally:
            model.route_log = None
            model.route_force = None
        if not moe:
            return logits, torch.zeros((0, len(tokens), 0), dtype=torch.long)
        per = {i: [] for i in moe}
        for i, e in log:
            per[i].append(e.cpu())
        got = torch.stack([torch.cat(per[i]) for i in moe])
        if got.shape[1] != len(tokens):
            raise RuntimeError(f"routed_logits: recorded {got.shape[1]} routed positions for "
                               f"{len(tokens)} tokens (a MoE path that bypasses Transformer.moe)")
        return logits, got

    @torch.inference_mode()
    def prefill(self, tokens: list[int]) -> torch.Tensor:
        """Reset, run the prompt in one batched pass; returns the last position's logits [vocab]."""
        tokens = self._ids(tokens)
        self.reset()
        t0 = time.perf_counter()
        h = self._step(tokens)[-1:]
        out = self._live().head(h)[0].float()
        self._prefill_stats(len(tokens), time.perf_counter() - t0)
        return out

    @torch.inference_mode()
    def decode(self, token: int) -> torch.Tensor:
        """Append one token after ``prefill``/``decode``; returns its logits [vocab]."""
        if self.decode_path == "eager":
            return self._live().head(self._step([int(token)]))[0].float()
        return self._static_step(int(token))[0].clone()

    # -- decode path ---------------------------------------------------------------------
    def set_decode_mode(self, mode: str) -> str:
        """How single-token steps run: ``eager`` (``Transformer.forward``), ``static`` (the
        position on the device, ``engine.cuda_graph``), ``cuda_graph`` (static, captured and
        replayed; with cpu_moe layers, one graph per stretch between them) or ``auto``
        (cuda_graph on CUDA when the engine allows it, else eager). A
        mode that cannot be applied raises ConfigError; ``decode_path`` and
        ``decode_path_reason`` say what was applied. Returns the path."""
        from .cuda_graph import eligibility, host_layers, node_layers
        if mode not in DECODE_MODES:
            raise ConfigError(f"decode mode {mode!r} is not one of {', '.join(DECODE_MODES)}",
                              "pick one of those (KVBENCH_DECODE_MODE or eng.set_decode_mode)")
        why = eligibility(self)
        if mode in ("static", "cuda_graph") and why:
            raise ConfigError(f"decode mode {mode!r} cannot be applied: {why}", "use decode mode eager or auto")
        if mode == "cuda_graph" and self.device.type != "cuda":
            raise ConfigError(f"decode mode 'cuda_graph' needs a CUDA device, this engine runs on {self.device}",
                              "use decode mode static (same step, not captured) or eager")
        if mode == "auto":
            path = "cuda_graph" if self.device.type == "cuda" and why is None else "eager"
            reason = "auto: " + (why or ("no CUDA device" if path == "eager" else "eligible"))
        else:
            path, reason = mode, "requested"
        host = host_layers(self) if path == "cuda_graph" else []
        nodes = node_layers(self) if host else []
        if nodes:
            runner = ("the host thread at each layer's doorbell" if settings.get("KVBENCH_HOST_NODES_RUN") == "doorbell"
                      else "CUDA's callback thread")
            waits = "sleeping on a blocking event" if settings.get("KVBENCH_HOST_NODES_WAIT") == "sleep" else "spinning"
            reason += (f"; {len(host)} MoE layers' experts on the host (cpu_moe): {len(nodes)} as host nodes "
                       f"inside the graph (KVBENCH_HOST_NODES), captured as {len(host) - len(nodes) + 1} "
                       f"graph{'s' if len(host) > len(nodes) else ''}, run by {runner} (KVBENCH_HOST_NODES_RUN); "
                       f"the host waits for a step by {waits} (KVBENCH_HOST_NODES_WAIT)")
        elif host:
            reason += (f"; {len(host)} MoE layers' experts on the host (cpu_moe): captured as "
                       f"{len(host) + 1} graphs around them")
        if host and len(nodes) < len(host) and settings.get("KVBENCH_HOST_NODES"):
            reason += (f"; KVBENCH_HOST_NODES applied to {len(nodes)} of them (a host node needs a cpu-tier "
                       f"layer computing through engine.native with no GPU share)")
        self.decode_mode, self.decode_path, self.decode_path_reason = mode, path, reason
        self._static = None
        return path

    @property
    def attn_math(self) -> str:
        """The attention kernel's precision in force (``engine.attn_math``): ``exact`` (float32
        maths on the stored values) or ``ggml-cpu`` (the query converted to K's dot type)."""
        return self._live().attn_math

    def set_attn_math(self, mode: str) -> str:
        """Apply kernel precision ``mode`` to every layer; a mode some layer's K format cannot
        take (no query conversion, or a head size that is not whole q8_0 blocks) raises
        ConfigError naming the layer, and nothing changes. Captured decode steps are rebuilt."""
        from . import attn_math
        attn_math.check_mode(mode)
        model = self._live()
        for i, (k, _v) in enumerate(self.kv_formats):
            try:
                attn_math.q_for_k(torch.zeros(1, 1, self.spec.head_dim), k.split(" ", 1)[0], mode)
            except ConfigError as exc:
                raise ConfigError(f"attention maths {mode!r} cannot be applied to layer {i} (K {k}): "
                                  f"{exc.args[0] if exc.args else exc}", "use attention maths 'exact'") from None
        model.attn_math = mode
        self._static = None
        return mode

    @property
    def cpu_expert_math(self) -> str | None:
        """The arithmetic of the ``cpu_moe`` layers' experts (``engine.cpu_experts.MATH`` where
        the host's CPU computes them; ``PcieExperts.math`` where the device reads their host
        blocks), or None when every expert is on the device."""
        from .model import PcieExperts   # DmaExperts (host_compute) is among host_expert_layers
        model = self._live()
        host = model.host_expert_layers() or [i for i in model.spec.moe_layers
                                              if isinstance(model.layers[i].experts, PcieExperts)]
        return model.layers[host[0]].experts.math if host else None

    PREFILL_PATHS = ("exact", "fast")

    @property
    def scratch_lend(self) -> bool:
        """Whether a prefill now lends the plan's trunk scratch to its transients (applied, not
        only asked: ``KVBENCH_SCRATCH_LEND`` on, a CUDA engine, a ledger holding the buffers)."""
        ledger = getattr(self, "ledger", None)
        return (self.device.type == "cuda" and ledger is not None and bool(settings.get("KVBENCH_SCRATCH_LEND"))
                and any(n in ledger.names for n in SCRATCH_LENT))

    @property
    def prefill_path(self) -> str:
        """How prefills attend (``set_prefill_path``): ``exact`` (the cache's own kernels,
        float32 maths on the stored values: every accuracy number) or ``fast`` (bfloat16 SDPA
        over the stored rows, ``engine.kernels.prefill_attention.prefill_attention_fast``:
        throughput numbers only; over bf16 weights its activations are bf16 too:
        ``prefill_activations``)."""
        return self._live().prefill_path

    @property
    def prefill_activations(self) -> str:
        """The activations' dtype a prefill runs with now (``Transformer.prefill_act_dtype``):
        ``bf16`` on the fast path over bf16 weights (as HF's bf16 model), else ``fp32``."""
        return "bf16" if self._live().prefill_act_dtype(2) == torch.bfloat16 else "fp32"

    def set_prefill_path(self, path: str) -> str:
        """Apply prefill path ``path`` to every layer. A path that is not one of
        ``PREFILL_PATHS``, or ``fast`` on an engine with a layer whose cache cannot take it (a
        sliding-window ring, ``engine.kv_ring``), raises ConfigError naming it, and nothing
        changes. Returns the path."""
        if path not in self.PREFILL_PATHS:
            raise ConfigError(f"prefill path {path!r} is not one of {', '.join(self.PREFILL_PATHS)}",
                              "use prefill path 'exact' (accuracy) or 'fast' (throughput)")
        model = self._live()
        if path == "fast":
            bad = [i for i, c in enumerate(self.caches) if not hasattr(c, "attend_fast")]
            if bad:
                raise ConfigError(f"prefill path 'fast' cannot be applied to layer {bad[0]} "
                                  f"({type(self.caches[bad[0]]).__name__}: a sliding-window ring; "
                                  f"{len(bad)} such layers)", "use prefill path 'exact' for this model")
        model.prefill_path = path
        return path

    def _static_decoder(self):
        """The engine's ``StaticDecode`` (built on first use for the applied decode path)."""
        from .cuda_graph import StaticDecode, eligibility
        if self._static is None:
            why = eligibility(self)
            if why:
                raise ConfigError(f"decode path {self.decode_path!r} is no longer possible: {why}",
                                  "call eng.set_decode_mode('eager')")
            self._static = StaticDecode(self, capture=self.decode_path == "cuda_graph")
        return self._static

    def _static_step(self, token: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token through ``StaticDecode`` at ``self.pos``: (logits, argmax), both reused.
        ``token`` None: the previous step's argmax, left on the device (``device_embed``)."""
        self._check_ctx(self.pos + 1)
        self._static_decoder()
        try:
            out = self._static.step(token, self.pos)
        except torch.OutOfMemoryError as exc:
            from .errors import out_of_memory
            raise out_of_memory(f"{self.decode_path} decode at position {self.pos}", self.plan,
                                self.device, exc) from None
        self.pos += 1
        return out

    def _prefill_stats(self, n: int, seconds: float) -> None:
        waves = [getattr(c, "last_waves", None) for c in self.caches]
        scratch = [getattr(c, "peak_scratch_bytes", None) for c in self.caches]
        retries = [r for c in self.caches if (r := getattr(c, "last_wave_retries", None)) is not None]
        rows = [r for c in self.caches if (r := getattr(c, "last_wave_rows", None)) is not None]
        self.last_prefill_stats = {
            "tokens": n, "seconds": seconds,
            "waves": max((w for w in waves if w is not None), default=None),
            "peak_scratch_bytes": max((b for b in scratch if b is not None), default=None),
            # waves redone smaller after an out-of-memory (all layers), the smallest wave size in force
            "wave_retries": sum(retries) if retries else None,
            "wave_rows": min(rows, default=None),
            # each layer's (waves, rows per wave): sliding-window rings run in window-sized
            # chunks whatever the budget, so only a per-layer record says which splits moved
            "layer_splits": [[getattr(c, "last_waves", None), getattr(c, "last_wave_rows", None)]
                             for c in self.caches],
        }

    @torch.inference_mode()
    def generate(self, tokens: list[int], max_new_tokens: int, stop_at_eos: bool = True) -> list[int]:
        """Greedy decoding from an empty cache; returns only the new tokens."""
        tokens = self._ids(tokens)
        if not tokens:
            raise ConfigError("generate() needs at least one prompt token")
        self.reset()
        self._check_ctx(len(tokens) + max_new_tokens - 1)
        eos = self._eos()
        if len(tokens) == 1 and self.decode_path != "eager":
            # a one-token prompt is one decode step (llama.cpp decodes it so), not a prefill: on
            # MoE models over expert blocks the prefill path's fixed cost halved the suite's tg32
            # (~0.1 s a sample, inferred; reports/h100-2026-12-05c calls 4-5). Eager: the same
            # _step either way.
            nxt = int(self._static_step(tokens[0])[1])
        else:
            nxt = int(self._live().head(self._step(tokens)[-1:]).argmax(-1)[0])
        new: list[int] = [nxt]
        self.last_stop_reason = "length"
        if stop_at_eos and nxt in eos:
            self.last_stop_reason = "eos"
        elif max_new_tokens > 1:
            batches = self._greedy(nxt, max_new_tokens - 1)
            for batch in batches:
                for t in batch:
                    new.append(t)
                    if stop_at_eos and t in eos:
                        self.last_stop_reason = "eos"
                        break
                if self.last_stop_reason == "eos":
                    batches.close()
                    break
        # the last token returned is never fed (as one step at a time would leave it), whatever
        # a batch computed past an EOS (its KV rows lie beyond the position: harmless)
        self.pos = len(tokens) + len(new) - 1
        return new[:max_new_tokens]

    def rewind(self, pos: int) -> None:
        """Forget positions ``pos..``: the next step writes at ``pos``. Exact for linear caches
        (rows are addressed by position and written before they are read again). A
        sliding-window ring may already have overwritten rows a position before ``pos`` still
        needs, so an engine with one raises ConfigError and nothing changes."""
        if not 0 <= pos <= self.pos:
            raise ConfigError(f"rewind({pos}) outside the sequence of {self.pos} positions",
                              "rewind to a position between 0 and the current one")
        from .kv_ring import RingKV
        rings = [i for i, c in enumerate(self.caches) if isinstance(c, RingKV)]
        if rings and pos < self.pos:
            raise ConfigError(f"rewind cannot be applied: layer {rings[0]} is a sliding-window ring "
                              f"({len(rings)} such layers), whose rows before position {pos} may be overwritten",
                              "prefill the sequence again instead")
        self.pos = pos

    def decode_greedy(self, token: int, n: int) -> list[int]:
        """Feed ``token`` at the current position, then its greedy continuation: ``n`` decode
        steps on the applied decode path, their ``n`` argmax tokens (no EOS stop). With
        ``rewind`` it times decode at a depth as llama-bench's ``tg N @ d D`` does."""
        if n < 1:
            raise ConfigError(f"decode_greedy(n={n})", "ask for at least one token")
        return [t for batch in self._greedy(int(token), n) for t in batch]

    def _eos(self) -> set[int]:
        eos = set(self.tokenizer.eos_ids)
        if self.spec.eos_id is not None:
            eos.add(int(self.spec.eos_id))
        return eos

    @torch.inference_mode()
    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int,
                       stop_at_eos: bool = True) -> list[list[int]]:
        """``generate`` for several prompts; returns each one's new tokens (``last_stop_reasons``
        their stop reasons, ``last_generate_batch`` how they ran).

        On the eager decode path the prompts run together: each is prefilled alone into caches
        of its own (made as the engine's: each layer's K/V formats on the layer's device, sized
        to prompt + answer, checked to hold the engine's applied formats), then every decode
        step feeds one token of every sequence through ``Transformer.forward_rows``: one matmul
        per weight for all of them (the weights are read once per step, not once per sequence),
        attention per sequence through its cache. Prompts are packed in order into batches
        whose caches together fit ``wave_budget_bytes``: the prefill scratch the plan already
        prices, which no long prefill uses while they decode (``last_generate_batch``
        ``cache_bytes``: the largest batch's; a prompt whose caches alone are larger runs
        alone). A sequence that stops keeps its row (ignored), so every step of a batch
        has the same shape: an answer never depends on when the others stopped. Rows differ
        from ``generate`` only by the matmuls' accumulation order at B rows (the same tokens
        but at near-ties). On the static / CUDA-graph paths (one sequence per captured step)
        the prompts run one after another through ``generate``. The engine's own cache is
        left empty (``reset``)."""
        prompts = [self._ids(p) for p in prompts]
        if any(not p for p in prompts):
            raise ConfigError("generate_batch() needs at least one token in every prompt")
        for p in prompts:
            self._check_ctx(len(p) + max_new_tokens - 1)
        t0 = time.perf_counter()
        if self.decode_path != "eager" or max_new_tokens < 1 or len(prompts) < 2:
            outs, reasons = [], []
            for p in prompts:
                outs.append(self.generate(p, max_new_tokens, stop_at_eos))
                reasons.append(self.last_stop_reason)
            self.last_stop_reasons = reasons
            self.last_generate_batch = {"path": "sequential", "decode_path": self.decode_path,
                                        "sequences": len(prompts), "batches": [1] * len(prompts),
                                        "seconds": time.perf_counter() - t0}
            self.reset()
            return outs
        self.reset()
        # caches of a batch: one per sequence, each sized to the batch's longest prompt + answer
        per_row = sum(kvmod.kv_bytes_per_token(self.spec.n_kv_heads, self.spec.head_dim, k, v)
                      for k, v in self._wanted_formats)
        groups, cur, longest = [], [], 0
        for b, p in enumerate(prompts):
            n = max(longest, len(p)) + max_new_tokens
            if cur and (len(cur) + 1) * n * per_row > self.wave_budget_bytes:
                groups.append(cur)
                cur, longest = [], 0
            cur.append(b)
            longest = max(longest, len(p))
        groups.append(cur)
        outs: list[list[int]] = [[] for _ in prompts]
        reasons = ["length"] * len(prompts)
        steps = 0
        cache_bytes = max(len(g) * (max(len(prompts[b]) for b in g) + max_new_tokens) * per_row for g in groups)
        for group in groups:
            steps += self._generate_group([prompts[b] for b in group], max_new_tokens, stop_at_eos,
                                          [outs[b] for b in group], reasons, group)
        self.last_stop_reasons = reasons
        self.last_generate_batch = {"path": "batched", "decode_path": self.decode_path,
                                    "sequences": len(prompts), "batches": [len(g) for g in groups],
                                    "decode_steps": steps, "cache_bytes": cache_bytes,
                                    "seconds": time.perf_counter() - t0}
        return outs

    def _generate_group(self, prompts, max_new: int, stop_at_eos: bool, outs, reasons, index) -> int:
        """One batch of ``generate_batch``: fills ``outs`` (lists, in place) and ``reasons[index[b]]``;
        returns the batched decode steps it ran."""
        model, spec = self._live(), self.spec
        eos = self._eos()
        n = max(len(p) for p in prompts) + max_new
        caches = [[kvmod.make_layer_kv(spec, i, n, k, model.layer_devices[i],
                                       wave_budget_bytes=self.wave_budget_bytes, v_dtype=v)
                   for i, (k, v) in enumerate(self._wanted_formats)] for _ in prompts]
        for c in caches:                     # never a different KV than the engine's own
            got = [tuple(x.kv_dtypes) for x in c]
            if got != self.kv_formats:
                raise RuntimeError(f"generate_batch: its caches hold {got[:2]}... where the engine's "
                                   f"hold {self.kv_formats[:2]}...")
        live, pos, last = [], [], []
        for b, p in enumerate(prompts):
            h = model.forward(torch.tensor(p, dtype=torch.long), 0, caches[b])
            t = int(model.head(h[-1:]).argmax(-1)[0])
            outs[b].append(t)
            pos.append(len(p))
            last.append(t)
            if stop_at_eos and t in eos:
                reasons[index[b]] = "eos"
            elif max_new > 1:
                live.append(b)
        steps = 0
        while live:
            h = model.forward_rows(torch.tensor(last, dtype=torch.long), pos, caches, live)
            nxt = model.head(h).argmax(-1).tolist()
            steps += 1
            for b in list(live):
                t = nxt[b]
                outs[b].append(t)
                pos[b] += 1
                last[b] = t
                if stop_at_eos and t in eos:
                    reasons[index[b]] = "eos"
                    live.remove(b)
                elif len(outs[b]) >= max_new:
                    live.remove(b)
        return steps

    @torch.inference_mode()
    def decode_greedy(self, token: int, n: int) -> list[int]:
        """``n`` greedy steps after ``prefill``/``decode``: ``token`` at ``self.pos``, then each
        step's argmax; returns the ``n`` argmax tokens (the last one not fed; ``self.pos`` ends
        ``n`` further). The static path with ``device_embed`` queues the steps back to back
        and reads the tokens back every ``KVBENCH_DECODE_READBACK`` steps."""
        return [t for batch in self._greedy(int(token), n) for t in batch]

    def _greedy(self, token: int, n: int):
        """Yield lists of greedy tokens, ``n`` in all, starting by feeding ``token``. Eager and
        the static path without ``device_embed``: one step, one read-back (a sync) each. With
        ``device_embed``: up to ``KVBENCH_DECODE_READBACK`` steps queued with nothing read or
        written by the host (each step takes the previous argmax on the device), their argmaxes
        gathered in a device buffer, then one read-back."""
        self._check_ctx(self.pos + n)
        if self.decode_path == "eager" or not self._static_decoder().device_embed:
            for _ in range(n):
                if self.decode_path == "eager":
                    token = int(self._live().head(self._step([token])).argmax(-1)[0])
                else:
                    token = int(self._static_step(token)[1])
                yield [token]
            return
        per = settings.get("KVBENCH_DECODE_READBACK")
        buf = torch.empty(min(per, n), dtype=torch.long, device=self.device)
        feed = token
        while n > 0:
            b = min(per, n)
            for j in range(b):
                buf[j].copy_(self._static_step(feed)[1])
                feed = None                          # from now on the device holds the token
            n -= b
            yield buf[:b].tolist()                   # the one sync of the batch

    @staticmethod
    def _ids(tokens) -> list[int]:
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        return [int(t) for t in tokens]


class NoTokenizer:
    """Stands in for a GGUF without tokenizer metadata: logits from ids work, text does not."""
    eos_ids: frozenset = frozenset()

    def __init__(self, path):
        self.path = path

    def __getattr__(self, name):
        raise ModelFileError(self.path, f"has no tokenizer metadata, so tokenizer.{name} is unavailable",
                             "pass token ids, or use a GGUF converted with its tokenizer")


def _tokenizer_for(g: GGUFFile):
    if "tokenizer.ggml.model" not in g.meta and "tokenizer.ggml.tokens" not in g.meta:
        return NoTokenizer(g.path)
    from .models import fallback_chat_template
    from .tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(g)
    tok.chat_template_source = "gguf" if tok.has_chat_template else None
    fallback = fallback_chat_template(g.path)
    if fallback and not tok.has_chat_template:   # e.g. gemma3-270m: Gemma's turn format
        tok.set_chat_template(fallback)
        tok.chat_template_source = "registry fallback"
    return tok


def load(model: str | os.PathLike, *, kv_dtype: str = "fp32", device: str | torch.device = "cpu",
         ctx: int = 4096, vram_budget: int | None = None, n_gpu_layers: int | None = None,
         wave_budget_bytes: int | None = None, weight_format: str = "auto",
         weights_from: Engine | None = None, host_ram: int | None = None,
         expert_format: str = "weights", cpu_moe: int | str | None = None, host_experts: str = "cpu") -> Engine:
    """Load a registry name or .gguf path; see the module docstring.

    ``weight_format`` is how matrices are stored at run time ("f32" exact, "bf16"/"f16" half
    the bytes; norms stay f32; "auto": f32 when it needs at most half the available host RAM,
    else bf16: ``engine.planner``); the planner prices exactly that, and ``eng.plan``
    records what was applied (``weight_format``) and asked for (``weight_format_requested``).

    Host memory is planned too (``plan.host_ram``: weights, routed experts, tail KV, scratch,
    against ``engine.hostmem.available()`` or ``host_ram`` bytes): a plan that does not fit
    raises ``OutOfMemoryError`` before anything is read or allocated.

    The planner decides the split: layers ``[0, n_gpu_layers)`` (the trunk) run on ``device``
    with a ``kv_dtype`` cache; the rest (the tail) run on the CPU with fp32 KV. Every buffer
    is recorded in ``eng.ledger`` with its category and tier, so ``eng.ledger.compare(eng.plan)``
    holds the runtime to the plan.

    ``weights_from``: an engine loaded from the same file, device and ``weight_format`` whose
    weights this load takes over instead of reading the file again (seconds instead of minutes
    at 30B scale); only the KV caches, scratch and expert cache are made anew for the new
    kv_dtype / ctx / budget, in the same ledger. The new plan must place layers and head as
    the old one did (else ConfigError). On CUDA ``vram_budget=None`` then means the old plan's
    budget (free memory now would not count the weights already held). The old engine is
    left unusable (its ``model`` is None).

    ``expert_format``: "weights" (routed experts at ``weight_format``, as above) or "blocks"
    (kept in the file's Q4_0 / Q8_0 blocks, llama.cpp's placement ``-ngl 99 --n-cpu-moe N``:
    every layer's attention and KV on ``device``, the experts of the first ``cpu_moe`` MoE
    layers computed on the host CPU from Q4_0, the others resident on ``device`` and read by
    ``engine.kernels.moe_blocks``; ``cpu_moe`` "auto"/None: the fewest that fit the budget).
    Experts stored otherwise raise; ``eng.plan`` records ``expert_format``, ``cpu_moe`` and
    ``layer_expert_tiers``; ``eng.cpu_expert_math`` the host path's arithmetic.
    ``host_experts="pcie"``: those layers' experts stay on the host as their blocks (pinned)
    and the device's kernel reads them in place over PCIe instead of the CPU computing them
    (``engine.model.PcieExperts``; the captured step stays one graph); ``"dma"``: the same host
    blocks, a token's k chosen experts copied to a device staging stack after a routing sync
    (``engine.model.DmaExperts``); ``"auto"``: "cpu", "pcie" or "dma", whichever one layer's
    experts take least time on this machine, measured at load (``engine.host_probe``: seconds),
    or the only one that applies (a CPU device: cpu; no host layers or Q8_0 blocks: pcie);
    ``eng.plan.host_experts`` is what was applied, ``host_experts_requested`` "auto" and
    ``host_experts_reason`` the numbers behind it."""
    from . import hybrid
    if expert_format not in ("weights", "blocks"):
        raise ConfigError(f"expert_format {expert_format!r} is not 'weights' or 'blocks'", "pick one of those")
    # 1. validate: the request, the file (or the engine whose weights are taken over)
    req = _validate(model, kv_dtype, device, ctx, wave_budget_bytes, weight_format, weights_from)
    src = _source(req, weights_from)
    if weights_from is not None and vram_budget is None and req.device.type == "cuda":
        vram_budget = weights_from.plan.budget_bytes     # free memory now would not count the held weights
    # 2. plan: device and host memory, refused before anything is read or allocated
    blocks = _expert_blocks(src) if expert_format == "blocks" else None
    auto_reason = None
    if host_experts == "auto":
        host_experts, auto_reason = _auto_host_experts(req, src, vram_budget, n_gpu_layers, host_ram,
                                                       weights_from, blocks, cpu_moe)
    plan = _plan(req, src, vram_budget, n_gpu_layers, host_ram, weights_from, blocks, cpu_moe, host_experts)
    if auto_reason is not None:
        plan = dataclasses.replace(plan, host_experts_requested="auto", host_experts_reason=auto_reason)
    # 3. place: which layers, head and experts live where (engine.hybrid)
    placement = hybrid.place(plan, src.spec, req.device)
    if weights_from is not None:
        hybrid.take_over(weights_from, plan, placement)
    # 4. bind: weights (read or taken over), expert cache, scratch, KV caches, all in the ledger
    tokenizer = src.tokenizer or _tokenizer_for(src.gguf)
    try:
        model_, cache = hybrid.bind_weights(src.gguf, src.spec, plan, placement, src.ledger,
                                            WEIGHT_DTYPES[plan.weight_format], weights_from)
        scratch = hybrid.alloc_scratch(plan, src.ledger)
        hybrid.bind_staging(model_, src.spec, plan, scratch)
        eng = Engine(req.path, src.gguf, src.spec, model_, tokenizer, req.kv_dtype, req.device, req.ctx,
                     req.wave, layer_kv_formats=list(zip(plan.layer_k_dtypes, plan.layer_v_dtypes)))
    except torch.OutOfMemoryError as exc:
        raise out_of_memory("load", plan, req.device, exc) from None
    hybrid.register_kv(eng.caches, placement, src.ledger)
    eng.plan, eng.ledger, eng.expert_cache = plan, src.ledger, cache
    return eng


@dataclass(frozen=True)
class _Request:
    path: Path
    kv_dtype: str
    device: torch.device
    ctx: int
    wave: int
    weight_format: str


@dataclass
class _Source:
    gguf: GGUFFile
    spec: ModelSpec
    tokenizer: object | None      # None: built after the plan says the load can go ahead
    ledger: object


def _validate(model, kv_dtype, device, ctx, wave_budget_bytes, weight_format, reuse) -> _Request:
    kvspec.parse(kv_dtype)              # a bad spec is a ConfigError naming it and the accepted forms
    if not isinstance(ctx, int) or ctx <= 0:
        raise ConfigError(f"ctx {ctx!r} must be a positive integer")
    dev = _device(device)
    path = Path(resolve(model))
    if reuse is not None:
        if reuse.model is None:
            raise ConfigError("weights_from: that engine's weights were already taken over by a later load",
                              "pass the engine the last load returned")
        if weight_format == "auto":             # the loaded weights decide
            weight_format = reuse.plan.weight_format
        if (path, dev, weight_format) != (Path(reuse.path), reuse.device, reuse.plan.weight_format):
            raise ConfigError(f"weights_from holds {Path(reuse.path).name} on {reuse.device} at "
                              f"{reuse.plan.weight_format}, not {path.name} on {dev} at {weight_format}",
                              "load afresh (no weights_from) or match model, device and weight_format")
    if weight_format != "auto" and weight_format not in WEIGHT_DTYPES:
        raise ConfigError(f"weight_format {weight_format!r} cannot be applied by this engine "
                          f"(it stores {', '.join(WEIGHT_DTYPES)}, or auto)", "pick one of those")
    return _Request(path, kv_dtype, dev, ctx, int(wave_budget_bytes or DEFAULT_WAVE_BUDGET), weight_format)


def _source(req: _Request, reuse) -> _Source:
    if reuse is not None:
        return _Source(reuse.gguf, reuse.spec, reuse.tokenizer, reuse.ledger)
    from .ledger import Ledger
    g = open_gguf(req.path)
    spec = ModelSpec.from_gguf(g)
    if req.device.type == "cuda":
        _warm_cuda_libraries(req.device)
    return _Source(g, spec, None, Ledger(req.device))   # the ledger before any allocation


def _expert_blocks(src: _Source) -> str:
    """The block format every routed expert tensor of the file is stored in (q4_0 / q8_0), or a
    ConfigError naming the first that is not (``engine.models.expert_blocks_of``)."""
    from .models import EXPERT_TENSORS, expert_blocks_of
    names = [f"blk.{i}.{n}.weight" for i in src.spec.moe_layers for n in EXPERT_TENSORS]
    return expert_blocks_of({n: src.gguf.qtype(n) for n in names}, src.spec.name)


def _auto_host_experts(req: _Request, src: _Source, vram_budget, n_gpu_layers, host_ram, reuse, blocks,
                       cpu_moe) -> tuple[str, str]:
    """``host_experts="auto"``: the placement of the host layers' experts that is faster on this
    machine (``engine.host_probe``), or the only one that applies; (tier, reason)."""
    if blocks is None:
        raise ConfigError("host_experts 'auto' chooses how experts kept in their GGUF blocks are computed",
                          "pass expert_format='blocks' with it")
    if req.device.type != "cuda":
        return "cpu", f"auto: on a {req.device.type} device the host CPU computes every expert"
    probe_plan = _plan(req, src, vram_budget, n_gpu_layers, host_ram, reuse, blocks, cpu_moe, "pcie")
    if not probe_plan.cpu_moe:
        return "pcie", "auto: no MoE layer's experts are on the host (cpu_moe 0), nothing to choose"
    if blocks != "q4_0":
        return "pcie", f"auto: the CPU tier computes Q4_0 experts only, these are {blocks}"
    from .errors import OutOfMemoryError
    try:                              # the CPU tier keeps int4 copies beside the blocks: more host memory
        _plan(req, src, vram_budget, n_gpu_layers, host_ram, reuse, blocks, cpu_moe, "cpu")
    except OutOfMemoryError as exc:
        return "pcie", f"auto: the CPU tier does not fit host memory ({exc.args[0].split('; ')[0]})"
    from . import host_probe
    return host_probe.choose(host_probe.measure(src.spec, req.device))


def _plan(req: _Request, src: _Source, vram_budget, n_gpu_layers, host_ram, reuse, expert_blocks=None,
          cpu_moe=None, host_experts="cpu"):
    from .planner import plan as make_plan, require_host_fit
    held = 0 if reuse is None else reuse.plan.host_ram.need - reuse.plan.host_ram.headroom
    plan = make_plan(src.spec, kv_dtype=req.kv_dtype, ctx=req.ctx, vram_budget=vram_budget,
                     n_gpu_layers=n_gpu_layers, wave_budget_bytes=req.wave, weight_format=req.weight_format,
                     device=req.device, host_ram=host_ram, host_held=held, file_bytes=req.path.stat().st_size,
                     expert_blocks=expert_blocks, cpu_moe=cpu_moe, host_experts=host_experts)
    require_host_fit(plan)
    if plan.weight_format not in WEIGHT_DTYPES:
        raise ConfigError(f"weight_format {plan.weight_format!r} cannot be applied by this engine "
                          f"(it stores {', '.join(WEIGHT_DTYPES)})", "pick one of those")
    return plan


def _warm_cuda_libraries(dev: torch.device) -> None:
    """cuBLAS allocates its workspace through the caching allocator on first use; create it
    before the ledger starts counting, so `unaccounted` measures the engine, not the library."""
    from .cuda_graph import capture_stream
    side = capture_stream(dev)       # the decode graphs' stream: its cuBLAS workspace too
    for stream in (torch.cuda.current_stream(dev), side):
        with torch.cuda.stream(stream):
            for dt in (torch.float32, torch.bfloat16, torch.float16):
                a = torch.ones(8, 8, device=dev, dtype=dt)
                (a @ a).sum()
        stream.synchronize()


WEIGHT_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16,
                 "q8_0": torch.int8}         # int8: Q8_0 matrices (engine.qweights)
assert tuple(WEIGHT_DTYPES) == formats.ENGINE_WEIGHT_FORMATS
