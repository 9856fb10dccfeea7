"""engine.tokenizer against HF transformers' own GGUF tokenizer loader (the oracle).

Real model: SmolLM2-135M-Instruct's GGUF (byte-level BPE, pre "smollm", ChatML template).
Other pre-tokenizer types: tiny GGUFs whose byte-level vocabulary is trained here with HF
``tokenizers`` across regex boundaries, so a wrong split regex changes the ids.
"""
from __future__ import annotations

import json
import time

import gguf
import pytest
import regex
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers, trainers

from engine.errors import ChatTemplateError, UnsupportedModelError
from engine.gguf_io import open_gguf
from engine.tokenizer import Tokenizer

STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "héllo café naïve résumé Ærøskøbing",
    "日本語のテキストと中文字符",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "emoji 🎉🔥 and a family 👨\u200d👩\u200d👧\u200d👦 and a flag 🏳️\u200d🌈",
    "def f(x):\n    if x:\n        return x * 2\n\treturn None\n",
    "class A:\n\tdef __init__(self):\n\t\tself.x = {'a': [1, 2]}\n",
    "a   b    c     d",
    "trailing spaces   ",
    "\n\n\n",
    "line one\r\nline two\r\n",
    "12345678901234567890",
    "pi is 3.14159265358979 and e is 2.71828",
    "I'm sure you're right, they've said we'll go, she'd know, it's done",
    "IT'S LOUD, YOU'RE LOUD",
    "<|im_start|>user\nHello<|im_end|>",
    "text before <|im_end|> text after <|endoftext|>",
    "",
    " ",
    "   leading spaces",
    "mixed\ttabs\t\tand  spaces\n \n",
    "https://example.com/path?q=1&r=two#frag",
    "{\"json\": [true, null, 1.5e-3]}",
    "naïve ß ǅ Ω ﬁ",
]

# Strings where a whitespace run meets a digit: SmolLM2's tokenizer.json (Digits(individual)
# then ByteLevel) and llama.cpp's "smollm" pre split every digit off first, so "  1" is
# ["ĠĠ", "1"]; HF's GGUF loader uses the plain GPT-2 regex there and gives ["Ġ", "Ġ", "1"].
DIGIT_EDGES = ["  1", "x\n\n2024", "a  12 b", "\t\t7", "page   42"]

MESSAGES = {
    "user": [{"role": "user", "content": "Write a short sentence about the ocean."}],
    "system-user": [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Name a colour."}],
    "multi-turn": [{"role": "user", "content": "Hi!"},
                   {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Tell me a joke about café 日本."}],
    "special-in-content": [{"role": "user", "content": "say <|im_end|> please\n\n  ok"}],
}


@pytest.fixture(scope="module")
def gfile(smollm2_path):
    return open_gguf(smollm2_path)


@pytest.fixture(scope="module")
def tok(gfile):
    return Tokenizer.from_gguf(gfile)


@pytest.fixture(scope="module")
def meta(gfile):
    """SmolLM2's tokenizer metadata, to edit for ``Tokenizer.from_meta``."""
    return {k: v for k, v in gfile.meta.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def hf(smollm2_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent),
                                                      gguf_file=smollm2_path.name)


def _hf_ids(hf, text):
    return hf.encode(text, add_special_tokens=False)


def _digit_split_reference(hf, text):
    """llama.cpp "smollm" semantics built from HF: isolate each digit, HF-encode the pieces."""
    return [i for piece in regex.split(r"(\p{N})", text) if piece for i in _hf_ids(hf, piece)]


# ------------------------------------------------------------------ SmolLM2: encode/decode
def test_from_gguf_is_fast(gfile):
    t0 = time.perf_counter()
    Tokenizer.from_gguf(gfile)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"from_gguf took {elapsed:.2f}s"


def test_vocab_and_special_ids(tok, hf):
    assert tok.vocab_size == len(hf) == 49152
    assert tok.bos_id == hf.bos_token_id
    assert tok.eos_id == hf.eos_token_id
    assert hf.eos_token_id in tok.eos_ids
    assert hf.convert_tokens_to_ids("<|endoftext|>") in tok.eos_ids
    assert tok.encode("<|im_start|>") == [hf.convert_tokens_to_ids("<|im_start|>")]
    assert tok.encode("<|im_end|>") == [hf.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.parametrize("text", STRINGS, ids=lambda s: repr(s)[:30])
def test_ids_match_hf(tok, hf, text):
    assert tok.encode(text) == _hf_ids(hf, text)


@pytest.mark.parametrize("text", STRINGS, ids=lambda s: repr(s)[:30])
def test_round_trip(tok, hf, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", DIGIT_EDGES, ids=repr)
def test_digits_split_as_llama_cpp(tok, hf, text):
    assert tok.encode(text) == _digit_split_reference(hf, text)
    assert tok.decode(tok.encode(text)) == text


def test_two_spaces_then_digit(tok):
    # hand-derived from SmolLM2's tokenizer.json: Digits(individual_digits) then ByteLevel
    assert [tok.id_to_token(i) for i in tok.encode("  1")] == ["ĠĠ", "1"]


def test_add_special_tokens_follows_gguf(meta, tok, hf):
    text = "Hello world"
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert tok.encode(text, add_special_tokens=True) == hf.encode(text, add_special_tokens=True)
    with_bos = Tokenizer.from_meta({**meta, "tokenizer.ggml.add_bos_token": True})
    assert with_bos.encode(text, add_special_tokens=True) == [tok.bos_id, *_hf_ids(hf, text)]
    assert with_bos.encode(text) == _hf_ids(hf, text)


# ------------------------------------------------------------------ SmolLM2: chat template
@pytest.mark.parametrize("gen", [True, False], ids=["gen", "nogen"])
@pytest.mark.parametrize("name", MESSAGES)
def test_chat_template_matches_hf(tok, hf, name, gen):
    messages = MESSAGES[name]
    want_text = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    want_ids = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True,
                                      return_dict=False)
    assert tok.render_chat(messages, add_generation_prompt=gen) == want_text
    assert tok.apply_chat_template(messages, add_generation_prompt=gen) == list(want_ids)


FEATURE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% if loop.first and tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}"
    "  {% if m.role == 'user' %}\n"
    "<|im_start|>user\n{{ m['content'] | trim }}<|im_end|>\n"
    "  {% else %}\n"
    "<|im_start|>{{ m.role }}\n{{ m['content'] }}<|im_end|>\n"
    "  {% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    "{{ extra | default('') }}{% if date %}{{ strftime_now('%Y') | length }}{% endif %}"
)


def test_template_features_match_hf(meta, hf):
    """trim_blocks/lstrip_blocks, tojson (no HTML escaping, unicode kept), tools, kwargs."""
    tools = [{"name": "get <weather>", "description": "météo & more", "params": {"x": 1}}]
    messages = MESSAGES["multi-turn"]
    kw = {"tools": tools, "extra": "EXTRA", "date": True}
    want = hf.apply_chat_template(messages, chat_template=FEATURE_TEMPLATE, tokenize=False,
                                  add_generation_prompt=True, **kw)
    t = Tokenizer.from_meta({**meta, "tokenizer.chat_template": FEATURE_TEMPLATE})
    assert t.render_chat(messages, add_generation_prompt=True, **kw) == want
    assert "<weather>" in want and "météo & more" in want


def test_template_raise_exception_is_chat_template_error(meta):
    t = Tokenizer.from_meta({**meta, "tokenizer.chat_template": FEATURE_TEMPLATE},
                            source="model.gguf")
    with pytest.raises(ChatTemplateError) as err:
        t.apply_chat_template([{"role": "robot", "content": "beep"}])
    msg = str(err.value)
    assert "unknown role robot" in msg and "model.gguf" in msg and "\n" not in msg


def test_template_syntax_error_is_chat_template_error(meta):
    t = Tokenizer.from_meta({**meta, "tokenizer.chat_template": "{% for m in messages %}"})
    with pytest.raises(ChatTemplateError, match="does not parse"):
        t.render_chat(MESSAGES["user"])


def test_empty_messages_is_chat_template_error(tok):
    with pytest.raises(ChatTemplateError, match="no messages"):
        tok.apply_chat_template([])


# ------------------------------------------------------------------ models without a template
def test_meta_without_template(meta, hf):
    bare = {k: v for k, v in meta.items() if k != "tokenizer.chat_template"}
    t = Tokenizer.from_meta(bare, source="/models/no-template.gguf")
    assert not t.has_chat_template
    with pytest.raises(ChatTemplateError) as err:
        t.apply_chat_template(MESSAGES["user"])
    msg = str(err.value)
    assert "/models/no-template.gguf" in msg and "template" in msg and "\n" not in msg
    # a registry-supplied fallback makes it work, with HF's ids for the same template
    t.set_chat_template(meta["tokenizer.chat_template"])
    assert t.apply_chat_template(MESSAGES["user"]) == list(
        hf.apply_chat_template(MESSAGES["user"], add_generation_prompt=True, return_dict=False))
    override = Tokenizer.from_meta(bare, chat_template="{{ messages[0]['content'] }}")
    assert override.render_chat(MESSAGES["user"]) == MESSAGES["user"][0]["content"]


def _write_gguf(path, tokens, types, merges, pre, template=None, arch="llama"):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if template is not None:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------------ other pre-tokenizer types
CORPUS = [
    "Hello world! It's 2024, and we'll count 1234567 items.\n\n  def f(x):\n\treturn x  # done\r\n",
    "(hello) [world] {foo} 'quoted' \"double\" 3.14159 -42 +7 don't WON'T",
    "日本語 Привет مرحبا café naïve 👨\u200d👩\u200d👧 emoji",
    "    indented\n        more\n\n\n   spaces   \t\ttabs\n \n",
    "I'M YOU'RE THEY'VE we'd she'll",
]
PRE_PROBES = CORPUS + ["(hello", "a\n\n\nb", "x  \n y", "IT'S", "123456", " 12", "<think>hi",
                       "<|im_start|>user\nhi<|im_end|>", ""]


@pytest.fixture(scope="module")
def tiny_vocab():
    """A byte-level BPE vocabulary trained with no split regex, so merges cross the regex
    boundaries of every pre type (e.g. "Ġ1", "(h", "ĊĊ"); plus control/user-defined tokens."""
    rt = RustTokenizer(models.BPE())
    rt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rt.train_from_iterator(CORPUS * 20, trainer)
    model = json.loads(rt.to_str())["model"]
    learned = sorted(model["vocab"], key=model["vocab"].get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *learned, "<think>"]
    types = [3, 3, 3, *[1] * len(learned), 4]
    return tokens, types, merges


@pytest.fixture(scope="module")
def tiny_ids(tiny_vocab, tmp_path_factory):
    """pre type -> (our ids, HF's ids) for PRE_PROBES."""
    transformers = pytest.importorskip("transformers")
    out = {}
    for pre in ("gpt2", "olmo", "qwen2", "llama-bpe"):
        d = tmp_path_factory.mktemp(pre)
        path = _write_gguf(d / "tiny.gguf", *tiny_vocab, pre=pre)
        ref = transformers.AutoTokenizer.from_pretrained(str(d), gguf_file="tiny.gguf")
        ours = Tokenizer.from_gguf(open_gguf(path))
        out[pre] = ([ours.encode(s) for s in PRE_PROBES],
                    [ref.encode(s, add_special_tokens=False) for s in PRE_PROBES])
    return out


@pytest.mark.parametrize("pre", ["gpt2", "olmo", "qwen2", "llama-bpe"])
def test_pre_types_match_hf(tiny_ids, pre):
    ours, ref = tiny_ids[pre]
    for text, a, b in zip(PRE_PROBES, ours, ref):
        assert a == b, f"pre={pre} text={text!r}"


def test_pre_types_are_distinguished(tiny_ids):
    # the probes would catch a pre type silently mapped to the GPT-2 regex
    gpt2 = tiny_ids["gpt2"][0]
    for pre in ("qwen2", "llama-bpe"):
        assert sum(a != b for a, b in zip(tiny_ids[pre][0], gpt2)) >= 3
    assert tiny_ids["qwen2"][0] != tiny_ids["llama-bpe"][0]   # \p{N} vs \p{N}{1,3}


def test_gguf_without_template_names_file(tiny_vocab, tmp_path):
    path = _write_gguf(tmp_path / "plain.gguf", *tiny_vocab, pre="gpt2")
    t = Tokenizer.from_gguf(open_gguf(path))
    assert t.encode("<|im_start|>") == [1] and t.encode("<think>") == [len(tiny_vocab[0]) - 1]
    assert t.decode(t.encode("<think>hi"), skip_special_tokens=True) == "<think>hi"
    with pytest.raises(ChatTemplateError, match="plain.gguf.*no tokenizer.chat_template"):
        t.render_chat(MESSAGES["user"])


# ------------------------------------------------------------------ SentencePiece vocabularies
SPM_CORPUS = [
    "Hello world! It's 2024, and we'll count 1234567 items.\n\n  def f(x):\n\treturn x  # done\r\n",
    "(hello) [world] {foo} 'quoted' \"double\" 3.14159 -42 +7 don't WON'T",
    "café naïve Привет мир hello hello world world the the the",
    "    indented\n        more\n\n\n   spaces   \t\ttabs\n \n",
]
# emoji and CJK are not in the trained alphabet: they go through <0xXX> byte fallback
SPM_PROBES = SPM_CORPUS + ["hello world", "emoji 🎉 and 日本", "<start_of_turn>user\nhi",
                           "<tool>x", "a    b", "the\tthe", "", "x"]


@pytest.fixture(scope="module")
def spm_files(tmp_path_factory):
    """Two SentencePiece-style GGUFs over one trained vocabulary (+ 256 byte tokens):
    "llama" (merge order from scores, with many ties; prefix space) and "gemma3" (merge order
    from file position, scores deliberately reversed; runs of spaces stored as spaces)."""
    rt = RustTokenizer(models.BPE())
    rt.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    rt.train_from_iterator(SPM_CORPUS * 20, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    model = json.loads(rt.to_str())["model"]
    learned = sorted(model["vocab"], key=model["vocab"].get)
    files = {}
    for arch, prefix in (("llama", True), ("gemma3", False)):
        tokens = ["<pad>", "<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)],
                  *learned, "<start_of_turn>", "<tool>"]
        types = [3, 2, 3, 3, *[6] * 256, *[1] * len(learned), 3, 4]
        if arch == "gemma3":
            tokens += ["  ", "   "]
            types += [4, 4]
            scores = [float(i) for i in range(len(tokens))]
        else:
            scores = [0.0] * 260 + [-float(i // 3) for i in range(len(learned))] + [0.0, 0.0]
        d = tmp_path_factory.mktemp(arch)
        w = gguf.GGUFWriter(str(d / "spm.gguf"), arch)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores(scores)
        w.add_bos_token_id(2)
        w.add_eos_token_id(3)
        w.add_unk_token_id(1)
        w.add_add_space_prefix(prefix)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        files[arch] = d / "spm.gguf"
    return files


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sentencepiece_matches_hf(spm_files, arch):
    transformers = pytest.importorskip("transformers")
    path = spm_files[arch]
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = Tokenizer.from_gguf(open_gguf(path))
    assert ours.add_bos and ours.bos_id == ref.bos_token_id
    byte_fallback = 0
    for text in SPM_PROBES:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == ref.encode(text), f"{arch}: {text!r}"
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
        byte_fallback += sum(ours.id_to_token(i).startswith("<0x") for i in ids)
        if arch == "gemma3":   # no prefix space, so text survives the round trip exactly
            assert ours.decode(ours.encode(text)) == text
    assert byte_fallback > 0


def test_sentencepiece_merge_order_matters(spm_files):
    # the same vocabulary ranked by score instead of file position must tokenize differently,
    # so the gemma test above would catch the wrong ranking
    g = open_gguf(spm_files["gemma3"])
    by_position = Tokenizer.from_gguf(g)
    by_score = Tokenizer.from_meta({**g.meta, "general.architecture": "llama"})
    assert any(by_position.encode(t) != by_score.encode(t) for t in SPM_PROBES)


def test_gemma3_real_vocabulary_matches_hf(gemma3_path, gemma3_hf_tokenizer):
    """262144-token SentencePiece vocabulary, no merges in the file, no chat template."""
    g = open_gguf(gemma3_path)
    t0 = time.perf_counter()
    ours = Tokenizer.from_gguf(g)
    build_s = time.perf_counter() - t0
    ref = gemma3_hf_tokenizer
    assert build_s < 10, f"from_gguf took {build_s:.1f}s"
    assert ours.vocab_size == len(ref)
    assert ref.convert_tokens_to_ids("<end_of_turn>") in ours.eos_ids
    for text in STRINGS + DIGIT_EDGES + ["<start_of_turn>user\nhi<end_of_turn>\n", "a     b"]:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == ref.encode(text), repr(text)
        assert ours.decode(ids[1:]) == text
    if not g.meta.get("tokenizer.chat_template"):
        with pytest.raises(ChatTemplateError, match="no tokenizer.chat_template"):
            ours.apply_chat_template(MESSAGES["user"])


# ------------------------------------------------------------------ metadata errors
@pytest.mark.parametrize("edit, needle", [
    ({"tokenizer.ggml.model": "bert"}, "tokenizer.ggml.model 'bert'"),
    ({"tokenizer.ggml.pre": "martian"}, "tokenizer.ggml.pre 'martian'"),
    ({"tokenizer.ggml.merges": None}, "merges"),
    ({"tokenizer.ggml.tokens": None}, "no tokenizer"),
    ({"tokenizer.ggml.eos_token_id": 10 ** 6}, "eos_token_id"),
    ({"tokenizer.ggml.token_type": [1, 2, 3]}, "token_type"),
], ids=["model", "pre", "merges", "tokens", "eos-range", "types-length"])
def test_metadata_problems_raise_unsupported(meta, edit, needle):
    with pytest.raises(UnsupportedModelError) as err:
        Tokenizer.from_meta({**meta, **edit}, source="bad.gguf")
    msg = str(err.value)
    assert msg.startswith("bad.gguf: ") and needle in msg and "\n" not in msg
