"""Engine: load a GGUF model and run teacher-forced logits and greedy generation.

Contract (DESIGN.md "Engine contract"): ``load(model, kv_dtype=, device=, ctx=, ...)``
returns an ``Engine`` with ``spec``, ``tokenizer``, ``logits(tokens)`` ([T, vocab] float32,
teacher-forced), ``generate(tokens, max_new_tokens, stop_at_eos=True)`` (greedy, new tokens
only), ``kv_dtypes`` (the dtype each layer's cache *holds*, read from its buffers). Every
call starts from an empty cache: results never depend on earlier calls.

    eng = load("smollm2-135m")
    ids = eng.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    print(eng.tokenizer.decode(eng.generate(ids, 32)))
"""
from __future__ import annotations

import os
import time
import weakref
from pathlib import Path

import torch

from . import kv as kvmod
from .errors import ConfigError, ContextOverflowError, ModelFileError, out_of_memory
from .gguf_io import GGUFFile, open_gguf
from . import settings
from .hostmem import pinned_empty
from .model import Experts, LayerWeights, Transformer
from .models import resolve
from .spec import ModelSpec

DEFAULT_WAVE_BUDGET = 256 << 20
DECODE_MODES = ("auto", "eager", "static", "cuda_graph")


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


def load_weights(g: GGUFFile, spec: ModelSpec, dtype: torch.dtype = torch.float32,
                 layer_devices: list[torch.device] | None = None, head_device: torch.device | None = None,
                 pin_experts: bool = False, decode_device: torch.device | None = None,
                 ) -> tuple[list[LayerWeights], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every tensor read straight into its storage, shape checked against the spec.

    Matrices and routed experts are stored as ``dtype``, norms float32. Layer ``i``'s resident
    tensors live on ``layer_devices[i]``; routed experts (``Experts``) and ``token_embd`` on the
    host, experts in pinned memory when ``pin_experts``; ``output_norm`` and ``output`` on
    ``head_device`` when given (the head's own tier: a tied output is then its own copy),
    else on the host (a tied output is ``token_embd`` itself). Tensors are decoded one at a
    time in chunks (``GGUFFile.tensor``), on ``decode_device`` when given (e.g. the GPU for
    host-bound tensors: raw blocks go up, the stored dtype comes back), else on their own
    device, so the host never holds more than the stored bytes plus one chunk of float32.
    Defaults: everything float32 on the host."""
    d, q, kvd = spec.d_model, spec.q_dim, spec.kv_dim
    host = torch.device("cpu")
    layer_devices = layer_devices or [host] * spec.n_layers

    def read(name, shape, dev, wdtype=dtype, pin=False):
        if dev.type == "cpu" and (pin or (decode_device is not None and decode_device != dev)):
            # pinned at its exact size (torch's pinned allocator rounds up to a power of two)
            out = pinned_empty(shape, wdtype) if pin else torch.empty(shape, dtype=wdtype)
            return g.tensor(name, shape, dtype=wdtype, device=decode_device or host, out=out)
        return g.tensor(name, shape, dtype=wdtype, device=dev)

    layers = []
    for i in range(spec.n_layers):
        p, dev = f"blk.{i}.", layer_devices[i]
        t = lambda name, shape: read(p + name, shape, dev)                        # noqa: E731
        norm = lambda name, shape: read(p + name, shape, dev, torch.float32)      # noqa: E731
        lw = LayerWeights(
            attn_norm=norm("attn_norm.weight", (d,)), wq=t("attn_q.weight", (q, d)),
            wk=t("attn_k.weight", (kvd, d)), wv=t("attn_v.weight", (kvd, d)),
            wo=t("attn_output.weight", (d, q)), ffn_norm=norm("ffn_norm.weight", (d,)))
        if spec.qk_norm == "head":
            lw.q_norm, lw.k_norm = norm("attn_q_norm.weight", (spec.head_dim,)), norm("attn_k_norm.weight", (spec.head_dim,))
        elif spec.qk_norm == "full":
            lw.q_norm, lw.k_norm = norm("attn_q_norm.weight", (q,)), norm("attn_k_norm.weight", (kvd,))
        if spec.post_norms:
            lw.post_attn_norm = norm("post_attention_norm.weight", (d,))
            lw.post_ffn_norm = norm("post_ffw_norm.weight", (d,))
        if i in spec.moe_layers:
            E, ff = spec.n_experts, spec.d_ff_expert
            lw.router = t("ffn_gate_inp.weight", (E, d))
            lw.experts = Experts(*(read(p + name, shape, host, pin=pin_experts) for name, shape in (
                ("ffn_gate_exps.weight", (E, ff, d)), ("ffn_up_exps.weight", (E, ff, d)),
                ("ffn_down_exps.weight", (E, d, ff)))))
        else:
            ff = spec.d_ff
            lw.w_gate, lw.w_up = t("ffn_gate.weight", (ff, d)), t("ffn_up.weight", (ff, d))
            lw.w_down = t("ffn_down.weight", (d, ff))
        layers.append(lw)
    vd = (spec.vocab_size, d)
    embed = read("token_embd.weight", vd, host)
    out_norm = read("output_norm.weight", (d,), head_device or host, torch.float32)
    if spec.tied_output:
        output = embed if head_device is None else embed.to(head_device, copy=True)
    else:
        output = read("output.weight", vd, head_device or host)
    return layers, embed, out_norm, output


class WeightsPlacementError(ConfigError):
    """``weights_from`` an engine whose weights are placed differently from the new plan."""


_LIVE: "weakref.WeakSet[Engine]" = weakref.WeakSet()


def live_engines() -> int:
    """Engines of this process that still hold weights (not taken over, not closed)."""
    return sum(1 for e in list(_LIVE) if e.model is not None)


class Engine:
    # what the harness may ask of this engine (harness.engine_api names): everything
    name = "kvbench"
    capabilities = frozenset({"logits", "chunked_logits", "generate", "chat", "prefill", "kv_applied",
                              "kv_bytes", "plan", "prefill_stats", "caches"})

    def __init__(self, path: Path, g: GGUFFile, spec: ModelSpec, model: Transformer, tokenizer,
                 kv_dtype: str, device: torch.device, ctx: int, wave_budget_bytes: int,
                 layer_kv_dtypes: list[str] | None = None):
        self.path, self.gguf, self.spec, self.model, self.tokenizer = path, g, spec, model, tokenizer
        self.kv_dtype_requested, self.device, self.ctx = kv_dtype, device, ctx
        self.wave_budget_bytes = wave_budget_bytes
        wanted = layer_kv_dtypes or [kv_dtype] * spec.n_layers
        self.caches = [kvmod.make_layer_kv(spec, i, ctx, wanted[i], model.layer_devices[i],
                                           wave_budget_bytes=wave_budget_bytes)
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
        return [c.dtype for c in self.caches]

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
        try:
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
    def logits(self, tokens: list[int], chunk: int | None = None) -> torch.Tensor:
        """Teacher-forced logits [len(tokens), vocab] float32 from an empty cache.

        ``chunk`` prefills in pieces of that many tokens (same maths, different batching)."""
        tokens = self._ids(tokens)
        self.reset()
        self._check_ctx(len(tokens))
        step = chunk or len(tokens)
        out = []
        t0 = time.perf_counter()
        for s in range(0, len(tokens), step):
            out.append(self._live().head(self._step(tokens[s:s + step])).float().cpu())
        self._prefill_stats(len(tokens), time.perf_counter() - t0)
        return torch.cat(out)

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
        replayed) or ``auto`` (cuda_graph on CUDA when the engine allows it, else eager). A
        mode that cannot be applied raises ConfigError; ``decode_path`` and
        ``decode_path_reason`` say what was applied. Returns the path."""
        from .cuda_graph import eligibility
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
        self.decode_mode, self.decode_path, self.decode_path_reason = mode, path, reason
        self._static = None
        return path

    def _static_step(self, token: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One token through ``StaticDecode`` at ``self.pos``: (logits, argmax), both reused."""
        from .cuda_graph import StaticDecode, eligibility
        self._check_ctx(self.pos + 1)
        if self._static is None:
            why = eligibility(self)
            if why:
                raise ConfigError(f"decode path {self.decode_path!r} is no longer possible: {why}",
                                  "call eng.set_decode_mode('eager')")
            self._static = StaticDecode(self, capture=self.decode_path == "cuda_graph")
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
        }

    @torch.inference_mode()
    def generate(self, tokens: list[int], max_new_tokens: int, stop_at_eos: bool = True) -> list[int]:
        """Greedy decoding from an empty cache; returns only the new tokens."""
        tokens = self._ids(tokens)
        if not tokens:
            raise ConfigError("generate() needs at least one prompt token")
        self.reset()
        self._check_ctx(len(tokens) + max_new_tokens - 1)
        eos = set(self.tokenizer.eos_ids)
        if self.spec.eos_id is not None:
            eos.add(int(self.spec.eos_id))
        nxt = int(self._live().head(self._step(tokens)[-1:]).argmax(-1)[0])
        new: list[int] = []
        self.last_stop_reason = "length"
        for _ in range(max_new_tokens):
            new.append(nxt)
            if stop_at_eos and nxt in eos:
                self.last_stop_reason = "eos"
                break
            if len(new) == max_new_tokens:
                break
            if self.decode_path == "eager":
                nxt = int(self._live().head(self._step([nxt])).argmax(-1)[0])
            else:
                nxt = int(self._static_step(nxt)[1])
        return new

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
         weights_from: Engine | None = None, host_ram: int | None = None) -> Engine:
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
    left unusable (its ``model`` is None)."""
    from .expert_cache import ExpertCache
    from .ledger import Ledger
    from .planner import plan as make_plan, require_host_fit

    if kv_dtype not in kvmod.KV_DTYPES:
        raise ConfigError(f"kv_dtype {kv_dtype!r} is not one of {', '.join(kvmod.KV_DTYPES)}",
                          "pick one of those")
    if not isinstance(ctx, int) or ctx <= 0:
        raise ConfigError(f"ctx {ctx!r} must be a positive integer")
    dev = _device(device)
    wave = int(wave_budget_bytes or DEFAULT_WAVE_BUDGET)
    path = resolve(model)
    reuse = weights_from
    if reuse is not None:
        if reuse.model is None:
            raise ConfigError("weights_from: that engine's weights were already taken over by a later load",
                              "pass the engine the last load returned")
        if weight_format == "auto":             # the loaded weights decide
            weight_format = reuse.plan.weight_format
        if (Path(path), dev, weight_format) != (Path(reuse.path), reuse.device, reuse.plan.weight_format):
            raise ConfigError(f"weights_from holds {Path(reuse.path).name} on {reuse.device} at "
                              f"{reuse.plan.weight_format}, not {Path(path).name} on {dev} at {weight_format}",
                              "load afresh (no weights_from) or match model, device and weight_format")
        g, spec, tokenizer, ledger = reuse.gguf, reuse.spec, reuse.tokenizer, reuse.ledger
        if vram_budget is None and dev.type == "cuda":
            vram_budget = reuse.plan.budget_bytes
    else:
        g = open_gguf(path)
        spec = ModelSpec.from_gguf(g)
        tokenizer = None            # built once the plan says this load can go ahead
        if dev.type == "cuda":
            _warm_cuda_libraries(dev)
        ledger = Ledger(dev)   # before any allocation, so `unaccounted` sees everything
    held = 0 if reuse is None else reuse.plan.host_ram.need - reuse.plan.host_ram.headroom
    plan = make_plan(spec, kv_dtype=kv_dtype, ctx=ctx, vram_budget=vram_budget, n_gpu_layers=n_gpu_layers,
                     wave_budget_bytes=wave, weight_format=weight_format, device=dev, host_ram=host_ram,
                     host_held=held, file_bytes=Path(path).stat().st_size)
    require_host_fit(plan)          # before anything is read or allocated
    weight_format = plan.weight_format
    swa_on_triton = [i for i in spec.swa_layers if plan.layer_tiers[i] == "trunk"]
    if swa_on_triton and kvmod.kernels.use_triton(dev):   # fail at load, not mid-prefill
        raise ConfigError(f"{path.name}: layers {swa_on_triton[:3]}... use sliding-window attention, "
                          f"which is implemented only in the torch path",
                          "use KVBENCH_ATTN_BACKEND=torch or device cpu")
    wdtype = WEIGHT_DTYPES.get(weight_format)
    if wdtype is None:
        raise ConfigError(f"weight_format {weight_format!r} cannot be applied by this engine "
                          f"(it stores {', '.join(WEIGHT_DTYPES)})", "pick one of those")
    if tokenizer is None:
        tokenizer = _tokenizer_for(g)
    host = torch.device("cpu")
    tiers = plan.layer_tiers
    layer_devices = [dev if t == "trunk" else host for t in tiers]
    head_device = dev if plan.head_tier == "trunk" else None
    trunk_moe = [i for i in spec.moe_layers if tiers[i] == "trunk"]
    if reuse is not None:
        if (tiers, plan.head_tier) != (reuse.plan.layer_tiers, reuse.plan.head_tier):
            raise WeightsPlacementError(f"weights_from: this plan puts {plan.n_gpu_layers} layers and the head on "
                              f"{plan.head_tier}, the loaded weights are placed for {reuse.plan.n_gpu_layers} "
                              f"and {reuse.plan.head_tier}", "load afresh (no weights_from) for this budget")
        for c in reuse.caches:                         # free the old runtime buffers first
            ledger.free(c.k)
            ledger.free(c.v)
        for buf in (reuse.expert_cache.slots if reuse.expert_cache is not None else ()):
            ledger.free(buf)
        for name in [f"scratch.{item}" for item in reuse.plan.scratch_items] + \
                ["scratch.host"] * bool(reuse.plan.host.scratch):
            ledger.release(name)
        c = buf = None                                 # the loop variables held the last buffers
        left = {(c, t): ledger.current(c, t) for c in ("kv", "scratch", "expert_cache") for t in ("trunk", "host")}
        if any(left.values()):
            raise ConfigError(f"weights_from: buffers outside the weights are still recorded ({left})",
                              "load afresh (no weights_from)")
        old_model = reuse.model
        reuse.model = reuse.expert_cache = reuse._static = None   # a captured decode graph holds old buffers
        reuse.caches = []
        for i in trunk_moe:     # unbind the old cache's slots so they are freed before the new ones exist
            old_model.layers[i].experts = Experts(*old_model.layers[i].experts.tensors())
    try:
        cache = ExpertCache.for_spec(spec, ledger, plan.expert_slots, dtype=wdtype) if trunk_moe else None
        if reuse is not None:
            layers = [LayerWeights(**vars(lw)) for lw in old_model.layers]
            for i in trunk_moe:
                layers[i].experts = cache.layer(i, *layers[i].experts.tensors())
            model_ = Transformer(spec, layers, old_model.embed, old_model.out_norm, old_model.output,
                                 old_model.layer_devices, old_model.head_device)
        else:
            # streamed: each tensor is decoded (on the GPU when there is one) straight into its storage
            layers, embed, out_norm, output = load_weights(
                g, spec, wdtype, layer_devices, head_device, pin_experts=dev.type == "cuda",
                decode_device=dev if dev.type == "cuda" else None)
            for i, lw in enumerate(layers):
                tier = tiers[i]
                for name, value in vars(lw).items():
                    if isinstance(value, torch.Tensor):
                        ledger.register("weights", value, tier, name=f"blk.{i}.{name}")
                if lw.experts is not None:
                    hosted = [ledger.register("weights", t, "host", name=f"blk.{i}.experts.{n}")
                              for n, t in zip(("gate", "up", "down"), lw.experts.tensors())]
                    if tier == "trunk":
                        lw.experts = cache.layer(i, *hosted)
            ledger.register("weights", embed, "host", name="token_embd")
            if plan.head_tier == "trunk":
                ledger.register("weights", out_norm, "trunk", name="output_norm")
                ledger.register("weights", output, "trunk", name="output")
            else:
                ledger.register("weights", out_norm, "host", name="output_norm")
                if not spec.tied_output:
                    ledger.register("weights", output, "host", name="output")
            model_ = Transformer(spec, layers, embed, out_norm, output, layer_devices, head_device or host)
        for item, nbytes in plan.scratch_items.items():
            ledger.alloc("scratch", (nbytes,), torch.uint8, "trunk", name=f"scratch.{item}", zero=False)
        if plan.host.scratch:
            ledger.alloc("scratch", (plan.host.scratch,), torch.uint8, "host", name="scratch.host", zero=False)
        eng = Engine(path, g, spec, model_, tokenizer, kv_dtype, dev, ctx, wave,
                     layer_kv_dtypes=plan.layer_kv_dtypes)
    except torch.OutOfMemoryError as exc:
        raise out_of_memory("load", plan, dev, exc) from None
    for i, c in enumerate(eng.caches):
        for j, buf in enumerate((c.k, c.v)):
            ledger.register("kv", buf, tiers[i], name=f"blk.{i}.kv.{j}")
    eng.plan, eng.ledger, eng.expert_cache = plan, ledger, cache
    return eng


def _warm_cuda_libraries(dev: torch.device) -> None:
    """cuBLAS allocates its workspace through the caching allocator on first use; create it
    before the ledger starts counting, so `unaccounted` measures the engine, not the library."""
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        a = torch.ones(8, 8, device=dev, dtype=dt)
        (a @ a).sum().item()


WEIGHT_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
