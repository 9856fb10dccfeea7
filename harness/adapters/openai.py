"""Any OpenAI-compatible completions server: teacher-forced top-k log-probabilities, greedy chat.

Contract: ``OpenAI(model, row, "server", opts, url="http://host:port")`` talks to a running
server over HTTP (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``; stdlib only).
The server's KV cache type is whatever it was started with: the adapter can neither set nor
read it (no ``kv_applied``), so the harness cannot see a request being ignored from the
server's side; the "dtype changed nothing" detector compares the rows of one run instead
(two rows served bit for bit alike are flagged). The model's tokens are the GGUF's own
(kvbench's tokenizer of ``model``), sent as text; every scoring call checks that the server
echoed the same tokens, so a server that serves another model is an error, not a number.

- ``topk_logprobs(tokens, k)``: ``echo`` + ``logprobs=k`` + one generated token: per position
  the server's k most likely next tokens (keyed by text: tokens with the same text form one
  bucket) and the rest as one tail bucket (``harness.adapters.topk``). Servers differ in
  which entry belongs to which position: the OpenAI convention (entry i is the distribution
  that predicted token i, vLLM) or entry i the distribution after token i (llama-cpp-python
  with a BOS-less model). When the adapter connects it learns which, from the server's own
  greedy tokens (each must be the top-1 of the distribution that produced it); a server for
  which neither lines up is refused.
- ``generate(tokens, n)``: greedy completion of the templated prompt (temperature 0, every
  penalty off: ``GREEDY``); the
  text comes back and is tokenized with the model's tokenizer (+ EOS when the server
  stopped there). ``chat(messages, n)``: greedy through the server's own chat template.

Bad input is one line, exit 2: a server that cannot be reached, one without log-probabilities
(llama-cpp-python started without ``--logits_all true``), one whose tokens do not match.

    eng = OpenAI("smollm2-135m", "q8_0", "server", {"ctx": 4096}, url="http://127.0.0.1:8000")
    tk = eng.topk_logprobs(ids, 10)
"""
from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

from engine.errors import EngineError

from ..engine_api import CAP_CHAT, CAP_GENERATE, CAP_TOPK_LOGPROBS
from .base import Adapter, EngineUnavailable

CONTROL = 3                     # llama.cpp's token type of control tokens (engine.tokenizer)

START_HINT = ("start it first, e.g. python -m llama_cpp.server --model FILE --logits_all true "
              "--port 8000, and pass --engine openai://HOST:PORT")
PROBE = [{"role": "user", "content": "Name three colours of the rainbow."}]
TIMEOUT = 600
# greedy means argmax of the model's logits: no sampling, and no penalty a server applies by
# default (llama-cpp-python's repeat_penalty is 1.1 unless told otherwise: its "greedy" answer
# to "What is the capital of France?" leaves the argmax at token 11); vLLM's name is
# repetition_penalty. Servers that do not know a parameter ignore it.
GREEDY = {"temperature": 0.0, "top_p": 1.0, "seed": 0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
          "repeat_penalty": 1.0, "repetition_penalty": 1.0}


def _post(url: str, path: str, body: dict | None = None, timeout: float = TIMEOUT) -> dict:
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        try:
            j = json.loads(detail)
            detail = (j.get("error") or {}).get("message") if isinstance(j.get("error"), dict) else j.get("detail", j)
        except ValueError:
            pass
        raise _ServerSaid(exc.code, " ".join(str(detail).split())[:300]) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise EngineUnavailable(f"cannot reach the OpenAI-compatible server at {url} ({reason})", START_HINT) from None
    except ValueError:
        raise EngineUnavailable(f"{url}{path} did not answer JSON: not an OpenAI-compatible server",
                                START_HINT) from None


def _no_logprobs(url: str, said: str) -> EngineUnavailable:
    return EngineUnavailable(f"the server at {url} does not return log-probabilities ({said})",
                             "start it with them on (llama-cpp-python: --logits_all true; vLLM: "
                             "--max-logprobs >= k), or run without --engine openai://")


class _ServerSaid(EngineError):
    def __init__(self, code: int, message: str):
        self.code, self.message = code, message
        super().__init__(f"server answered HTTP {code}: {message}")


def _server_text(tokenizer, t: int) -> str:
    """A token's text as servers key it: control tokens (``<|im_end|>``) render empty, bytes that
    are not whole UTF-8 characters are dropped (llama-cpp-python: ``errors="ignore"``)."""
    if tokenizer.token_types and tokenizer.token_types[t] == CONTROL:
        return ""
    return tokenizer.decode([t]).replace("\ufffd", "")


def _text_keys(tokenizer) -> dict[str, tuple[int, ...]]:
    """Text of every token as a server keys it -> the ids that share that text (one bucket)."""
    out: dict[str, list[int]] = {}
    for i in range(tokenizer.vocab_size):
        out.setdefault(_server_text(tokenizer, i), []).append(i)
    return {k: tuple(v) for k, v in out.items()}


class OpenAI(Adapter):
    name = "openai"
    capabilities = frozenset({CAP_GENERATE, CAP_CHAT, CAP_TOPK_LOGPROBS})
    weight_format = "server"
    NATIVE = ("server",)
    ROWS = {"fp32": "server", "bf16": "server", "q8_0": "server"}
    _probed: dict[str, dict] = {}

    @classmethod
    def check_available(cls, url: str) -> dict:
        """Reach the server and list its models (EngineUnavailable when it cannot be reached)."""
        got = _post(url, "/v1/models", timeout=10)
        models = [m.get("id") for m in got.get("data") or [] if isinstance(m, dict)]
        if not models:
            raise EngineUnavailable(f"{url}/v1/models lists no model: not a usable OpenAI-compatible server",
                                    START_HINT)
        if url not in cls._probed:       # can it score a prompt at all? (echo + logprobs)
            body = {"model": models[0], "prompt": "The sky is", "max_tokens": 1, "temperature": 0.0,
                    "echo": True, "logprobs": 1}
            try:
                choice = (_post(url, "/v1/completions", body).get("choices") or [{}])[0]
            except _ServerSaid as exc:
                raise _no_logprobs(url, exc.message) from None
            tops = (choice.get("logprobs") or {}).get("top_logprobs") or []
            if not any(tops):
                raise _no_logprobs(url, "its completion carried no top_logprobs")
        return {"models": models}

    def __init__(self, model: str, row: str, native: str = "server", opts: dict | None = None,
                 device: str = "cpu", url: str = ""):
        super().__init__(model, row, native, opts, device)
        from engine.engine import _tokenizer_for
        from engine.gguf_io import open_gguf
        self.url = url.rstrip("/")
        self.server_model = self.check_available(self.url)["models"][0]
        self.tokenizer = _tokenizer_for(open_gguf(self.path))
        eos = set(self.tokenizer.eos_ids or ())
        if self.spec.eos_id is not None:
            eos.add(int(self.spec.eos_id))
        self.eos = sorted(eos)
        self._keys = None
        self.convention = self._probe()

    # -- HTTP ---------------------------------------------------------------------------------
    def _complete(self, prompt: str, **kw) -> dict:
        body = {"model": self.server_model, "prompt": prompt, **GREEDY, **kw}
        try:
            got = _post(self.url, "/v1/completions", body)
        except _ServerSaid as exc:
            if kw.get("logprobs") is not None and "logprob" in exc.message.lower():
                raise self._no_logprobs(exc.message) from None
            raise EngineError(f"openai server {self.url}: HTTP {exc.code}: {exc.message}") from None
        choices = got.get("choices") or []
        if not choices:
            raise EngineError(f"openai server {self.url}: a completion without choices")
        return choices[0]

    def _no_logprobs(self, said: str) -> EngineUnavailable:
        return _no_logprobs(self.url, said)

    # -- teacher-forced top-k -----------------------------------------------------------------
    def _score(self, tokens: list[int], k: int):
        """The server's echo of ``tokens`` + one generated token, aligned token by token: returns
        (entries, token_logprobs, at) where ``at[i]`` is the entry of our token i (None: the
        server left it out of the echo, as llama-cpp-python does with every BOS id) and
        ``at[len(tokens)]`` the generated token's entry."""
        choice = self._complete(self.tokenizer.decode(tokens), max_tokens=1, echo=True, logprobs=k)
        lp = choice.get("logprobs")
        if not lp or not lp.get("top_logprobs") or all(e is None for e in lp["top_logprobs"]):
            raise self._no_logprobs("its completion carried no top_logprobs")
        texts, tops = lp.get("tokens") or [], lp["top_logprobs"]
        at, j = [], 0
        for i, t in enumerate(tokens):
            mine = _server_text(self.tokenizer, t)
            if j < len(texts) and texts[j].replace("\ufffd", "") == mine:
                at.append(j)
                j += 1
            elif t == self.spec.bos_id or mine == "":
                at.append(None)          # a BOS / control token the server did not echo
            else:
                raise EngineError(f"the server at {self.url} tokenized the prompt differently from "
                                  f"{self.model_name} (at token {i} of {len(tokens)}: server "
                                  f"{texts[j] if j < len(texts) else 'nothing'!r}, model {mine!r}): "
                                  f"is it serving {self.model_name}?", "start the server on the same GGUF")
        at.append(j if j < len(tops) else None)
        return tops, lp.get("token_logprobs") or [], at

    def _entry_for(self, at: list, p: int, convention: str) -> int | None:
        """The entry holding the distribution at position p (the one that predicts token p+1)."""
        return at[p + 1] if convention == "openai" else at[p]

    def _probe(self) -> str:
        """Which entry holds which position's distribution, learnt from the server's greedy
        tokens on a chat-templated prompt (the corpus of every check is chat-templated too)."""
        if self._probed.get(self.url, {}).get("convention"):
            return self._probed[self.url]["convention"]
        prompt = list(self.tokenizer.apply_chat_template(PROBE, add_generation_prompt=True))
        greedy = self._complete(self.tokenizer.decode(prompt), max_tokens=8)
        cont = self.tokenizer.encode(greedy.get("text") or "")[:6]
        if len(cont) < 2:
            raise EngineError(f"the server at {self.url} answered the probe prompt with {len(cont)} tokens",
                              "check the server's model and settings")
        seq = prompt + cont
        tops, _, at = self._score(seq, 1)
        verdict = {}
        for name in ("openai", "after-token"):
            ok = []
            for q in range(len(prompt), len(seq)):      # seq[q] was the greedy choice after seq[:q]
                i = self._entry_for(at, q - 1, name)
                e = tops[i] if i is not None and i < len(tops) else None
                ok.append(bool(e) and max(e.items(), key=lambda kv: kv[1])[0] == _server_text(self.tokenizer, seq[q]))
            verdict[name] = all(ok)
        conv = next((n for n, v in verdict.items() if v), None)
        if conv is None:
            raise EngineUnavailable(f"the server at {self.url} gives log-probabilities that do not line up "
                                    "with its own greedy tokens under either convention",
                                    "check that it serves the same model, deterministically (temperature 0)")
        self._probed.setdefault(self.url, {})["convention"] = conv
        return conv

    def topk_logprobs(self, tokens: list[int], k: int):
        from .topk import TopK
        tokens = list(tokens)
        tops, token_lps, at = self._score(tokens, k)
        if self._keys is None:
            self._keys = _text_keys(self.tokenizer)
        buckets, logprobs, target, inexact, unknown, missing, shared = [], [], [], [], 0, 0, 0
        for p in range(len(tokens)):
            i = self._entry_for(at, p, self.convention)
            e = tops[i] if i is not None and i < len(tops) else None
            if not e:        # not scored: the server's first entry, or a token it left out
                buckets.append(None)
                logprobs.append(None)
                inexact.append(None)
                target.append(math.nan)
                missing += 1
                continue
            b, lps, rough = [], [], []
            for text, lp in sorted(e.items(), key=lambda kv: -kv[1]):
                ids = self._keys.get(text.replace("\ufffd", ""))
                if ids is None:
                    unknown += 1          # names no token of the model: its mass stays in the tail
                    continue
                # several tokens share this text and the server kept one value: it counts for top-1
                # containment, its mass stays in the tail bucket on both sides (the partition holds)
                shared += len(ids) > 1
                b.append(ids)
                lps.append(float(lp))
                rough.append(len(ids) > 1)
            buckets.append(b)
            logprobs.append(lps)
            inexact.append(rough)
            nxt = at[p + 1] if p + 1 < len(tokens) else None
            if p + 1 >= len(tokens):
                target.append(math.nan)
            elif self.convention == "openai" and nxt is not None and nxt < len(token_lps) and token_lps[nxt] is not None:
                target.append(float(token_lps[nxt]))
            else:      # only when the next token is one of this position's entries, alone with its text
                want = _server_text(self.tokenizer, tokens[p + 1])
                target.append(float(e[want]) if want in e and len(self._keys.get(want, ())) == 1 else math.nan)
        notes = [f"server convention: {self.convention}"]
        if missing:
            notes.append(f"{missing} of {len(tokens)} positions not scored by the server (not compared)")
        if unknown:
            notes.append(f"{unknown} top-k entries named no token of {self.model_name}: left in the tail bucket")
        if shared:
            notes.append(f"{shared} top-k entries whose text names several tokens (control tokens, partial "
                         "UTF-8): left in the tail bucket")
        tk = TopK(buckets, logprobs, target, k, source=f"openai server {self.url} (top-{k} + tail)", notes=notes,
                  inexact=inexact)
        self.record(tokens, tk)
        return tk

    # -- greedy text ----------------------------------------------------------------------------
    def generate(self, tokens: list[int], max_new_tokens: int, stop_at_eos: bool = True) -> list[int]:
        choice = self._complete(self.tokenizer.decode(list(tokens)), max_tokens=int(max_new_tokens))
        new = self.tokenizer.encode(choice.get("text") or "")[:max_new_tokens]
        stopped = choice.get("finish_reason") == "stop"
        if stopped and not stop_at_eos:
            raise EngineError(f"the server at {self.url} stopped at EOS after {len(new)} tokens and cannot be "
                              "told not to", "use a check that stops at EOS")
        self.last_stop_reason = "eos" if stopped else "length"
        if stopped and self.eos and len(new) < max_new_tokens:
            new.append(self.eos[0])
        return new

    def chat(self, messages: list[dict], max_new_tokens: int) -> str:
        """Greedy answer through the server's own chat template (``/v1/chat/completions``)."""
        body = {"model": self.server_model, "messages": [dict(m) for m in messages], **GREEDY,
                "max_tokens": int(max_new_tokens)}
        try:
            got = _post(self.url, "/v1/chat/completions", body)
        except _ServerSaid as exc:
            raise EngineError(f"openai server {self.url}: HTTP {exc.code}: {exc.message}") from None
        return ((got.get("choices") or [{}])[0].get("message") or {}).get("content") or ""

    @property
    def kv_applied_native(self) -> list[str]:
        return []                      # the server does not say which KV type it holds

    @property
    def kv_note(self) -> str | None:
        return "KV type set when the server was started; not observable through the API"

    def describe(self) -> dict:
        return {**super().describe(), "url": self.url, "server_model": self.server_model,
                "logprob_convention": self.convention}
