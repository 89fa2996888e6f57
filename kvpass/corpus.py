"""Training text for gates, made locally from seeds: no download, nothing shared with the evaluation.

- ``documentation``: running text of the CPython documentation (``pydoc_data``).
- ``lockers``: a chat in which facts ("the teal locker of Mira holds 482193-Q") are scattered in
  documentation text, then a question about one of them and its answer. Its templates, names and
  number formats differ from every evaluation task (:mod:`kvpass.tasks`), and its seeds have their
  own namespace.

Each sample is ``(ids, answer)``: the token ids and how many of the last ones are an answer that
needs a distant fact (0 for plain text), so training can weigh those positions more.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from kvpass.tasks import _haystack, _plant

COLOURS = ("teal", "amber", "crimson", "olive", "violet", "silver", "indigo", "coral")
NAMES = ("Mira", "Tobias", "Ines", "Kofi", "Anouk", "Ravi", "Lena", "Oskar", "Yara", "Emeka", "Sora", "Pavel")


def documentation(tokenizer, tokens: int, rng: random.Random) -> tuple[list[int], int]:
    """``tokens`` token ids of documentation text from a random start."""
    ids = tokenizer(" ".join(_haystack(rng, tokens // 12)), add_special_tokens=False).input_ids
    return ids[:tokens], 0


def lockers(tokenizer, tokens: int, rng: random.Random) -> tuple[list[int], int]:
    """A chat of at most ``tokens`` token ids: facts in documentation text, a question, its answer."""
    keys = rng.sample([(c, n) for c in COLOURS for n in NAMES], 4)
    codes = [f"{rng.randint(100000, 999999)}-{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}" for _ in keys]
    facts = [f"Remember: the {c} locker of {n} holds {code}." for (c, n), code in zip(keys, codes, strict=True)]
    c, n = keys[asked := rng.randrange(len(keys))]
    question = f"What does the {c} locker of {n} hold?"
    units = max(4, tokens // 30)
    while True:
        context = _plant(rng, _haystack(rng, units), facts)
        chat = [
            {"role": "user", "content": f"{context}\n\n{question}"},
            {"role": "assistant", "content": f"The {c} locker of {n} holds {codes[asked]}."},
        ]
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) <= tokens or units == 4:
            answer = len(tokenizer(text[text.rindex(codes[asked]) :], add_special_tokens=False).input_ids)
            return ids[-tokens:], answer
        units = max(4, int(units * tokens / len(ids)) - 1)


def samples(tokenizer, tokens: int, seed: int = 0) -> Iterator[tuple[list[int], int]]:
    """Endless training sequences, alternating documentation and lockers, reproducible from ``seed``."""
    for i in range(1 << 62):
        rng = random.Random(f"gate-train/{seed}/{i}")
        yield (lockers if i % 2 else documentation)(tokenizer, tokens, rng)
