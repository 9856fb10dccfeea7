"""HF transformers in-process on the same GGUF, with its own caches, quantized ones included.

Contract: ``HF(model, row, native, opts)`` loads the model's GGUF with transformers' own GGUF
loader (``from_pretrained(dir, gguf_file=...)``: HF dequantizes the weights) and its tokenizer
and chat template from the same file. KV settings (``native``):

- ``fp32``: the float32 model with a ``DynamicCache``;
- ``bf16``: the model loaded in bfloat16 (HF's caches hold the model's dtype, so bf16 KV comes
  with bf16 weights and compute: the report says so);
- ``quanto-int4``, ``quanto-int2`` (optimum-quanto), ``hqq-int8/4/3/2`` (HQQ), ``fp8``
  (float8 e4m3, one scale per tensor frozen at the first update): ``QuantizedCache`` on the
  float32 model.

HF keeps the first update and a residual window of recent tokens in full precision. So that
the quantized part is exercised, teacher-forced input is fed in chunks of ``step`` tokens
(default 8) with ``residual_length = step``: each chunk attends to its own K/V in full
precision and to every earlier token through the quantized cache; ``kv_note`` says exactly
that and the runner records it with the case. ``logits(tokens, chunk=N)`` feeds chunks of N
instead (the noise floor). What was applied is read from the cache HF built (its layer class
and bits, or the dtype of its tensors), not from the request. A backend that does not
install here is refused when the run starts (one line naming the package).

    eng = HF("smollm2-135m", "q8_0", "quanto-int4", {"ctx": 4096})
    eng.kv_applied_native[0], eng.kv_note
"""
from __future__ import annotations

import contextlib
import importlib.util
import io

import torch

from engine.errors import ContextOverflowError, EngineError

from ..engine_api import CAP_CHAT, CAP_CHUNKED_LOGITS, CAP_GENERATE, CAP_KV_APPLIED, CAP_LOGITS, CAP_PREFILL, \
    CAP_TOPK_LOGPROBS
from .base import Adapter, EngineUnavailable

QUANTIZED = {"quanto-int4": ("quanto", 4), "quanto-int2": ("quanto", 2), "hqq-int8": ("hqq", 8),
             "hqq-int4": ("hqq", 4), "hqq-int3": ("hqq", 3), "hqq-int2": ("hqq", 2), "fp8": ("fp8", None)}
PACKAGES = {"quanto": ("optimum.quanto", "optimum-quanto"), "hqq": ("hqq", "hqq")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def require_backend(native: str) -> None:
    """Refuse a KV setting whose backend package does not import here (EngineUnavailable)."""
    backend = QUANTIZED.get(native, (None,))[0]
    if backend in PACKAGES:
        module, package = PACKAGES[backend]
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            raise EngineUnavailable(f"engine hf: KV {native} needs the {package} package, which is not "
                                    "installed here", "pip install -e '.[engines]' (or make llama-cpp)")


class _Models:
    """Loaded (model, tokenizer) per (path, dtype), shared by an adapter and its twins."""
    cache: dict = {}

    @classmethod
    def get(cls, path, dtype: torch.dtype):
        key = (str(path), dtype)
        if key not in cls.cache:
            import transformers as tf
            tf.utils.logging.disable_progress_bar()
            tf.utils.logging.set_verbosity_error()
            try:
                with contextlib.redirect_stderr(io.StringIO()):     # the GGUF loader's progress bar
                    tok = tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
                    model = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                    dtype=dtype)
            except (ValueError, KeyError, OSError, NotImplementedError) as exc:
                raise EngineError(f"HF transformers could not load {path}: {str(exc).splitlines()[0]}",
                                  "use a model whose architecture transformers' GGUF loader supports") from None
            model.eval()
            cls.cache[key] = [model, tok, 0]
        entry = cls.cache[key]
        entry[2] += 1
        return entry[0], entry[1]

    @classmethod
    def release(cls, path, dtype) -> None:
        entry = cls.cache.get((str(path), dtype))
        if entry is not None:
            entry[2] -= 1
            if entry[2] <= 0:
                del cls.cache[(str(path), dtype)]


class HFTokenizer:
    """HF's tokenizer from the GGUF, with the contract kvbench's checks use."""

    def __init__(self, tok, eos_ids):
        self.tok, self.eos_ids = tok, frozenset(eos_ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tok(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> list[int]:
        text = self.tok.apply_chat_template([dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                            tokenize=False)
        return self.encode(text)


class HF(Adapter):
    name = "hf"
    capabilities = frozenset({CAP_LOGITS, CAP_CHUNKED_LOGITS, CAP_GENERATE, CAP_CHAT, CAP_PREFILL, CAP_KV_APPLIED,
                              CAP_TOPK_LOGPROBS})
    NATIVE = ("fp32", "bf16", "fp8", "hqq-int8", "quanto-int4", "hqq-int4", "hqq-int3", "quanto-int2", "hqq-int2")
    ROWS = {"fp32": "fp32", "bf16": "bf16"}            # HF has no cache in ggml's q8_0 format
    SAME_FORMAT = {"fp32": "fp32", "bf16": "bf16"}
    DETECTOR_REFERENCES = ("fp32", "bf16")

    @classmethod
    def check_available(cls) -> None:
        try:
            import transformers  # noqa: F401
        except ImportError as exc:
            raise EngineUnavailable(f"engine hf needs transformers, which is not importable ({exc})",
                                    "pip install -e '.[dev]'") from None

    def __init__(self, model: str, row: str, native: str, opts: dict | None = None, device: str = "cpu",
                 step: int = 8, residual: int | None = None, chunked: bool | None = None):
        super().__init__(model, row, native, opts, device)
        require_backend(native)
        self.check_available()
        if step < 1:
            raise EngineError(f"engine hf: step {step} must be >= 1")
        self.step, self.residual = step, residual or step
        # quantized caches see chunks of ``step``; a twin of a quantized row is fed the same way
        self.chunked = native in QUANTIZED if chunked is None else chunked
        self.dtype = DTYPES.get(native, torch.float32)
        self.weight_format = "bf16" if self.dtype == torch.bfloat16 else "f32"
        self.hf_model, tok = _Models.get(self.path, self.dtype)
        self.hf_model.to(device)
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        if self.spec.eos_id is not None:
            eos.add(int(self.spec.eos_id))
        self.tokenizer = HFTokenizer(tok, eos)
        self._last_cache = None

    # -- caches ---------------------------------------------------------------------------------
    def _new_cache(self):
        from transformers.cache_utils import DynamicCache, QuantizedCache
        native = self.kv_native_requested
        if native in DTYPES:
            return DynamicCache(config=self.hf_model.config)
        backend, bits = QUANTIZED[native]
        if backend == "fp8":
            return QuantizedCache("fp8", self.hf_model.config)
        return QuantizedCache(backend, self.hf_model.config, nbits=bits, residual_length=self.residual)

    @property
    def kv_applied_native(self) -> list[str]:
        if self._last_cache is None:
            self.prefill([0, 0])          # an observable needs a cache HF really built
        out = []
        for layer in self._last_cache.layers:
            kind = type(layer).__name__
            if kind.startswith("Quanto"):
                out.append(f"quanto-int{layer.nbits}")
            elif kind.startswith("HQQ"):
                out.append(f"hqq-int{layer.nbits}")
            elif kind.startswith("Fp8"):
                out.append("fp8")
            else:
                out.append({torch.float32: "fp32", torch.bfloat16: "bf16"}.get(layer.keys.dtype, str(layer.keys.dtype)))
        return out

    @property
    def kv_note(self) -> str | None:
        native = self.kv_native_requested
        if native == "bf16":
            return "HF caches hold the model's dtype: bf16 KV comes with bf16 weights and compute"
        if native == "fp8":
            return (f"HF fp8 cache: one e4m3 scale per tensor, frozen at the first update (the first chunk "
                    f"of {self.step} tokens); each chunk attends to its own K/V in full precision")
        if native in QUANTIZED:
            return (f"HF QuantizedCache residual window {self.residual}: each chunk of {self.step} tokens "
                    f"(decode: up to {self.residual - 1} recent tokens) attends to its own K/V in full "
                    "precision and to every earlier token through the quantized cache")
        return None

    # -- execution ------------------------------------------------------------------------------
    @torch.inference_mode()
    def _run(self, tokens: list[int], chunk: int | None, cache=None, all_logits: bool = True):
        if not tokens:
            raise EngineError("hf: no tokens to run", "pass at least one token")
        cache = cache if cache is not None else self._new_cache()
        start = cache.get_seq_length()
        if start + len(tokens) > self.ctx:
            raise ContextOverflowError(f"{start + len(tokens)} tokens exceed the engine's ctx of {self.ctx}",
                                       f"load it with ctx >= {start + len(tokens)}")
        step = chunk or (self.step if self.chunked else len(tokens))
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        out = []
        for s in range(0, len(tokens), step):
            o = self.hf_model(input_ids=ids[:, s:s + step], past_key_values=cache, use_cache=True,
                              logits_to_keep=0 if all_logits else 1)
            if all_logits or s + step >= len(tokens):
                out.append(o.logits[0].float().cpu())
        self._last_cache = cache
        return torch.cat(out), cache

    def logits(self, tokens: list[int], chunk: int | None = None) -> torch.Tensor:
        out, _ = self._run(list(tokens), chunk)
        if chunk is None:
            self.record(tokens, out)
        return out

    def prefill(self, tokens: list[int]) -> torch.Tensor:
        return self._run(list(tokens), None, all_logits=False)[0][-1]

    def generate(self, tokens: list[int], max_new_tokens: int, stop_at_eos: bool = True) -> list[int]:
        last, cache = self._run(list(tokens), None, all_logits=False)
        row = last[-1]
        new = []
        self.last_stop_reason = "length"
        for _ in range(max_new_tokens):
            t = int(row.argmax())
            new.append(t)
            if stop_at_eos and t in self.tokenizer.eos_ids:
                self.last_stop_reason = "eos"
                break
            if len(new) == max_new_tokens:
                break
            row = self._run([t], 1, cache=cache, all_logits=False)[0][-1]
        return new

    def topk_logprobs(self, tokens: list[int], k: int):
        from .topk import TopK
        return TopK.from_logits(self.logits(tokens), tokens, k, source="hf full logits")

    def twin(self, native: str) -> "HF":
        return HF(self.model_name, self.kv_dtype_requested, native, {"ctx": self.ctx}, self.device,
                  step=self.step, residual=self.residual, chunked=self.chunked)

    def describe(self) -> dict:
        return {**super().describe(), "step": self.step if self.chunked else None,
                "residual_length": self.residual if self.kv_native_requested in QUANTIZED else None}

    def close(self) -> None:
        if self.model is not None:
            _Models.release(self.path, self.dtype)
            self.hf_model = self._last_cache = None
        super().close()
