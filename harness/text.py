"""Deterministic prompt text: seeded pseudo-prose long enough for any prefill length.

Contract: ``prose(n_words, seed)`` returns the same English-like text for the same arguments
on every machine and Python version (``random.Random`` with an int seed, ``choice`` only);
``prompt_tokens(tokenizer, n, seed)`` wraps it in the model's chat template (a user turn
asking for a summary; plain encoding when the model has no template) and returns exactly
``n`` token ids. Nothing here is fetched or read from disk.

    ids = prompt_tokens(eng.tokenizer, 6169, seed=0)
    assert len(ids) == 6169
"""
from __future__ import annotations

import random

from engine.errors import ChatTemplateError

_SUBJECTS = ["the engineer", "a small team", "the night shift", "our planner", "the river pilot",
             "the old librarian", "a curious student", "the harbour master", "the survey crew",
             "the baker on the corner", "the orchestra", "a travelling merchant", "the gardener",
             "the weather station", "the ferry captain", "the committee", "the lighthouse keeper"]
_VERBS = ["measured", "described", "repaired", "counted", "painted", "questioned", "carried",
          "recorded", "compared", "followed", "mapped", "collected", "tested", "explained",
          "rebuilt", "studied", "packed", "watched"]
_OBJECTS = ["the northern bridge", "seven copper kettles", "a map of the valley", "the morning tide",
            "forty crates of apples", "the broken clock", "a letter from the capital",
            "the new railway line", "the price of bread", "the winter stores", "a flock of geese",
            "the school roof", "three wooden boats", "the village well", "the cloud patterns",
            "an old recipe for soup", "the harvest ledger", "the signal lamps"]
_WHEN = ["before dawn", "after the storm", "on Tuesday", "during the long summer", "at noon",
         "late in the evening", "every spring", "while the market was closing", "in the autumn",
         "for the third time this year", "without any help", "with great care"]
_LINKS = ["Later,", "Meanwhile,", "After that,", "Because of this,", "In the end,", "Soon,",
          "As a result,", "Nevertheless,", "At the same time,", "For a while,"]
_REASONS = ["because the roads were flooded", "so that nothing would be lost",
            "although nobody had asked", "since the numbers did not agree",
            "to prepare for the festival", "because the old notes were unclear",
            "so the children could learn", "while the others rested"]


def prose(n_words: int, seed: int = 0) -> str:
    """About ``n_words`` words of deterministic, grammatical filler prose in paragraphs."""
    rng = random.Random(seed)
    words, paras, sentences = 0, [], []
    while words < n_words:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_WHEN)}"
        if rng.choice((0, 1, 2)) == 0:
            s += f" {rng.choice(_REASONS)}"
        if sentences and rng.choice((0, 1)) == 0:
            s = f"{rng.choice(_LINKS)} {s}"
        s = s[0].upper() + s[1:] + "."
        sentences.append(s)
        words += len(s.split())
        if len(sentences) == 5:
            paras.append(" ".join(sentences))
            sentences = []
    if sentences:
        paras.append(" ".join(sentences))
    return "\n\n".join(paras)


def prompt_tokens(tokenizer, n: int, seed: int = 0) -> list[int]:
    """Exactly ``n`` ids: a chat-templated request to summarise prose (cut at n tokens)."""
    n_words = max(16, n)
    while True:
        text = ("Here are my field notes from this season. Read them carefully, then list the "
                "five most important events.\n\n" + prose(n_words, seed))
        try:
            ids = list(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                     add_generation_prompt=True))
        except ChatTemplateError:  # no chat template: plain text is still a valid long prompt
            ids = list(tokenizer.encode(text))
        if len(ids) >= n:
            return ids[:n]
        n_words *= 2
