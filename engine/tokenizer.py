"""Tokenizer and chat templates, built from a GGUF's ``tokenizer.*`` metadata.

Contract: ``Tokenizer.from_gguf(g)`` turns the vocabulary stored in an open ``GGUFFile``
into an HF ``tokenizers`` (Rust) pipeline. ``tokenizer.ggml.model == "gpt2"`` is byte-level
BPE split first by the regexes that ``tokenizer.ggml.pre`` names (``PRE_SPLITS``, as
llama.cpp applies them); ``"llama"`` is SentencePiece-style BPE with byte fallback, merges
rebuilt from the scores (Gemma: from file order) when the file has none. Ids equal HF
transformers' GGUF loader, except where that loader ignores the pre type: for "smollm"
(StarCoder family) every digit is split off first, as in the model's own tokenizer.json
and llama.cpp, so "  1" is ["ĠĠ", "1"] where HF's loader gives ["Ġ", "Ġ", "1"]. Control
(type 3) and user-defined (type 4) tokens are matched whole in any text, so
``"<|im_start|>"`` is one id. ``encode`` adds BOS/EOS only when asked and the file says so;
``apply_chat_template`` renders the model's jinja template as HF's ``apply_chat_template``
does and encodes it with no extra BOS. Metadata the engine cannot handle raises
``UnsupportedModelError``; a missing or failing template raises ``ChatTemplateError``.

    tok = Tokenizer.from_gguf(open_gguf(path))
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable, Mapping

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from .errors import ChatTemplateError, UnsupportedModelError

# llama.cpp's token types (llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split regexes as written in the original tokenizer.json files; llama.cpp rewrites some of
# them for its own regex engine (e.g. "(?i:'s)" -> "'[sS]") but they split identically.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGIT = r"\p{N}"

# tokenizer.ggml.pre -> the regexes applied in turn (each splits the pieces of the last,
# keeping every match and every gap), as llama.cpp's llm_tokenizer_bpe does.
PRE_SPLITS: dict[str, tuple[str, ...]] = {
    **{k: (_GPT2,) for k in ("gpt2", "default", "olmo", "mpt", "jais", "trillion",
                             "granite-docling")},
    # StarCoder-family vocabularies: every digit alone, then the GPT-2 regex
    **{k: (_DIGIT, _GPT2) for k in ("smollm", "starcoder", "refact", "command-r",
                                    "codeshell", "exaone", "minerva")},
    **{k: (_LLAMA3,) for k in ("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe",
                               "falcon3", "falcon-h1", "pixtral", "chatglm-bpe", "lfm2")},
    **{k: (_QWEN2,) for k in ("qwen2", "stablelm2", "deepseek-r1-qwen", "hunyuan", "megrez")},
    "qwen35": (_QWEN35,),
    **{k: (_GPT4O,) for k in ("gpt-4o", "llama4", "minimax-m2")},
    "tekken": (_TEKKEN,),
}
# Llama-3's tokenizer.json sets ignore_merges: a piece that is itself a vocabulary entry
# is taken whole (llama.cpp does the same for these pre types).
IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3",
                 "falcon-h1", "pixtral", "gpt-4o", "llama4"}

# Token texts that end a turn in the chat formats we know (llama.cpp's end-of-generation list).
EOG_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>",
             "<|end|>", "<end_of_turn>", "<EOT>", "<|return|>", "<end_of_utterance>")


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for
    themselves, the other 68 bytes take the code points from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _sequential_splits(patterns: Iterable[str]) -> list:
    return [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in patterns]


class Tokenizer:
    """Text <-> ids for one model, plus its chat template. Build with ``from_gguf``."""

    def __init__(self, backend: RustTokenizer, *, tokens: list[str], token_types: list[int],
                 bos_id: int | None, eos_id: int | None, unk_id: int | None = None,
                 pad_id: int | None = None, add_bos: bool = False, add_eos: bool = False,
                 eot_ids: Iterable[int] = (), chat_template: str | None = None,
                 source: str = "<tokenizer>", kind: str = "gpt2", pre: str = "default"):
        self.backend = backend
        self.tokens = tokens
        self.token_types = token_types
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self.source = source
        self.kind, self.pre = kind, pre
        self.chat_template = chat_template or None
        special = {CONTROL, USER_DEFINED}
        eog = {i for i in (eos_id, *eot_ids) if i is not None}
        by_text = {t: i for i, t in enumerate(tokens) if not token_types or token_types[i] in special}
        eog.update(by_text[t] for t in EOG_TEXTS if t in by_text)
        self.eos_ids: frozenset[int] = frozenset(eog)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_gguf(cls, g, chat_template: str | None = None) -> "Tokenizer":
        """``g``: an open ``engine.gguf_io.GGUFFile`` (or a path to one)."""
        if isinstance(g, (str, os.PathLike)):
            from .gguf_io import open_gguf
            g = open_gguf(g)
        return cls.from_meta(g.meta, source=str(g.path), chat_template=chat_template)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], source: str = "<metadata>",
                  chat_template: str | None = None) -> "Tokenizer":
        """Build from a GGUF metadata dict (``GGUFFile.meta``); ``source`` names it in errors."""
        def bad(problem: str, fix: str = "convert the model with a current llama.cpp "
                "convert_hf_to_gguf.py") -> UnsupportedModelError:
            return UnsupportedModelError(source, problem, fix)

        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if kind is None or not tokens:
            raise bad("metadata has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens "
                      "missing)")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise bad("tokenizer.ggml.tokens is not a list of strings")
        n = len(tokens)
        types = meta.get("tokenizer.ggml.token_type") or []
        if types and len(types) != n:
            raise bad(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        types = [int(t) for t in types]

        def token_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            if value is None:
                return None
            if not isinstance(value, int) or not 0 <= value < n:
                raise bad(f"tokenizer.ggml.{key} = {value!r} is outside the vocabulary of {n}")
            return value

        ids = {k: token_id(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id",
                                        "padding_token_id", "eot_token_id", "eom_token_id")}
        pre = meta.get("tokenizer.ggml.pre") or "default"
        if kind == "gpt2":
            merges = meta.get("tokenizer.ggml.merges")
            if not merges:
                raise bad("byte-level BPE vocabulary without tokenizer.ggml.merges")
            if pre not in PRE_SPLITS:
                raise bad(f"tokenizer.ggml.pre {pre!r} is not supported (supported: "
                          f"{', '.join(sorted(PRE_SPLITS))})",
                          "add its split regex to engine.tokenizer.PRE_SPLITS")
            backend = _byte_level_bpe(tokens, types, merges, pre)
            add_bos_default = False
        elif kind == "llama":
            scores = meta.get("tokenizer.ggml.scores")
            merges = meta.get("tokenizer.ggml.merges")
            if not merges and (scores is None or len(scores) != n):
                raise bad("SentencePiece vocabulary without merges needs tokenizer.ggml.scores, "
                          "one per token")
            arch = str(meta.get("general.architecture") or "")
            backend = _sentencepiece_bpe(
                tokens, types, scores, merges,
                add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                unk_id=ids["unknown_token_id"], order_by_position=arch.startswith("gemma"))
            add_bos_default = True   # llama.cpp's default for SentencePiece vocabularies
        else:
            raise bad(f"tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, llama)",
                      "use a model with a byte-level BPE (gpt2) or SentencePiece (llama) vocabulary")
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        return cls(backend, tokens=tokens, token_types=types, bos_id=ids["bos_token_id"],
                   eos_id=ids["eos_token_id"], unk_id=ids["unknown_token_id"],
                   pad_id=ids["padding_token_id"],
                   add_bos=add_bos_default if add_bos is None else bool(add_bos),
                   add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
                   eot_ids=(ids["eot_token_id"], ids["eom_token_id"]),
                   chat_template=chat_template or meta.get("tokenizer.chat_template"),
                   source=source, kind=kind, pre=pre)

    # ----------------------------------------------------------------- text <-> ids
    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of ``text``; special tokens written in the text become their single ids.
        ``add_special_tokens`` adds BOS (and EOS) where the GGUF asks for them."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos and self.bos_id is not None:
                ids = [self.bos_id, *ids]
            if self.add_eos and self.eos_id is not None:
                ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        return self.tokens[i]

    def token_to_id(self, text: str) -> int | None:
        return self.backend.token_to_id(text)

    # ----------------------------------------------------------------- chat
    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def set_chat_template(self, template: str | None) -> None:
        """Install a fallback template (e.g. from a registry) for a model without one."""
        self.chat_template = template or None

    def _token_text(self, i: int | None) -> str | None:
        return None if i is None else self.tokens[i]

    def render_chat(self, messages: list[Mapping[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> str:
        """The prompt text the model's template makes of ``messages`` (HF semantics)."""
        if not self.chat_template:
            raise ChatTemplateError(f"{self.source}: the model has no tokenizer.chat_template",
                                    "pass a template (Tokenizer.from_gguf(g, chat_template=...) or "
                                    "set_chat_template()) or use raw encode()")
        if not messages:
            raise ChatTemplateError("chat template: no messages to render",
                                    "pass at least one {'role': ..., 'content': ...} message")
        chat = []
        for m in messages:
            if not isinstance(m, Mapping):
                raise ChatTemplateError(f"chat template: a message must be a dict, got "
                                        f"{type(m).__name__}", "pass {'role': ..., 'content': ...}")
            chat.append({k: v for k, v in m.items() if v is not None})
        variables = {"bos_token": self._token_text(self.bos_id),
                     "eos_token": self._token_text(self.eos_id),
                     "unk_token": self._token_text(self.unk_id),
                     "pad_token": self._token_text(self.pad_id),
                     "tools": None, "documents": None, **kwargs}
        template = _compile(self.chat_template, self.source)
        try:
            return template.render(messages=chat, add_generation_prompt=add_generation_prompt,
                                   **variables)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"{self.source}: chat template raised: {exc}",
                                    "check the messages (roles, order) against what the "
                                    "template accepts") from None
        except Exception as exc:  # noqa: BLE001 - a template is user code; report it in one line
            raise ChatTemplateError(f"{self.source}: chat template failed "
                                    f"({type(exc).__name__}: {exc})",
                                    "check the messages and extra template variables") from None

    def apply_chat_template(self, messages: list[Mapping[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Render, then encode with special tokens parsed and no BOS beyond the template's."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **kwargs))

    def __repr__(self) -> str:
        return (f"Tokenizer({self.kind}/{self.pre}, vocab={self.vocab_size}, bos={self.bos_id}, "
                f"eos={sorted(self.eos_ids)}, template={'yes' if self.chat_template else 'no'})")


# --------------------------------------------------------------------- builders
def _add_special(backend: RustTokenizer, tokens: list[str], types: list[int],
                 usable: Any = None) -> None:
    """Control tokens as special, user-defined as plain added tokens: both match whole."""
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
               if k == CONTROL and (usable is None or usable(t))]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types)
            if k == USER_DEFINED and (usable is None or usable(t))]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _byte_level_bpe(tokens: list[str], types: list[int], merges: list[str],
                    pre: str) -> RustTokenizer:
    spell = byte_alphabet()
    alphabet = set(spell.values())
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        # a token stored as raw text (some converters write added tokens that way) is
        # respelled in the byte alphabet so the BPE model can reach it
        if not set(t) <= alphabet:
            t = "".join(spell[b] for b in t.encode("utf-8"))
        vocab[t] = i
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        pairs.append((left, right))
    bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in IGNORE_MERGES)
    backend = RustTokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*_sequential_splits(PRE_SPLITS[pre]),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    # a control token spelled outside the byte alphabet cannot be a real byte-level token
    # (a converter mislabel); it stays reachable only through its id
    _add_special(backend, tokens, types, usable=lambda t: set(t) <= alphabet)
    return backend


def _merges_from_vocab(vocab: dict[str, int], priority: list[float]) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a token, best merge first.

    SentencePiece BPE merges the adjacent pair whose joined text has the highest priority
    (its score); a BPE merge list ranked that way reproduces it. Ties go to the longer left
    part, then the longer right part, then file order (HF's ``generate_merges`` order, so
    ids agree with HF's GGUF loader)."""
    ranked = []
    for text, i in vocab.items():
        n = len(text)
        p = -priority[i]
        for k in range(1, n):
            left, right = text[:k], text[k:]
            if left in vocab and right in vocab:
                ranked.append((p, -k, k - n, i, left, right))
    ranked.sort()
    return [(r[4], r[5]) for r in ranked]


def _sentencepiece_bpe(tokens: list[str], types: list[int], scores: list[float] | None,
                       merges: list[str] | None, *, add_space_prefix: bool,
                       unk_id: int | None, order_by_position: bool) -> RustTokenizer:
    space = "\u2581"
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        # Gemma stores runs of spaces as real spaces; the model sees them as "\u2581" runs
        if " " in t and not t.strip():
            t = t.replace(" ", space)
        vocab[t] = i
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        # Gemma's scores are not its merge order; the order of the tokens in the file is
        priority = [-i for i in range(len(tokens))] if order_by_position else list(scores)
        pairs = _merges_from_vocab(vocab, priority)
    unk = tokens[unk_id] if unk_id is not None else None
    bpe = models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True)
    backend = RustTokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=space, prepend_scheme="first" if add_space_prefix else "never", split=False)
    steps = [decoders.Replace(space, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    # a user-defined token is matched whole only where the vocabulary spells it as written
    _add_special(backend, tokens, types, usable=lambda t: vocab.get(t) is not None)
    return backend


# --------------------------------------------------------------------- chat templates
class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (HF's assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes; chat templates expect plain json.dumps
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(template: str, source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"{source}: chat template does not parse (line {exc.lineno}: "
                                f"{exc.message})", "fix or replace the template") from None
