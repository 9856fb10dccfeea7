"""The CPU engine against HF transformers loading the same real GGUF (SmolLM2-135M)."""
from __future__ import annotations

import pytest
import torch

import engine

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a wooden screw press. Within "
    "fifty years presses were running in more than two hundred European cities, and the cost "
    "of books fell so far that literacy spread beyond monasteries and universities. Printers "
    "standardised spelling, popularised vernacular languages and carried news, scientific "
    "results and religious arguments faster than any government could control. By 1600 "
    "the presses of Venice, Antwerp and London had printed tens of millions of volumes: "
    "grammars, almanacs, maps, sermons, ballads and the first newspapers.\n\ndef f(x):\n"
    "    return x ** 2 + 3 * x - 7  # a small polynomial\n"
)


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return engine.load(smollm2_path, ctx=1024)


@pytest.fixture(scope="module")
def hf_smol(smollm2_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def prompt_ids(smol):
    ids = smol.tokenizer.encode(PROMPT)
    assert len(ids) >= 128
    return ids


@pytest.mark.slow(seconds=16)
def test_logits_match_hf_transformers(smol, hf_smol, prompt_ids):
    with torch.no_grad():
        ref = hf_smol(torch.tensor([prompt_ids])).logits[0].float()
    ours = smol.logits(prompt_ids)
    assert ours.shape == ref.shape == (len(prompt_ids), smol.spec.vocab_size)
    err = (ours - ref).abs().max().item()
    print(f"SmolLM2 vs HF over {len(prompt_ids)} positions: max-abs {err:.2e}")
    assert err <= 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_prefill_then_decode_equals_teacher_forced(smol, prompt_ids):
    ids = prompt_ids[:96]
    full = smol.logits(ids)
    n0 = 40
    rows = [smol.prefill(ids[:n0])]
    rows += [smol.decode(t) for t in ids[n0:]]
    stepped = torch.stack(rows)
    err = (stepped - full[n0 - 1:]).abs().max().item()
    assert err <= 1e-4, err


def test_chunked_prefill_matches_one_pass(smol, prompt_ids):
    full = smol.logits(prompt_ids)
    chunked = smol.logits(prompt_ids, chunk=29)
    assert (full - chunked).abs().max().item() <= 1e-4


def test_logits_from_a_position_are_the_tail_of_the_whole(smol, prompt_ids, hf_smol):
    """``logits(first=N)``: rows N.. of the whole (HF's too), in one pass or chunks; the head
    never sees the rows before N."""
    with torch.no_grad():
        ref = hf_smol(torch.tensor([prompt_ids])).logits[0].float()
    full = smol.logits(prompt_ids)
    n = len(prompt_ids)
    for first, chunk in ((100, None), (100, 29), (1, 64), (n - 1, None)):
        tail = smol.logits(prompt_ids, chunk=chunk, first=first)
        assert tail.shape == (n - first, smol.spec.vocab_size)
        assert (tail - ref[first:]).abs().max().item() <= 1e-3
        assert (tail - full[first:]).abs().max().item() <= 1e-4
    rows = []
    head = smol.model.head
    smol.model.head = lambda h: (rows.append(h.shape[0]), head(h))[1]
    try:
        smol.logits(prompt_ids, chunk=29, first=100)
    finally:
        del smol.model.head
    assert sum(rows) == n - 100
    with pytest.raises(engine.errors.ConfigError, match="first"):
        smol.logits(prompt_ids, first=n)


def test_logits_do_not_depend_on_earlier_calls(smol, prompt_ids):
    a = smol.logits(prompt_ids[:50])
    smol.generate(prompt_ids[:10], 5)
    b = smol.logits(prompt_ids[:50])
    assert torch.equal(a, b)


def test_greedy_chat_answers_paris(smol):
    ids = smol.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    out = smol.generate(ids, 24)
    text = smol.tokenizer.decode(out)
    print("answer:", text)
    assert "Paris" in text


def test_generate_stops_at_eos(smol):
    ids = smol.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say only the word yes."}], add_generation_prompt=True)
    out = smol.generate(ids, 64)
    assert len(out) < 64 and out[-1] in smol.tokenizer.eos_ids
    assert smol.last_stop_reason == "eos"


def test_context_overflow_is_a_clear_error(smol):
    with pytest.raises(engine.errors.ContextOverflowError, match="ctx"):
        smol.logits(list(range(2000)))


def test_rewind_and_decode_greedy_continue_generate_from_a_depth():
    """What the throughput check's tg<N>@d<D> runs: decode_greedy after a prefill gives
    generate's greedy tokens; rewinding to the depth and decoding again gives them again (rows
    rewritten before they are read); a sliding-window ring refuses to rewind back, naming why."""
    from engine import synth
    from engine.errors import ConfigError
    from engine.kv_ring import RingKV
    eng = engine.load(synth.ensure("tiny-qwen3"), kv_dtype="q8_0", ctx=128)
    prompt = list(range(5, 45))
    want = eng.generate(prompt, 7, stop_at_eos=False)
    first = int(eng.prefill(prompt).argmax())
    assert first == want[0]
    assert eng.decode_greedy(first, 6) == want[1:]
    eng.rewind(len(prompt))
    assert eng.decode_greedy(first, 6) == want[1:] and eng.pos == len(prompt) + 6
    with pytest.raises(ConfigError, match="outside the sequence"):
        eng.rewind(eng.pos + 1)
    ring = engine.load(synth.ensure("tiny-gemma3"), ctx=1024)
    assert any(isinstance(c, RingKV) for c in ring.caches)
    ring.prefill(prompt)
    ring.rewind(len(prompt))                       # nothing forgotten: allowed
    with pytest.raises(ConfigError, match="sliding-window ring"):
        ring.rewind(10)
    assert ring.pos == len(prompt)
