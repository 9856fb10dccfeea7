"""llama.cpp through llama-cpp-python's C API: the same GGUF, llama.cpp's own KV cache types.

Contract: ``LlamaCpp(model, row, native, opts)`` loads the model's GGUF with llama.cpp (mmap;
one model shared by every context of the process, so a ``twin`` costs a KV cache, not
weights) and makes a context of ``opts["ctx"]`` cells with ``type_k = type_v = native``
(``f32``, ``f16``, ``bf16``, ``q8_0``, ``q5_1``, ``q5_0``, ``q4_1``, ``q4_0``, ``iq4_nl``), or
``type_k/type_v`` for separate K and V types (llama.cpp's ``-ctk``/``-ctv``: ``q8_0/bf16``; the
row ``k-q8_0.v-bf16`` maps there by default), and flash attention on (llama.cpp needs it for a quantized V cache; ``flash_attn=False`` is
refused for those). Every call clears the cache first. ``logits`` asks llama.cpp for the
logits of every position (``chunk``: decode batches of that many tokens, the noise floor);
``generate`` is greedy on llama.cpp's logits; tokens and the chat template are llama.cpp's
own (llama-cpp-python's Jinja2 chat formatter, as its server renders the GGUF's template).

Observables come from llama.cpp, not from the request: ``kv_applied_native`` is the K and V
type its KV cache logged when the context was made, ``kv_bytes`` the K and V buffer sizes
the same line reports (0.01 MiB resolution), ``state_bytes_per_token`` what one more cached
token adds to its serialised state (exact: K and V rows of every layer + the cell's metadata).
``KVBENCH_FAULT=llamacpp_keep_f16`` plants the seed's bug on this real engine: the requested
type is dropped where it is handed to llama.cpp, which keeps its default f16.

    eng = LlamaCpp("smollm2-135m", "q8_0", "q8_0", {"ctx": 4096})
    eng.kv_applied_native[0], eng.kv_bytes, eng.logits(ids).shape
"""
from __future__ import annotations

import ctypes
import os
import re
import threading

import numpy as np
import torch

from engine import settings
from engine.errors import ContextOverflowError, EngineError

from ..engine_api import (CAP_CHAT, CAP_CHUNKED_LOGITS, CAP_GENERATE, CAP_KV_APPLIED, CAP_KV_BYTES,
                          CAP_LOGITS, CAP_PREFILL, CAP_TOPK_LOGPROBS)
from .base import Adapter, EngineUnavailable, KVNotSupported

FIX = "build it: make llama-cpp (llama-cpp-python from its PyPI sdist, ~6 min on 2 cores once)"
# ggml_type ids (ggml.h) of the KV cache types llama.cpp accepts, widest first
GGML_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q5_1": 7, "q5_0": 6, "q4_1": 3, "q4_0": 2,
              "iq4_nl": 20}
QUANTIZED = {"q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"}
FLASH_ENABLED = 1               # LLAMA_FLASH_ATTN_TYPE_ENABLED
_KV_LINE = re.compile(r"size = .*\(\s*(\d+) cells,\s*(\d+) layers.*K \((\w+)\):\s*([0-9.]+) MiB, "
                      r"V \((\w+)\):\s*([0-9.]+) MiB")


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise EngineUnavailable(f"engine llama.cpp needs the llama_cpp package (llama-cpp-python), "
                                f"which is not importable here ({exc})", FIX) from None
    return llama_cpp


class _Log:
    """llama.cpp's log, captured (not printed): the KV cache's line is the applied-type observable."""
    lock = threading.Lock()
    lines: list[str] = []                   # the last non-debug lines (for error messages)
    capture: list[str] | None = None        # every line while a context is being made
    callback = None
    DEBUG = 1                               # GGML_LOG_LEVEL_DEBUG

    @classmethod
    def install(cls, L) -> None:
        if cls.callback is None:
            @L.llama_log_callback
            def _cb(level, text, user):
                line = text.decode("utf-8", "replace")
                if cls.capture is not None:
                    cls.capture.append(line)
                if level != cls.DEBUG:
                    cls.lines.append(line)
                    del cls.lines[:-50]
            cls.callback = _cb               # ctypes callbacks must outlive their registration
            L.llama_log_set(cls.callback, ctypes.c_void_p(0))
            L.llama_backend_init()


class _Model:
    """One loaded GGUF (llama_model + vocab), shared by every context made of it."""
    cache: dict[str, "_Model"] = {}

    def __init__(self, L, path: str):
        self.L, self.path, self.users = L, path, 0
        params = L.llama_model_default_params()
        self.ptr = L.llama_model_load_from_file(path.encode(), params)
        if not self.ptr:
            raise EngineError(f"llama.cpp could not load {path}: " + _last_error(),
                              "check the file with python -m engine info")
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.eog = frozenset(t for t in range(self.n_vocab) if L.llama_vocab_is_eog(self.vocab, t))
        tmpl = L.llama_model_chat_template(self.ptr, None)
        self.chat_template = tmpl.decode("utf-8") if tmpl else None

    @classmethod
    def get(cls, L, path: str) -> "_Model":
        m = cls.cache.get(path)
        if m is None:
            m = cls.cache[path] = cls(L, path)
        m.users += 1
        return m

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0 and self.ptr:
            self.L.llama_model_free(self.ptr)
            self.ptr = None
            self.cache.pop(self.path, None)


def _last_error() -> str:
    errs = [ln.strip() for ln in _Log.lines if ln.strip()]
    return errs[-1] if errs else "no message"


class LlamaCppTokenizer:
    """llama.cpp's tokenizer and llama-cpp-python's Jinja2 rendering of the GGUF's template."""

    def __init__(self, m: _Model):
        self.m, self.L = m, m.L
        self.eos_ids = m.eog
        self._chat = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        raw = text.encode("utf-8")
        n_max = len(raw) + 16
        buf = (self.L.llama_token * n_max)()
        n = self.L.llama_tokenize(self.m.vocab, raw, len(raw), buf, n_max, add_special_tokens, True)
        if n < 0:
            n_max = -n
            buf = (self.L.llama_token * n_max)()
            n = self.L.llama_tokenize(self.m.vocab, raw, len(raw), buf, n_max, add_special_tokens, True)
        return list(buf[:n])

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out, buf = b"", ctypes.create_string_buffer(256)
        for t in ids:
            n = self.L.llama_token_to_piece(self.m.vocab, int(t), buf, 256, 0, not skip_special_tokens)
            out += buf.raw[:max(n, 0)]
        return out.decode("utf-8", "replace")

    def _piece(self, t: int) -> str:
        return self.decode([t]) if t >= 0 else ""

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> list[int]:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        from engine.errors import ChatTemplateError
        if not self.m.chat_template:
            raise ChatTemplateError(f"{self.m.path}: the model has no tokenizer.chat_template",
                                    "use a model with a chat template")
        L, v = self.L, self.m.vocab
        fmt = Jinja2ChatFormatter(self.m.chat_template, eos_token=self._piece(L.llama_vocab_eos(v)),
                                  bos_token=self._piece(L.llama_vocab_bos(v)),
                                  add_generation_prompt=add_generation_prompt)
        res = fmt(messages=[dict(m) for m in messages])
        # as llama-cpp-python's server: BOS where the vocabulary asks for it, unless the template added it
        return self.encode(res.prompt, add_special_tokens=not res.added_special)


class LlamaCpp(Adapter):
    name = "llama.cpp"
    capabilities = frozenset({CAP_LOGITS, CAP_CHUNKED_LOGITS, CAP_GENERATE, CAP_CHAT, CAP_PREFILL,
                              CAP_KV_APPLIED, CAP_KV_BYTES, CAP_TOPK_LOGPROBS})
    weight_format = "gguf"              # llama.cpp computes on the file's own (quantized) types
    NATIVE = tuple(GGML_TYPES)
    ROWS = {"fp32": "f32", "bf16": "bf16", "q8_0": "q8_0"}
    SAME_FORMAT = {"f32": "fp32", "bf16": "bf16", "q8_0": "q8_0"}
    DETECTOR_REFERENCES = ("f32", "f16", "bf16", "q8_0")
    BATCH = 512

    @classmethod
    def check_available(cls) -> None:
        import_llama_cpp()

    @classmethod
    def valid_native(cls, native: str) -> bool:
        """One type (K and V), or ``k/v`` with two different ones (``-ctk k -ctv v``)."""
        k, sep, v = native.partition("/")
        return native in cls.NATIVE or (bool(sep) and k in cls.NATIVE and v in cls.NATIVE and k != v)

    @classmethod
    def native_of(cls, row: str) -> str | None:
        """A uniform row by ``ROWS``; a row whose K and V formats differ on every layer alike
        (``k-q8_0.v-bf16``) as ``q8_0/bf16``; per-layer rows have no llama.cpp setting (None)."""
        if row in cls.ROWS:
            return cls.ROWS[row]
        from engine import kv_spec
        from engine.errors import ConfigError
        try:
            spec = kv_spec.parse(row)
        except ConfigError:
            return None
        if spec.layers:
            return None
        k, v = cls.ROWS.get(spec.k), cls.ROWS.get(spec.v)
        return f"{k}/{v}" if k and v and k != v else None

    def references(self) -> list[str]:
        """As ``Adapter.references``; for ``k/v`` every setting down to the narrower of the two,
        the two uniform ones included (K or V ignored leaves the logits of one of them)."""
        if "/" not in self.kv_native_requested:
            return super().references()
        i = max(self.NATIVE.index(t) for t in self.kv_native_requested.split("/"))
        return [n for n in self.NATIVE[:i + 1] if n in self.DETECTOR_REFERENCES]

    def __init__(self, model: str, row: str, native: str, opts: dict | None = None, device: str = "cpu",
                 flash_attn: bool = True, threads: int | None = None, _shared: _Model | None = None):
        super().__init__(model, row, native, opts, device)
        L = self.L = import_llama_cpp()
        if device != "cpu" and not L.llama_supports_gpu_offload():
            raise EngineUnavailable(f"engine llama.cpp: device {device!r} asked, but this llama-cpp-python "
                                    "build has no GPU backend", "pass --device cpu, or rebuild it with "
                                    "CMAKE_ARGS=-DGGML_CUDA=on")
        if native.partition("/")[2 if "/" in native else 0] in QUANTIZED and not flash_attn:
            raise KVNotSupported(f"llama.cpp needs flash attention for a {native} V cache",
                                 "keep flash_attn on")
        _Log.install(L)
        self.flash_attn = flash_attn
        self.threads = threads or os.cpu_count() or 1
        self.m = _shared or _Model.get(L, str(self.path))
        if _shared is not None:
            _shared.users += 1
        self.tokenizer = LlamaCppTokenizer(self.m)
        self.n_vocab = self.m.n_vocab
        passed = native
        fault = settings.get("KVBENCH_FAULT")
        if fault and fault[0] == "llamacpp_keep_f16" and _shared is None:
            passed = "f16"              # planted (not in the detector's twins): the request never reaches llama.cpp
        self._make_context(passed)
        self._per_cell = None

    def _make_context(self, native: str) -> None:
        L = self.L
        p = L.llama_context_default_params()
        p.n_ctx = self.ctx
        p.n_batch = p.n_ubatch = min(self.BATCH, self.ctx)
        p.n_seq_max = 1
        k, _, v = native.partition("/")
        p.type_k, p.type_v = GGML_TYPES[k], GGML_TYPES[v or k]
        p.flash_attn_type = FLASH_ENABLED if self.flash_attn else 0
        p.n_threads = p.n_threads_batch = self.threads
        p.no_perf = True
        with _Log.lock:
            _Log.capture = logged = []
            try:
                self.ctx_ptr = L.llama_init_from_model(self.m.ptr, p)
            finally:
                _Log.capture = None
        if not self.ctx_ptr:
            raise KVNotSupported(f"llama.cpp refused a context with {native} KV "
                                 f"(flash attention {'on' if self.flash_attn else 'off'}): " + _last_error(),
                                 "pick another --engine-kv type")
        found = [m for m in map(_KV_LINE.search, logged) if m]
        if not found:
            raise EngineError("llama.cpp did not log its KV cache (the 'llama_kv_cache: size = ...' "
                              "line): cannot observe the applied KV type",
                              "use the llama-cpp-python version pinned in the Makefile (LLAMA_CPP_SPEC)")
        cells, layers, k, k_mib, v, v_mib = found[-1].groups()
        self.n_cells, self._kv_layers, self._kv_types = int(cells), int(layers), (k, v)
        self._kv_mib = float(k_mib) + float(v_mib)
        self.n_batch = p.n_batch

    # -- observables --------------------------------------------------------------------------
    @property
    def kv_applied_native(self) -> list[str]:
        k, v = self._kv_types
        return [k if k == v else f"{k}/{v}"] * self._kv_layers

    @property
    def kv_bytes(self) -> int:
        """The K and V buffers llama.cpp says it allocated (its KV log line, 0.01 MiB resolution)."""
        return round(self._kv_mib * 2**20)

    @property
    def state_bytes_per_token(self) -> int:
        """What one more cached token adds to llama.cpp's own serialised state: every layer's K
        and V rows plus the cell's position and sequence (a second, exact observable)."""
        if self._per_cell is None:
            sizes = []
            for n in (1, 2):
                self._clear()
                self._run(list(range(n)), "last")
                sizes.append(self.L.llama_state_seq_get_size(self.ctx_ptr, 0))
            self._clear()
            self._per_cell = sizes[1] - sizes[0]
        return self._per_cell

    # -- execution ----------------------------------------------------------------------------
    def _clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx_ptr), True)

    def _run(self, tokens: list[int], outputs: str | None, start: int = 0, chunk: int | None = None):
        """Decode ``tokens`` at positions start.. in batches of ``chunk``; the logits of every
        position (``outputs="all"``), of the last one (``"last"``) or none, as [n, vocab]."""
        if not tokens:
            raise EngineError("llama.cpp: no tokens to decode", "pass at least one token")
        if start + len(tokens) > self.n_cells:
            raise ContextOverflowError(f"{start + len(tokens)} tokens exceed llama.cpp's context of "
                                       f"{self.n_cells} cells", f"load it with ctx >= {start + len(tokens)}")
        L, step = self.L, min(chunk or self.n_batch, self.n_batch)
        out = []
        for s in range(0, len(tokens), step):
            part = tokens[s:s + step]
            batch = L.llama_batch_init(len(part), 0, 1)
            try:
                for i, t in enumerate(part):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(t), start + s + i, 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = outputs == "all" or (outputs == "last" and s + i == len(tokens) - 1)
                batch.n_tokens = len(part)
                rc = L.llama_decode(self.ctx_ptr, batch)
                if rc != 0:
                    raise EngineError(f"llama.cpp llama_decode returned {rc} at position {start + s}: "
                                      + _last_error(), "see llama.cpp's message")
                n_out = len(part) if outputs == "all" else int(outputs == "last" and s + len(part) == len(tokens))
                if n_out:
                    ptr = L.llama_get_logits(self.ctx_ptr)
                    out.append(np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy())
            finally:
                L.llama_batch_free(batch)
        return torch.from_numpy(np.concatenate(out)) if out else None

    def logits(self, tokens: list[int], chunk: int | None = None) -> torch.Tensor:
        self._clear()
        out = self._run(list(tokens), "all", chunk=chunk)
        if chunk is None:
            self.record(tokens, out)
        return out

    def prefill(self, tokens: list[int]) -> torch.Tensor:
        self._clear()
        return self._run(list(tokens), "last")[0]

    def generate(self, tokens: list[int], max_new_tokens: int, stop_at_eos: bool = True) -> list[int]:
        self._clear()
        row = self._run(list(tokens), "last")[0]
        new, pos = [], len(tokens)
        self.last_stop_reason = "length"
        for _ in range(max_new_tokens):
            t = int(row.argmax())
            new.append(t)
            if stop_at_eos and t in self.tokenizer.eos_ids:
                self.last_stop_reason = "eos"
                break
            if len(new) == max_new_tokens:
                break
            row = self._run([t], "last", start=pos)[0]
            pos += 1
        return new

    def topk_logprobs(self, tokens: list[int], k: int):
        from .topk import TopK
        return TopK.from_logits(self.logits(tokens), tokens, k, source="llama.cpp full logits")

    # -- the detector's twin ------------------------------------------------------------------
    def twin(self, native: str) -> "LlamaCpp":
        need = max((len(t) for t, _ in self.tape), default=1)
        opts = {"ctx": max(256, need)}
        return LlamaCpp(self.model_name, self.kv_dtype_requested, native, opts, self.device,
                        flash_attn=self.flash_attn, threads=self.threads, _shared=self.m)

    def close(self) -> None:
        if getattr(self, "ctx_ptr", None):
            self.L.llama_free(self.ctx_ptr)
            self.ctx_ptr = None
            self.m.release()
        super().close()
